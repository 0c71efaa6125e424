"""Depth maps for ``structure="depth"``: a transformers depth estimator, run as transformers' own pipeline runs it.

The map a depth ControlNet reads is relative depth scaled to 0..255 (near = bright), exactly what
``transformers.pipeline("depth-estimation")(image)["depth"]`` returns: the estimator's prediction resized
(bicubic) to the picture's size, then stretched from its minimum to its maximum. The default estimator is
Depth Anything V2 Small (about 100 MB, Apache-2.0); any ``AutoModelForDepthEstimation`` checkpoint works.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..encoding import fingerprint
from ..loading.cache import StatusCallback, check_local_folder, translate_load_errors
from ..loading.quiet import quiet_loaders

#: Depth maps kept per estimator (the panel previews the same picture while other controls move).
DEPTH_CACHE_SIZE = 8


@dataclass
class DepthEstimator:
    """A loaded depth estimator and its image processor; :meth:`depth_map` is the map a depth ControlNet reads."""

    model: Any  # transformers AutoModelForDepthEstimation
    processor: Any  # its image processor (DPT's for Depth Anything)
    source: str  # the model's name, for messages and provenance
    _maps: OrderedDict[str, Any] = field(default_factory=OrderedDict, repr=False)

    def predicted_depth(self, image: Any) -> torch.Tensor:
        """The estimator's relative depth ``[H, W]`` (float32, CPU) at the picture's own size."""
        inputs = self.processor(images=image, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        with torch.inference_mode():
            outputs = self.model(pixel_values=pixel_values)
        (result,) = self.processor.post_process_depth_estimation(outputs, target_sizes=[(image.height, image.width)])
        return result["predicted_depth"].detach().float().cpu()

    def depth_map(self, image: Any) -> Any:
        """The picture's depth map as a grayscale PIL image of its size: transformers' depth-estimation pipeline's
        ``"depth"`` output (min-max stretched to 0..255; a flat prediction gives black). Cached per picture."""
        from PIL import Image

        key = fingerprint(image)
        if key in self._maps:
            self._maps.move_to_end(key)
            return self._maps[key]
        depth = self.predicted_depth(image).numpy()
        span = float(depth.max() - depth.min())
        normalised = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
        depth_map = Image.fromarray((normalised * 255).astype("uint8"))
        self._maps[key] = depth_map
        while len(self._maps) > DEPTH_CACHE_SIZE:
            self._maps.popitem(last=False)
        return depth_map


def load_depth_estimator(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    allow_pickle: bool = False,
    on_status: StatusCallback | None = None,
) -> DepthEstimator:
    """A transformers depth estimator from a Hub id or folder (``"tiny"``: the offline twin), on ``device``."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from ..loading.offline import ensure_tiny_depth_estimator

    say = on_status or (lambda message: None)
    path = model
    if model == "tiny":
        say("Building the tiny depth estimator (first use only)…")
        path = ensure_tiny_depth_estimator()
    check_local_folder(path, model, "config.json", "a depth estimator (transformers format)")
    say(f"Loading the depth estimator {model!r} onto {device}…")
    with translate_load_errors(model, allow_pickle), quiet_loaders():
        estimator = AutoModelForDepthEstimation.from_pretrained(
            path, dtype=dtype, use_safetensors=None if allow_pickle else True
        )
        processor = AutoImageProcessor.from_pretrained(path)
    return DepthEstimator(estimator.to(device).eval(), processor, model)
