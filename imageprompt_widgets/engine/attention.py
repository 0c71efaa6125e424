"""Cross-attention maps: where in the picture each prompt token acts, recorded during one run (DAAM-style).

At every UNet call, every cross-attention layer computes, for each latent position, a softmax over the
prompt tokens. :class:`AttentionRecorder` recomputes that softmax for the conditional branch (the rows
the prompt conditions; with guidance the second half of the batch) exactly as diffusers' ``AttnProcessor``
does (``attn.get_attention_scores``: the padding mask included, so masked tokens get 0), averages it over
heads, resizes it to the latent grid (bilinear: a mix of distributions is still a distribution) and adds
it to a running sum. The maps are the average over layers and UNet calls (steps): ``[B, L, h, w]``, summing
to 1 over the tokens at every position. Nothing is stored per step.

The recorder installs forward pre-hooks on the UNet's cross-attention modules (and one on the UNet, for the
latent size) for one run and removes them after; the attention processors are not replaced, so the pictures
are bit-identical with and without recording, and the IP-Adapter's scale switching still finds its own
processors. With recording off, nothing is installed.

IP-Adapter: the adapter's image tokens have a softmax of their own beside the text's (the decoupled
cross-attention), so they get maps of their own, ``[B, n, h, w]`` summing to 1 over the adapter's tokens
(several adapters: their tokens one after the other, in ``pipe.ip_adapters`` order, each adapter's summing
to 1, or 0 for an adapter switched off throughout). Each layer's contribution is weighted by the adapter's scale in that layer at that step, so layers and
steps where the adapter is switched off (``adapter_blocks``, the step window) count for nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


class AttentionRecordError(ValueError):
    """The UNet handed a cross-attention layer something the recorder cannot read (an unknown layout)."""


@dataclass
class AttentionMaps:
    """What one run's recording gives: the prompt's maps and, with an IP-Adapter, the adapter's."""

    prompt: torch.Tensor  # [B, L, h, w] float32 on the CPU; L the length the UNet saw (padding included)
    adapter: torch.Tensor | None  # [B, n, h, w], or None when the UNet was given no IP-Adapter tokens
    calls: int  # layer calls averaged (cross-attention layers x UNet calls)


def cross_attention_layers(unet: Any) -> dict[str, Any]:
    """The UNet's cross-attention modules by name (``...transformer_blocks.0.attn2`` in SD 1.x)."""
    return {name: module for name, module in unet.named_modules() if getattr(module, "is_cross_attention", False)}


def attention_probabilities(attn: Any, hidden_states: torch.Tensor, context: torch.Tensor,
                            mask: torch.Tensor | None = None, *, query: torch.Tensor | None = None) -> torch.Tensor:
    """The softmax of one cross-attention layer, ``[B, heads, positions, tokens]``, as diffusers'
    ``AttnProcessor`` computes it (``mask`` is the UNet's additive bias ``[B, 1, tokens]`` or ``None``;
    ``query`` the layer's :func:`attention_query`, where already computed)."""
    query = attention_query(attn, hidden_states) if query is None else query
    batch = query.shape[0] // attn.heads
    mask = attn.prepare_attention_mask(mask, context.shape[1], batch)
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    probabilities = attn.get_attention_scores(query, attn.head_to_batch_dim(attn.to_k(context)), mask)
    return probabilities.reshape(batch, attn.heads, *probabilities.shape[1:])


def adapter_probabilities(attn: Any, query: torch.Tensor, to_k_ip: Any, adapter_tokens: torch.Tensor) -> torch.Tensor:
    """The IP-Adapter's own softmax over its image tokens, ``[B, heads, positions, n]`` (no mask, as diffusers);
    ``adapter_tokens`` is ``[B, n, D]`` or ``[B, images, n, D]``."""
    batch = query.shape[0] // attn.heads
    key = attn.head_to_batch_dim(to_k_ip(adapter_tokens.reshape(batch, -1, adapter_tokens.shape[-1])))
    probabilities = attn.get_attention_scores(query, key, None)
    return probabilities.reshape(batch, attn.heads, *probabilities.shape[1:])


def attention_query(attn: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """The layer's queries, heads split into the batch (``[B * heads, positions, head_dim]``)."""
    if attn.spatial_norm is not None:
        raise AttentionRecordError("Cross-attention with a spatial norm is not recorded (not an SD 1.x UNet).")
    if hidden_states.ndim == 4:
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return attn.head_to_batch_dim(attn.to_q(hidden_states))


def layer_grid(positions: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """The ``(h, w)`` of a layer with ``positions`` latent positions: the latent size halved (rounding up, as
    SD's stride-2 downsamplers do) until it fits."""
    height, width = latent_size
    while height * width > positions:
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    if height * width != positions:
        raise AttentionRecordError(
            f"A cross-attention layer has {positions} positions, which is no downsampling of the "
            f"{latent_size[0]}x{latent_size[1]} latent grid."
        )
    return height, width


class AttentionRecorder:
    """Running sums of one run's cross-attention maps (use :func:`recording_attention` to install it).

    ``num_images`` is the number of output images B: a UNet batch of 2B is ``[uncond; cond]`` (guidance),
    whose second half is recorded; a batch of B is all conditional. ``layers`` limits the recording to
    some cross-attention modules by name (all by default).
    """

    def __init__(self, unet: Any, num_images: int, layers: Sequence[str] | None = None) -> None:
        found = cross_attention_layers(unet)
        unknown = sorted(set(layers or ()) - set(found))
        if unknown:
            raise AttentionRecordError(f"The UNet has no cross-attention layer named {unknown[0]!r}.")
        self.unet = unet
        self.num_images = num_images
        self.layers = {name: found[name] for name in (layers if layers is not None else found)}
        self.latent_size: tuple[int, int] | None = None
        self.calls = 0
        self._prompt_sum: torch.Tensor | None = None
        self._adapter_sums: dict[int, torch.Tensor] = {}  # adapter index -> its weighted sum
        self._adapter_weights: dict[int, float] = {}
        self._adapter_tokens: dict[int, int] = {}  # adapter index -> how many tokens it has

    @contextlib.contextmanager
    def installed(self) -> Iterator[AttentionRecorder]:
        """The hooks, for the duration of the ``with`` block; removed however it ends."""
        handles = [self.unet.register_forward_pre_hook(self._remember_latent_size, with_kwargs=True)]
        try:
            for module in self.layers.values():
                handles.append(module.register_forward_pre_hook(self._record, with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def maps(self) -> AttentionMaps | None:
        """The averages so far (``None`` before the first recorded call), on the CPU in float32."""
        if self._prompt_sum is None:
            return None
        adapter = None
        if self._adapter_tokens:  # the UNet was given IP-Adapter tokens
            batch, _, height, width = self._prompt_sum.shape
            adapter = torch.cat([
                (self._adapter_sums[i] / self._adapter_weights[i]).cpu() if i in self._adapter_sums
                else torch.zeros(batch, count, height, width)  # switched off throughout: no attention
                for i, count in sorted(self._adapter_tokens.items())
            ], dim=1)
        return AttentionMaps((self._prompt_sum / self.calls).cpu(), adapter, self.calls)

    # -- hooks ------------------------------------------------------------------------------------

    def _remember_latent_size(self, module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.latent_size = (int(sample.shape[-2]), int(sample.shape[-1]))

    def _conditional_rows(self, batch: int) -> slice:
        if batch == 2 * self.num_images:
            return slice(self.num_images, None)
        if batch == self.num_images:
            return slice(None)
        raise AttentionRecordError(
            f"A UNet batch of {batch} rows is neither {self.num_images} nor {2 * self.num_images} images."
        )

    def _record(self, attn: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        if context is None or self.latent_size is None:
            return
        adapter_tokens = None
        if isinstance(context, tuple):  # diffusers' IP-Adapter layout: (text, [adapter tokens, ...])
            context, adapter_tokens = context
        rows = self._conditional_rows(hidden.shape[0])
        hidden = hidden[rows]
        with torch.no_grad():
            query = attention_query(attn, hidden)
            prompt = attention_probabilities(attn, hidden, context[rows], None if mask is None else mask[rows],
                                             query=query)
            self._prompt_sum = self._add(self._prompt_sum, prompt)
            self.calls += 1
            processor = attn.processor
            if adapter_tokens is not None and hasattr(processor, "to_k_ip"):
                self._record_adapter(attn, query, processor, [tokens[rows] for tokens in adapter_tokens])

    def _record_adapter(self, attn: Any, query: torch.Tensor, processor: Any, tokens: list[torch.Tensor]) -> None:
        """Each adapter's softmax, weighted by its scale in this layer now (an adapter that is off adds nothing)."""
        for index, (adapter_tokens, to_k_ip, scale) in enumerate(zip(tokens, processor.to_k_ip, processor.scale)):
            self._adapter_tokens[index] = adapter_tokens.reshape(adapter_tokens.shape[0], -1,
                                                                 adapter_tokens.shape[-1]).shape[1]
            weight = float(sum(scale) / len(scale)) if isinstance(scale, (list, tuple)) else float(scale)
            if weight <= 0:
                continue
            probabilities = adapter_probabilities(attn, query, to_k_ip, adapter_tokens)
            self._adapter_sums[index] = self._add(self._adapter_sums.get(index), probabilities, weight)
            self._adapter_weights[index] = self._adapter_weights.get(index, 0.0) + weight

    def _add(self, total: torch.Tensor | None, probabilities: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """Head average ``[B, heads, hw, L] -> [B, L, h, w]`` at latent resolution, added to ``total``."""
        assert self.latent_size is not None
        batch, _, positions, tokens = probabilities.shape
        height, width = layer_grid(positions, self.latent_size)
        maps = probabilities.float().mean(1).transpose(1, 2).reshape(batch, tokens, height, width)
        if (height, width) != self.latent_size:
            maps = F.interpolate(maps, size=self.latent_size, mode="bilinear", align_corners=False)
        if weight != 1.0:
            maps = maps * weight
        return maps if total is None else total.add_(maps)


@contextlib.contextmanager
def recording_attention(unet: Any, num_images: int, layers: Sequence[str] | None = None) -> Iterator[AttentionRecorder]:
    """Record the UNet's cross-attention maps while the block runs; ``recorder.maps()`` gives the averages."""
    recorder = AttentionRecorder(unet, num_images, layers)
    with recorder.installed():
        yield recorder
