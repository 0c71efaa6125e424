"""IP-Adapter: image features through a trained projection into extra cross-attention layers.

``h94/IP-Adapter``'s ``ip-adapter_sd15`` projects a ViT-H/14 image embedding (1024-d) to four 768-d tokens
that a second, decoupled cross-attention in every UNet attention layer reads, next to the text prompt.
The Plus adapters (``ip-adapter-plus_sd15``, ``ip-adapter-plus-face_sd15``) read more of the picture: a
resampler (16 learned queries) attends over the encoder's *penultimate* hidden states (257 patch tokens)
and gives 16 tokens. Several adapters can be loaded at once; each then has its own images and scale
(diffusers takes one embedding tensor and one scale configuration per adapter).

Loaded with diffusers' ``load_ip_adapter``; the strength is ``scale`` (or ``adapter_scales``, one per
adapter), applied only inside a window of the steps (``adapter_start``..``adapter_end``, diffusers'
ControlNet rule: :func:`~imageprompt_widgets.conditioning.in_window`) and only in the chosen blocks
(:data:`BLOCK_PRESETS`, or a dictionary in diffusers' ``set_ip_adapter_scale`` format). The scales are
restored after every run, so a cached pipeline is never left with the window's last value.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import conditioning
from ..conditioning import Conditioning
from ..encoding import ImageEmbedding, zero_image_hidden_states
from ..loading.adapter_fit import AdapterNeeds, check_adapter_file, parse_adapter  # noqa: F401 - parse_adapter
from ..loading.cache import EncoderMismatchError, translate_load_errors
from ..loading.quiet import quiet_loaders
from ..presets import Preset
from ..settings import GenerationSettings, SettingsError
from .inputs import ConditioningInputs, negative_pooled_text, negative_text

#: IP-Adapter layers per block preset, as ``set_ip_adapter_scale`` takes them (SD 1.x block names).
#: From InstantStyle's SD 1.5 script (https://github.com/InstantStyle/InstantStyle/blob/main/infer_style_sd15.py):
#: ``target_blocks=["up_blocks.1"]`` for style, ``["down_blocks.2", "mid_block", "up_blocks.1"]`` for style and
#: layout. Whole blocks, unlike the single layers its README gives for SDXL (``up_blocks.0.attentions.1``,
#: ``down_blocks.2.attentions.1``), which do not exist in that form in SD 1.x. "composition" is the layout part
#: of that list on its own.
BLOCK_PRESETS: dict[str, Callable[[float], float | dict[str, Any]]] = {
    "all": lambda scale: scale,
    "style": lambda scale: {"up": {"block_1": scale}},
    "composition": lambda scale: {"down": {"block_2": scale}, "mid": scale},
    "style_and_composition": lambda scale: {"down": {"block_2": scale}, "mid": scale, "up": {"block_1": scale}},
}
#: The same names on SDXL's UNet: InstantStyle's own layers (its README and diffusers' IP-Adapter guide):
#: ``up_blocks.0.attentions.1`` for style, ``down_blocks.2.attentions.1`` for layout.
SDXL_BLOCK_PRESETS: dict[str, Callable[[float], float | dict[str, Any]]] = {
    "all": lambda scale: scale,
    "style": lambda scale: {"up": {"block_0": [0.0, scale, 0.0]}},
    "composition": lambda scale: {"down": {"block_2": [0.0, scale]}},
    "style_and_composition": lambda scale: {"down": {"block_2": [0.0, scale]}, "up": {"block_0": [0.0, scale, 0.0]}},
}


def is_sdxl_unet(unet: Any) -> bool:
    """Whether a UNet has SDXL's layout (its ``text_time`` added embedding: the pooled slot and micro-conditioning),
    so the named adapter blocks mean InstantStyle's SDXL layers."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def load_parts(
    *, sd: Any, image_encoder: Any, image_processor: Any, preset: Preset, local: Preset, allow_pickle: bool,
    say: Callable[[str], None], **_: Any,
) -> dict[str, Any]:
    """Check each adapter file against the encoder and UNet from its shapes (loading/adapter_fit.py: a file that
    does not fit is one sentence naming what it needs, before the UNet is touched), then load them into SD's UNet
    (all at once, as diffusers' lists) and register their image encoder on SD, so bare diffusers with
    ``ip_adapter_image=`` sees the same encoder."""
    names = ", ".join(map(repr, preset.ip_adapters))
    say(f"Loading the IP-Adapter weights {names}…")
    return {"ip_adapter": load_adapters(sd, image_encoder, image_processor, list(local.ip_adapters),
                                        list(preset.ip_adapters), encoder_name=preset.clip_model,
                                        allow_pickle=allow_pickle)}


def load_adapters(
    sd: Any, image_encoder: Any, image_processor: Any, specs: Sequence[str], names: Sequence[str], *,
    encoder_name: str = "the loaded one", allow_pickle: bool = False,
) -> AdapterHandle:
    """Load the IP-Adapters ``specs`` (files, ``"folder::weight_name"`` or ``"repo:subfolder:weight_name"``; their
    display ``names``) into ``sd``, replacing any loaded before: every file is checked first, so a refusal leaves
    the UNet as it was."""
    checked = [
        check_adapter_file(spec, image_encoder, sd.unet, name=name, encoder_name=encoder_name,
                           allow_pickle=allow_pickle)
        for spec, name in zip(specs, names)
    ]
    files = [path for path, _ in checked]
    with translate_load_errors(", ".join(map(repr, names)), allow_pickle), quiet_loaders():
        sd.load_ip_adapter([os.path.dirname(path) or "." for path in files], subfolder=[""] * len(files),
                           weight_name=[os.path.basename(path) for path in files], image_encoder_folder=None)
    sd.register_modules(image_encoder=image_encoder, feature_extractor=image_processor)
    return AdapterHandle(sd, names, files=files, needs=[needs for _, needs in checked])


def reads_hidden_states(projection: Any) -> bool:
    """Whether an adapter's image projection reads the encoder's hidden states (Plus: a resampler) rather than
    its projected embedding (diffusers' own test: not an ``ImageProjection``)."""
    from diffusers.models.embeddings import ImageProjection

    return not isinstance(projection, ImageProjection)


def check_adapter_fits(image_encoder: Any, unet: Any, preset: Preset) -> None:
    """Each adapter's projection reads the image encoder's embedding (or, for Plus, its hidden states): their
    widths must agree."""
    for spec, projection in zip(preset.ip_adapters, unet.encoder_hid_proj.image_projection_layers):
        if reads_hidden_states(projection):
            expected, width, what = projection.proj_in.in_features, image_encoder.config.hidden_size, "hidden states"
        else:
            expected, width, what = projection.image_embeds.in_features, image_encoder.config.projection_dim, \
                "embeddings"
        if width != expected:
            raise EncoderMismatchError(
                f"The image encoder {preset.clip_model!r} gives {width}-d {what} but the IP-Adapter "
                f"{spec!r} expects {expected}-d ones: use the encoder the adapter was trained with."
            )


@dataclass
class AdapterTokens:
    """What one adapter made of one output image's pictures: the tokens its cross-attention reads, and for a Plus
    adapter where each resampler query looked (the inspector's view of the 16 query tokens)."""

    name: str  # the adapter's preset name
    tokens: torch.Tensor  # [n * Q, D]: Q tokens per picture (4 for ip-adapter, 16 for Plus), float32 on the CPU
    #: [n * Q, T]: the last resampler layer's attention from each query to the picture's tokens (CLS first, then
    #: the patch grid), averaged over heads; the rest of each row went to the queries themselves. None (plain).
    attention: torch.Tensor | None = None
    queries: int = 0  # Q, tokens per picture


def adapter_processors(unet: Any) -> list[Any]:
    """The UNet's IP-Adapter attention processors (empty when no adapter is loaded)."""
    return [p for p in unet.attn_processors.values() if hasattr(p, "scale") and hasattr(p, "to_k_ip")]


class AdapterHandle:
    """The loaded adapters as a builder may use them: what each reads, block scales inside a step window
    (restored after), and the unconditional input of the Plus adapters."""

    def __init__(self, sd: Any, names: Sequence[str] = (), *, files: Sequence[str] = (),
                 needs: Sequence[AdapterNeeds] = ()) -> None:
        self._sd = sd
        projections = list(sd.unet.encoder_hid_proj.image_projection_layers)
        #: The presets' names of the adapters, in load order.
        self.names = tuple(names) or tuple(f"adapter {i}" for i in range(len(projections)))
        #: The local files they were loaded from (a later ``pipe.load_ip_adapter`` loads them again beside its own).
        self.files = tuple(files)
        #: What each needs, read from its file's shapes (loading/adapter_fit.py).
        self.needs = tuple(needs)
        #: Per adapter: True where it reads the encoder's penultimate hidden states (Plus), False for the embedding.
        self.reads_hidden_states = tuple(reads_hidden_states(p) for p in projections)
        self._zero_states: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.reads_hidden_states)

    @property
    def needs_hidden_states(self) -> bool:
        """Whether any adapter reads the penultimate hidden states (encode the images with them)."""
        return any(self.reads_hidden_states)

    @property
    def projections(self) -> list[Any]:
        """The adapters' image projections (``ImageProjection``, or the Plus resampler)."""
        return list(self._sd.unet.encoder_hid_proj.image_projection_layers)

    def tokens(self, index: int, adapter_input: torch.Tensor) -> AdapterTokens:
        """Adapter ``index``'s tokens for one output image's input (a row of diffusers' ``ip_adapter_image_embeds``:
        ``[n, D]`` or, for Plus, ``[n, T, Dv]``), computed by the loaded projection; with the resampler's last
        attention for a Plus adapter."""
        projection = self.projections[index]
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        handle = None
        if self.reads_hidden_states[index]:
            last = projection.layers[-1].attn
            handle = last.register_forward_pre_hook(lambda module, args: seen.append((args[0], args[1])))
        try:
            with torch.inference_mode():
                parameter = next(projection.parameters())
                tokens = projection(adapter_input.to(parameter.device, parameter.dtype))
                attention = resampler_attention(last, *seen[0]) if seen else None
        finally:
            if handle is not None:
                handle.remove()
        queries = tokens.shape[1]
        features = adapter_input.shape[1] if attention is not None else 0
        return AdapterTokens(
            self.names[index], tokens.reshape(-1, tokens.shape[-1]).float().cpu(),
            None if attention is None else attention[:, :, :features].reshape(-1, features).float().cpu(), queries,
        )

    def zero_image_hidden_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's penultimate hidden states of an all-zero input ``[1, T, Dv]`` (zero after normalisation:
        CLIP's mean colour): diffusers' negative for Plus."""
        key = (tuple(pixel_values.shape[1:]), str(pixel_values.device), pixel_values.dtype)
        if key not in self._zero_states:
            self._zero_states[key] = zero_image_hidden_states(self._sd.image_encoder, pixel_values[:1])
        return self._zero_states[key]

    def scale_configs(self, settings: GenerationSettings) -> list[Any]:
        """One ``set_ip_adapter_scale`` configuration per adapter: its scale in the chosen blocks."""
        scales = adapter_scales(settings, len(self), self.names)
        if settings.adapter_blocks != "custom":
            named = SDXL_BLOCK_PRESETS if is_sdxl_unet(self._sd.unet) else BLOCK_PRESETS
            configs = [named[settings.adapter_blocks](scale) for scale in scales]
            if named is SDXL_BLOCK_PRESETS and settings.adapter_blocks != "all":
                check_block_configs(self._sd.unet, configs)  # a small SDXL-like UNet may lack InstantStyle's layers
            return configs
        blocks = settings.block_scales()
        if isinstance(blocks, list) and len(blocks) != len(self):
            raise SettingsError(
                f"adapter_block_scales lists {len(blocks)} entries but {len(self)} IP-Adapter"
                f"{'s are' if len(self) > 1 else ' is'} loaded: give one per adapter, or one dictionary for all."
            )
        per_adapter = blocks if isinstance(blocks, list) else [blocks] * len(self)
        configs = [scaled_block_config(config, scale) for config, scale in zip(per_adapter, scales)]
        check_block_configs(self._sd.unet, configs)
        return configs

    @contextlib.contextmanager
    def window(self, settings: GenerationSettings) -> Iterator[Callable[[int, int], None]]:
        """Yield the step hook ``(steps_finished, total)`` that switches the adapters on inside the window
        (their block configurations) and off outside it; restore the scales after."""
        processors = adapter_processors(self._sd.unet)
        saved = [list(p.scale) for p in processors]
        configs = self.scale_configs(settings)
        state: dict[str, bool | None] = {"active": None}

        def before_step(steps_finished: int, total: int) -> None:
            active = conditioning.in_window(steps_finished, total, settings.adapter_start, settings.adapter_end)
            if active != state["active"]:
                # one entry per adapter: diffusers refuses a single value for several adapters
                self._sd.set_ip_adapter_scale(configs if active else [0.0] * len(configs))
                state["active"] = active

        try:
            yield before_step
        finally:
            for processor, scale in zip(processors, saved):
                processor.scale = scale


def resampler_attention(attn: Any, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """A resampler layer's attention probabilities ``[B, Q, K]`` (heads averaged), as its ``Attention`` module
    computes them: ``softmax(to_q(queries) · to_k(keys)ᵀ · scale)`` per head."""
    query = attn.head_to_batch_dim(attn.to_q(queries))
    key = attn.head_to_batch_dim(attn.to_k(keys))
    probabilities = attn.get_attention_scores(query, key, None)
    return probabilities.reshape(queries.shape[0], attn.heads, *probabilities.shape[1:]).mean(dim=1)


def adapter_scales(settings: GenerationSettings, count: int, names: Sequence[str] = ()) -> list[float]:
    """Each adapter's strength: ``adapter_scales`` where given (one per adapter), else ``scale`` for all."""
    if not settings.adapter_scales:
        return [settings.scale] * count
    if len(settings.adapter_scales) != count:
        listed = f" ({', '.join(map(repr, names))})" if names else ""
        raise SettingsError(
            f"adapter_scales has {len(settings.adapter_scales)} number{'s' if len(settings.adapter_scales) > 1 else ''}"
            f" but {count} IP-Adapter{'s are' if count > 1 else ' is'} loaded{listed}: give one per adapter, "
            "or none to use scale for each."
        )
    return list(settings.adapter_scales)


def scaled_block_config(config: Any, scale: float) -> Any:
    """A ``set_ip_adapter_scale`` configuration with every number multiplied by ``scale``."""
    if isinstance(config, dict):
        return {key: scaled_block_config(value, scale) for key, value in config.items()}
    if isinstance(config, list):
        return [scaled_block_config(value, scale) for value in config]
    return float(config) * scale


def check_block_configs(unet: Any, configs: list[Any]) -> None:
    """A :class:`SettingsError` naming the UNet's blocks when a configuration names a block or layer count it
    lacks (diffusers' own expansion, which ``set_ip_adapter_scale`` runs, decides)."""
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    down = [i for i, block in enumerate(unet.down_blocks) if hasattr(block, "attentions")]
    up = [i for i, block in enumerate(unet.up_blocks) if hasattr(block, "attentions")]
    try:
        for config in configs:  # diffusers skips a block without attention silently: a typo would do nothing
            for part, blocks in (("down", down), ("up", up)):
                named = config.get(part) if isinstance(config, dict) else None
                for key in named if isinstance(named, dict) else ():
                    if int(key.removeprefix("block_")) not in blocks:
                        raise ValueError(f"{part}.{key} has no attention layers")
        _maybe_expand_lora_scales(unet, configs, default_scale=0.0)
    except ValueError as err:
        per_block = unet.config.layers_per_block

        def layers(count: int) -> str:
            return f"{count} layer{'s' if count != 1 else ''} each"

        raise SettingsError(
            f"adapter_block_scales does not fit this UNet ({str(err).rstrip('.')}): it has attention in down "
            f"blocks {', '.join(map(str, down))} ({layers(per_block)}), mid (1) and up blocks "
            f"{', '.join(map(str, up))} ({layers(per_block + 1)})."
        ) from None


def build(inputs: ConditioningInputs) -> Conditioning:
    """``ip_adapter``: the text prompt as ``prompt_embeds``; the images through the adapters.

    Each adapter gets its own images (``inputs.adapter_embeddings``; by default every adapter sees the input
    images), combined with ``combine``/``weights`` (``concat`` keeps them side by side: the adapter's tokens for
    each). A plain adapter reads the projected embedding, a Plus adapter the penultimate hidden states.
    The text branch's negative is ``negative_prompt`` (the empty prompt when none is typed; zeros with
    ``negative="zeros"``), exactly as diffusers encodes a ``negative_prompt`` beside ``ip_adapter_image``. The
    adapters' negative is what diffusers uses (zeros for a plain adapter, an all-zero input's hidden states
    for Plus) or the negative images'. So negative text and negative images act side by side: the text on
    SD's own cross-attention, the images on the adapters'.
    """
    settings = inputs.settings
    adapter = inputs.parts.get("ip_adapter")
    if adapter is None:
        raise SettingsError(
            f"mode='ip_adapter' needs a preset with an IP-Adapter ('ip-adapter', 'ip-adapter-plus', or their "
            f"tiny twins); {inputs.preset_name!r} has none."
        )
    if settings.norm_match:
        raise SettingsError("norm_match rescales tokens fed to the UNet directly; the IP-Adapter has its own "
                            "projection, so switch norm_match off for mode='ip_adapter'.")
    embeddings = list(inputs.adapter_embeddings) or [inputs.embedding] * len(adapter)
    if len(embeddings) != len(adapter):
        raise SettingsError(
            f"adapter_images gives images for {len(embeddings)} adapter{'s' if len(embeddings) > 1 else ''} but "
            f"{inputs.preset_name!r} has {len(adapter)}: give one list of images per adapter."
        )
    adapter.scale_configs(settings)  # scales and block dictionaries that do not fit: a sentence before any work
    text = inputs.text.encode(settings.prompt)
    images = [
        adapter_input(embedding, hidden, settings.combine, settings.weights, inputs.preset_name)
        for embedding, hidden in zip(embeddings, adapter.reads_hidden_states)
    ]
    negative = (lambda: torch.zeros_like(text)) if settings.negative == "zeros" else negative_text(inputs)

    def negative_images() -> list[torch.Tensor]:
        return [
            _negative_input(adapter, embedding, hidden, image, settings, inputs.negative_embedding)
            for embedding, hidden, image in zip(embeddings, adapter.reads_hidden_states, images)
        ]

    pooled = negative_pooled = None
    if inputs.text.has_pooled:  # SDXL: the prompt's pooled embedding, its negative as diffusers computes it
        pooled = inputs.text.pooled(settings.prompt)
        negative_pooled = ((lambda: torch.zeros_like(pooled)) if settings.negative == "zeros"
                           else negative_pooled_text(inputs))
    return Conditioning(text, negative=negative, adapter_embeds=images, negative_adapter_embeds=negative_images,
                        contexts=[adapter.window(settings)], pooled=pooled, negative_pooled=negative_pooled)


def adapter_input(
    embedding: ImageEmbedding, hidden: bool, combine: str, weights: Sequence[float] = (), preset_name: str = "custom"
) -> torch.Tensor:
    """One adapter's images as diffusers' ``ip_adapter_image_embeds`` entry for one output image:
    ``[1, n, D]`` (plain: projected embeddings) or ``[1, n, T, Dv]`` (Plus: penultimate hidden states), with
    ``n`` = 1, or the number of images for ``concat``."""
    if not hidden:
        combined = conditioning.combined_images(combine, embedding.image_embeds, weights)
        return combined if combined.ndim == 3 else combined[:, None, :]
    states = embedding.penultimate_hidden_states
    if states is None:
        raise SettingsError(
            f"The IP-Adapter Plus of {preset_name!r} reads the image encoder's hidden states: pass pictures, "
            "not precomputed image embeddings."
        )
    combined = conditioning.combined_images(combine, states, weights)
    if combine == "concat":  # each picture through the resampler: its tokens side by side with the others'
        return combined.reshape(1, *states.shape)
    return combined[:, None]


def _negative_input(
    adapter: AdapterHandle, embedding: ImageEmbedding, hidden: bool, image: torch.Tensor,
    settings: GenerationSettings, negative_embedding: ImageEmbedding | None,
) -> torch.Tensor:
    if settings.negative == "image":
        assert negative_embedding is not None  # generate() checks the inputs against negative="image" first
        negative = adapter_input(negative_embedding, hidden, "average")
    elif hidden:
        assert embedding.pixel_values is not None  # adapter_input refused embeddings without pictures
        negative = adapter.zero_image_hidden_states(embedding.pixel_values)[:, None]
    else:
        return torch.zeros_like(image)
    return negative if negative.shape == image.shape else negative[:, :1].expand_as(image)
