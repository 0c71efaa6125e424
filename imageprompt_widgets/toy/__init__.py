"""The toy world: a miniature Stable Diffusion and CLIP trained on coloured shapes, shipped with the package.

Offline, the ``tiny`` presets can only show that tensors have the right shapes: their weights are
random. The ``toy`` preset's weights were trained (``scripts/train_toy.py``, minutes on two CPU
cores) on a world simple enough to learn that fast, so an image prompt visibly *does* something and
the methods can be compared by numbers. ``world`` draws the pictures, ``judge`` reads them back,
``measure`` makes the tables, ``train`` made the weights.

This module only names where the weights are (the presets' table holds the folders); it imports nothing heavy.
"""

from __future__ import annotations

from ..presets import TOY_ADAPTER_FOLDER as ADAPTER_FOLDER
from ..presets import TOY_CLIP_FOLDER as CLIP_FOLDER
from ..presets import TOY_FINE_FOLDER as FINE_FOLDER
from ..presets import TOY_PROJECTOR_FOLDER as PROJECTOR_FOLDER
from ..presets import TOY_SD_FOLDER as SD_FOLDER
from ..presets import TOY_VARIATIONS_FOLDER as VARIATIONS_FOLDER
from ..presets import TOY_WEIGHTS as WEIGHTS

#: The shipped weights: ``sd`` (a StableDiffusionPipeline folder), ``clip`` (a CLIPModel folder, with the world's
#: captions for the zero-shot caption route), the image-prompt stages' ``ip_adapter`` (the plain and Plus
#: adapters in h94's layout), ``variations`` (a StableDiffusionImageVariationPipeline folder) and ``projector``,
#: ``fine`` (the 16 × 16 base of the ``toy-fine`` preset), and ``training.json`` (how they were made).

__all__ = ["ADAPTER_FOLDER", "CLIP_FOLDER", "FINE_FOLDER", "PROJECTOR_FOLDER", "SD_FOLDER", "VARIATIONS_FOLDER", "WEIGHTS"]
