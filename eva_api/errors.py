"""User-facing errors: each carries a one-line message that says what is wrong and where.

The CLI prints ``error: <message>`` for these and exits with status 2, without a traceback.
"""


class EvaError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class ConfigError(EvaError):
    """An unknown recipe, an unknown config key or a value of the wrong type."""


class DataError(EvaError):
    """A missing data path, a malformed folder, an unreadable or too large image, an unreachable download."""


class CheckpointError(EvaError):
    """A missing, truncated or incompatible checkpoint file."""


class TrainingError(EvaError):
    """Training cannot go on (e.g. the loss became NaN)."""
