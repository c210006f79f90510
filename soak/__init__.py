"""Soak and fault-injection suite (issue 5): ``python -m soak`` or ``make soak``."""
