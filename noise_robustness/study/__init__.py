"""A study: its members, its folder (identity, results, resume), how it runs, and its report."""
