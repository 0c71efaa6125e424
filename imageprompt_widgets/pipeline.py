"""ImagePromptPipeline: CLIP image encoder + Stable Diffusion, with the image as the prompt.

The pipeline encodes images with the CLIP vision tower, turns the embeddings into prompt
embeddings (conditioning.py), and hands those to diffusers' own ``StableDiffusionPipeline``
unchanged, so the pixels equal what bare diffusers gives for the same embeddings and seed.
Everything in between is kept in a :class:`~imageprompt_widgets.results.Trace`.

Every method goes through :meth:`ImagePromptPipeline.generate` with one signature: ``mode`` picks
a conditioning builder (``conditioning_builders()``), and the result is always a diffusers
``StableDiffusionPipeline`` call with explicit ``prompt_embeds`` and ``negative_prompt_embeds``.
When the two differ in length (``single``, ``tokens``, ``concat``), the shorter is padded with
zero tokens that ``encoder_attention_mask`` removes from cross-attention exactly; the trace keeps
the unpadded embeddings and the mask (``extras["encoder_attention_mask"]``).
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
from .concurrency import RunLock
from .conditioning import Conditioning
from .downloads import DownloadProgress, watch_downloads
from .images import load_images
from .models import (
    MODEL_CACHE,
    StatusCallback,
    load_components,
    model_key,
    resolve_device_dtype,
)
from .presets import PRESETS, Preset, resolve_preset
from .results import GenerationResult, Provenance, Trace
from .settings import CROPS, GenerationSettings, SettingsError
from .structure import StructureRunners

#: At most this many latent snapshots are kept per run (a stride is used beyond it).
MAX_TRACED_STEPS = 64
#: How many distinct input batches keep their embeddings cached per pipeline.
EMBEDDING_CACHE_SIZE = 16
#: Ordinary prompts whose text-encoder outputs set the target of norm matching.
NORM_PROBE_PROMPTS = (
    "a photograph of a cat sitting on a windowsill",
    "an oil painting of a lighthouse at sunset, dramatic sky",
    "a red sports car parked in a city street at night",
    "portrait of an old man with a beard, studio lighting",
)


class Cancelled(Exception):
    """Raised inside the denoising loop to stop it; ``generate`` turns it into ``cancelled=True``."""


class NonFiniteImageError(ValueError):
    """The VAE decoded NaN or infinite values (typically a float16 VAE overflowing): the images would be black."""


@dataclass
class ImageEmbedding:
    """What the CLIP vision tower made of a batch of images (tensors on the pipeline's device)."""

    pixel_values: torch.Tensor  # [N, 3, H, W], the picture CLIP saw, normalised
    image_embeds: torch.Tensor  # [N, D], projected: the space SD's cross-attention width matches
    hidden_states: torch.Tensor  # [N, T, Dv], the vision tower's last hidden state
    tokens: torch.Tensor | None = None  # [N, T, D], every token through post-layernorm and projection

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

    def __init__(
        self, sd: Any, image_encoder: Any, image_processor: Any, *, preset: Preset | None = None,
        captioner: Any = None, allow_pickle: bool = False,
    ):
        self.sd = sd
        self.captioner = captioner
        self.image_encoder = image_encoder
        self.image_processor = image_processor
        self.preset = preset or Preset(name="custom", sd_model="custom", clip_model="custom")
        self.lock = RunLock()
        self._embeddings: OrderedDict[tuple[str, ...], ImageEmbedding] = OrderedDict()
        self._empty_prompt_embeds: torch.Tensor | None = None
        self._text_token_norm: float | None = None
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
        on_progress: Callable[[DownloadProgress], None] | None = None,
    ) -> ImagePromptPipeline:
        """Load (once per process) the preset's models: ``"sd14"`` (default), ``"sd15"``, ``"tiny"`` or a folder.

        ``safety_checker=None`` follows the model; ``False`` switches it off. ``allow_pickle=True``
        permits ``.bin`` weights, which can run code when loaded: only for models you trust.
        ``on_progress`` gets the Hub's download progress (:mod:`imageprompt_widgets.downloads`); raising
        ``DownloadCancelled`` from it stops the download.
        """
        preset = resolve_preset(preset)
        dev, dt = resolve_device_dtype(device, dtype)
        key: Any = model_key(preset.sd_model, preset.clip_model, dev, dt, safety_checker, allow_pickle)
        extras = (preset.method, preset.revision, preset.clip_subfolder, preset.ip_adapter, preset.captioner)
        if any(extras):  # the method presets share models with plain ones but are different pipelines
            key = (key, *extras)

        def load() -> ImagePromptPipeline:
            loader = _component_loader(preset)
            parts = loader(
                preset, dev, dt, safety_checker=safety_checker, allow_pickle=allow_pickle, on_status=on_status
            )
            captioner = None
            if preset.captioner:
                from .methods.caption import load_captioner

                captioner = load_captioner(preset, dev, dt, allow_pickle=allow_pickle, on_status=on_status)
            return cls(
                parts.sd, parts.image_encoder, parts.image_processor, preset=preset, captioner=captioner,
                allow_pickle=allow_pickle,
            )

        with watch_downloads(on_progress):
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

    def encode_image(self, images: Any, crop: str = "center_crop") -> ImageEmbedding:
        """Encode one image or a list in one batch; the same inputs again come from a small cache.

        With the default ``crop="center_crop"`` this equals
        ``image_encoder(**image_processor(images=..., return_tensors="pt"))`` exactly; ``"squash"``
        resizes to the square without keeping the aspect ratio and ``"pad"`` letterboxes the whole
        picture on CLIP's mean colour (which normalises to zero) before the same normalisation.
        """
        if crop not in CROPS:
            raise SettingsError(f"crop={crop!r} is not one of {', '.join(CROPS)}.")
        pil_images = load_images(images)
        return self._encode_loaded(pil_images, [_fingerprint(image) for image in pil_images], crop)

    def _encode_loaded(self, pil_images: list[Any], fingerprints: list[str], crop: str) -> ImageEmbedding:
        """``encode_image`` for images already decoded and fingerprinted (``generate`` does both once)."""
        key = (crop, *fingerprints)
        cached = self._embeddings.get(key)
        if cached is not None:
            self._embeddings.move_to_end(key)
            return cached
        with torch.inference_mode():
            if crop == "center_crop":
                inputs = self.image_processor(images=pil_images, return_tensors="pt")
            else:
                squared = [_square_for_clip(image, crop, self.image_processor) for image in pil_images]
                inputs = self.image_processor(
                    images=squared, do_resize=False, do_center_crop=False, return_tensors="pt"
                )
            pixel_values = inputs["pixel_values"].to(self.image_encoder.device, self.image_encoder.dtype)
            out = self.image_encoder(pixel_values=pixel_values)
            tokens = conditioning.project_vision_tokens(
                out.last_hidden_state,
                self.image_encoder.vision_model.post_layernorm,
                self.image_encoder.visual_projection,
            )
        embedding = ImageEmbedding(pixel_values, out.image_embeds, out.last_hidden_state, tokens)
        self._embeddings[key] = embedding
        while len(self._embeddings) > EMBEDDING_CACHE_SIZE:
            self._embeddings.popitem(last=False)
        return embedding

    def empty_prompt_embeds(self) -> torch.Tensor:
        """SD's text encoder on ``""``: what diffusers uses as the negative when none is given (``[1, 77, D]``)."""
        if self._empty_prompt_embeds is None:
            self._empty_prompt_embeds = self.encode_text("", purpose="the empty-prompt negative")
        return self._empty_prompt_embeds

    def encode_text(self, prompt: str, *, purpose: str = "a text prompt") -> torch.Tensor:
        """SD's own text encoder on ``prompt``: exactly the ``prompt_embeds`` diffusers would compute (``[1, 77, D]``)."""
        if getattr(self.sd, "text_encoder", None) is None:
            raise SettingsError(
                f"The {self.preset.name!r} model has no text encoder, so it cannot use {purpose}: "
                "use negative='zeros' and a mode without text (repeat, single, tokens)."
            )
        with torch.inference_mode():
            embeds, _ = self.sd.encode_prompt(prompt, self.device, 1, False)
        return embeds

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

    def caption(self, images: Any) -> str:
        """Caption the (first) image with the preset's captioner (BLIP); ``mode="caption"`` generates from it."""
        if self.captioner is None:
            raise SettingsError(
                f"The {self.preset.name!r} preset has no captioner: use the 'caption' or 'tiny-caption' preset."
            )
        with self.lock:
            return self.captioner.caption(load_images(images)[0])

    # -- structure (structure.py) ------------------------------------------------------------------

    def load_controlnet(self, model: str | None = None, on_status: StatusCallback | None = None) -> Any:
        """The canny ControlNet of ``structure="edges"``, loaded once: the preset's, or ``model`` (Hub id or folder)."""
        with self.lock:
            return self._structure.controlnet(model, on_status)

    @property
    def native_size(self) -> int:
        """The model's native side in pixels (512 for SD 1.x): the longer side of a structure run by default."""
        return self._structure.native_size

    def structure_pipeline(self, structure: str = "none") -> Any:
        """The diffusers pipeline a run with ``structure`` calls: :attr:`sd` itself, or its ControlNet or
        img2img twin built from the same components (so bare diffusers can be compared with it)."""
        with self.lock:
            return self._structure.pipeline(structure)

    # -- generation -----------------------------------------------------------------------------

    def generate(
        self,
        images: Any,
        settings: GenerationSettings | None = None,
        *,
        negative_image: Any = None,
        structure_image: Any = None,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        trace_latents: bool = False,
        **changes: Any,
    ) -> GenerationResult:
        """Generate from images; keyword settings are those of :class:`GenerationSettings`.

        ``negative_image`` (one image or several) becomes the negative conditioning, so guidance
        pushes away from it (it implies ``negative="image"``). ``on_step`` is called after every
        step (progress, previews); setting ``cancel`` stops the run after the current step without
        decoding, and the result has ``cancelled=True``. ``structure_image`` is the picture whose layout
        ``structure="edges"`` or ``"img2img"`` keeps (default: the first input image).
        """
        settings = settings or self.default_settings()
        if negative_image is not None and settings.negative == "empty_prompt" and "negative" not in changes:
            changes["negative"] = "image"
        if changes:
            settings = settings.replace(**changes)
        pil_images = load_images(images)
        negative_images = load_images(negative_image) if negative_image is not None else []
        if settings.negative == "image" and not negative_images:
            raise SettingsError("negative='image' needs negative_image=: the image(s) guidance should push away from.")
        if negative_images and settings.negative != "image":
            raise SettingsError(
                f"negative_image was given but negative={settings.negative!r}: pass negative='image' to use it."
            )
        structure_images = load_images(structure_image) if structure_image is not None else []
        if structure_images and settings.structure == "none":
            raise SettingsError(
                "structure_image was given but structure='none': pass structure='edges' or structure='img2img'."
            )
        if len(structure_images) > 1:
            raise SettingsError(f"structure_image takes one image, not {len(structure_images)}.")
        if not self.lock.acquire(cancel):  # cancelled while another run held the pipeline
            return GenerationResult([], None, settings, self._provenance(settings, ()), cancelled=True)
        try:
            start = time.perf_counter()
            # Decoding and hashing a 12-megapixel photo costs ~0.1 s each: do both once per input.
            input_prints = [_fingerprint(image) for image in pil_images]
            negative_prints = [_fingerprint(image) for image in negative_images]
            embedding = self._encode_loaded(pil_images, input_prints, settings.crop)
            negative_embedding = (
                self._encode_loaded(negative_images, negative_prints, settings.crop) if negative_images else None
            )
            cond = self._conditioning(embedding, settings, negative_embedding, pil_images)
            trace = Trace(
                pixel_values=_cpu(embedding.pixel_values),
                image_embeds=_cpu(embedding.image_embeds),
                hidden_states=_cpu(embedding.hidden_states),
                prompt_embeds=_cpu(cond.prompt_embeds),
                negative_prompt_embeds=_cpu(cond.negative_prompt_embeds),
                extras={name: _cpu(value) for name, value in cond.extras.items()},
            )
            plan = self._structure.plan(
                settings, (structure_images or pil_images)[0], cond.prompt_embeds.shape[0]
            )
            trace.extras.update(plan.extras)
            notes = dict(cond.notes)
            if structure_images:
                notes["structure_input"] = _fingerprint(structure_images[0])[:16]
            provenance = self._provenance(settings, input_prints, negative_prints, notes)
            provenance.model.update(plan.notes)
            tracker = _StepTracker(self, settings, trace, on_step, cancel, trace_latents)
            if cancel is not None and cancel.is_set():
                return GenerationResult([], trace, settings, provenance, cancelled=True,
                                        seconds=time.perf_counter() - start)
            prompt_embeds, negative_embeds = cond.prompt_embeds, cond.negative_prompt_embeds
            mask = None
            if negative_embeds is not None:
                (negative_embeds, prompt_embeds), mask = conditioning.pad_with_mask([negative_embeds, prompt_embeds])
                if mask is not None:
                    trace.extras["encoder_attention_mask"] = _cpu(mask)
            try:
                with contextlib.ExitStack() as stack:
                    stack.enter_context(tracker.tapping_noise_predictions())
                    non_finite = stack.enter_context(_watching_decoded_values(self.sd.vae))
                    if mask is not None:
                        stack.enter_context(_attention_mask(self.sd.unet, mask))
                    for method_context in cond.contexts:
                        tracker.step_hooks.append(stack.enter_context(method_context))
                    for structure_context in plan.contexts(trace.extras, mask):
                        stack.enter_context(structure_context)
                    output = plan.runner(
                        prompt_embeds=prompt_embeds,
                        negative_prompt_embeds=negative_embeds,
                        num_inference_steps=settings.steps,
                        guidance_scale=settings.guidance_scale,
                        generator=torch.Generator(self.device).manual_seed(settings.seed),
                        output_type="pil",
                        callback_on_step_end=tracker,
                        callback_on_step_end_tensor_inputs=["latents"],
                        **plan.kwargs,
                        **cond.sd_kwargs,
                    )
            except Cancelled:
                tracker.finish()
                return GenerationResult([], trace, settings, provenance, cancelled=True,
                                        seconds=time.perf_counter() - start)
            tracker.finish()
            if non_finite:
                half = non_finite[0] in (torch.float16, torch.bfloat16)
                advice = ("load the model with dtype='float32' (a float32 VAE does not overflow) or try a smaller size"
                          if half else "lower scale or guidance_scale, or try a smaller size")
                raise NonFiniteImageError(
                    f"The VAE ({_dtype_text(non_finite[0])}) decoded NaN values, so the images would come out "
                    f"black: {advice}."
                )
            return GenerationResult(
                images=list(output.images),
                trace=trace,
                settings=settings,
                provenance=provenance,
                nsfw_content_detected=output.nsfw_content_detected,
                seconds=time.perf_counter() - start,
            )
        finally:
            self.lock.release()

    def _conditioning(
        self,
        embedding: ImageEmbedding,
        settings: GenerationSettings,
        negative_embedding: ImageEmbedding | None = None,
        images: Sequence[Any] = (),
    ) -> Conditioning:
        """Prompt and negative embeddings, one row per output image, in the UNet's dtype."""
        builder = conditioning_builders()[settings.mode]
        cond = builder(self, embedding, settings, negative_embedding, images)
        copies = settings.num_images
        cond.prompt_embeds = cond.prompt_embeds.to(self.device, self.dtype).repeat(copies, 1, 1)
        if settings.guidance_scale <= 1:
            cond.negative_prompt_embeds = None  # no classifier-free guidance: no unconditional branch runs
        elif cond.negative_prompt_embeds is not None:
            cond.negative_prompt_embeds = cond.negative_prompt_embeds.to(self.device, self.dtype).repeat(copies, 1, 1)
        return cond

    def image_sequence(
        self, embedding: ImageEmbedding, settings: GenerationSettings, *, form: str | None = None,
        combine: str | None = None, weights: Sequence[float] | None = None, extras: dict | None = None,
        prefix: str = "",
    ) -> torch.Tensor:
        """Images → one ``[1, L, D]`` token sequence: mode form, combine, norm matching, then ``scale``.

        ``form`` is ``repeat``, ``single`` or ``tokens`` (default: the mode's own).
        """
        form = form or settings.mode
        self._check_image_width(embedding, settings.mode)
        if form == "repeat":
            sequences = conditioning.repeat_tokens(embedding.image_embeds)
        elif form == "single":
            sequences = conditioning.single_token(embedding.image_embeds)
        else:
            sequences = conditioning.vision_tokens(embedding.tokens)
        combine = combine or settings.combine
        weights = settings.weights if weights is None else weights
        if len(embedding) > 1 or weights:
            sequence = conditioning.combine(combine, sequences, list(weights) or None)
        else:
            sequence = sequences
        if settings.norm_match:
            target = self.text_token_norm()
            if extras is not None:
                extras[f"{prefix}text_token_norm"] = torch.tensor(target)
                extras[f"{prefix}image_token_norm_before"] = sequence.norm(dim=-1)[0].float()
            sequence = conditioning.match_norm(sequence, target)
        return settings.scale * sequence

    def _check_image_width(self, embedding: ImageEmbedding, mode: str) -> None:
        width, cross = embedding.image_embeds.shape[-1], self.sd.unet.config.cross_attention_dim
        if width != cross:
            raise SettingsError(
                f"mode={mode!r} feeds image tokens to the UNet, but the image encoder gives {width}-d embeddings "
                f"and the UNet expects {cross}-d: this preset supports mode='ip_adapter'."
            )

    def _provenance(
        self,
        settings: GenerationSettings,
        input_prints: Sequence[str],
        negative_prints: Sequence[str] = (),
        notes: dict[str, Any] | None = None,
    ) -> Provenance:
        from ._version import __version__

        return Provenance(
            method=self.preset.method or settings.mode,
            model={
                "preset": self.preset.name,
                "sd_model": self.preset.sd_model,
                "clip_model": self.preset.clip_model,
                **({"ip_adapter": self.preset.ip_adapter} if self.preset.ip_adapter else {}),
                **({"captioner": self.preset.captioner} if self.preset.captioner else {}),
            },
            inputs=tuple(fingerprint[:16] for fingerprint in input_prints),
            negative_inputs=tuple(fingerprint[:16] for fingerprint in negative_prints),
            notes=dict(notes or {}),
            device=str(self.device),
            dtype=_dtype_text(self.dtype),
            version=__version__,
        )


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
        self._timesteps: list[Any] = []
        self.started = time.perf_counter()
        self._unet_call: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        #: Called with (steps finished, total) after each step, before the next (e.g. the IP-Adapter window).
        self.step_hooks: list[Callable[[int, int], None] | None] = []

    def __call__(self, sd: Any, index: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        latents = kwargs["latents"]
        total = sd.num_timesteps
        step = index + 1
        self._timesteps.append(timestep)  # a device tensor: float() here would wait for the GPU every step
        if self.trace_latents:
            stride = max(1, math.ceil(total / MAX_TRACED_STEPS))
            if index % stride == 0 or step == total:
                self.snapshots.append(latents.detach().to("cpu", copy=True))
                self.trace.latent_steps.append(step)
        if self.on_step is not None:
            seconds = time.perf_counter() - self.started
            self.on_step(StepInfo(step, total, float(timestep), latents, seconds, self._predicted_x0))
        for hook in self.step_hooks:
            if hook is not None:
                hook(step, total)
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
        index = round(float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep))
        alpha = alphas[min(max(index, 0), len(alphas) - 1)].to(sample.device, torch.float32)
        sample, prediction = sample.float(), prediction.float()
        if scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
            return alpha.sqrt() * sample - (1 - alpha).sqrt() * prediction
        return (sample - (1 - alpha).sqrt() * prediction) / alpha.sqrt()

    def finish(self) -> None:
        self.trace.timesteps = [float(timestep) for timestep in self._timesteps]
        if self.snapshots:
            self.trace.latents = torch.stack(self.snapshots)


# ---------------------------------------------------------------------------------------------
# One conditioning builder per mode (settings.MODES is exactly the keys of conditioning_builders())


def _image_conditioning(
    pipe: ImagePromptPipeline,
    embedding: ImageEmbedding,
    settings: GenerationSettings,
    negative_embedding: ImageEmbedding | None,
    images: Sequence[Any],
) -> Conditioning:
    """``repeat``, ``single``, ``tokens``: the images' token sequence is the prompt."""
    extras: dict[str, torch.Tensor] = {}
    prompt = pipe.image_sequence(embedding, settings, extras=extras)
    negative = _negative(pipe, prompt, settings, negative_embedding, extras, form=settings.mode)
    return Conditioning(prompt, negative, extras=extras)


def _blend_conditioning(
    pipe: ImagePromptPipeline,
    embedding: ImageEmbedding,
    settings: GenerationSettings,
    negative_embedding: ImageEmbedding | None,
    images: Sequence[Any],
) -> Conditioning:
    """``blend``: the text prompt's embeddings mixed with the image's by ``image_weight``.

    ``interpolate`` mixes token by token with the ``repeat`` form (77 tokens, like the text);
    ``concat`` appends the ``single`` form (one token per image) after the 77 text tokens.
    """
    extras: dict[str, torch.Tensor] = {}
    text = pipe.encode_text(settings.prompt, purpose="a text prompt (blend)")
    form = "repeat" if settings.blend == "interpolate" else "single"
    image = pipe.image_sequence(embedding, settings, form=form, extras=extras).to(text.dtype)
    prompt = conditioning.BLEND_FUNCTIONS[settings.blend](text, image, settings.image_weight)
    negative = _negative(pipe, prompt, settings, negative_embedding, extras, form=form)
    return Conditioning(prompt, negative, extras=extras)


def _negative(
    pipe: ImagePromptPipeline,
    prompt: torch.Tensor,
    settings: GenerationSettings,
    negative_embedding: ImageEmbedding | None,
    extras: dict[str, torch.Tensor],
    form: str,
) -> torch.Tensor | None:
    """The unconditional branch: SD's empty prompt (the guide's default), zeros, or negative images.

    Negative images take the same form, norm matching and scale as the prompt's images; several
    are averaged with equal weights.
    """
    if settings.guidance_scale <= 1:
        return None
    if settings.negative == "empty_prompt":
        return pipe.empty_prompt_embeds()
    if settings.negative == "zeros":
        return torch.zeros_like(prompt)
    assert negative_embedding is not None  # generate() checks this before encoding
    return pipe.image_sequence(
        negative_embedding, settings, form=form, combine="average", weights=(), extras=extras, prefix="negative_"
    )


def _square_for_clip(image: Any, crop: str, processor: Any) -> Any:
    """``squash``: resize to CLIP's square; ``pad``: letterbox on CLIP's mean colour, then resize."""
    from PIL import Image

    size = processor.crop_size
    target = (int(size["width"]), int(size["height"]))
    if crop == "pad":
        side = max(image.size)
        fill = tuple(round(channel * 255) for channel in processor.image_mean)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    return image.resize(target, Image.Resampling.BICUBIC)


@contextlib.contextmanager
def _watching_decoded_values(vae: Any) -> Iterator[list[torch.dtype]]:
    """Notice NaN/Inf in what the VAE's decoder returns (a float16 VAE overflows to NaN, and diffusers then
    hands back black images without a word). One ``isfinite`` per decode; the pixels are not touched. Yields
    a list that gets the decoder's dtype once per decode that had non-finite values."""
    found: list[torch.dtype] = []
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, torch.nn.Module):
        yield found
        return

    def check(module: Any, args: tuple, output: Any) -> None:
        sample = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if torch.is_tensor(sample) and not bool(torch.isfinite(sample).all()):
            found.append(sample.dtype)

    handle = decoder.register_forward_hook(check)
    try:
        yield found
    finally:
        handle.remove()


def _dtype_text(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def _attention_mask(unet: Any, mask: torch.Tensor) -> Iterator[None]:
    """Hand ``encoder_attention_mask`` to every UNet call (diffusers' pipeline has no argument for it)."""

    def add_mask(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sample = args[0] if args else kwargs["sample"]
        if sample.shape[0] == mask.shape[0]:
            kwargs["encoder_attention_mask"] = mask.to(sample.device)
        return args, kwargs

    handle = unet.register_forward_pre_hook(add_mask, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _component_loader(preset: Preset) -> Callable[..., Any]:
    """models.load_components for SD + CLIP pairs; the variations and IP-Adapter presets load their own way."""
    if preset.method == "variations":
        from .methods.variations import load_components as load_variations

        return load_variations
    if preset.method == "ip_adapter":
        from .methods.ip_adapter import load_components as load_ip_adapter

        return load_ip_adapter
    return load_components


def conditioning_builders() -> dict[str, Any]:
    """Mode name → the function that builds its :class:`Conditioning` (imported lazily: optional parts)."""
    from .methods import caption, ip_adapter

    return {
        "repeat": _image_conditioning,
        "single": _image_conditioning,
        "tokens": _image_conditioning,
        "blend": _blend_conditioning,
        "ip_adapter": ip_adapter.build_conditioning,
        "caption": caption.build_conditioning,
    }


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
