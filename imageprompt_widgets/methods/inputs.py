"""What a method's builder receives: narrow inputs, never the pipeline.

A builder sees the images' embeddings, the settings, SD's text side (three functions) and the parts its
method loaded; it cannot reach into the pipeline's state, so it can be read and tested on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..encoding import ImageEmbedding
from ..settings import GenerationSettings


@dataclass(frozen=True)
class TextSide:
    """SD's own text encoder, as builders may use it (each raises a ``SettingsError`` on a model without one)."""

    encode: Callable[[str], torch.Tensor]  # prompt -> [1, 77, D], exactly diffusers' prompt_embeds
    empty: Callable[[], torch.Tensor]  # encode(""): diffusers' negative when none is given
    typical_norm: Callable[[], float]  # per-token norm of ordinary prompts: the target of norm matching


@dataclass
class ConditioningInputs:
    settings: GenerationSettings
    embedding: ImageEmbedding
    text: TextSide
    cross_attention_dim: int  # the UNet's: image tokens fed to it must have this width
    negative_embedding: ImageEmbedding | None = None  # the negative images' embeddings (negative="image")
    images: Sequence[Any] = ()  # the decoded input pictures (the caption method reads them)
    parts: Mapping[str, Any] = field(default_factory=dict)  # what methods loaded: "ip_adapter", "captioner"
    #: One embedding per IP-Adapter when each has its own images (``adapter_images``); empty: ``embedding`` for all.
    adapter_embeddings: Sequence[ImageEmbedding] = ()
    preset_name: str = "custom"  # for messages
    #: The words method's WordSpace (CLIP's text tower and a phrase table), loaded on first call; None: none here.
    words: Callable[[], Any] | None = None


def negative_text(inputs: ConditioningInputs) -> Callable[[], torch.Tensor]:
    """The text side of the negative branch, as a function (called only when guidance runs): SD's text
    encoder on ``negative_prompt``, exactly the ``negative_prompt_embeds`` diffusers computes for it beside a
    77-token prompt, or the empty prompt (diffusers' default negative) when none is typed."""
    text, negative_prompt = inputs.text, inputs.settings.negative_prompt
    return (lambda: text.encode(negative_prompt)) if negative_prompt else text.empty
