"""Exception types for errors a user can cause.

Every error that bad input can trigger derives from :class:`CdpruneError` and from the
builtin a caller would expect (``ValueError``), so ``except ValueError`` keeps working and
the CLI can turn any of them into one line on stderr.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["CdpruneError", "ConfigError", "CheckpointError", "DataError", "UnsupportedModelError"]


# An option named in a message: ``{macs_reduction}``.
_OPTION = re.compile(r"\{([a-z][a-z0-9_]*)\}")


class CdpruneError(Exception):
    """Base class of all errors raised for bad input.

    A message names the options it speaks of as ``{field}`` placeholders
    (``"give a smaller {macs_target}"``): ``str(error)`` reads them as the field names, as
    Python callers set them, and :meth:`render` lets the command line write its flags.
    """

    def __init__(self, *args: object):
        self.template = args[0] if len(args) == 1 and isinstance(args[0], str) \
            and _OPTION.search(args[0]) else None
        if self.template is not None:
            args = (self.render(lambda key: key),)
        super().__init__(*args)

    def render(self, name: Callable[[str], str]) -> str:
        """The message with every ``{field}`` written as ``name(field)``."""
        if self.template is None:
            return str(self)
        return _OPTION.sub(lambda m: name(m.group(1)), self.template)


class ConfigError(CdpruneError, ValueError):
    """An argument or configuration value is invalid."""


class CheckpointError(CdpruneError, ValueError):
    """A weights, statistics or plan file cannot be used (corrupt, unsafe or mismatched)."""


class DataError(CdpruneError, ValueError):
    """A dataset is missing, incomplete or does not fit the model."""


class MissingFileError(CdpruneError, FileNotFoundError):
    """A file or directory given does not exist or does not hold what it should.

    Still a ``FileNotFoundError``, so callers that catch that keep working; unlike the
    builtin it may name options as ``{field}``.
    """


class UnsupportedModelError(CdpruneError, ValueError):
    """A layer pattern of the model cannot be pruned exactly; the message names the layers.

    Passing those layers as ``ignored_layers`` leaves them whole and prunes the rest.
    """
