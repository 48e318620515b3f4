"""Randomized smoothing: the certificate (``smoothing``) and the certification of a finished study's members."""
