"""User-facing errors: each message names the file, key or value at fault and what to do.

Entry points catch :class:`CacoError` and print its message alone (no traceback).
"""


class CacoError(Exception):
    """Base of every error whose message is meant for the user as it stands."""


class ConfigError(CacoError, ValueError):
    """A configuration value that cannot work (names the key)."""


class DataError(CacoError, FileNotFoundError):
    """A dataset that is missing, unreadable or empty (names the path)."""


class TrainingDiverged(CacoError, RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""
