"""The notebook panel: ``display(ImagePromptWidget())``. The only part of the package that imports ipywidgets."""

from ..engine.runners import InlineRunner, ThreadRunner
from .panel import ImagePromptWidget

__all__ = ["ImagePromptWidget", "InlineRunner", "ThreadRunner"]
