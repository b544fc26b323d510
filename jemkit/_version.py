"""The package version, in one place: ``jemkit.__version__`` and the version recorded in checkpoints."""

__version__ = "0.4.0"
