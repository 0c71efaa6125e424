"""The notebook panel: ``display(ImagePromptWidget())``. The only part of the package that imports ipywidgets."""

from .panel import ImagePromptWidget
from .runner import InlineRunner, ThreadRunner

__all__ = ["ImagePromptWidget", "InlineRunner", "ThreadRunner"]
