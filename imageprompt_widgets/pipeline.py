"""ImagePromptPipeline: CLIP image encoder + Stable Diffusion, with the image as the prompt.

The pipeline encodes images with the CLIP vision tower, turns the embeddings into prompt
embeddings (conditioning.py), and hands those to diffusers' own ``StableDiffusionPipeline``
unchanged, so the pixels equal what bare diffusers gives for the same embeddings and seed.
Everything in between is kept in a :class:`~imageprompt_widgets.trace.Trace`.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import conditioning
from .images import load_images
from .models import (
    MODEL_CACHE,
    StatusCallback,
    load_components,
    model_key,
    resolve_device_dtype,
)
from .presets import PRESETS, Preset, resolve_preset
from .settings import GenerationSettings
from .trace import GenerationResult, Trace

#: At most this many latent snapshots are kept per run (a stride is used beyond it).
MAX_TRACED_STEPS = 64
#: How many distinct input batches keep their embeddings cached per pipeline.
EMBEDDING_CACHE_SIZE = 16


class Cancelled(Exception):
    """Raised inside the denoising loop to stop it; ``generate`` turns it into ``cancelled=True``."""


@dataclass
class ImageEmbedding:
    """What the CLIP vision tower made of a batch of images (tensors on the pipeline's device)."""

    pixel_values: torch.Tensor  # [N, 3, H, W], the picture CLIP saw, normalised
    image_embeds: torch.Tensor  # [N, D], projected: the space SD's cross-attention width matches
    hidden_states: torch.Tensor  # [N, T, Dv], the vision tower's last hidden state

    def __len__(self) -> int:
        return self.image_embeds.shape[0]


@dataclass
class StepInfo:
    """Handed to ``on_step`` after every denoising step. Tensors live on the device; do not modify them."""

    step: int  # steps finished so far, 1-based
    total: int  # steps in this run (PNDM runs one more than asked)
    timestep: float
    latents: torch.Tensor  # [B, C, h, w] after this step
    seconds: float  # since the first step started
    _x0: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def steps_per_second(self) -> float:
        return self.step / self.seconds if self.seconds > 0 else 0.0

    def x0(self) -> torch.Tensor:
        """The model's current estimate of the clean latents (what previews should show, not the noise)."""
        if self._x0 is None:
            raise RuntimeError("x0 is only available to on_step callbacks during generation")
        return self._x0()


StepCallback = Callable[[StepInfo], None]


class ImagePromptPipeline:
    """A CLIP vision tower and a Stable Diffusion pipeline that it conditions.

    Get one with :meth:`from_preset` or :meth:`from_pretrained` (both cached: the same arguments
    give the same object). One generation runs at a time per object (schedulers are stateful);
    other callers wait on :attr:`lock`.
    """

    def __init__(self, sd: Any, image_encoder: Any, image_processor: Any, *, preset: Preset | None = None):
        self.sd = sd
        self.image_encoder = image_encoder
        self.image_processor = image_processor
        self.preset = preset or Preset(name="custom", sd_model="custom", clip_model="custom")
        self.lock = threading.RLock()
        self._embeddings: OrderedDict[tuple[str, ...], ImageEmbedding] = OrderedDict()
        self._empty_prompt_embeds: torch.Tensor | None = None

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
    ) -> ImagePromptPipeline:
        """Load (once per process) the preset's models: ``"sd14"`` (default), ``"sd15"``, ``"tiny"`` or a folder.

        ``safety_checker=None`` follows the model; ``False`` switches it off. ``allow_pickle=True``
        permits ``.bin`` weights, which can run code when loaded: only for models you trust.
        """
        preset = resolve_preset(preset)
        dev, dt = resolve_device_dtype(device, dtype)
        key = model_key(preset.sd_model, preset.clip_model, dev, dt, safety_checker, allow_pickle)

        def load() -> ImagePromptPipeline:
            parts = load_components(
                preset, dev, dt, safety_checker=safety_checker, allow_pickle=allow_pickle, on_status=on_status
            )
            return cls(parts.sd, parts.image_encoder, parts.image_processor, preset=preset)

        return MODEL_CACHE.get_or_create(key, load)

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
            allow_pickle=allow_pickle, on_status=on_status,
        )

    @property
    def device(self) -> torch.device:
        return self.sd.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sd.unet.dtype

    def __repr__(self) -> str:
        return f"ImagePromptPipeline(preset={self.preset.name!r}, device={self.device}, dtype={self.dtype})"

    # -- encoding -------------------------------------------------------------------------------

    def encode_image(self, images: Any) -> ImageEmbedding:
        """Encode one image or a list in one batch; the same inputs again come from a small cache.

        Equals ``image_encoder(**image_processor(images=..., return_tensors="pt"))`` exactly.
        """
        pil_images = load_images(images)
        key = tuple(_fingerprint(image) for image in pil_images)
        cached = self._embeddings.get(key)
        if cached is not None:
            self._embeddings.move_to_end(key)
            return cached
        with torch.inference_mode():
            inputs = self.image_processor(images=pil_images, return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self.image_encoder.device, self.image_encoder.dtype)
            out = self.image_encoder(pixel_values=pixel_values)
        embedding = ImageEmbedding(pixel_values, out.image_embeds, out.last_hidden_state)
        self._embeddings[key] = embedding
        while len(self._embeddings) > EMBEDDING_CACHE_SIZE:
            self._embeddings.popitem(last=False)
        return embedding

    def empty_prompt_embeds(self) -> torch.Tensor:
        """SD's text encoder on ``""``: what diffusers uses as the negative when none is given (``[1, 77, D]``)."""
        if self._empty_prompt_embeds is None:
            with torch.inference_mode():
                embeds, _ = self.sd.encode_prompt("", self.device, 1, False)
            self._empty_prompt_embeds = embeds
        return self._empty_prompt_embeds

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self,
        images: Any,
        settings: GenerationSettings | None = None,
        *,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        trace_latents: bool = False,
        **changes: Any,
    ) -> GenerationResult:
        """Generate from images; keyword settings are those of :class:`GenerationSettings`.

        ``on_step`` is called after every step (progress, previews); setting ``cancel`` stops the
        run after the current step without decoding, and the result has ``cancelled=True``.
        """
        settings = settings or GenerationSettings()
        if changes:
            settings = settings.replace(**changes)
        pil_images = load_images(images)
        with self.lock:
            start = time.perf_counter()
            embedding = self.encode_image(pil_images)
            prompt_embeds, negative_embeds = self._conditioning(embedding, settings)
            trace = Trace(
                pixel_values=_cpu(embedding.pixel_values),
                image_embeds=_cpu(embedding.image_embeds),
                hidden_states=_cpu(embedding.hidden_states),
                prompt_embeds=_cpu(prompt_embeds),
                negative_prompt_embeds=_cpu(negative_embeds),
            )
            recipe = self._recipe(settings, pil_images)
            tracker = _StepTracker(self, settings, trace, on_step, cancel, trace_latents)
            if cancel is not None and cancel.is_set():
                return GenerationResult([], trace, recipe, cancelled=True, seconds=time.perf_counter() - start)
            try:
                with tracker.tapping_noise_predictions():
                    output = self.sd(
                        prompt_embeds=prompt_embeds,
                        negative_prompt_embeds=negative_embeds,
                        num_inference_steps=settings.steps,
                        guidance_scale=settings.guidance_scale,
                        height=settings.height,
                        width=settings.width,
                        generator=torch.Generator(self.device).manual_seed(settings.seed),
                        output_type="pil",
                        callback_on_step_end=tracker,
                        callback_on_step_end_tensor_inputs=["latents"],
                    )
            except Cancelled:
                tracker.finish()
                return GenerationResult([], trace, recipe, cancelled=True, seconds=time.perf_counter() - start)
            tracker.finish()
            return GenerationResult(
                images=list(output.images),
                trace=trace,
                recipe=recipe,
                nsfw_content_detected=output.nsfw_content_detected,
                seconds=time.perf_counter() - start,
            )

    def _conditioning(
        self, embedding: ImageEmbedding, settings: GenerationSettings
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt and negative embeddings, one row per output image, in the UNet's dtype."""
        image_embeds = embedding.image_embeds
        if len(embedding) > 1:
            image_embeds = conditioning.average(image_embeds)
        prompt = conditioning.repeat_tokens(image_embeds, settings.scale)
        prompt = prompt.to(self.device, self.dtype).repeat(settings.num_images, 1, 1)
        if settings.guidance_scale <= 1:
            return prompt, None  # no classifier-free guidance: diffusers never runs an unconditional branch
        negative = self.empty_prompt_embeds().to(self.dtype).repeat(settings.num_images, 1, 1)
        return prompt, negative

    def _recipe(self, settings: GenerationSettings, images: Sequence[Any]) -> dict[str, Any]:
        from . import __version__

        return {
            "settings": settings.to_dict(),
            "model": {
                "preset": self.preset.name,
                "sd_model": self.preset.sd_model,
                "clip_model": self.preset.clip_model,
            },
            "inputs": [_fingerprint(image)[:16] for image in images],
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "version": __version__,
        }


class _StepTracker:
    """diffusers' ``callback_on_step_end``: records the trace, reports steps, cancels between steps."""

    def __init__(
        self,
        pipeline: ImagePromptPipeline,
        settings: GenerationSettings,
        trace: Trace,
        on_step: StepCallback | None,
        cancel: threading.Event | None,
        trace_latents: bool,
    ) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.trace = trace
        self.on_step = on_step
        self.cancel = cancel
        self.trace_latents = trace_latents
        self.snapshots: list[torch.Tensor] = []
        self.started = time.perf_counter()
        self._unet_call: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, sd: Any, index: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        latents = kwargs["latents"]
        total = sd.num_timesteps
        step = index + 1
        self.trace.timesteps.append(float(timestep))
        if self.trace_latents:
            stride = max(1, math.ceil(total / MAX_TRACED_STEPS))
            if index % stride == 0 or step == total:
                self.snapshots.append(latents.detach().to("cpu", copy=True))
                self.trace.latent_steps.append(step)
        if self.on_step is not None:
            seconds = time.perf_counter() - self.started
            self.on_step(StepInfo(step, total, float(timestep), latents, seconds, self._predicted_x0))
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled
        return kwargs

    @contextlib.contextmanager
    def tapping_noise_predictions(self) -> Iterator[None]:
        """Capture the UNet's input and output each step (references only) so ``x0`` can be computed."""
        handle = None
        if self.on_step is not None:
            handle = self.pipeline.sd.unet.register_forward_hook(self._remember_unet_call, with_kwargs=True)
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    def _remember_unet_call(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        prediction = output[0] if isinstance(output, tuple) else output.sample
        self._unet_call = (sample, timestep, prediction)

    def _predicted_x0(self) -> torch.Tensor:
        """x0 from the last UNet call: the input is the VP-scaled latent for every SD scheduler."""
        if self._unet_call is None:
            raise RuntimeError("no UNet call seen yet")
        sample, timestep, prediction = self._unet_call
        if self.settings.guidance_scale > 1:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + self.settings.guidance_scale * (cond - uncond)
            sample = sample.chunk(2)[1]
        scheduler = self.pipeline.sd.scheduler
        alphas = scheduler.alphas_cumprod
        index = int(round(float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)))
        alpha = alphas[min(max(index, 0), len(alphas) - 1)].to(sample.device, torch.float32)
        sample, prediction = sample.float(), prediction.float()
        if scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
            return alpha.sqrt() * sample - (1 - alpha).sqrt() * prediction
        return (sample - (1 - alpha).sqrt() * prediction) / alpha.sqrt()

    def finish(self) -> None:
        if self.snapshots:
            self.trace.latents = torch.stack(self.snapshots)


def generate(images: Any, *, model: str | Preset | None = None, **settings: Any) -> GenerationResult:
    """One call for scripts: the default preset (or ``model=``), the same result as ``pipe.generate``."""
    load_options = {name: settings.pop(name) for name in ("device", "dtype", "safety_checker") if name in settings}
    return ImagePromptPipeline.from_preset(model, **load_options).generate(images, **settings)


def _fingerprint(image: Any) -> str:
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to("cpu", copy=True)
