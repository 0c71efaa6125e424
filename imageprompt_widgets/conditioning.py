"""Image embeddings → prompt embeddings: pure tensor functions, one per mode.

Stable Diffusion's UNet cross-attends to a ``[batch, tokens, dim]`` sequence that normally comes
from its text encoder. Each mode here builds that sequence from CLIP image embeddings instead.
They are pure functions of tensors so that each one can be tested against a hand computation.
"""

from __future__ import annotations

import torch

#: Length of a Stable Diffusion 1.x text prompt in tokens.
PROMPT_TOKENS = 77


def repeat_tokens(image_embeds: torch.Tensor, scale: float = 1.0, num_tokens: int = PROMPT_TOKENS) -> torch.Tensor:
    """The original guide's method: ``scale * image_embeds`` repeated to the shape of a text prompt.

    ``[N, D] -> [N, num_tokens, D]``. Cross-attention keys carry no position, so this is the same
    conditioning as one token; it only looks like a prompt.
    """
    if image_embeds.ndim != 2:
        raise ValueError(f"image_embeds must be [N, D], got shape {tuple(image_embeds.shape)}")
    return scale * image_embeds[:, None, :].repeat(1, num_tokens, 1)


def average(embeds: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean over the first axis, keeping it: ``[N, ...] -> [1, ...]``; weights are normalised."""
    if weights is None:
        return embeds.mean(dim=0, keepdim=True)
    weights = weights.to(embeds.dtype).to(embeds.device)
    shape = (-1,) + (1,) * (embeds.ndim - 1)
    return (embeds * weights.reshape(shape)).sum(dim=0, keepdim=True) / weights.sum()
