"""The IP-Adapter's tokens, seen like the prompt's: a heatmap of what its cross-attention reads, and for a Plus
adapter where each of the resampler's query tokens looked in the picture.

A plain IP-Adapter projects one embedding to 4 tokens; a Plus adapter's resampler sends 16 learned queries
over the encoder's patch tokens and keeps what they gather. The heatmap shows those tokens (one row each);
the small maps show, per query, the last resampler layer's attention over the patch grid (brighter = more),
over the picture CLIP saw. Pure: numbers in (``pipe.adapter_tokens(result)`` computes them), a picture out;
Pillow and numpy only, so it stands apart from the other views.

```python
tokens = pipe.adapter_tokens(result)           # AdapterTokens: .tokens [16, D], .attention [16, 257]
view = views.adapter_tokens.adapter_tokens_view(tokens, seen=picture)
view.attention_maps.shape                      # [16, 16, 16]: per query, its attention over the patch grid
view                                           # shown inline in a notebook (PNG)
```
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

#: Side of each query's attention map in the picture, in pixels.
MAP_SIDE = 64
#: Width the token heatmap is stretched to (whole pixels per value).
HEATMAP_WIDTH = 256


def attention_grids(attention: torch.Tensor) -> torch.Tensor:
    """``[Q, T]`` attention over CLS + ``g²`` patch tokens → ``[Q, g, g]`` over the patch grid (CLS dropped), each
    map divided by its own maximum so that where a query looks shows even when it looks mostly at the queries."""
    if attention.ndim != 2:
        raise ValueError(f"attention must be [queries, tokens], got shape {tuple(attention.shape)}.")
    patches = attention.shape[1] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} patch tokens do not form a square grid (expected CLS + g² tokens).")
    grids = attention[:, 1:].float().reshape(-1, side, side)
    return grids / grids.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]


@dataclass
class AdapterTokensView:
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

    def render(self) -> Image.Image:
        count, width = self.tokens.shape
        scale_x, scale_y = max(1, HEATMAP_WIDTH // width), max(1, 160 // count)
        heat = _diverging(self.tokens.float().numpy()).resize((width * scale_x, count * scale_y), Image.Resampling.NEAREST)
        parts = [_titled(heat, f"{self.name}: {count} tokens (rows) x {width} dims")]
        if self.attention_maps is not None:
            parts.append(_titled(self._attention_mosaic(), "where each query looked (last resampler layer)"))
        return _side_by_side(parts)

    def _attention_mosaic(self) -> Image.Image:
        assert self.attention_maps is not None
        maps = self.attention_maps.float().numpy()
        columns = math.ceil(math.sqrt(len(maps)))
        rows = math.ceil(len(maps) / columns)
        mosaic = Image.new("RGB", (columns * (MAP_SIDE + 2), rows * (MAP_SIDE + 2)), "white")
        under = self.seen.convert("RGB").resize((MAP_SIDE, MAP_SIDE), Image.Resampling.BICUBIC) if self.seen else None
        for query, grid in enumerate(maps):
            tile = _sequential(grid).resize((MAP_SIDE, MAP_SIDE), Image.Resampling.NEAREST)
            if under is not None:
                tile = Image.blend(under, tile, 0.6)
            ImageDraw.Draw(tile).text((2, 1), str(query), fill=(255, 255, 255))
            mosaic.paste(tile, ((query % columns) * (MAP_SIDE + 2), (query // columns) * (MAP_SIDE + 2)))
        return mosaic

    def to_png(self) -> bytes:
        buffer = io.BytesIO()
        self.render().save(buffer, format="PNG")
        return buffer.getvalue()

    def _repr_png_(self) -> bytes:
        return self.to_png()


def adapter_tokens_view(tokens: Any, seen: Image.Image | None = None) -> AdapterTokensView:
    """The view of an :class:`~imageprompt_widgets.methods.ip_adapter.AdapterTokens` (the first picture's queries
    when the adapter saw several)."""
    maps = None
    if tokens.attention is not None:
        maps = attention_grids(tokens.attention[: tokens.queries])
    return AdapterTokensView(tokens.name, tokens.tokens.detach().float().cpu(), maps, seen)


def _diverging(values: np.ndarray) -> Image.Image:
    """Blue (negative) – white – red (positive), symmetric around zero."""
    limit = float(np.abs(values).max()) or 1.0
    t = np.clip(values / limit, -1.0, 1.0)[..., None]
    white, red, blue = np.array([255.0, 255, 255]), np.array([178.0, 24, 43]), np.array([33.0, 102, 172])
    rgb = np.where(t >= 0, white + t * (red - white), white - t * (blue - white))
    return Image.fromarray(rgb.round().astype(np.uint8))


def _sequential(values: np.ndarray) -> Image.Image:
    """Dark purple (0) to yellow (1): the usual reading of "more attention"."""
    t = np.clip(values, 0.0, 1.0)[..., None]
    low, high = np.array([48.0, 18, 59]), np.array([250.0, 230, 80])
    return Image.fromarray((low + t * (high - low)).round().astype(np.uint8))


def _titled(image: Image.Image, title: str) -> Image.Image:
    canvas = Image.new("RGB", (max(image.width, 6 * len(title) + 8), image.height + 18), "white")
    ImageDraw.Draw(canvas).text((2, 2), title, fill=(20, 20, 20))
    canvas.paste(image, (0, 18))
    return canvas


def _side_by_side(images: list[Image.Image], gap: int = 16) -> Image.Image:
    canvas = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images)),
                       "white")
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width + gap
    return canvas
