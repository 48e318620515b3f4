"""A study as plain values: what each option is to it (one spec), its members, its folder and its report."""
