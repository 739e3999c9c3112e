"""The version of fixres: one place, read by the package, the CLI and every export's metadata."""

__version__ = "0.1.0"
