"""User-facing errors.

Everything a user can get wrong (a config field, a checkpoint tensor, a prompt that does not fit)
raises a subclass of :class:`LatentAttnError`. The CLI turns these into one line on stderr and
exit status 2; anything else is a bug and keeps its traceback.
"""


class LatentAttnError(ValueError):
    """Base class for errors caused by user input rather than by a bug in latentattn."""


class ConfigError(LatentAttnError):
    """A config field is missing, has the wrong type, or breaks a rule."""


class CheckpointError(LatentAttnError):
    """A checkpoint directory is missing a file or tensor, has an extra one, or a wrong shape."""


class CacheOverflowError(LatentAttnError):
    """A write would go past the capacity the cache was allocated with."""
