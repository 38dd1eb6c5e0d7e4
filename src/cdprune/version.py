"""The package version, in a module of its own so packaging can read it without imports."""

__version__ = "0.1.0"
