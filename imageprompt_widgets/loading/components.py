"""The one way every preset is loaded: SD, its image encoder, then the parts its methods need.

1. offline names (``tiny``, ``tiny-ip-adapter``, ...) become folders this package builds (offline.py);
2. SD through ``StableDiffusionPipeline.from_pretrained`` (without the text encoder for the image-variations
   model, which has none), safetensors only unless ``allow_pickle``;
3. the CLIP vision tower with its projection (never a second text encoder): from SD's own folder where the
   model ships it (image variations), else from the preset's encoder (a subfolder for h94/IP-Adapter);
4. each method the preset offers loads its own parts (the IP-Adapter's weights, BLIP) through the
   ``part_loaders`` the caller hands in (the engine takes them from the method registry: loading knows no
   methods); the preset's LoRAs load through diffusers' LoRA loader (lora.py);
   An SDXL preset (``family="sdxl"``) loads through ``StableDiffusionXLPipeline.from_pretrained`` (both text
   encoders) and a second vision tower (``clip_model_2``: OpenCLIP bigG beside ViT-L/14);
5. the fit is checked (image tokens must have the UNet's cross-attention width: on SDXL both towers' widths
   side by side, 768 + 1,280 = 2,048; the second tower's must be the pooled slot's), everything moves to
   the device (or is offloaded, per the memory level: memory.py), and the libraries' progress bars stay
   off (ours report).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..encoding import ClipTextTower
from ..faults import TextTowerUnavailable, import_error_sentence
from ..presets import Preset, resolve_preset
from . import lora, memory, offline, offline_sdxl_adapters
from .cache import (
    DamagedModelError,
    ModelLoadError,
    StatusCallback,
    _dtype_name,
    _size_text,
    check_encoder_fits,
    check_local_folder,
    diffusers_dtype_kwarg,
    translate_load_errors,
)
from .lora import LoraInfo
from .quiet import one_loader_at_a_time, quiet_loaders

#: ``load_parts(sd=, image_encoder=, image_processor=, preset=, local=, device=, dtype=, allow_pickle=, say=)``
#: of a method that loads parts of its own (methods/ip_adapter.py, methods/caption.py) -> {name: part}.
PartLoader = Callable[..., dict[str, Any]]


@dataclass
class LoadedComponents:
    sd: Any  # diffusers.StableDiffusionPipeline (StableDiffusionXLPipeline for an SDXL preset)
    image_encoder: Any  # transformers.CLIPVisionModelWithProjection
    image_processor: Any  # transformers.CLIPImageProcessor
    preset: Preset
    load_seconds: float
    parts: dict[str, Any] = field(default_factory=dict)  # what methods loaded: "ip_adapter", "captioner"
    loras: list[LoraInfo] = field(default_factory=list)  # the preset's LoRAs, loaded and active
    memory_level: str = memory.DEFAULT_MEMORY  # the memory level (memory.py) ...
    memory_measures: tuple[str, ...] = ()  # ... and what it did on this device
    #: SDXL's second vision tower (``preset.clip_model_2``: bigG) and its processor; None without one.
    image_encoder_2: Any = None
    image_processor_2: Any = None


def load_components(
    preset: Preset | str | None,
    device: torch.device,
    dtype: torch.dtype,
    *,
    safety_checker: bool | None = None,
    allow_pickle: bool = False,
    on_status: StatusCallback | None = None,
    memory_level: str = memory.DEFAULT_MEMORY,
    part_loaders: Sequence[PartLoader] = (),
) -> LoadedComponents:
    """Load a preset's models onto ``device`` in ``dtype`` (see the module docstring for the steps);
    ``memory_level`` decides where the weights live (memory.py); ``part_loaders`` load what the preset's
    methods need beyond SD and the encoder (``methods.part_loaders(preset)``).

    One load or build runs at a time per process (the libraries' loaders are not thread-safe: quiet.py).
    """
    preset = resolve_preset(preset)
    say = on_status or (lambda message: None)
    try:
        with one_loader_at_a_time():
            try:
                return _load_components(preset, device, dtype, safety_checker=safety_checker,
                                        allow_pickle=allow_pickle, say=say, memory_level=memory_level,
                                        part_loaders=part_loaders)
            except DamagedModelError as err:
                damaged = offline.builds_of(offline_sdxl_adapters.materialize(preset), err.path)
                if not damaged:  # not a model this package built: the user's to replace
                    raise
                # A build whose files were cut short or deleted keeps its marker, so it never healed by itself.
                say(f"The offline models in {', '.join(map(str, damaged))} are damaged ({err}); rebuilding them…")
                for folder in damaged:
                    offline.discard_build(folder)
                return _load_components(preset, device, dtype, safety_checker=safety_checker,
                                        allow_pickle=allow_pickle, say=say, memory_level=memory_level,
                                        part_loaders=part_loaders)
    except ImportError as err:
        raise ModelLoadError(import_error_sentence(preset.name, err)) from err


def _load_components(
    preset: Preset, device: torch.device, dtype: torch.dtype, *, safety_checker: bool | None,
    allow_pickle: bool, say: StatusCallback, memory_level: str = memory.DEFAULT_MEMORY,
    part_loaders: Sequence[PartLoader] = (),
) -> LoadedComponents:
    start = time.perf_counter()
    local = offline_sdxl_adapters.materialize(preset, say)  # every offline name (SD 1.x, SDXL, its adapters)

    say(f"Loading Stable Diffusion {preset.sd_model!r} onto {device} ({_dtype_name(dtype)})…")
    sd = load_sd(local.sd_model, preset, dtype, safety_checker=safety_checker, allow_pickle=allow_pickle)
    if local.clip_model == local.sd_model:  # the image-variations model ships its encoder in its own folder
        image_encoder, image_processor = sd.image_encoder, sd.feature_extractor
        if image_encoder is None or image_processor is None:
            raise ModelLoadError(f"Model {preset.sd_model!r} has no image_encoder or feature_extractor: it is not "
                                 "an image-variations model.")
    else:
        say(f"Loading the image encoder {preset.clip_model!r}…")
        image_encoder, image_processor = load_image_encoder(local.clip_model, preset, dtype, allow_pickle,
                                                            fallback_processor=sd.feature_extractor)
    image_encoder_2 = image_processor_2 = None
    if preset.clip_model_2:
        say(f"Loading the second image encoder {preset.clip_model_2!r}…")
        image_encoder_2, image_processor_2 = load_image_encoder(
            local.clip_model_2, preset, dtype, allow_pickle, fallback_processor=image_processor, second=True)
    if preset.image_tokens_fit:
        check_encoder_fits(image_encoder, sd.unet, preset, image_encoder_2,
                           getattr(sd, "text_encoder_2", None))

    parts: dict[str, Any] = {}
    for load_parts in part_loaders:
        parts.update(load_parts(sd=sd, image_encoder=image_encoder, image_processor=image_processor,
                                preset=preset, local=local, device=device, dtype=dtype,
                                allow_pickle=allow_pickle, say=say))

    loras = load_preset_loras(sd, preset, local, say)
    memory_measures = memory.place(sd, image_encoder, memory_level, device)
    image_encoder.eval()
    if image_encoder_2 is not None:
        memory.place_module(image_encoder_2, memory_measures, device)
        image_encoder_2.eval()
    sd.set_progress_bar_config(disable=True)  # progress is ours to show (tqdm in the CLI, a bar in the widget)
    seconds = time.perf_counter() - start
    say(
        f"Loaded {preset.name!r} in {seconds:.1f} s: {_size_text(sd.unet)} UNet, "
        f"{_size_text(image_encoder)} image encoder on {device}."
    )
    return LoadedComponents(sd, image_encoder, image_processor, preset, seconds, parts, loras,
                            memory_level, memory_measures, image_encoder_2, image_processor_2)


def load_preset_loras(sd: Any, preset: Preset, local: Preset, say: StatusCallback) -> list[LoraInfo]:
    """The preset's LoRAs (``local.loras``: the same with offline names as folders), loaded and fused into
    this copy of the model (lora.py says why)."""
    loaded: list[LoraInfo] = []
    for (source, weight), (path, _) in zip(preset.loras, local.loras):
        say(f"Loading the LoRA {source!r}…")
        name = lora.default_name(source, {info.name for info in loaded})
        loaded.append(lora.load_lora(sd, source, path, name, lora.check_weight(weight, name)))
    return lora.fuse_into_model(sd, loaded)


def load_sd(path: str, preset: Preset, dtype: torch.dtype, *, safety_checker: bool | None, allow_pickle: bool) -> Any:
    """``StableDiffusionPipeline.from_pretrained`` (``StableDiffusionXLPipeline`` for an SDXL preset) with our safety
    defaults (safetensors, no remote code)."""
    with quiet_loaders():
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    name = preset.sd_model
    what = "an SDXL model (diffusers format)" if preset.is_sdxl else "a Stable Diffusion model (diffusers format)"
    check_local_folder(path, name, "model_index.json", what)
    kwargs: dict[str, Any] = {diffusers_dtype_kwarg(): dtype, "use_safetensors": None if allow_pickle else True}
    if not preset.text_encoder:
        kwargs.update(text_encoder=None, tokenizer=None)
    if preset.revision and not os.path.isdir(path):
        kwargs["revision"] = preset.revision
    if safety_checker is False and not preset.is_sdxl:  # SDXL has no safety checker
        # The supported way to switch it off; a lambda in its place breaks the pipeline config.
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipeline_class = StableDiffusionXLPipeline if preset.is_sdxl else StableDiffusionPipeline
    with translate_load_errors(name, allow_pickle, folder=path), quiet_loaders():
        return pipeline_class.from_pretrained(path, **kwargs)


def load_image_encoder(
    path: str, preset: Preset, dtype: torch.dtype, allow_pickle: bool, *, fallback_processor: Any = None,
    second: bool = False,
) -> tuple[Any, Any]:
    """CLIP's vision tower with its projection, and the processor that prepares its pictures.

    The processor is the encoder's own where its folder has one; else (h94/IP-Adapter ships none) the one
    diffusers itself would use, SD's ``feature_extractor``; else CLIP's default sized to the encoder.
    ``second``: the preset's second tower (``clip_model_2``, SDXL's bigG), which has no subfolder.
    """
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    name, subfolder = (preset.clip_model_2 or "", "") if second else (preset.clip_model, preset.clip_subfolder or "")
    folder = os.path.join(path, subfolder)
    check_local_folder(folder, name, "config.json", "a CLIP model (transformers format)")
    with translate_load_errors(name, allow_pickle, folder=folder), quiet_loaders():
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            path, subfolder=subfolder, dtype=dtype, use_safetensors=None if allow_pickle else True
        )
    try:
        with quiet_loaders():
            processor = CLIPImageProcessor.from_pretrained(path, subfolder=subfolder)
    except OSError:
        size = encoder.config.image_size
        processor = fallback_processor or CLIPImageProcessor(size=size, crop_size=size)
    return encoder, processor


def load_clip_text_tower(folder: str, name: str, device: torch.device, dtype: torch.dtype) -> ClipTextTower:
    """The text tower with projection that sits beside a CLIP vision tower in its checkpoint (openai's
    ViT-L/14 ships both); :class:`TextTowerUnavailable` where the checkpoint holds only a vision tower."""
    from transformers import AutoConfig, CLIPTextModelWithProjection, CLIPTokenizer

    try:
        with quiet_loaders():
            config = AutoConfig.from_pretrained(folder)
            if getattr(config, "text_config", None) is None:
                raise TextTowerUnavailable(
                    f"The image encoder {name!r} ships no CLIP text tower, so images cannot be compared with text."
                )
            model = CLIPTextModelWithProjection.from_pretrained(folder, dtype=dtype, use_safetensors=True)
            tokenizer = CLIPTokenizer.from_pretrained(folder)
    except TextTowerUnavailable:
        raise
    except Exception as err:  # any loader failure means: no text tower here
        raise TextTowerUnavailable(
            f"The text tower of {name!r} could not be loaded ({type(err).__name__}), so images cannot be "
            "compared with text."
        ) from err
    model.to(device).eval()
    return ClipTextTower(model, tokenizer, source=f"CLIP text tower with projection of {name!r}")
