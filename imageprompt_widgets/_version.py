"""The package's one version number: pyproject.toml reads it (hatch), ``imageprompt_widgets.__version__`` re-exports it."""

__version__ = "0.1.0"
