"""The panel's banner: the notebooks' box (views/banner.py) in the panel's words, for a model whose pictures are
not real Stable Diffusion's. The toy world says what it can draw; random weights say their pictures are noise."""

from __future__ import annotations

from ..presets import Preset
from ..views.banner import Banner, has_random_weights, is_toy_world

TOY_EXAMPLE = "a red circle on a blue background"


def panel_banner(preset: Preset) -> Banner | None:
    """The box above the panel for ``preset``; ``None`` for real Stable Diffusion (or a folder of one's own)."""
    if is_toy_world(preset) or preset.name.startswith("toy"):
        return Banner(
            f"The toy world ({preset.name!r}):",
            "a miniature Stable Diffusion and CLIP trained on 64 px pictures of one coloured shape on a plain "
            f"background, shipped with the package. Try the method \u201cwords only\u201d with the prompt "
            f"\u201c{TOY_EXAMPLE}\u201d, or an image of such a shape. It knows nothing else; real pictures "
            "need 'sd14' (about 7 GB, a GPU).",
        )
    if preset.offline_builder and has_random_weights(preset):
        return Banner(
            f"Random weights ({preset.name!r}):",
            "every picture is noise: this model is built here for tests, to show the tensors and the plumbing. "
            "Choose 'toy' (trained, offline) for pictures that mean something without a download.",
        )
    return None
