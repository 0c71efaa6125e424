"""``repeat``, ``single``, ``tokens``: the images' own tokens are the prompt.

``repeat`` is the original guide's method (CLIP's projected image embedding copied into the 77 slots of a
text prompt), ``single`` the same embedding as one token, ``tokens`` every projected vision token. Several
images are combined (``combine``, ``weights``), optionally rescaled to the length of SD's text tokens
(``norm_match``), then multiplied by ``scale``. The negative is SD's text encoder on ``negative_prompt``
(the empty prompt, the guide's default, unless one is typed), zeros, or the negative images through the same
steps, with the negative text's 77 tokens in front of them when one is typed.

On SDXL (two image towers) every token is ViT-L/14's beside OpenCLIP bigG's (768 + 1,280 = SDXL's 2,048, as
its text tokens are its two text encoders' side by side), and the pooled slot gets bigG's image embedding,
combined like the tokens (docs/methods.md, "SDXL").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import conditioning
from ..conditioning import Conditioning, ConditioningError
from ..encoding import ImageEmbedding
from .inputs import ConditioningInputs, TextSide, negative_pooled_text, negative_text

#: How each form turns ``[N, D]`` embeddings (or ``[N, T, D]`` tokens) into ``[N, L, D]`` sequences.
FORMS = ("repeat", "single", "tokens")


def build(inputs: ConditioningInputs) -> Conditioning:
    settings = inputs.settings
    extras: dict[str, torch.Tensor] = {}
    prompt = image_sequence(inputs, inputs.embedding, settings.mode, extras=extras)
    pooled = image_pooled(inputs, inputs.embedding)
    return Conditioning(prompt, negative=negative_for(inputs, prompt, settings.mode, extras), extras=extras,
                        pooled=pooled, negative_pooled=negative_pooled_for(inputs, pooled))


def unet_width_embeds(embedding: ImageEmbedding) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(image_embeds, tokens)`` at the UNet's width: the tower's own, or on SDXL both towers' side by side."""
    if embedding.second is None:
        return embedding.image_embeds, embedding.tokens
    second = embedding.second
    embeds = conditioning.side_by_side(embedding.image_embeds, second.image_embeds)
    tokens = (conditioning.side_by_side(embedding.tokens, second.tokens)
              if embedding.tokens is not None and second.tokens is not None else None)
    return embeds, tokens


def image_pooled(
    inputs: ConditioningInputs, embedding: ImageEmbedding, *, combine: str | None = None,
    weights: Sequence[float] | None = None,
) -> torch.Tensor | None:
    """SDXL's pooled slot for images: bigG's image embeddings ``[N, P]`` combined into ``[1, P]`` like the tokens
    (``concat``: their weighted sum); None on SD 1.x. The image's own place in SDXL, as Revision shows."""
    if not inputs.text.has_pooled:
        return None
    if embedding.second is None:
        raise ConditioningError(
            f"mode={inputs.settings.mode!r} on SDXL fills the pooled slot with OpenCLIP bigG's image embedding, but "
            "this embedding has only one tower's: pass images (not an embedding), with a preset that has clip_model_2."
        )
    settings = inputs.settings
    return conditioning.combined_pooled(combine or settings.combine, embedding.second.image_embeds,
                                        settings.weights if weights is None else weights)


def negative_pooled_for(inputs: ConditioningInputs, pooled: torch.Tensor | None) -> Callable[[], torch.Tensor] | None:
    """The negative branch's pooled slot beside :func:`negative_for`'s tokens (None on SD 1.x): the negative
    text's (diffusers' own), zeros, or the negative images' bigG embeddings averaged."""
    if pooled is None:
        return None
    settings = inputs.settings
    if settings.negative == "zeros":
        return lambda: torch.zeros_like(pooled)
    if settings.negative == "image":
        negative_embedding = inputs.negative_embedding
        assert negative_embedding is not None  # generate() checks the inputs against negative="image" first
        return lambda: image_pooled(inputs, negative_embedding, combine="average", weights=())
    return negative_pooled_text(inputs)


def image_sequence(
    inputs: ConditioningInputs, embedding: ImageEmbedding, form: str, *, combine: str | None = None,
    weights: Sequence[float] | None = None, extras: dict[str, torch.Tensor] | None = None, prefix: str = "",
) -> torch.Tensor:
    """Images → one ``[1, L, D]`` token sequence: form, combine, norm matching, then ``scale``."""
    settings = inputs.settings
    check_width(embedding, inputs.cross_attention_dim, settings.mode, sdxl=inputs.text.has_pooled)
    image_embeds, tokens = unet_width_embeds(embedding)
    if form == "repeat":
        sequences = conditioning.repeat_tokens(image_embeds)
    elif form == "single":
        sequences = conditioning.single_token(image_embeds)
    else:
        if tokens is None:
            raise ConditioningError("mode='tokens' needs the images' vision tokens; this embedding has only "
                                    "image_embeds: use mode='repeat' or 'single'.")
        sequences = conditioning.vision_tokens(tokens)
    sequence = conditioning.combined_images(
        combine or settings.combine, sequences, settings.weights if weights is None else weights
    )
    if settings.norm_match:
        sequence = norm_matched(sequence, inputs.text, extras, prefix)
    return settings.scale * sequence


def norm_matched(
    sequence: torch.Tensor, text: TextSide, extras: dict[str, torch.Tensor] | None, prefix: str = ""
) -> torch.Tensor:
    """Every token rescaled to the typical length of SD's text tokens; both norms kept in ``extras``."""
    target = text.typical_norm()
    if extras is not None:
        extras[f"{prefix}text_token_norm"] = torch.tensor(target)
        extras[f"{prefix}image_token_norm_before"] = sequence.norm(dim=-1)[0].float()
    return conditioning.match_norm(sequence, target)


def negative_for(
    inputs: ConditioningInputs, prompt: torch.Tensor, form: str, extras: dict[str, torch.Tensor]
) -> Callable[[], torch.Tensor]:
    """The unconditional branch, as a function (called only when guidance runs): SD's text encoder on
    ``negative_prompt`` (the empty prompt when none is typed), zeros shaped like the prompt, or the negative
    images in the prompt's form (averaged with equal weights, norm-matched and scaled like the prompt).

    Negative images and a negative text together: the text's 77 tokens followed by the images' tokens, one
    sequence the UNet's cross-attention reads at once (as ``blend="concat"`` joins text and image); the
    prompt is padded to its length with masked tokens, which cross-attention ignores exactly."""
    settings = inputs.settings
    if settings.negative == "empty_prompt":
        return negative_text(inputs)
    if settings.negative == "zeros":
        return lambda: torch.zeros_like(prompt)
    negative_embedding = inputs.negative_embedding
    assert negative_embedding is not None  # generate() checks the inputs against negative="image" first

    def images() -> torch.Tensor:
        return image_sequence(
            inputs, negative_embedding, form, combine="average", weights=(), extras=extras, prefix="negative_"
        )

    if not settings.negative_prompt:
        return images
    text = negative_text(inputs)
    return lambda: torch.cat([text(), images().to(prompt.dtype)], dim=1)


def check_width(embedding: ImageEmbedding, cross_attention_dim: int, mode: str, *, sdxl: bool = False) -> None:
    width = embedding.image_embeds.shape[-1]
    if embedding.second is not None:
        width += embedding.second.image_embeds.shape[-1]
    elif sdxl:  # SDXL without the second tower's embedding (a bare [N, D] embedding)
        raise ConditioningError(
            f"mode={mode!r} feeds image tokens to the UNet, which expects {cross_attention_dim}-d tokens, but the "
            f"embedding is {width}-d: on SDXL each token is both image encoders' embeddings side by side, so pass "
            "images (both towers encode them), not one tower's embedding."
        )
    if width != cross_attention_dim:
        raise ConditioningError(
            f"mode={mode!r} feeds image tokens to the UNet, but the image encoder gives {width}-d embeddings "
            f"and the UNet expects {cross_attention_dim}-d: this preset supports mode='ip_adapter'."
        )

