"""The package version (one place: the package, export model cards and the CLI read it)."""

__version__ = "0.1.0"
