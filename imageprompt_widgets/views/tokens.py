"""The prompt as the UNet receives it, token by token, and the vision tower's patch tokens on their grid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import FigureView, InspectError, new_figure, patch_grid_side, show_image
from .clip import clip_input_images
from .norms import token_norms


def patch_norms(hidden_states: torch.Tensor) -> torch.Tensor:
    """Norms of the vision tower's patch tokens on their grid: ``[T, Dv] -> [g, g]`` (CLS token dropped)."""
    if hidden_states.ndim != 2:
        raise InspectError(f"hidden_states must be [T, Dv] for one image, got {tuple(hidden_states.shape)}.")
    side = patch_grid_side(hidden_states.shape[0])
    return token_norms(hidden_states[1:]).reshape(side, side)


@dataclass
class TokenView(FigureView):
    """The ``[tokens × dims]`` prompt embeddings as a heatmap, and per-patch norms over CLIP's picture."""

    prompt_embeds: torch.Tensor  # [L, D]
    patch_norms: torch.Tensor | None  # [g, g]
    seen: Any = None  # what CLIP saw (a PIL image), under the patch norms

    @property
    def distinct_tokens(self) -> int:
        """How many different rows: 1 for ``repeat`` (77 copies of one vector)."""
        return int(torch.unique(self.prompt_embeds, dim=0).shape[0])

    def describe(self) -> str:
        tokens, dims = self.prompt_embeds.shape
        return f"{tokens} prompt tokens x {dims} dims, {self.distinct_tokens} distinct rows."

    def figure(self) -> Any:
        tokens, dims = self.prompt_embeds.shape
        panels = 2 if self.patch_norms is not None else 1
        figure = new_figure(5.2 + 4.0 * (panels - 1), 4.2)
        axes = figure.subplots(1, panels, squeeze=False, width_ratios=[1.5, 1][:panels])[0]
        values = self.prompt_embeds.numpy()
        bound = float(abs(values).max()) or 1.0
        heat = axes[0].imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
        axes[0].set_xlabel(f"embedding dimension (0 to {dims - 1})")
        axes[0].set_ylabel(f"token position (0 to {tokens - 1})")
        distinct = self.distinct_tokens
        axes[0].set_title(f"Prompt fed to the UNet: {tokens} tokens x {dims} dims,\n"
                          f"{distinct} distinct" + (" (every row the same vector)" if distinct == 1 else ""),
                          fontsize=10)
        figure.colorbar(heat, ax=axes[0], label="value", shrink=0.9)
        if self.patch_norms is not None:
            ax = axes[1]
            side = self.patch_norms.shape[0]
            if self.seen is not None:
                show_image(ax, self.seen)
                extent = (-0.5, self.seen.width - 0.5, self.seen.height - 0.5, -0.5)
                overlay = ax.imshow(self.patch_norms.numpy(), cmap="magma", alpha=0.6, extent=extent,
                                    interpolation="nearest")
            else:
                overlay = ax.imshow(self.patch_norms.numpy(), cmap="magma", interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
            ax.set_title(f"Patch-token norms ({side}x{side} grid)\nover what CLIP saw", fontsize=10)
            figure.colorbar(overlay, ax=ax, label="patch token norm", shrink=0.9)
        return figure


def token_view(trace: Any, index: int = 0, image_processor: Any = None) -> TokenView:
    """Prompt-embedding heatmap of output ``index``, patch norms of the first input image."""
    seen = clip_input_images(trace.pixel_values[:1], image_processor)[0] if image_processor is not None else None
    try:
        norms = patch_norms(trace.hidden_states[0])
    except InspectError:
        norms = None
    return TokenView(trace.prompt_embeds[index].detach().float().cpu(), norms, seen)
