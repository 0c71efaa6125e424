"""Optional dependencies: imported where a feature needs them, with one sentence naming the extra when missing.

The plain install is the panel and the engine; ``[batch]`` adds Hugging Face ``accelerate`` (several
processes), ``datasets`` (dataset inputs) and ``pyarrow`` (Parquet files); ``[plot]`` adds matplotlib;
``[umap]`` adds UMAP for the dataset view.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ValueError):
    """A feature needs a package that is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or a :class:`MissingExtraError` saying which extra to install for ``purpose``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{purpose} needs the {module.split('.')[0]} package: pip install 'imageprompt_widgets[{extra}]'."
        ) from None


def available(module: str) -> bool:
    """Whether ``module`` can be imported (for features that fall back quietly, such as UMAP → PCA)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
