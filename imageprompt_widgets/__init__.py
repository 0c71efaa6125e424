"""imageprompt_widgets: an image as the prompt of Stable Diffusion, in a notebook.

``display(ImagePromptWidget())`` gives the panel; :class:`ImagePromptPipeline` is the headless engine.
Names are imported lazily so that ``import imageprompt_widgets`` stays cheap and never pulls in
ipywidgets unless the widget is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_LAZY = {
    "ImagePromptPipeline": "engine.pipeline",
    "ImageEmbedding": "engine.pipeline",
    "StepInfo": "engine.pipeline",
    "generate": "engine.pipeline",
    "GenerationResult": "engine.results",
    "Trace": "engine.results",
    "SaveError": "engine.results",
    "GenerationSettings": "settings",
    "ControlUnit": "settings",
    "SettingsError": "settings",
    "load_image": "images",
    "load_images": "images",
    "ImageInputError": "images",
    "PRESETS": "presets",
    "Preset": "presets",
    "ModelLoadError": "loading.cache",
    "clear_cache": "loading.cache",
    "ImagePromptWidget": "widget",
}

__all__ = [
    "PRESETS",
    "ControlUnit",
    "GenerationResult",
    "GenerationSettings",
    "ImageEmbedding",
    "ImageInputError",
    "ImagePromptPipeline",
    "ImagePromptWidget",
    "ModelLoadError",
    "Preset",
    "SaveError",
    "SettingsError",
    "StepInfo",
    "Trace",
    "__version__",
    "clear_cache",
    "generate",
    "load_image",
    "load_images",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'imageprompt_widgets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .engine.pipeline import ImageEmbedding, ImagePromptPipeline, StepInfo, generate
    from .engine.results import GenerationResult, SaveError, Trace
    from .images import ImageInputError, load_image, load_images
    from .loading.cache import ModelLoadError, clear_cache
    from .presets import PRESETS, Preset
    from .settings import ControlUnit, GenerationSettings, SettingsError
    from .widget import ImagePromptWidget
