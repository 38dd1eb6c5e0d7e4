"""The ``cdprune`` command line: a thin layer that parses, calls the library and prints.

The library never imports this package.
"""

from .main import main

__all__ = ["main"]
