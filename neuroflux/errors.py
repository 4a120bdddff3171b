"""Project-wide error type for mistakes a user can fix.

CLIs print these as one clear message and exit 2, never with a traceback.
Anything else reaching a CLI is a bug and keeps its traceback.
"""

__all__ = ["NeuroFluxError"]


class NeuroFluxError(ValueError):
    """Bad input the user can fix; the message says what to change."""
