"""Exception types for errors a user can cause.

Every error that bad input can trigger derives from :class:`CdpruneError` and from the
builtin a caller would expect (``ValueError``), so ``except ValueError`` keeps working and
the CLI can turn any of them into one line on stderr.
"""

from __future__ import annotations

__all__ = ["CdpruneError", "ConfigError", "CheckpointError", "DataError", "UnsupportedModelError"]


class CdpruneError(Exception):
    """Base class of all errors raised for bad input."""


class ConfigError(CdpruneError, ValueError):
    """An argument or configuration value is invalid."""


class CheckpointError(CdpruneError, ValueError):
    """A weights, statistics or plan file cannot be used (corrupt, unsafe or mismatched)."""


class DataError(CdpruneError, ValueError):
    """A dataset is missing, incomplete or does not fit the model."""


class UnsupportedModelError(CdpruneError, ValueError):
    """A layer pattern of the model cannot be pruned exactly; the message names the layers.

    Passing those layers as ``ignored_layers`` leaves them whole and prunes the rest.
    """
