"""Image embeddings → prompt embeddings: pure tensor functions, one per mode and per combine.

Stable Diffusion's UNet cross-attends to a ``[batch, tokens, dim]`` sequence that normally comes
from its text encoder. Each mode here builds that sequence from CLIP image embeddings instead;
each combine function mixes several images into one sequence. They are pure functions of tensors
so that each one can be tested against a hand computation, and the choices offered by the
settings (``settings.MODES``, ``settings.COMBINES``) are exactly the keys of the tables below.

The order the pipeline applies them in, for ``N`` input images:

1. mode: every image becomes a token sequence ``[N, L, D]`` (``repeat``: 77 copies of the
   embedding, ``single``: one token, ``tokens``: all projected vision tokens);
2. combine: the ``N`` sequences become one ``[1, L', D]`` (skipped for one image without weights);
3. norm matching (optional): every token rescaled to the typical norm of SD's text tokens;
4. ``scale`` multiplies the result;
5. ``blend`` mixes that with the text prompt's embeddings by ``image_weight``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .settings import SettingsError

#: Length of a Stable Diffusion 1.x text prompt in tokens.
PROMPT_TOKENS = 77


class ConditioningError(SettingsError):
    """Settings and inputs a combine or mode cannot work with (wrong shapes, wrong number of images or weights)."""


@dataclass
class Conditioning:
    """What a method hands the diffusion call, for one output image.

    ``negative`` and ``negative_adapter_embeds`` are what the unconditional branch of classifier-free
    guidance sees, as functions: :func:`for_unet` calls them only when guidance runs. ``contexts`` are
    context managers entered around the diffusers call; each may yield a step hook
    ``(steps_finished, total) -> None`` (the IP-Adapter's start/end window uses one).
    """

    prompt_embeds: torch.Tensor  # [1, L, D]
    negative: Callable[[], torch.Tensor] | None = None  # -> [1, L', D]
    #: IP-Adapter inputs: one tensor per adapter, ``[1, n, D]`` (embeddings) or ``[1, n, T, Dv]`` (Plus: hidden
    #: states); a single tensor is taken as one adapter's.
    adapter_embeds: torch.Tensor | list[torch.Tensor] | None = None
    negative_adapter_embeds: Callable[[], torch.Tensor | list[torch.Tensor]] | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    contexts: list[Any] = field(default_factory=list)
    #: SDXL's pooled slot (``pooled_prompt_embeds``, ``[1, P]``) and, as a function called only when guidance
    #: runs, the negative branch's (default: zeros); None on SD 1.x.
    pooled: torch.Tensor | None = None
    negative_pooled: Callable[[], torch.Tensor] | None = None


@dataclass
class UnetConditioning:
    """The tensors one run feeds the UNet: a row per output image, on its device, in its dtype."""

    prompt_embeds: torch.Tensor  # [B, L, D]
    negative_prompt_embeds: torch.Tensor | None  # [B, L', D] when guided, else None
    #: diffusers' ``ip_adapter_image_embeds``: one tensor per adapter, ``[2B or B, n, ...]``, negatives first.
    ip_adapter_image_embeds: list[torch.Tensor] | None = None
    #: SDXL: ``pooled_prompt_embeds`` ``[B, P]`` and, when guided, ``negative_pooled_prompt_embeds``; None on SD 1.x.
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def padded(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(prompt, negative, mask)`` at one length for the guided batch (:func:`pad_with_mask`); the mask
        is ``None`` when the lengths already agree."""
        if self.negative_prompt_embeds is None:
            return self.prompt_embeds, None, None
        (negative, prompt), mask = pad_with_mask([self.negative_prompt_embeds, self.prompt_embeds])
        return prompt, negative, mask


def for_unet(
    cond: Conditioning, guided: bool, copies: int, device: Any = None, dtype: torch.dtype | None = None
) -> UnetConditioning:
    """Apply the guidance rule once for every method: with guidance the negatives are computed and batched
    as diffusers expects (IP-Adapter negatives default to zeros, as diffusers uses); without, nothing
    negative is computed or fed."""

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, dtype).repeat(copies, *([1] * (tensor.ndim - 1)))

    prompt = rows(cond.prompt_embeds)
    negative = rows(cond.negative()) if guided and cond.negative is not None else None
    adapters = None
    if cond.adapter_embeds is not None:
        positives = _as_list(cond.adapter_embeds)
        adapters = [rows(positive) for positive in positives]
        if guided:
            negatives = (_as_list(cond.negative_adapter_embeds()) if cond.negative_adapter_embeds is not None
                         else [torch.zeros_like(positive) for positive in positives])
            adapters = [torch.cat([rows(neg), pos]) for neg, pos in zip(negatives, adapters)]
    pooled = negative_pooled = None
    if cond.pooled is not None:
        pooled = rows(cond.pooled)
        if guided:
            negative_pooled = (rows(cond.negative_pooled()) if cond.negative_pooled is not None
                               else torch.zeros_like(pooled))
    return UnetConditioning(prompt, negative, adapters, pooled, negative_pooled)


def _as_list(tensors: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]


# ---------------------------------------------------------------------------------------------
# Modes: one image embedding -> a token sequence


def repeat_tokens(image_embeds: torch.Tensor, scale: float = 1.0, num_tokens: int = PROMPT_TOKENS) -> torch.Tensor:
    """The original guide's method: ``scale * image_embeds`` repeated to the shape of a text prompt.

    ``[N, D] -> [N, num_tokens, D]``. Cross-attention keys carry no position, so this is the same
    conditioning as one token; it only looks like a prompt.
    """
    _check_ndim(image_embeds, 2, "image_embeds", "[N, D]")
    return scale * image_embeds[:, None, :].repeat(1, num_tokens, 1)


def single_token(image_embeds: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """One token per image, ``[N, D] -> [N, 1, D]``: what ``repeat`` really is, without the copies."""
    _check_ndim(image_embeds, 2, "image_embeds", "[N, D]")
    return scale * image_embeds[:, None, :]


def project_vision_tokens(
    hidden_states: torch.Tensor,
    post_layernorm: Callable[[torch.Tensor], torch.Tensor],
    visual_projection: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """All vision tokens in the projected space: ``[N, T, Dv] -> [N, T, D]``.

    CLIP computes ``image_embeds`` as ``visual_projection(post_layernorm(hidden_states[:, 0]))``;
    applying the same two layers to every token gives token 0 equal to ``image_embeds`` and the
    other ``T - 1`` patch tokens in the same space.
    """
    _check_ndim(hidden_states, 3, "hidden_states", "[N, T, Dv]")
    return visual_projection(post_layernorm(hidden_states))


def vision_tokens(tokens: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``tokens`` mode: every projected vision token (``[N, T, D]``, 257 for ViT-L/14), times ``scale``."""
    _check_ndim(tokens, 3, "tokens", "[N, T, D]")
    return scale * tokens


def side_by_side(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Two towers' vectors or tokens joined along the last axis: SDXL's tokens are ViT-L/14's (768) beside
    OpenCLIP bigG's (1,280), as its text tokens are its two text encoders' hidden states side by side
    (``[..., D1] + [..., D2] -> [..., D1 + D2]``). The leading shapes (images, tokens) must agree."""
    if first.shape[:-1] != second.shape[:-1]:
        raise ConditioningError(
            f"The two image encoders give differently shaped tokens, {tuple(first.shape)} and {tuple(second.shape)}: "
            "SDXL's tokens need one token of each per position (the same patch grid)."
        )
    return torch.cat([first, second.to(first.dtype)], dim=-1)


# ---------------------------------------------------------------------------------------------
# Combine: N token sequences -> one


def _weights(embeds: torch.Tensor, weights: torch.Tensor | list[float] | tuple[float, ...] | None,
             default: float = 1.0) -> torch.Tensor:
    count = embeds.shape[0]
    if weights is None or len(weights) == 0:
        return torch.full((count,), default, dtype=embeds.dtype, device=embeds.device)
    weights = torch.as_tensor(weights, dtype=embeds.dtype, device=embeds.device).flatten()
    if weights.numel() != count:
        raise ConditioningError(f"Got {weights.numel()} weights for {count} images: give one weight per image.")
    return weights


def _per_image(weights: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    return weights.reshape((-1,) + (1,) * (embeds.ndim - 1))


def average(embeds: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean over images: ``[N, ...] -> [1, ...]``; weights are normalised to sum to one."""
    w = _weights(embeds, weights)
    if float(w.sum()) == 0:
        raise ConditioningError("The weights of 'average' sum to zero: at least one image needs weight.")
    return (embeds * _per_image(w, embeds)).sum(dim=0, keepdim=True) / w.sum()


def norm_average(embeds: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Average of directions, at the average length: each token is the weighted mean of the unit
    vectors, rescaled to the weighted mean of the norms.

    Plain averaging shrinks vectors that point apart (two orthogonal unit vectors average to length
    0.71); this keeps the length CLIP produced, which is what the UNet is sensitive to.
    """
    w = _weights(embeds, weights)
    if float(w.sum()) == 0:
        raise ConditioningError("The weights of 'norm_average' sum to zero: at least one image needs weight.")
    norms = embeds.norm(dim=-1, keepdim=True)
    direction = (embeds / norms.clamp_min(1e-12) * _per_image(w, embeds)).sum(dim=0, keepdim=True)
    length = (norms * _per_image(w, embeds)).sum(dim=0, keepdim=True) / w.sum()
    return direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12) * length


def concat(embeds: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Token sequences side by side, each times its weight: ``[N, L, D] -> [1, N * L, D]``."""
    _check_ndim(embeds, 3, "embeds", "[N, L, D]")
    w = _weights(embeds, weights)
    weighted = embeds * _per_image(w, embeds)
    return weighted.reshape(1, -1, embeds.shape[-1])


def add(embeds: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum (not normalised): ``Σ w_i e_i``."""
    w = _weights(embeds, weights)
    return (embeds * _per_image(w, embeds)).sum(dim=0, keepdim=True)


def subtract(embeds: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """"Like the first image, without the others": ``w_0 e_0 − Σ_{i≥1} w_i e_i``."""
    if embeds.shape[0] < 2:
        raise ConditioningError("'subtract' needs at least two images: the first minus the others.")
    weighted = embeds * _per_image(_weights(embeds, weights), embeds)
    return weighted[:1] - weighted[1:].sum(dim=0, keepdim=True)


def elementwise_max(embeds: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-coordinate maximum over the weighted embeddings ``w_i e_i``."""
    weighted = embeds * _per_image(_weights(embeds, weights), embeds)
    return weighted.amax(dim=0, keepdim=True)


def elementwise_min(embeds: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-coordinate minimum over the weighted embeddings ``w_i e_i``."""
    weighted = embeds * _per_image(_weights(embeds, weights), embeds)
    return weighted.amin(dim=0, keepdim=True)


def slerp(embeds: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Spherical interpolation between exactly two images, per token along the last axis.

    ``t = w_1 / (w_0 + w_1)`` (equal weights: halfway). ``sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b``
    with θ the angle between ``a`` and ``b``; almost parallel vectors fall back to linear interpolation.
    Opposite vectors have no single great circle between them (linear interpolation would pass through
    zero): they turn through a fixed perpendicular direction (the coordinate axis least aligned with ``a``,
    so the same inputs always take the same path) while the length moves linearly from ``|a|`` to ``|b|``.
    """
    if embeds.shape[0] != 2:
        raise ConditioningError(f"'slerp' interpolates between exactly two images, got {embeds.shape[0]}.")
    w = _weights(embeds, weights)
    if float(w.sum()) == 0:
        raise ConditioningError("The weights of 'slerp' sum to zero: give t as weights=[1 - t, t].")
    t = float(w[1] / w.sum())
    a, b = embeds[0:1], embeds[1:2]
    norm_a, norm_b = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    cos = (a * b).sum(-1, keepdim=True) / (norm_a * norm_b).clamp_min(1e-12)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    nearly_parallel = (sin.abs() < 1e-6) & (cos > 0)
    opposite = (sin.abs() < 1e-6) & (cos <= 0)
    safe_sin = torch.where(sin.abs() < 1e-6, torch.ones_like(sin), sin)
    spherical = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / safe_sin
    linear = (1 - t) * a + t * b
    unit_a = a / norm_a.clamp_min(1e-12)
    axis = F.one_hot(unit_a.abs().argmin(dim=-1), a.shape[-1]).to(a.dtype)
    perpendicular = axis - (axis * unit_a).sum(-1, keepdim=True) * unit_a
    perpendicular = perpendicular / perpendicular.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    length = (1 - t) * norm_a + t * norm_b
    turned = (math.cos(t * math.pi) * unit_a + math.sin(t * math.pi) * perpendicular) * length
    return torch.where(opposite, turned, torch.where(nearly_parallel, linear, spherical))


CombineFunction = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]

#: Name → combine function; ``settings.COMBINES`` is exactly these keys (a test checks it).
COMBINE_FUNCTIONS: dict[str, CombineFunction] = {
    "average": average,
    "norm_average": norm_average,
    "concat": concat,
    "add": add,
    "subtract": subtract,
    "max": elementwise_max,
    "min": elementwise_min,
    "slerp": slerp,
}


#: Combines that need more than one image (the others are defined for one: they leave it as it is).
MIN_IMAGES = {"subtract": 2, "slerp": 2}


def require_images(name: str, count: int) -> None:
    """A :class:`ConditioningError` when combine ``name`` cannot work with ``count`` images."""
    needed = MIN_IMAGES.get(name, 1)
    if count < needed:
        what = {"subtract": "the first image minus the others", "slerp": "a path between two images"}[name]
        raise ConditioningError(
            f"combine={name!r} needs at least {needed} images ({what}), got {count}: add an image or use "
            "combine='average'."
        )


def combine(name: str, embeds: torch.Tensor, weights: torch.Tensor | list[float] | None = None) -> torch.Tensor:
    """Apply the combine function called ``name`` to ``[N, L, D]`` sequences (or ``[N, D]`` vectors)."""
    try:
        function = COMBINE_FUNCTIONS[name]
    except KeyError:
        raise ConditioningError(f"Unknown combine {name!r}: use one of {', '.join(COMBINE_FUNCTIONS)}.") from None
    if name == "concat" and embeds.ndim == 2:
        embeds = embeds[:, None, :]
    return function(embeds, weights)


def combined_pooled(name: str, embeds: torch.Tensor, weights: tuple[float, ...] | list[float] = ()) -> torch.Tensor:
    """``N`` images' pooled vectors ``[N, P]`` → one ``[1, P]``: the combine ``name``, except ``concat``, which has no
    single vector: there the weighted sum (``add``), as ComfyUI sums several unCLIP/Revision conditionings."""
    return combined_images("add" if name == "concat" else name, embeds, weights)


def combined_images(name: str, embeds: torch.Tensor, weights: tuple[float, ...] | list[float] = ()) -> torch.Tensor:
    """``N`` images' sequences → one: the combine (skipped for one image without weights, where every
    combine that accepts one image leaves it as it is)."""
    require_images(name, embeds.shape[0])
    if embeds.shape[0] == 1 and not weights:
        return embeds
    return combine(name, embeds, list(weights) or None)


# ---------------------------------------------------------------------------------------------
# Norm matching


def typical_token_norm(text_embeds: torch.Tensor) -> float:
    """The median per-token L2 norm of text-encoder outputs ``[B, 77, D]``, leaving out token 0.

    Token 0 (the start token) of SD's text encoder is an outlier many times longer than the rest,
    so it is excluded; the median is robust to the few end-of-text tokens that differ.
    """
    _check_ndim(text_embeds, 3, "text_embeds", "[B, L, D]")
    return float(text_embeds[:, 1:].float().norm(dim=-1).median())


def match_norm(tokens: torch.Tensor, target_norm: float) -> torch.Tensor:
    """Rescale every token (last axis) to length ``target_norm``; zero tokens stay zero."""
    norms = tokens.norm(dim=-1, keepdim=True)
    return tokens * (target_norm / norms.clamp_min(1e-12))


# ---------------------------------------------------------------------------------------------
# Text and image together


def blend_interpolate(text_embeds: torch.Tensor, image_tokens: torch.Tensor, image_weight: float) -> torch.Tensor:
    """``(1 − w) · text + w · image``, token by token; ``image_tokens`` must have the text's length.

    At ``w = 0`` this is the text's embeddings bit for bit (the image term is skipped, not multiplied
    by zero), so generation equals plain text-to-image; at ``w = 1`` it is the image alone.
    """
    if text_embeds.shape[1:] != image_tokens.shape[1:]:
        raise ConditioningError(
            f"blend 'interpolate' needs image tokens shaped like the text, [*, {text_embeds.shape[1]}, "
            f"{text_embeds.shape[2]}], got {list(image_tokens.shape)}."
        )
    if image_weight == 0:
        return text_embeds.clone()
    if image_weight == 1:
        return image_tokens.clone()
    return (1 - image_weight) * text_embeds + image_weight * image_tokens


def blend_concat(text_embeds: torch.Tensor, image_tokens: torch.Tensor, image_weight: float) -> torch.Tensor:
    """Text tokens times ``1 − w`` followed by image tokens times ``w``, ``[1, 77 + L, D]``.

    The endpoints drop the side that has no weight (``w = 0``: the text alone, exactly;
    ``w = 1``: the image alone): a zero token is not neutral in attention, it still takes a share.
    """
    if image_weight == 0:
        return text_embeds.clone()
    if image_weight == 1:
        return image_tokens.clone()
    return torch.cat([(1 - image_weight) * text_embeds, image_weight * image_tokens], dim=1)


#: Name → how ``blend`` mixes text and image; ``settings.BLENDS`` is exactly these keys.
BLEND_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "interpolate": blend_interpolate,
    "concat": blend_concat,
}


# ---------------------------------------------------------------------------------------------
# SDXL's pooled slot: Revision's noise augmentation

#: The steps of the noise schedule unCLIP's noise augmentation draws its level from (ComfyUI's
#: ``CLIPEmbeddingNoiseAugmentation`` for SDXL: 1,000 steps, ``squaredcos_cap_v2``).
NOISE_AUGMENT_STEPS = 1000


def cosine_alphas_cumprod(steps: int = NOISE_AUGMENT_STEPS) -> torch.Tensor:
    """ᾱ_t of the cosine schedule (Nichol & Dhariwal; ``squaredcos_cap_v2``): betas from
    ``ᾱ(t) = cos²((t + 0.008) / 1.008 · π/2)``, each capped at 0.999, then the cumulative product of ``1 − β``."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), dim=0)


def noise_augmented(embeds: torch.Tensor, level: float, generator: torch.Generator) -> torch.Tensor:
    """An image embedding noised as unCLIP's noise augmentation does (ComfyUI's unCLIP / Revision conditioning):
    ``sqrt(ᾱ_t) · e + sqrt(1 − ᾱ_t) · ε`` at ``t = round(999 · level)`` of :func:`cosine_alphas_cumprod`, ``ε``
    drawn in float32 from ``generator`` (on the CPU). ``level=0`` returns ``embeds`` unchanged (ComfyUI would
    still add the tiny noise of step 0); ``level=1`` is almost pure noise."""
    if not 0 <= level <= 1:
        raise ConditioningError(f"noise_augmentation={level!r} must be between 0 and 1.")
    if level == 0:
        return embeds.clone()
    step = round((NOISE_AUGMENT_STEPS - 1) * level)
    alpha = float(cosine_alphas_cumprod()[step])
    noise = torch.randn(tuple(embeds.shape), generator=generator, dtype=torch.float32).to(embeds.device, embeds.dtype)
    return math.sqrt(alpha) * embeds + math.sqrt(1 - alpha) * noise


def lerp_exact(start: torch.Tensor, end: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 − w) · start + w · end``, exactly ``start`` at ``w = 0`` and exactly ``end`` at ``w = 1`` (the other term
    is skipped, not multiplied by zero): the pooled slot's mix in blend and revision."""
    if start.shape != end.shape:
        raise ConditioningError(f"Cannot mix pooled embeddings of shapes {tuple(start.shape)} and {tuple(end.shape)}.")
    if weight == 0:
        return start.clone()
    if weight == 1:
        return end.to(start.dtype).clone()
    return (1 - weight) * start + weight * end.to(start.dtype)


# ---------------------------------------------------------------------------------------------
# Step windows


def in_window(step_index: int, total: int, start: float, end: float) -> bool:
    """Whether step ``step_index`` (0-based) of ``total`` lies in the window from ``start`` to ``end``.

    diffusers' rule for ``control_guidance_start``/``_end``: the step acts when ``i / total >= start`` and
    ``(i + 1) / total <= end``, i.e. the whole step lies inside the window. The ControlNet window
    (``control_start``/``control_end``) is decided inside diffusers by it; the IP-Adapter window
    (``adapter_start``/``adapter_end``) uses this function, so equal numbers give equal windows.
    """
    if total <= 0:
        return False
    return step_index / total >= start and (step_index + 1) / total <= end


# ---------------------------------------------------------------------------------------------
# Sequences of different lengths in one guided batch


def pad_with_mask(
    sequences: list[torch.Tensor],
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Pad ``[B, L_i, D]`` sequences with zero tokens to a common length; mask marks real tokens.

    Classifier-free guidance runs the negative and the positive as one UNet batch, so their
    lengths must agree. Padding tokens are masked out of cross-attention (``encoder_attention_mask``),
    which removes them exactly: a masked key gets a ``-10000`` bias and a softmax weight of 0.
    Returns the sequences unchanged and ``None`` when they already agree.
    """
    length = max(s.shape[1] for s in sequences)
    if all(s.shape[1] == length for s in sequences):
        return sequences, None
    padded, masks = [], []
    for s in sequences:
        missing = length - s.shape[1]
        padded.append(torch.cat([s, s.new_zeros(s.shape[0], missing, s.shape[2])], dim=1))
        mask = torch.zeros(s.shape[0], length, dtype=s.dtype, device=s.device)
        mask[:, : s.shape[1]] = 1
        masks.append(mask)
    return padded, torch.cat(masks)


def _check_ndim(tensor: torch.Tensor, ndim: int, name: str, shape: str) -> None:
    if tensor.ndim != ndim:
        raise ConditioningError(f"{name} must be {shape}, got shape {tuple(tensor.shape)}.")

