"""Pure-torch float64 reference implementations: the oracle every kernel is tested against.

Nothing outside tests/ imports these; they are written for clarity, not speed.
"""
