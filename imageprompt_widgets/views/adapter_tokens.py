"""The IP-Adapter's tokens, seen like the prompt's: a heatmap of what its cross-attention reads, and for a Plus
adapter where each of the resampler's query tokens looked in the picture.

A plain IP-Adapter projects one embedding to 4 tokens; a Plus adapter's resampler sends 16 learned queries
over the encoder's patch tokens and keeps what they gather. The heatmap shows those tokens (one row each);
the small maps show, per query, the last resampler layer's attention over the patch grid (brighter = more),
over the picture CLIP saw. Pure: numbers in (``pipe.adapter_tokens(result)`` computes them), a matplotlib
figure out, like every view (:mod:`.base`).

```python
tokens = pipe.adapter_tokens(result)           # AdapterTokens: .tokens [16, D], .attention [16, 257]
view = views.adapter_tokens.adapter_tokens_view(tokens, seen=picture)
view.attention_maps.shape                      # [16, 16, 16]: per query, its attention over the patch grid
view                                           # shown inline in a notebook (PNG)
```
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .base import FigureView, new_figure, patch_grid_side, show_image


def attention_grids(attention: torch.Tensor) -> torch.Tensor:
    """``[Q, T]`` attention over CLS + ``g²`` patch tokens → ``[Q, g, g]`` over the patch grid (CLS dropped), each
    map divided by its own maximum so that where a query looks shows even when it looks mostly at the queries."""
    if attention.ndim != 2:
        raise ValueError(f"attention must be [queries, tokens], got shape {tuple(attention.shape)}.")
    side = patch_grid_side(attention.shape[1])
    grids = attention[:, 1:].float().reshape(-1, side, side)
    return grids / grids.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]


@dataclass
class AdapterTokensView(FigureView):
    """One adapter's tokens ``[N, D]`` as a heatmap, and its queries' attention maps ``[Q, g, g]`` (Plus only)."""

    name: str
    tokens: torch.Tensor  # [N, D]
    attention_maps: torch.Tensor | None = None  # [Q, g, g] in 0..1
    seen: Image.Image | None = None  # the picture CLIP saw, under the attention maps

    @property
    def distinct_tokens(self) -> int:
        """How many different token rows (a plain adapter's 4 tokens, a Plus adapter's 16)."""
        return int(torch.unique(self.tokens, dim=0).shape[0])

    def describe(self) -> str:
        count, width = self.tokens.shape
        text = f"{self.name}: {count} tokens x {width} dims, {self.distinct_tokens} distinct"
        if self.attention_maps is not None:
            side = self.attention_maps.shape[-1]
            text += f"; {self.attention_maps.shape[0]} resampler queries over a {side}x{side} patch grid"
        return text

    def figure(self) -> Any:
        count, width = self.tokens.shape
        maps = self.attention_maps
        columns = math.ceil(math.sqrt(len(maps))) if maps is not None else 0
        rows = math.ceil(len(maps) / columns) if maps is not None else 0
        figure = new_figure(5.0 + 0.9 * columns, max(3.2, 0.9 * rows + 0.8))
        grid = figure.add_gridspec(max(rows, 1), 1 + columns, width_ratios=[5.0] + [0.9] * columns)
        ax = figure.add_subplot(grid[:, 0])
        values = self.tokens.float().numpy()
        bound = float(abs(values).max()) or 1.0
        heat = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
        ax.set_xlabel(f"embedding dimension (0 to {width - 1})")
        ax.set_ylabel(f"adapter token (0 to {count - 1})")
        ax.set_title(f"{self.name}: {count} tokens x {width} dims, {self.distinct_tokens} distinct", fontsize=10)
        figure.colorbar(heat, ax=ax, label="value", shrink=0.9)
        if maps is None:
            return figure
        for query, attention in enumerate(maps.float().numpy()):
            cell = figure.add_subplot(grid[query // columns, 1 + query % columns])
            if self.seen is not None:
                show_image(cell, self.seen.convert("RGB"))
                extent = (-0.5, self.seen.width - 0.5, self.seen.height - 0.5, -0.5)
                cell.imshow(attention, cmap="magma", vmin=0, vmax=1, alpha=0.6, extent=extent, interpolation="nearest")
            else:
                cell.imshow(attention, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
                cell.set_xticks([])
                cell.set_yticks([])
            cell.set_title(f"query {query}", fontsize=7)
        figure.suptitle("Right: where each resampler query looked (last layer; each map scaled to its own maximum, "
                        "bright = most)", fontsize=8)
        return figure


def adapter_tokens_view(tokens: Any, seen: Image.Image | None = None) -> AdapterTokensView:
    """The view of an :class:`~imageprompt_widgets.methods.ip_adapter.AdapterTokens` (the first picture's queries
    when the adapter saw several)."""
    maps = None
    if tokens.attention is not None:
        maps = attention_grids(tokens.attention[: tokens.queries])
    return AdapterTokensView(tokens.name, tokens.tokens.detach().float().cpu(), maps, seen)
