"""The toy world: a miniature Stable Diffusion and CLIP trained on coloured shapes, shipped with the package.

Offline, the ``tiny`` presets can only show that tensors have the right shapes: their weights are
random. The ``toy`` preset's weights were trained (``scripts/train_toy.py``, minutes on two CPU
cores) on a world simple enough to learn that fast, so an image prompt visibly *does* something and
the methods can be compared by numbers. ``world`` draws the pictures, ``judge`` reads them back,
``measure`` makes the tables, ``train`` made the weights.

This module only names where the weights are; it imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

#: The shipped weights: ``sd`` (a StableDiffusionPipeline folder), ``clip`` (a CLIPModel folder) and
#: ``training.json`` (how they were made); ``ip_adapter`` only where train.py's adapter stage was switched on
#: (off by default: the shipped weights have none).
WEIGHTS = Path(__file__).resolve().parent / "weights"
SD_FOLDER = WEIGHTS / "sd"
CLIP_FOLDER = WEIGHTS / "clip"
ADAPTER_FOLDER = WEIGHTS / "ip_adapter"
