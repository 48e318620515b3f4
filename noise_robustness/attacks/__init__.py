"""Adversarial attacks of every member of a study at once."""
