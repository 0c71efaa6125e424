"""ImagePromptPipeline: CLIP image encoder + Stable Diffusion, with the image as the prompt.

The pipeline encodes images with the CLIP vision tower (encoding.py), lets the chosen method turn the
embeddings into conditioning (methods/), and hands that to diffusers' own ``StableDiffusionPipeline``
unchanged, so the pixels equal what bare diffusers gives for the same embeddings and seed. Everything in
between is kept in a :class:`~imageprompt_widgets.engine.results.Trace`.

``generate`` reads like diffusers' ``__call__``, as a short sequence of named steps:
check inputs → encode → condition → plan → denoise → result.
When the prompt and its negative differ in length (``single``, ``tokens``, ``concat``), the shorter is
padded with zero tokens that ``encoder_attention_mask`` removes from cross-attention exactly; the trace
keeps the unpadded embeddings and the mask (``extras["encoder_attention_mask"]``).

An SDXL preset runs ``StableDiffusionXLPipeline`` the same way: the method also fills SDXL's pooled slot
(``pooled_prompt_embeds``, traced beside the tokens) and the run passes its micro-conditioning.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import conditioning
from ..encoding import ClipTextTower, ImageEmbedding, encode_images, fingerprint
from ..images import ImageInputError, describe_source, load_images
from ..loading import cache as load_policy
from ..loading import lora
from ..loading.adapter_fit import AdapterNeeds
from ..loading.cache import (
    MODEL_CACHE,
    StatusCallback,
    model_key,
    resolve_device_dtype,
    translate_load_errors,
)
from ..loading.components import LoadedComponents, load_clip_text_tower, load_components
from ..loading.downloads import ProgressCallback, watch_downloads
from ..loading.lora import LoraInfo
from ..loading.memory import DEFAULT_MEMORY, automatic_level, check_level, execution_device
from ..loading.quiet import noting_prompt_truncation, quiet_loaders
from ..methods import METHODS, ip_adapter, part_loaders
from ..methods.inputs import ConditioningInputs, TextSide
from ..presets import PRESETS, Preset, resolve_preset, shown_source
from ..settings import AUTOCAST_MAX_STEPS, MODES, GenerationSettings, SettingsError
from ..structure.plan import ControlMap, StructurePlan, StructureRunners, unit_pictures
from . import schedule
from .attention import AttentionMaps, recording_attention
from .concurrency import RunLock
from .results import GenerationResult, Interpolation, Provenance, Trace
from .samplers import scheduler_for, uses_sigmas
from .steps import (
    Cancelled,
    NonFiniteImageError,
    StepCallback,
    StepInfo,
    StepTracker,
    guided_prediction,
    masked_prompt,
    non_finite_error,
    predicted_x0,
    watching_decoded_values,
)

__all__ = ["ImageEmbedding", "ImagePromptPipeline", "NonFiniteImageError", "StepInfo", "generate"]

#: How many distinct input batches keep their embeddings cached per pipeline.
EMBEDDING_CACHE_SIZE = 16
#: How many distinct texts (prompts, negative prompts) keep their text-encoder outputs cached per pipeline: a live
#: re-run after a slider move encodes nothing again.
TEXT_CACHE_SIZE = 32
#: The stages of ``GenerationResult.timings``, in the order a run passes them ("loading" first where the
#: controller loaded the model for the run); ``total`` is their sum, give or take bookkeeping.
STAGES = ("loading", "inputs", "waiting", "encoding", "conditioning", "denoising", "decoding")
#: The most input (or negative) images one run takes: each is decoded and encoded at once, so a folder of
#: thousands would exhaust memory before the first step.
MAX_INPUT_IMAGES = 64
#: Ordinary prompts whose text-encoder outputs set the target of norm matching.
NORM_PROBE_PROMPTS = (
    "a photograph of a cat sitting on a windowsill",
    "an oil painting of a lighthouse at sunset, dramatic sky",
    "a red sports car parked in a city street at night",
    "portrait of an old man with a beard, studio lighting",
)


@dataclass
class RunInputs:
    """A run's pictures, decoded and fingerprinted once (a 12-megapixel photo costs ~0.1 s for each)."""

    images: list[Any]
    prints: list[str]
    negatives: list[Any] = field(default_factory=list)
    negative_prints: list[str] = field(default_factory=list)
    #: The pictures whose layout a structure run keeps: one, or one per ControlNet unit (empty: the first input).
    structure_images: list[Any] = field(default_factory=list)
    adapter_images: list[list[Any]] = field(default_factory=list)  # per IP-Adapter (empty: the inputs for all)
    adapter_prints: list[list[str]] = field(default_factory=list)


@dataclass
class RunPlan:
    """Everything the denoising loop needs, decided before it starts."""

    structure: StructurePlan
    unet: conditioning.UnetConditioning
    contexts: list[Any]  # context managers around the diffusers call (method windows, structure records)
    trace: Trace
    provenance: Provenance
    #: Seconds of the diffusers call's two halves (``denoising``, ``decoding``) and its UNet calls, once it ran.
    seconds: dict[str, float] = field(default_factory=dict)
    unet_calls: int = 0


class ImagePromptPipeline:
    """A CLIP vision tower and a Stable Diffusion pipeline that it conditions.

    Get one with :meth:`from_preset` or :meth:`from_pretrained` (both cached: the same arguments
    give the same object). One generation runs at a time per object (schedulers are stateful);
    other callers wait on :attr:`lock`.
    """

    def __init__(
        self, sd: Any, image_encoder: Any, image_processor: Any, *, preset: Preset | None = None,
        parts: dict[str, Any] | None = None, allow_pickle: bool = False, loras: list[LoraInfo] | None = None,
        memory_level: str = DEFAULT_MEMORY, memory_measures: tuple[str, ...] = (),
        image_encoder_2: Any = None, image_processor_2: Any = None,
    ):
        self.sd = sd
        self.image_encoder = image_encoder
        self.image_processor = image_processor
        #: SDXL's second image encoder (OpenCLIP bigG, ``preset.clip_model_2``) and its processor; None without one.
        self.image_encoder_2 = image_encoder_2
        self.image_processor_2 = image_processor_2
        self.preset = preset or Preset(name="custom", sd_model="custom", clip_model="custom")
        #: What the preset's methods loaded beside SD and the encoder ("ip_adapter", "captioner").
        self.parts = dict(parts or {})
        #: The memory level the models were placed with (loading/memory.py) and what it did on this device.
        self.memory_level = check_level(memory_level)
        self.memory_measures = tuple(memory_measures)
        self._loras: list[LoraInfo] = list(loras or [])
        self._allow_pickle = allow_pickle
        self.lock = RunLock()
        self._embeddings: OrderedDict[tuple[str, ...], ImageEmbedding] = OrderedDict()
        self._empty_prompt_embeds: torch.Tensor | None = None
        self._text_token_norm: float | None = None
        #: text -> (embeds, pooled (SDXL; else None), was cut)
        self._texts: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None, bool]] = OrderedDict()
        self._text_seconds = 0.0  # time the text encoder ran during the current run
        self._tiny_decoder: Any = None
        self._tiny_decoder_given = False  # held through use_tiny_decoder (the recipe says "given")
        self._word_space: Any = None  # methods.words.WordSpace, built on first use
        self._structure = StructureRunners(sd, self.preset.controlnet, allow_pickle=allow_pickle)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_preset(
        cls,
        preset: str | Preset | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        safety_checker: bool | None = None,
        allow_pickle: bool = False,
        on_status: StatusCallback | None = None,
        on_progress: ProgressCallback | None = None,
        memory: str | None = None,
        projector: str | os.PathLike | None = None,
    ) -> ImagePromptPipeline:
        """Load (once per process) the preset's models: ``"sd14"`` (default), ``"sd15"``, ``"tiny"`` or a folder.

        ``safety_checker=None`` follows the model; ``False`` switches it off. ``allow_pickle=True``
        permits ``.bin`` weights, which can run code when loaded: only for models you trust.
        ``on_progress`` gets the Hub's download progress (:mod:`imageprompt_widgets.loading.downloads`); raising
        ``DownloadCancelled`` from it stops the download.
        ``memory`` (``"default"``, ``"balanced"``, ``"low"``, ``"lowest"``) saves GPU memory with diffusers'
        offloading, attention slicing and VAE tiling (loading/memory.py); it is part of the cache key, so panels
        asking for different levels get different pipelines. ``None`` chooses (``memory.automatic_level``):
        ``"default"``, except SDXL on a CUDA device under 20 GB (a 16 GB T4), which gets ``"low"``.
        ``projector`` (a folder written by ``imageprompt train-projector``) loads a trained projector for
        ``mode="projector"`` with any preset; the toy preset loads its own unless another is given.
        """
        preset = resolve_preset(preset)
        if projector is not None:
            preset = dataclasses.replace(preset, projector=os.fspath(projector))
        dev, dt = resolve_device_dtype(device, dtype)
        memory = automatic_level(preset.is_sdxl, dev) if memory is None else check_level(memory)
        key: Any = model_key(preset.sd_model, preset.clip_model, dev, dt, safety_checker, allow_pickle)
        extras = (preset.method, preset.revision, preset.clip_subfolder, preset.ip_adapter, preset.captioner,
                  preset.loras, preset.projector, preset.clip_model_2)
        if any(extras):  # the method presets share models with plain ones but are different pipelines
            key = (key, *extras)
        if memory != DEFAULT_MEMORY:
            key = (key, "memory", memory)

        def load() -> ImagePromptPipeline:
            loaded = load_components(
                preset, dev, dt, safety_checker=safety_checker, allow_pickle=allow_pickle, on_status=on_status,
                memory_level=memory, part_loaders=part_loaders(preset),
            )
            return cls.from_components(loaded, allow_pickle=allow_pickle)

        with watch_downloads(on_progress):
            return MODEL_CACHE.get_or_create(key, load)

    @classmethod
    def from_components(cls, loaded: LoadedComponents, *, allow_pickle: bool = False) -> ImagePromptPipeline:
        """A pipeline over already loaded components (not cached: e.g. a private copy for benchmarks)."""
        return cls(loaded.sd, loaded.image_encoder, loaded.image_processor, preset=loaded.preset,
                   parts=loaded.parts, allow_pickle=allow_pickle, loras=loaded.loras,
                   memory_level=loaded.memory_level, memory_measures=loaded.memory_measures,
                   image_encoder_2=loaded.image_encoder_2, image_processor_2=loaded.image_processor_2)

    @classmethod
    def from_pretrained(
        cls,
        sd_model: str | None = None,
        clip_model: str | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        safety_checker: bool | None = None,
        allow_pickle: bool = False,
        on_status: StatusCallback | None = None,
        memory: str | None = None,
    ) -> ImagePromptPipeline:
        """Pair any SD 1.x model (Hub id or folder) with any CLIP image encoder; defaults from the default preset."""
        default = resolve_preset(None)
        sd_model = sd_model or default.sd_model
        clip_model = clip_model or default.clip_model
        preset = next(
            (p for p in PRESETS.values() if (p.sd_model, p.clip_model) == (sd_model, clip_model)),
            Preset(name=sd_model, sd_model=sd_model, clip_model=clip_model),
        )
        return cls.from_preset(
            preset, device=device, dtype=dtype, safety_checker=safety_checker,
            allow_pickle=allow_pickle, on_status=on_status, memory=memory,
        )

    @property
    def device(self) -> torch.device:
        """Where the models compute (with offloading their weights wait on the CPU, but they run here)."""
        return execution_device(self.sd)

    @property
    def dtype(self) -> torch.dtype:
        return self.sd.unet.dtype

    @property
    def is_sdxl(self) -> bool:
        """Whether the model is SDXL (the preset's ``family``, which chose the pipeline class that loaded it)."""
        return self.preset.is_sdxl

    def __repr__(self) -> str:
        return f"ImagePromptPipeline(preset={self.preset.name!r}, device={self.device}, dtype={self.dtype})"

    # -- encoding -------------------------------------------------------------------------------

    def encode_image(self, images: Any, crop: str = "center_crop") -> ImageEmbedding:
        """Encode one image or a list in one batch; the same inputs again come from a small cache.

        With the default ``crop="center_crop"`` this equals
        ``image_encoder(**image_processor(images=..., return_tensors="pt"))`` exactly; ``"squash"``
        resizes to the square without keeping the aspect ratio and ``"pad"`` letterboxes the whole
        picture on CLIP's mean colour (which normalises to zero) before the same normalisation.
        """
        pil_images = load_images(images)
        return self._encode_loaded(pil_images, [fingerprint(image) for image in pil_images], crop)

    def _encode_loaded(
        self, pil_images: list[Any], fingerprints: list[str], crop: str, hidden: bool = False
    ) -> ImageEmbedding:
        """``encode_image`` for images already decoded and fingerprinted (``generate`` does both once);
        ``hidden`` also keeps the penultimate hidden states (IP-Adapter Plus). An entry that has them serves
        a request without them too."""
        for key in [(crop, True, *fingerprints)] + ([] if hidden else [(crop, False, *fingerprints)]):
            cached = self._embeddings.get(key)
            if cached is not None:
                self._embeddings.move_to_end(key)
                return _copied(cached)
        embedding = encode_images(pil_images, self.image_encoder, self.image_processor, crop, penultimate=hidden)
        if self.image_encoder_2 is not None:  # SDXL: bigG's embedding of the same pictures, beside ViT-L's
            embedding.second = encode_images(pil_images, self.image_encoder_2, self.image_processor_2, crop)
        self._embeddings[(crop, hidden, *fingerprints)] = embedding
        while len(self._embeddings) > EMBEDDING_CACHE_SIZE:
            self._embeddings.popitem(last=False)
        return _copied(embedding)

    def _no_image_embedding(self) -> ImageEmbedding:
        """What a words-only run traces for its images: none (zero rows, the encoder's widths)."""
        config = self.image_encoder.config
        hidden = getattr(config, "hidden_size", config.projection_dim)
        return ImageEmbedding(torch.zeros(0, 3, 0, 0), torch.zeros(0, config.projection_dim),
                              torch.zeros(0, 0, hidden))

    def empty_prompt_embeds(self) -> torch.Tensor:
        """SD's text encoder on ``""``: what diffusers uses as the negative when none is given (``[1, 77, D]``)."""
        if self._empty_prompt_embeds is None:
            self._empty_prompt_embeds = self.encode_text("", purpose="the empty-prompt negative")
        return self._empty_prompt_embeds

    def encode_text(self, prompt: str, *, purpose: str = "a text prompt") -> torch.Tensor:
        """SD's own text encoder on ``prompt``: exactly the ``prompt_embeds`` diffusers would compute (``[1, 77, D]``;
        on SDXL both text encoders' penultimate hidden states side by side, ``[1, 77, 2048]``).

        The same text again comes from a small cache (a LoRA that changes the text encoder empties it), so a
        live re-run whose prompt and negative did not change runs no text encoder.
        """
        return self._encoded_text(prompt, purpose)[0]

    def encode_pooled_text(self, prompt: str, *, purpose: str = "a text prompt") -> torch.Tensor:
        """SDXL's pooled slot for ``prompt``: exactly the ``pooled_prompt_embeds`` diffusers' ``encode_prompt`` returns
        (``text_encoder_2``'s projected embedding, ``[1, 1280]``); a :class:`SettingsError` on SD 1.x."""
        pooled = self._encoded_text(prompt, purpose)[1]
        if pooled is None:
            raise SettingsError(f"The {self.preset.name!r} model is not SDXL: it has no pooled text embedding.")
        return pooled

    def _encoded_text(self, prompt: str, purpose: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(prompt_embeds, pooled_prompt_embeds or None)`` of ``prompt``, from the text cache or encoded once."""
        if getattr(self.sd, "text_encoder", None) is None:
            raise SettingsError(
                f"The {self.preset.name!r} model has no text encoder, so it cannot use {purpose}: "
                "use negative='zeros' and a mode without text (repeat, single, tokens)."
            )
        with noting_prompt_truncation() as cut:  # a cut prompt is noted, not printed in full
            cached = self._texts.get(prompt)
            if cached is not None:
                self._texts.move_to_end(prompt)
                if cached[2]:
                    cut.append(prompt)  # the note a fresh encoding would have made
                return cached[0].clone(), None if cached[1] is None else cached[1].clone()
            started, before = time.perf_counter(), len(cut)
            with torch.inference_mode():
                if self.is_sdxl:
                    embeds, _, pooled, _ = self.sd.encode_prompt(
                        prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
                else:
                    (embeds, _), pooled = self.sd.encode_prompt(prompt, self.device, 1, False), None
            self._text_seconds += time.perf_counter() - started
            was_cut = len(cut) > before or self._longer_than_tokenizer(prompt)
            if was_cut and len(cut) == before:  # the libraries said nothing (their logging turned down): note it
                cut.append(prompt)
        self._texts[prompt] = (embeds, pooled, was_cut)
        while len(self._texts) > TEXT_CACHE_SIZE:
            self._texts.popitem(last=False)
        return embeds.clone(), None if pooled is None else pooled.clone()

    def _longer_than_tokenizer(self, prompt: str) -> bool:
        """Whether SD's tokenizer cuts ``prompt`` (the note must not depend on the libraries' log verbosity)."""
        tokenizer = self.sd.tokenizer
        return len(tokenizer(prompt, truncation=False)["input_ids"]) > tokenizer.model_max_length

    def text_token_norm(self) -> float:
        """The typical per-token norm of SD's text-encoder outputs, measured once per pipeline.

        Norm matching rescales image tokens to this length. It is measured on a few ordinary
        prompts (median over their tokens, start token left out), not hard-coded, so it is right
        for whatever text encoder is loaded.
        """
        if self._text_token_norm is None:
            embeds = torch.cat([self.encode_text(p, purpose="norm matching") for p in NORM_PROBE_PROMPTS])
            self._text_token_norm = conditioning.typical_token_norm(embeds)
        return self._text_token_norm

    def default_settings(self) -> GenerationSettings:
        """The settings a run starts from: the library defaults with the preset's own (e.g. variations) applied."""
        return GenerationSettings.from_kwargs(**dict(self.preset.defaults))

    @property
    def captioner(self) -> Any:
        """The preset's BLIP captioner (``None`` for presets without one)."""
        return self.parts.get("captioner")

    def caption(self, images: Any) -> str:
        """Caption the (first) image with the preset's captioner (BLIP); ``mode="caption"`` generates from it."""
        if self.captioner is None:
            raise SettingsError(
                f"The {self.preset.name!r} preset has no captioner: use the 'caption' or 'tiny-caption' preset."
            )
        with self.lock:
            return self.captioner.caption(load_images(images)[0])

    @property
    def ip_adapters(self) -> tuple[str, ...]:
        """The loaded IP-Adapters' names, in the order ``adapter_images`` and ``adapter_scales`` follow (empty
        without one)."""
        handle = self.parts.get("ip_adapter")
        return handle.names if handle is not None else ()

    def capabilities(self) -> frozenset[str]:
        """What the loaded models can do (the method registry's terms): image tokens of the UNet's width,
        SD's text encoder, an IP-Adapter, a captioner."""
        found = set()
        width = self.image_encoder.config.projection_dim
        if self.image_encoder_2 is not None:
            width += self.image_encoder_2.config.projection_dim
        if width == self.sd.unet.config.cross_attention_dim:
            found.add("image_tokens")
        if getattr(self.sd, "text_encoder", None) is not None:
            found.add("text")
        if self.is_sdxl:
            found.add("sdxl")
            text_2 = getattr(self.sd, "text_encoder_2", None)
            if (self.image_encoder_2 is not None and text_2 is not None
                    and self.image_encoder_2.config.projection_dim == text_2.config.projection_dim):
                found.add("pooled_image")
        found.update(name for name in ("ip_adapter", "captioner", "projector") if name in self.parts)
        return frozenset(found)

    def methods(self) -> list[str]:
        """The methods (``mode`` values) this pipeline can run."""
        capabilities = self.capabilities()
        return [name for name in MODES if METHODS[name].available(capabilities)]

    def text_side(self) -> TextSide:
        """SD's text encoder as conditioning builders see it (with SDXL's pooled slot on SDXL)."""
        if not self.is_sdxl:
            return TextSide(encode=self.encode_text, empty=self.empty_prompt_embeds, typical_norm=self.text_token_norm)
        return TextSide(encode=self.encode_text, empty=self.empty_prompt_embeds, typical_norm=self.text_token_norm,
                        pooled=self.encode_pooled_text,
                        zeros_for_empty=bool(self.sd.config.get("force_zeros_for_empty_prompt", False)))

    # -- IP-Adapters added to a loaded pipeline (loading/adapter_fit.py, methods/ip_adapter.py) ---------------

    def load_ip_adapter(
        self, source: str | os.PathLike, *, image_encoder: str | os.PathLike | None = None,
        allow_pickle: bool | None = None,
    ) -> AdapterNeeds:
        """Add an IP-Adapter to this pipeline: a ``.safetensors`` file, ``"folder::weight_name"``,
        ``"repo:subfolder:weight_name"`` (``"h94/IP-Adapter:models:ip-adapter_sd15.safetensors"``) or an offline
        twin's name (``"tiny-ip-adapter-plus"``). Returns what it needs, read from its shapes.

        The file is checked against this pipeline's image encoder and UNet before anything is loaded: one that
        does not fit raises :class:`~imageprompt_widgets.loading.adapter_fit.AdapterFitError` (a ``ValueError``)
        naming the encoder or UNet it needs, and the pipeline is left as it was. ``image_encoder`` (a folder, a Hub
        id, or ``"repo:subfolder"`` as the sentence names it: ``"h94/IP-Adapter:models/image_encoder"``) replaces
        the pipeline's image encoder with the one the adapter needs, once the adapters fit it. Adapters loaded
        before stay, this one beside them (``adapter_images``/``adapter_scales`` follow the load order:
        :attr:`ip_adapters`); ``mode="ip_adapter"`` is then available. Acts on every later run of this pipeline
        (and of every panel sharing it); waits for a running generation to finish first. ``allow_pickle``
        (default: the pipeline's) permits a ``.bin`` file, which can run code when loaded.
        """
        from ..loading.offline import TINY_ADAPTER_NAMES, tiny_adapter_spec
        from ..loading.offline_sdxl_adapters import TINY_SDXL_ADAPTER_NAMES, tiny_sdxl_adapter_spec

        name = os.fspath(source)
        allow = self._allow_pickle if allow_pickle is None else allow_pickle
        with self.lock:
            current = self.parts.get("ip_adapter")
            names = [*(current.names if current is not None else ()), name]
            if current is not None and len(current.files) != len(current):
                raise SettingsError("The IP-Adapters of this pipeline were loaded without their files: load the "
                                    "new one with a preset that lists them all.")
            spec = (tiny_adapter_spec(name) if name in TINY_ADAPTER_NAMES else
                    tiny_sdxl_adapter_spec(name) if name in TINY_SDXL_ADAPTER_NAMES else name)
            specs = [*(current.files if current is not None else ()), spec]
            encoder, processor, preset = self.image_encoder, self.image_processor, self.preset
            if image_encoder is not None:
                encoder, processor, preset = self._adapter_encoder(os.fspath(image_encoder), allow)
            handle = ip_adapter.load_adapters(self.sd, encoder, processor, specs, names,
                                              encoder_name=preset.clip_model, allow_pickle=allow)
            if encoder is not self.image_encoder:
                self.image_encoder, self.image_processor, self.preset = encoder, processor, preset
                self._embeddings.clear()
            self.parts["ip_adapter"] = handle
            return handle.needs[-1]

    def _adapter_encoder(self, source: str, allow_pickle: bool) -> tuple[Any, Any, Preset]:
        """The image encoder ``source`` names (``"repo:subfolder"``, a Hub id or a folder), on this pipeline's device
        and dtype, and this pipeline's preset with it as ``clip_model``."""
        from ..loading.components import load_image_encoder

        repo, _, subfolder = source.partition(":") if not os.path.isdir(source) else (source, "", "")
        preset = dataclasses.replace(self.preset, clip_model=repo, clip_subfolder=subfolder or None)
        encoder, processor = load_image_encoder(repo, preset, self.dtype, allow_pickle,
                                                fallback_processor=getattr(self.sd, "feature_extractor", None))
        return encoder.to(self.device).eval(), processor, preset

    # -- LoRA (loading/lora.py) ------------------------------------------------------------------------------

    @property
    def loras(self) -> tuple[LoraInfo, ...]:
        """The LoRAs loaded into this pipeline, each with its name, source and weight (they act on every run)."""
        return tuple(self._loras)

    def load_lora(self, source: str, weight: float = 1.0, name: str | None = None) -> LoraInfo:
        """Load a LoRA (a ``.safetensors`` file, a folder, a Hub id or ``"owner/repo:file.safetensors"``;
        ``"tiny-lora"``/``"tiny-lcm-lora"``: the offline twins) with diffusers' LoRA loader, active at ``weight``.

        It acts on every later run of this pipeline (and of every panel sharing it) until
        :meth:`unload_loras`; the recipe lists it. Waits for a running generation to finish first.
        """
        from ..loading.offline import TINY_LORAS, ensure_tiny_lora
        from ..loading.offline_sdxl import TINY_SDXL_LORAS, ensure_tiny_sdxl_lora

        with self.lock:
            taken = {info.name for info in self._loras}
            name = name or lora.default_name(source, taken)
            if name in taken:
                raise lora.LoraError(f"A LoRA named {name!r} is loaded already: pass another name=.")
            weight = lora.check_weight(weight, name)
            local = (ensure_tiny_lora(source) if source in TINY_LORAS
                     else ensure_tiny_sdxl_lora(source) if source in TINY_SDXL_LORAS else source)
            info = lora.load_lora(self.sd, source, local, name, weight)
            self._loras.append(info)
            lora.activate(self.sd, self._loras)
            self._text_changed()
            return info

    def set_lora_weight(self, name: str, weight: float) -> LoraInfo:
        """Change a loaded LoRA's weight (cheap: no reload); 0 switches it off without unloading it."""
        with self.lock:
            index = next((i for i, info in enumerate(self._loras) if info.name == name), None)
            if index is None:
                loaded = ", ".join(info.name for info in self._loras) or "none"
                raise lora.LoraError(f"No LoRA named {name!r} is loaded (loaded: {loaded}).")
            if self._loras[index].fused:
                raise lora.LoraError(
                    f"The LoRA {name!r} is fused into the {self.preset.name!r} model: its weight is part of the "
                    "model (load it with pipe.load_lora on the base preset to change it)."
                )
            info = LoraInfo(name, self._loras[index].source, lora.check_weight(weight, name))
            self._loras[index] = info
            lora.activate(self.sd, self._loras)
            self._text_changed()
            return info

    def unload_loras(self) -> None:
        """Remove every LoRA loaded with :meth:`load_lora`: the UNet and text encoder have the weights they had
        before, bit for bit. (A preset's fused LoRAs are part of its model and stay.)"""
        with self.lock:
            if any(not info.fused for info in self._loras):
                lora.unload_all(self.sd)
                self._loras = [info for info in self._loras if info.fused]
                self._text_changed()

    def _text_changed(self) -> None:
        """A LoRA may change the text encoder: forget what was measured and encoded with it."""
        self._empty_prompt_embeds = None
        self._text_token_norm = None
        self._texts.clear()

    # -- structure (structure/plan.py) ------------------------------------------------------------------

    def load_controlnet(
        self, model: str | None = None, on_status: StatusCallback | None = None, *, kind: str | None = None
    ) -> Any:
        """The ControlNet of a structure kind, loaded once: the preset's, or ``model`` (Hub id or folder).

        Each ControlNet reads one kind of map (structure/controlnets.py): ``kind="edges"`` (Canny edges, the default) or
        ``"depth"``. A ``model`` whose name says which (``...-canny``, ``..._depth``) needs no ``kind``; it then
        replaces the preset's ControlNet of that kind, so runs feed it the map it was trained on.
        """
        with self.lock:
            return self._structure.controlnet(model, on_status, kind=kind)

    def load_structure(self, settings: GenerationSettings, on_status: StatusCallback | None = None) -> None:
        """Load every ControlNet and map estimator a run with ``settings`` needs (each once), so that a face can
        report the loading before the run's first step instead of inside it."""
        with self.lock:
            for unit in settings.units():
                self._structure.controlnet(on_status=on_status, kind=unit.kind)
                self._structure.estimator(unit.kind, on_status)

    def structure_maps(
        self, images: Any = None, settings: GenerationSettings | None = None, *, structure_image: Any = None,
        on_status: StatusCallback | None = None, **changes: Any,
    ) -> list[ControlMap]:
        """Each ControlNet unit's map exactly as a run with these settings would feed it (what the panel's
        Structure section previews): ``.image`` (grayscale, at the run's size), ``.unit``, ``.controlnet``.

        The pictures are ``structure_image`` (one for all units, or one each), else the first of ``images``.
        Loads the depth estimator on first use, but never waits for a running generation.
        """
        settings = settings or self.default_settings()
        if changes:
            settings = settings.replace(**changes)
        pictures = load_images(structure_image) if structure_image is not None else load_images(images)[:1]
        if not pictures:
            raise SettingsError("structure_maps needs a picture: pass images or structure_image.")
        return self._structure.maps(settings, pictures, on_status)

    @property
    def native_size(self) -> int:
        """The model's native side in pixels (512 for SD 1.x): the longer side of a structure run by default."""
        return self._structure.native_size

    def structure_pipeline(self, structure: str | GenerationSettings = "none") -> Any:
        """The diffusers pipeline a run with ``structure`` calls: :attr:`sd` itself, or its ControlNet or
        img2img twin built from the same components (so bare diffusers can be compared with it). With settings,
        the ControlNet pipeline of all their units (``control_units`` too)."""
        with self.lock:
            if isinstance(structure, GenerationSettings):
                return self._structure.pipeline(structure.structure, kinds=[u.kind for u in structure.units()])
            return self._structure.pipeline(structure)

    # -- inspection: the engine's side of the inspector's views --------------------------------------

    def clip_text_tower(self) -> ClipTextTower:
        """The text tower with projection of the preset's CLIP checkpoint, loaded once (model cache).

        Raises :class:`~imageprompt_widgets.faults.TextTowerUnavailable` where the checkpoint holds only a
        vision tower (the IP-Adapter's encoder, the image-variations model).
        """
        folder = getattr(self.image_encoder.config, "name_or_path", "") or self.preset.clip_model
        key = ("clip-text-tower", os.path.abspath(folder) if os.path.isdir(folder) else folder,
               str(self.device), str(self.image_encoder.dtype))
        return MODEL_CACHE.get_or_create(
            key, lambda: load_clip_text_tower(folder, shown_source(self.preset.clip_model), self.device,
                                             self.image_encoder.dtype)
        )

    def word_space(self) -> Any:
        """CLIP's text tower with projection and the preset's phrase table, its embeddings computed once per model
        (and kept on disk): what ``mode="words"`` and :meth:`nearest_words` use
        (:class:`~imageprompt_widgets.methods.words.WordSpace`). Raises
        :class:`~imageprompt_widgets.faults.TextTowerUnavailable` where the checkpoint has no text tower."""
        from ..methods.words import table_name_for, word_space

        if self._word_space is None:
            self._word_space = word_space(self.clip_text_tower(), table_name_for(self.preset.clip_model))
        return self._word_space

    def nearest_words(self, image: Any, k: int = 10, crop: str = "center_crop") -> list[tuple[str, float]]:
        """The ``k`` phrases of the shipped table whose CLIP text embeddings are nearest the image embedding, best
        first, as ``(phrase, cosine)`` pairs. ``image``: anything :meth:`encode_image` takes, an
        :class:`ImageEmbedding`, or projected embeddings ``[D]`` / ``[N, D]`` (several: their mean direction)."""
        if isinstance(image, ImageEmbedding):
            embeds = image.image_embeds
        elif isinstance(image, torch.Tensor):
            embeds = image
        else:
            embeds = self.encode_image(image, crop=crop).image_embeds
        return self.word_space().nearest(embeds, k)

    def adapter_tokens(self, result: GenerationResult, adapter: int = 0, index: int = 0) -> Any:
        """What IP-Adapter ``adapter`` made of output ``index``'s pictures in ``result``: its tokens (and, for a Plus
        adapter, where each of the resampler's query tokens looked), recomputed from the traced input
        (:class:`~imageprompt_widgets.methods.ip_adapter.AdapterTokens`; ``views.adapter_tokens`` draws it)."""
        handle = self.parts.get("ip_adapter")
        traced = result.trace.extras.get(adapter_trace_name(adapter)) if result.trace is not None else None
        if handle is None or traced is None:
            raise SettingsError("This run fed no IP-Adapter: generate with mode='ip_adapter' on an IP-Adapter preset.")
        guided = result.trace.negative_prompt_embeds is not None
        row = traced.shape[0] // 2 + index if guided else index  # diffusers' layout: the negatives first
        return handle.tokens(adapter, traced[row])

    # -- decoding and precision: what a run's settings choose ---------------------------------------

    def tiny_decoder_source(self) -> str:
        """Where this model's tiny decoder comes from: ``madebyollin/taesd`` for SD 1.x's VAE,
        ``madebyollin/taesdxl`` for SDXL's, the offline twin (``tiny-taesd``: 4 latent channels, one x2 upsampling)
        for the tiny presets' VAEs (``tiny`` and ``tiny-sdxl``); a :class:`SettingsError` for a VAE without one."""
        from ..loading.offline import TINY_TAESD
        from .preview import TAESD_SD1, TAESD_SDXL, is_sd1_vae, is_sdxl_vae

        vae = self.sd.vae
        if is_sd1_vae(vae):
            return TAESD_SD1
        if is_sdxl_vae(vae):
            return TAESD_SDXL
        config = vae.config
        tiny_vaes = {"tiny": [32, 64], "tiny-sdxl": [16, 32]}  # offline.py's and offline_sdxl.py's tiny VAEs
        if (config.get("latent_channels") == 4
                and list(config.get("block_out_channels", [])) == tiny_vaes.get(self.preset.offline_builder or "")):
            return TINY_TAESD
        raise SettingsError(
            f"The {self.preset.name!r} model has no tiny decoder (TAESD is made for SD 1.x's VAE, TAESDXL for SDXL's, "
            "and their offline twin for the tiny presets'): use decoder='full'."
        )

    def tiny_decoder(self) -> Any:
        """The tiny decoder (TAESD: diffusers' ``AutoencoderTiny``) that ``decoder="tiny"`` runs, loaded once and held
        by this pipeline (a few MB; downloaded from the Hub like the model itself where it is not cached)."""
        if self._tiny_decoder is None:
            from diffusers import AutoencoderTiny

            from ..loading.offline import TINY_TAESD, ensure_tiny_taesd

            source = self.tiny_decoder_source()
            folder = ensure_tiny_taesd() if source == TINY_TAESD else source
            with translate_load_errors(source, False), quiet_loaders():
                model = AutoencoderTiny.from_pretrained(folder, use_safetensors=True)
            model = model.to(self.device)
            if model.dtype != self.sd.vae.dtype:  # the VAE's dtype (half on a GPU): the twin decodes like it
                model = model.to(dtype=self.sd.vae.dtype)
            self._tiny_decoder = model.eval()
        return self._tiny_decoder

    def use_tiny_decoder(self, model: Any) -> None:
        """Hold ``model`` (an ``AutoencoderTiny`` loaded or trained elsewhere) as the tiny decoder of later runs."""
        with self.lock:
            self._tiny_decoder = model.to(self.device).eval()
            self._tiny_decoder_given = True

    def _tiny_decoder_name(self) -> str:
        """What the recipe names as the tiny decoder: its source, or "given" for one handed to use_tiny_decoder."""
        return "given" if self._tiny_decoder_given else self.tiny_decoder_source()

    @property
    def tiny_decoder_loaded(self) -> Any:
        """The tiny decoder once a ``decoder="tiny"`` run (or :meth:`tiny_decoder`) loaded it, else ``None``: previews
        use it where it is there (engine/preview.py)."""
        return self._tiny_decoder

    def compute_dtype(self, settings: GenerationSettings) -> torch.dtype:
        """The dtype a run with ``settings`` computes in: the model's own, or bfloat16 under autocast.

        ``precision="auto"`` autocasts a float32 model on a CPU with bfloat16 instructions for runs of at most
        :data:`~imageprompt_widgets.settings.AUTOCAST_MAX_STEPS` steps (live runs); ``"float32"`` never does, and
        ``"bfloat16"`` always does where the model is float32.
        """
        if self.dtype != torch.float32 or settings.precision == "float32":
            return self.dtype
        if settings.precision == "bfloat16":
            return torch.bfloat16
        if (self.device.type == "cpu" and settings.steps <= AUTOCAST_MAX_STEPS
                and load_policy.cpu_has_bfloat16()):
            return torch.bfloat16
        return self.dtype

    def decode_latents(self, latents: torch.Tensor) -> list[Any]:
        """Latents ``[B, C, h, w]`` through the VAE, exactly (not a preview), as PIL images."""
        from PIL import Image

        vae = self.sd.vae
        with torch.inference_mode():
            pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
        pixels = ((pixels.float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return [Image.fromarray(frame.permute(1, 2, 0).numpy()) for frame in pixels]

    def replay_x0(self, result: GenerationResult, snapshots: list[int], index: int = 0) -> torch.Tensor:
        """The model's clean-latent estimate at traced latent snapshots, ``[len(snapshots), C, h, w]``.

        The latent after step ``k`` is the noisy input of step ``k + 1``: the UNet runs on it once more with
        the traced prompt (and negative, with the run's guidance) and :func:`~imageprompt_widgets.engine.steps.predicted_x0`
        gives the estimate, the same as the live previews' ``StepInfo.x0()``. The final latent is its own x0.
        Needs the run's latents (``trace_latents=True``) and conditioning that is all in the prompt embeddings
        (not IP-Adapter or masked prompts). The run's scheduler is rebuilt from its settings: sigma-space
        schedulers give their step's sigma, and Euler-type latents are scaled to the UNet's input as they do.
        """
        trace = result.trace
        if trace is None or trace.latents is None:
            raise SettingsError("This run traced no latents: generate with trace_latents=True to replay its steps.")
        if "encoder_attention_mask" in trace.extras or "ip_adapter_image_embeds" in trace.extras:
            raise SettingsError("x0 replays need the whole prompt in prompt_embeds (no masked prompt, no IP-Adapter).")
        scheduler = scheduler_for(result.settings.scheduler, self.sd.scheduler)
        scheduler.set_timesteps(result.settings.steps)
        skipped = len(scheduler.timesteps) - len(trace.timesteps)  # img2img starts part-way into the schedule
        sigma_space = uses_sigmas(scheduler)
        scaled_input = float(scheduler.init_noise_sigma) != 1.0  # Euler-type: latents carry sqrt(sigma^2 + 1)
        unet = self.sd.unet
        prompt = trace.prompt_embeds[index : index + 1].to(self.device, self.dtype)
        negative = trace.negative_prompt_embeds
        guidance = result.settings.guidance_scale if negative is not None else None
        if guidance is not None:
            prompt = torch.cat([negative[index : index + 1].to(self.device, self.dtype), prompt])
        added = self._replayed_added_conditioning(result, index, guidance is not None)
        estimates = []
        for snapshot in snapshots:
            sample = trace.latents[snapshot, index : index + 1].to(self.device, torch.float32)
            step = trace.latent_steps[snapshot] if trace.latent_steps else snapshot + 1
            if step >= len(trace.timesteps):
                estimates.append(sample.cpu())
                continue
            timestep = torch.tensor(trace.timesteps[step])
            sigma = float(scheduler.sigmas[skipped + step]) if sigma_space else None
            if scaled_input and sigma is not None:
                sample = sample / (sigma**2 + 1) ** 0.5
            model_input = torch.cat([sample, sample]) if guidance is not None else sample
            with torch.inference_mode():
                prediction = unet(model_input.to(self.dtype), timestep.to(self.device),
                                  encoder_hidden_states=prompt, **added).sample
            estimates.append(
                predicted_x0(sample, timestep, guided_prediction(prediction, guidance), scheduler, sigma).cpu()
            )
        return torch.cat(estimates)

    def _replayed_added_conditioning(self, result: GenerationResult, index: int, guided: bool) -> dict[str, Any]:
        """SDXL's ``added_cond_kwargs`` of a traced run (its pooled slot and micro-conditioning, as diffusers built
        them: negatives first when guided); nothing on SD 1.x."""
        trace = result.trace
        if trace.pooled_prompt_embeds is None:
            return {}
        pooled = trace.pooled_prompt_embeds[index : index + 1]
        if guided:
            pooled = torch.cat([trace.negative_pooled_prompt_embeds[index : index + 1], pooled])
        told = result.provenance.notes["micro_conditioning"]
        time_ids = torch.tensor([[*told["original_size"], *told["crops_coords_top_left"], *told["target_size"]]],
                                dtype=self.dtype)
        return {"added_cond_kwargs": {"text_embeds": pooled.to(self.device, self.dtype),
                                      "time_ids": time_ids.repeat(pooled.shape[0], 1).to(self.device)}}

    def interpolate(
        self, start: Any, end: Any, count: int = 5, settings: GenerationSettings | None = None, *,
        on_step: StepCallback | None = None, cancel: threading.Event | None = None, **changes: Any,
    ) -> Interpolation:
        """``count`` images along a slerp from ``start`` to ``end`` with one seed: the embedding-space walk.

        Each end is an image (anything ``load_image`` takes), a text (CLIP's text tower with projection) or
        a ``[D]`` embedding. Each point is the ``slerp`` combine of the two ends with weights ``[1 - t, t]``,
        generated as a ``repeat`` prompt through :meth:`generate` (trace, NaN check, cancel): for two
        images it is exactly ``generate([a, b], combine="slerp", weights=[1 - t, t])``. ``settings`` (and
        keyword changes) give seed, steps, guidance, scale and norm matching.
        """
        if count < 2:
            raise SettingsError(f"An interpolation needs at least 2 images, not {count}.")
        if self.is_sdxl:
            raise SettingsError("pipe.interpolate walks one CLIP tower's embedding space, and SDXL's image tokens need "
                                "two towers' and its pooled slot: it is not available on SDXL yet (use an SD 1.x preset).")
        settings = (settings or self.default_settings()).replace(
            mode="repeat", num_images=1, structure="none", weights=(), **changes
        )
        if settings.negative == "image":
            settings = settings.replace(negative="empty_prompt")
        (first, first_label), (last, last_label) = self._endpoint(start), self._endpoint(end)
        if first.shape != last.shape:
            raise SettingsError(f"The two ends have different widths: {tuple(first.shape)} and {tuple(last.shape)}.")
        weights = [i / (count - 1) for i in range(count)]
        ends = torch.stack([first, last])
        embeds = torch.stack([conditioning.slerp(ends, torch.tensor([1 - w, w]))[0] for w in weights])
        results = []
        for embed in embeds:
            point = ImageEmbedding.from_embeds(embed[None].to(self.device, self.image_encoder.dtype))
            result = self.generate(point, settings, on_step=on_step, cancel=cancel)
            if result.cancelled:
                break
            results.append(result)
        return Interpolation(weights, embeds, results, (first_label, last_label))

    def _endpoint(self, value: Any) -> tuple[torch.Tensor, str]:
        if isinstance(value, str):  # a text; a picture on disk is a Path or an image
            return self.clip_text_tower().embed([value])[0], repr(value)
        if isinstance(value, torch.Tensor):
            return value.detach().float().cpu().reshape(-1), "an embedding"
        name = describe_source(value)  # a file's quoted name where it has one
        return self.encode_image(value).image_embeds[0].detach().float().cpu(), name if name[:1] == "'" else "an image"

    # -- generation: check inputs → encode → condition → plan → denoise → result ------------------

    def generate(
        self,
        images: Any = None,
        settings: GenerationSettings | None = None,
        *,
        negative_image: Any = None,
        structure_image: Any = None,
        adapter_images: Any = None,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        trace_latents: bool = False,
        trace_attention: bool = False,
        **changes: Any,
    ) -> GenerationResult:
        """Generate from images; keyword settings are those of :class:`GenerationSettings`.

        ``images`` is anything ``load_image`` takes (or a list), or an :class:`ImageEmbedding` already
        computed. ``negative_image`` (one image or several) becomes the negative conditioning, so guidance
        pushes away from it (it implies ``negative="image"``). ``on_step`` is called after every step
        (progress, previews); setting ``cancel`` stops the run after the current step without decoding,
        and the result has ``cancelled=True`` (a :class:`~imageprompt_widgets.engine.concurrency.CancelEvent`
        also ends a wait for another run on this pipeline at once). ``structure_image`` is the picture
        whose layout ``structure="edges"``, ``"depth"`` or ``"img2img"`` keeps (default: the first input image);
        with ``control_units``, one picture for all ControlNet units or a list with one per unit.
        ``adapter_images`` (``mode="ip_adapter"``) gives each loaded IP-Adapter its own images, one list per
        adapter (e.g. ``[[scene], [face]]``); without it every adapter sees ``images``.
        ``trace_latents=True`` keeps the latents after each step (``trace.latents``); ``trace_attention=True``
        records where each prompt token acts (``trace.attention_maps``, see :mod:`imageprompt_widgets.engine.attention`).
        """
        started = time.perf_counter()
        settings, inputs = self._check_inputs(images, settings, negative_image, structure_image, changes,
                                              adapter_images)
        if settings.decoder == "tiny" and self._tiny_decoder is None:
            self.tiny_decoder_source()  # a model without a tiny decoder is refused before any work
        checked = time.perf_counter()
        timings = {"inputs": checked - started}
        if not self.lock.acquire(cancel):  # cancelled while another run held the pipeline
            return GenerationResult([], None, settings, self._provenance(settings, inputs), cancelled=True,
                                    timings=_with_total(timings, started))
        try:
            start = time.perf_counter()
            timings["waiting"] = start - checked
            if settings.decoder == "tiny" and self._tiny_decoder is None:
                self.tiny_decoder()  # loaded once: its first run says so in its timings
                timings["loading"] = time.perf_counter() - start
            encode_start = time.perf_counter()
            self._text_seconds = 0.0
            embedding, negative_embedding, adapter_embeddings = self._encode(images, inputs, settings)
            encoded = time.perf_counter()
            cond = self._condition(inputs, settings, embedding, negative_embedding, adapter_embeddings)
            plan = self._plan(inputs, settings, embedding, cond)
            planned = time.perf_counter()
            # SD's text encoder runs inside the method's conditioning (encode_text keeps its time): encoding.
            text = min(self._text_seconds, planned - encoded)
            timings["encoding"] = encoded - encode_start + text
            timings["conditioning"] = planned - encoded - text
            if cancel is not None and cancel.is_set():
                return GenerationResult([], plan.trace, settings, plan.provenance, cancelled=True,
                                        seconds=time.perf_counter() - start, timings=_with_total(timings, started))
            output = self._denoise(plan, settings, on_step, cancel, trace_latents, trace_attention)
            timings.update(plan.seconds)
            return GenerationResult(
                images=list(output.images) if output is not None else [],
                trace=plan.trace,
                settings=settings,
                provenance=plan.provenance,
                cancelled=output is None,
                # SDXL has no safety checker (its output has no such field)
                nsfw_content_detected=getattr(output, "nsfw_content_detected", None) if output is not None else None,
                seconds=time.perf_counter() - start,
                timings=_with_total(timings, started),
                unet_calls=plan.unet_calls,
            )
        finally:
            self.lock.release()

    def _check_inputs(
        self, images: Any, settings: GenerationSettings | None, negative_image: Any, structure_image: Any,
        changes: dict[str, Any], adapter_images: Any = None,
    ) -> tuple[GenerationSettings, RunInputs]:
        """Validate the settings against the inputs and decode every picture once, before any model work."""
        settings = settings or self.default_settings()
        if negative_image is not None and settings.negative == "empty_prompt" and "negative" not in changes:
            changes["negative"] = "image"
        if changes:
            settings = settings.replace(**changes)
        _check_image_count(images, "input")
        _check_image_count(negative_image, "negative")
        if _no_images(images) and not settings.text_only:
            raise ImageInputError(
                f"mode={settings.mode!r} needs an image: add one, or draw from words alone with mode='text' (or "
                "blend with image_weight=0) and a prompt."
            )
        pil_images = [] if isinstance(images, ImageEmbedding) or _no_images(images) else load_images(images)
        negatives = load_images(negative_image) if negative_image is not None else []
        if settings.negative == "image" and not negatives:
            raise SettingsError("negative='image' needs negative_image=: the image(s) guidance should push away from.")
        if negatives and settings.negative != "image":
            raise SettingsError(
                f"negative_image was given but negative={settings.negative!r}: pass negative='image' to use it."
            )
        self._check_family(settings)
        # Counted before any is decoded, as inputs and negatives are.
        listed = _source_count(structure_image) if structure_image is not None else 0
        if listed and settings.structure == "none":
            raise SettingsError(
                "structure_image was given but structure='none': pass structure='edges', 'depth' or 'img2img'."
            )
        if listed > 1 and settings.structure == "img2img":
            raise SettingsError(f"structure='img2img' takes one structure_image, not {listed}.")
        if listed > 1:
            unit_pictures([None] * listed, len(settings.units()))  # one for all units, or one each
        structure_images = load_images(structure_image) if structure_image is not None else []
        if settings.structure != "none" and not (structure_images or pil_images):
            raise SettingsError(f"structure={settings.structure!r} needs a picture: pass structure_image=.")
        per_adapter = self._adapter_images(adapter_images, settings)
        return settings, RunInputs(
            pil_images, [fingerprint(image) for image in pil_images],
            negatives, [fingerprint(image) for image in negatives],
            structure_images,
            per_adapter, [[fingerprint(image) for image in group] for group in per_adapter],
        )

    def _check_family(self, settings: GenerationSettings) -> None:
        """What only one model family runs: micro-conditioning is SDXL's."""
        if not self.is_sdxl:
            chosen = settings.micro_conditioning()
            if chosen:
                raise SettingsError(
                    f"{', '.join(chosen)} {'is' if len(chosen) == 1 else 'are'} SDXL's micro-conditioning, and "
                    f"{self.preset.name!r} is not SDXL: leave {'it' if len(chosen) == 1 else 'them'} empty, or use "
                    "the 'sdxl' or 'tiny-sdxl' preset."
                )

    def _adapter_images(self, adapter_images: Any, settings: GenerationSettings) -> list[list[Any]]:
        """``adapter_images`` decoded: one list of pictures per loaded IP-Adapter."""
        if adapter_images is None:
            return []
        if settings.mode != "ip_adapter":
            raise SettingsError(f"adapter_images are the IP-Adapters' images: use them with mode='ip_adapter', "
                                f"not {settings.mode!r}.")
        if not isinstance(adapter_images, (list, tuple)) or not adapter_images:
            raise SettingsError("adapter_images takes one list of images per IP-Adapter, e.g. [[scene], [face]].")
        count = len(self.parts["ip_adapter"]) if "ip_adapter" in self.parts else 0
        if len(adapter_images) != count:
            raise SettingsError(
                f"adapter_images has {len(adapter_images)} entr{'ies' if len(adapter_images) > 1 else 'y'} but "
                f"{self.preset.name!r} has {count} IP-Adapter{'s' if count != 1 else ''}: give one list of images "
                "per adapter."
            )
        for group in adapter_images:
            _check_image_count(group, "adapter")
        return [load_images(group) for group in adapter_images]

    def _encode(
        self, images: Any, inputs: RunInputs, settings: GenerationSettings
    ) -> tuple[ImageEmbedding, ImageEmbedding | None, list[ImageEmbedding]]:
        """The inputs', negative images' and each IP-Adapter's own images' CLIP embeddings (from the small cache
        when seen before); with the penultimate hidden states where an IP-Adapter Plus reads them."""
        adapter = self.parts.get("ip_adapter")
        hidden = settings.mode == "ip_adapter" and adapter is not None and adapter.needs_hidden_states
        if isinstance(images, ImageEmbedding):
            embedding = images
        elif settings.mode == "text" or not inputs.images:  # words only: the images (if any) are not encoded
            embedding = self._no_image_embedding()
        else:
            embedding = self._encode_loaded(inputs.images, inputs.prints, settings.crop, hidden)
        negative = (self._encode_loaded(inputs.negatives, inputs.negative_prints, settings.crop, hidden)
                    if inputs.negatives else None)
        per_adapter = [self._encode_loaded(group, prints, settings.crop, hidden)
                       for group, prints in zip(inputs.adapter_images, inputs.adapter_prints)]
        return embedding, negative, per_adapter

    def _condition(
        self, inputs: RunInputs, settings: GenerationSettings, embedding: ImageEmbedding,
        negative_embedding: ImageEmbedding | None, adapter_embeddings: list[ImageEmbedding] | None = None,
    ) -> conditioning.Conditioning:
        """The method's conditioning for one output image (its registry entry builds it)."""
        # Words only: mode="text", or blend at image weight 0 without an image (exactly text-to-image).
        build = METHODS["text" if settings.text_only and not len(embedding) else settings.mode].builder()
        with noting_prompt_truncation() as truncated:
            cond = build(ConditioningInputs(
                settings=settings, embedding=embedding, text=self.text_side(),
                cross_attention_dim=self.sd.unet.config.cross_attention_dim, negative_embedding=negative_embedding,
                images=inputs.images, parts=self.parts, preset_name=self.preset.name,
                adapter_embeddings=adapter_embeddings or [], words=self.word_space,
            ))
        if self.is_sdxl and cond.pooled is None:
            raise SettingsError(f"mode={settings.mode!r} does not fill SDXL's pooled slot yet: on {self.preset.name!r} "
                                "use text, repeat, single, tokens, blend, words or revision.")
        if truncated:
            length = getattr(getattr(self.sd, "tokenizer", None), "model_max_length", 77)
            cond.notes["prompt_truncated"] = (
                f"the prompt is longer than the text encoder's {length} tokens; only its start was used")
        return cond

    def _plan(
        self, inputs: RunInputs, settings: GenerationSettings, embedding: ImageEmbedding,
        cond: conditioning.Conditioning,
    ) -> RunPlan:
        """The UNet's tensors (guidance rule applied once), the structure plan, the trace and the provenance."""
        unet = conditioning.for_unet(cond, settings.guided, settings.num_images, self.device, self.dtype)
        trace = Trace(
            pixel_values=_cpu(embedding.pixel_values),
            image_embeds=_cpu(embedding.image_embeds),
            hidden_states=_cpu(embedding.hidden_states),
            prompt_embeds=_cpu(unet.prompt_embeds),
            negative_prompt_embeds=_cpu(unet.negative_prompt_embeds),
            pooled_prompt_embeds=_cpu(unet.pooled_prompt_embeds),
            negative_pooled_prompt_embeds=_cpu(unet.negative_pooled_prompt_embeds),
            extras={name: _cpu(value) for name, value in cond.extras.items()},
        )
        for index, adapter_embeds in enumerate(unet.ip_adapter_image_embeds or []):
            trace.extras[adapter_trace_name(index)] = _cpu(adapter_embeds)
        structure_source = inputs.structure_images or inputs.images[:1]
        structure = self._structure.plan(settings, structure_source, settings.num_images)
        trace.extras.update(structure.extras)
        notes = dict(cond.notes)
        if inputs.structure_images:
            prints = [fingerprint(image)[:16] for image in inputs.structure_images]
            notes["structure_input"] = prints[0] if len(prints) == 1 else prints
        if inputs.adapter_prints:
            notes["adapter_inputs"] = [[print_[:16] for print_ in group] for group in inputs.adapter_prints]
        if self.is_sdxl:  # what SDXL's micro-conditioning was told (diffusers' defaults filled in)
            native = self.native_size
            height = structure.kwargs.get("height") or native
            width = structure.kwargs.get("width") or native
            if settings.structure == "img2img":  # img2img's size is its picture's (fitted to the model)
                width, height = structure.kwargs["image"][0].size
            told = {"original_size": (height, width), "crops_coords_top_left": (0, 0), "target_size": (height, width),
                    **settings.micro_conditioning()}
            notes["micro_conditioning"] = {name: list(value) for name, value in told.items()}
        provenance = self._provenance(settings, inputs, notes)
        provenance.model.update(structure.notes)
        return RunPlan(structure, unet, list(cond.contexts), trace, provenance)

    def _denoise(
        self, plan: RunPlan, settings: GenerationSettings, on_step: StepCallback | None,
        cancel: threading.Event | None, trace_latents: bool, trace_attention: bool = False,
    ) -> Any:
        """diffusers' own call with our conditioning and step callback; ``None`` when cancelled mid-run.

        diffusers gets a shallow copy of the structure's pipeline holding this run's own scheduler
        (``settings.scheduler``, built from the model's config): the shared pipeline and its scheduler
        are never changed, so a run leaves no trace on them and other runs never see its choice.
        """
        started = time.perf_counter()
        shared = plan.structure.runner
        runner = copy.copy(shared)  # the same components (no memory); its own config and run state
        runner.scheduler = scheduler_for(settings.scheduler, shared.scheduler)
        if settings.decoder == "tiny":
            runner.vae = self.tiny_decoder()  # diffusers decodes with it as it would with vae=AutoencoderTiny(...)
        plan.structure.runner = runner
        compute = self.compute_dtype(settings)
        prompt, negative, mask = plan.unet.padded()
        if mask is not None:
            plan.trace.extras["encoder_attention_mask"] = _cpu(mask)
        tracker = StepTracker(runner.unet, runner.scheduler, settings.guidance_scale if negative is not None else None,
                              on_step=on_step, cancel=cancel, trace_latents=trace_latents)
        total = unet_step_count(shared.scheduler, settings)
        method_kwargs = ({"ip_adapter_image_embeds": plan.unet.ip_adapter_image_embeds}
                         if plan.unet.ip_adapter_image_embeds is not None else {})
        if plan.unet.pooled_prompt_embeds is not None:  # SDXL: the pooled slot and the micro-conditioning
            method_kwargs.update(pooled_prompt_embeds=plan.unet.pooled_prompt_embeds, **settings.micro_conditioning())
            if negative is not None:
                method_kwargs["negative_pooled_prompt_embeds"] = plan.unet.negative_pooled_prompt_embeds
        recorder = None
        calls = [0]
        try:
            with contextlib.ExitStack() as stack:
                counter = runner.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
                stack.callback(counter.remove)
                if compute != self.dtype:
                    stack.enter_context(torch.autocast(self.device.type, dtype=compute))
                stack.enter_context(tracker.tapping_noise_predictions())
                non_finite = stack.enter_context(watching_decoded_values(runner.vae))
                if mask is not None:
                    stack.enter_context(masked_prompt(runner.unet, mask))
                for context in plan.contexts:
                    hook = stack.enter_context(context)
                    if hook is not None:
                        hook(0, total)  # the state before the first step
                        tracker.step_hooks.append(hook)
                for context in plan.structure.contexts(plan.trace.extras, mask):
                    stack.enter_context(context)
                if trace_attention:
                    recorder = stack.enter_context(recording_attention(runner.unet, settings.num_images))
                output = runner(
                    prompt_embeds=prompt,
                    negative_prompt_embeds=negative,
                    num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance_scale,
                    output_type="pil",
                    callback_on_step_end=tracker,
                    callback_on_step_end_tensor_inputs=["latents"],
                    **plan.structure.kwargs,
                    **method_kwargs,
                    **self._noise(runner, settings, plan.structure.kwargs),
                )
        except Cancelled:
            output = None
        ended = time.perf_counter()
        last_step = tracker.ended if tracker.ended is not None else ended
        plan.seconds = {"denoising": last_step - started, "decoding": ended - last_step}
        plan.unet_calls = calls[0]
        plan.provenance.notes["compute_dtype"] = str(compute).removeprefix("torch.")
        if settings.decoder == "tiny":
            plan.provenance.model["tiny_decoder"] = self._tiny_decoder_name()
        plan.trace.timesteps, plan.trace.latents = tracker.timesteps, tracker.latents
        plan.trace.latent_steps = list(tracker.latent_steps)
        if recorder is not None:
            _keep_attention_maps(plan.trace, recorder.maps())
        if output is not None and non_finite:
            raise non_finite_error(non_finite[0])
        return output

    def _noise(self, runner: Any, settings: GenerationSettings, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The seeded randomness of the diffusers call, per ``settings.noise``.

        ``device``: ``generator=torch.Generator(device)``, diffusers' own way (the noise differs between CPU,
        CUDA and MPS for one seed). ``cpu``: the starting noise drawn in float32 from
        ``torch.Generator("cpu")`` and handed over as ``latents=`` (then moved to the device and dtype), so
        one seed starts from the same noise on every machine; the same generator goes on to supply the
        noise of stochastic schedulers (euler_a, lcm). img2img noises its input itself, from that generator.
        """
        if settings.noise == "device":
            return {"generator": torch.Generator(self.device).manual_seed(settings.seed)}
        generator = torch.Generator("cpu").manual_seed(settings.seed)
        if settings.structure == "img2img":
            return {"generator": generator}
        native = runner.unet.config.sample_size * runner.vae_scale_factor
        height, width = call_kwargs.get("height") or native, call_kwargs.get("width") or native
        shape = (settings.num_images, runner.unet.config.in_channels,
                 height // runner.vae_scale_factor, width // runner.vae_scale_factor)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        return {"generator": generator, "latents": latents.to(self.device, self.dtype)}

    def _adapter_provenance(self) -> dict[str, Any]:
        """The recipe's ``ip_adapter``: the preset's spec, or the loaded adapters' names where
        :meth:`load_ip_adapter` added one."""
        handle = self.parts.get("ip_adapter")
        if handle is not None and handle.names != self.preset.ip_adapters:
            return {"ip_adapter": _json_spec(handle.names if len(handle) > 1 else handle.names[0])}
        return {"ip_adapter": _json_spec(self.preset.ip_adapter)} if self.preset.ip_adapter else {}

    def _provenance(
        self, settings: GenerationSettings, inputs: RunInputs, notes: dict[str, Any] | None = None
    ) -> Provenance:
        from .._version import __version__

        return Provenance(
            method=self.preset.method or settings.mode,
            model={
                "preset": self.preset.name,
                "sd_model": self.preset.sd_model,
                "clip_model": self.preset.clip_model,
                **({"clip_model_2": self.preset.clip_model_2} if self.preset.clip_model_2 else {}),
                **self._adapter_provenance(),
                **({"captioner": self.preset.captioner} if self.preset.captioner else {}),
                **({"loras": [info.to_dict() for info in self._loras]} if self._loras else {}),
                "memory": {"level": self.memory_level, "measures": list(self.memory_measures)},
            },
            inputs=tuple(print_[:16] for print_ in inputs.prints),
            negative_inputs=tuple(print_[:16] for print_ in inputs.negative_prints),
            notes=dict(notes or {}),
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            version=__version__,
        )


def adapter_trace_name(index: int) -> str:
    """The trace name of IP-Adapter ``index``'s input (diffusers' layout): ``ip_adapter_image_embeds`` for the
    first, ``ip_adapter_image_embeds_1``, ... for the others."""
    return "ip_adapter_image_embeds" if index == 0 else f"ip_adapter_image_embeds_{index}"


def unet_step_count(scheduler: Any, settings: GenerationSettings) -> int:
    """How many UNet steps a run makes: known before it starts, so progress has a fixed total.

    ``scheduler`` is the model's own; the count is that of ``settings.scheduler`` built from its config, as the
    run builds it (PNDM, SD's default, runs one more: its warm-up step), on a fresh object so the shared
    scheduler is untouched; img2img runs the last ``int(steps * strength)`` of them.
    """
    plan = schedule.planned_steps(scheduler_for(settings.scheduler, scheduler), settings.steps,
                                  structure=settings.structure, strength=settings.strength)
    return plan.total  # the one count; the controller shows its reason (PNDM's warm-up, img2img) in Started


def generate(images: Any = None, *, model: str | Preset | None = None, **settings: Any) -> GenerationResult:
    """One call for scripts: the default preset (or ``model=``), the same result as ``pipe.generate``."""
    load_options = {name: settings.pop(name) for name in ("device", "dtype", "safety_checker", "memory")
                    if name in settings}
    return ImagePromptPipeline.from_preset(model, **load_options).generate(images, **settings)


def _with_total(timings: dict[str, float], started: float) -> dict[str, float]:
    """The stages in :data:`STAGES` order, then ``total``: the seconds since ``started``."""
    ordered = {stage: timings[stage] for stage in STAGES if stage in timings}
    return {**ordered, "total": time.perf_counter() - started}


def _keep_attention_maps(trace: Trace, maps: AttentionMaps | None) -> None:
    """The prompt's maps cut to the prompt's own tokens (padding the UNet saw has weight 0 there), and the
    IP-Adapter's, into the trace."""
    if maps is None:
        return
    trace.attention_maps = maps.prompt[:, : trace.prompt_embeds.shape[1]].contiguous()
    if maps.adapter is not None:
        trace.extras["adapter_attention_maps"] = maps.adapter


def _copied(embedding: ImageEmbedding) -> ImageEmbedding:
    """A copy of a cached embedding whose tensors the caller may change in place: the cache keeps what the
    encoder gave, so the same inputs give the same pixels whatever ran before (SDXL's second tower's too)."""
    second = None if embedding.second is None else _copied(embedding.second)
    return dataclasses.replace(embedding, second=second, **{
        name: value.clone() for name, value in vars(embedding).items() if isinstance(value, torch.Tensor)})


def _source_count(sources: Any) -> int:
    """How many pictures ``sources`` lists (a list, an ipywidgets 7 upload value, or one source), undecoded."""
    if isinstance(sources, (list, tuple)):
        return len(sources)
    if isinstance(sources, Mapping) and sources and all(isinstance(value, Mapping) for value in sources.values()):
        return len(sources)  # an ipywidgets 7 FileUpload value: {name: {metadata, content}}
    return 1


def _no_images(sources: Any) -> bool:
    """Whether a run was given no input image at all (``None`` or an empty list): a words-only run."""
    return sources is None or (isinstance(sources, (list, tuple)) and not sources)


def _check_image_count(sources: Any, what: str) -> None:
    """Refuse more than :data:`MAX_INPUT_IMAGES` pictures before any is decoded."""
    count = _source_count(sources)
    if count > MAX_INPUT_IMAGES:
        raise ImageInputError(
            f"{count} {what} images are more than the {MAX_INPUT_IMAGES} one run takes: pass at most "
            f"{MAX_INPUT_IMAGES} (each is decoded and encoded at once)."
        )


def _json_spec(spec: str | tuple[str, ...]) -> str | list[str]:
    """One adapter's spec as it is; several as a JSON list."""
    return spec if isinstance(spec, str) else list(spec)


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to("cpu", copy=True)
