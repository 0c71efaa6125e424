"""Keep the input's structure: Canny edges through a ControlNet, or img2img from the noised input.

An image prompt carries what a picture shows and how it looks, not where things are. Two classic
ways put the layout back, and both work with every image-prompt method, because the method's
conditioning is still handed to diffusers as ``prompt_embeds``/``negative_prompt_embeds``:

- ``structure="edges"``: OpenCV's Canny edge map of the structure image goes to a ControlNet
  (``lllyasviel/sd-controlnet-canny`` for SD 1.x) through diffusers' ``StableDiffusionControlNetPipeline``;
- ``structure="img2img"``: diffusers' ``StableDiffusionImg2ImgPipeline`` starts from the structure
  image's latents noised to ``strength`` instead of pure noise.

Both diffusers pipelines are built once per :class:`~imageprompt_widgets.pipeline.ImagePromptPipeline`
from the components it already holds (one copy of SD in memory); the ControlNet loads once, on the
first ``edges`` run. The structure image is the first input image unless one is given separately;
without an explicit ``height``/``width`` it keeps its aspect ratio, its longer side at the model's
native size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .memory import execution_device
from .models import StatusCallback, diffusers_dtype_kwarg
from .quiet import quiet_loaders
from .settings import GenerationSettings, SettingsError

#: The optional dependency group that brings OpenCV (``pip install 'imageprompt_widgets[edges]'``).
EDGES_EXTRA = "edges"
#: Output sides are rounded to this (SD's VAE downsamples by 8; the settings demand multiples of 8).
SIZE_MULTIPLE = 8


class MissingExtraError(SettingsError):
    """An option that needs an optional dependency which is not installed."""


# ---------------------------------------------------------------------------------------------
# Edge maps and sizes: pure functions (the widget's preview uses them too)


def canny_edges(image: Any, low: int = 100, high: int = 200) -> np.ndarray:
    """``cv2.Canny`` on the image's grayscale (PIL's ``"L"`` conversion): a ``[H, W]`` uint8 array of 0 and 255."""
    cv2 = _opencv()
    gray = np.asarray(image.convert("L"))
    return cv2.Canny(gray, int(low), int(high))


def edge_map(image: Any, low: int = 100, high: int = 200, size: tuple[int, int] | None = None) -> Any:
    """The edge map a ControlNet run uses: the image resized to ``size`` (width, height) first, then Canny.

    Resizing before detecting keeps the edges one pixel wide at the size the ControlNet sees them.
    Returns a grayscale PIL image (white edges on black).
    """
    from PIL import Image

    return Image.fromarray(canny_edges(resized(image, size), low, high))  # uint8 [H, W]: mode "L"


def resized(image: Any, size: tuple[int, int] | None) -> Any:
    """``image`` as RGB at ``size`` (width, height), Lanczos as diffusers resizes; unchanged when it fits already."""
    from PIL import Image

    image = image.convert("RGB")
    if size is None or tuple(size) == image.size:
        return image
    return image.resize(tuple(size), Image.Resampling.LANCZOS)


def fit_size(
    image_size: tuple[int, int], height: int | None = None, width: int | None = None, native: int = 512
) -> tuple[int, int]:
    """``(width, height)`` of a run that keeps a structure image of ``image_size``.

    Both given: those. One given: the other from the image's aspect ratio. Neither: the aspect ratio
    kept with the longer side at ``native``. Sides are rounded to multiples of 8.
    """
    image_width, image_height = image_size
    if height and width:
        return int(width), int(height)
    if width:
        return int(width), _round_side(width * image_height / image_width)
    if height:
        return _round_side(height * image_width / image_height), int(height)
    scale = native / max(image_width, image_height)
    return _round_side(image_width * scale), _round_side(image_height * scale)


def control_tensor(edges: Any) -> torch.Tensor:
    """An edge map as the ControlNet receives it: ``[1, 3, H, W]`` float32 in 0..1 (three equal channels)."""
    gray = torch.from_numpy(np.asarray(edges.convert("L"), dtype=np.float32) / 255.0)
    return gray[None, None].expand(1, 3, *gray.shape).contiguous()


def _round_side(value: float) -> int:
    return max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def _opencv() -> Any:
    try:
        import cv2
    except ImportError as err:
        raise MissingExtraError(
            "structure='edges' computes edges with OpenCV, which is not installed: "
            f"pip install 'imageprompt_widgets[{EDGES_EXTRA}]' (it brings opencv-python-headless)."
        ) from err
    return cv2


# ---------------------------------------------------------------------------------------------
# Loading the ControlNet


def load_controlnet(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    allow_pickle: bool = False,
    on_status: StatusCallback | None = None,
) -> Any:
    """A diffusers ``ControlNetModel`` from a Hub id or folder (``"tiny"``: the offline twin), on ``device``."""
    from diffusers import ControlNetModel

    from .models import check_local_folder, translate_load_errors
    from .offline import ensure_tiny_controlnet

    say = on_status or (lambda message: None)
    path = model
    if model == "tiny":
        say("Building the tiny ControlNet (first use only)…")
        path = ensure_tiny_controlnet()
    check_local_folder(path, model, "config.json", "a ControlNet (diffusers format)")
    say(f"Loading the ControlNet {model!r} onto {device}…")
    kwargs = {diffusers_dtype_kwarg(): dtype, "use_safetensors": None if allow_pickle else True}
    with translate_load_errors(model, allow_pickle), quiet_loaders():
        controlnet = ControlNetModel.from_pretrained(path, **kwargs)
    return controlnet.to(device).eval()


# ---------------------------------------------------------------------------------------------
# What one run hands diffusers


@dataclass
class StructurePlan:
    """The diffusers pipeline a run calls, its structure arguments, and what goes into the trace.

    ``kwargs`` replace ``height``/``width`` in the call (img2img takes its size from the image).
    ``extras`` are traced tensors (``control_image`` ``[1, 3, H, W]`` in 0..1); ``edge_map`` is
    the picture shown to the user.
    """

    runner: Any
    kwargs: dict[str, Any]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    edge_map: Any = None
    structure_image: Any = None

    def contexts(self, extras: dict[str, torch.Tensor], mask: torch.Tensor | None) -> list[Any]:
        """Context managers for the diffusers call: record the start latents into ``extras``; give the
        ControlNet the same padding mask as the UNet."""
        if self.structure_image is None:
            return []
        managers: list[Any] = [recording_start_latents(self.runner, extras)]
        controlnet = getattr(self.runner, "controlnet", None)
        if mask is not None and controlnet is not None:
            managers.append(masked_cross_attention(controlnet, mask))
        return managers


class StructureRunners:
    """The ControlNet and the two structure pipelines of one SD pipeline, built on first use and kept.

    They share every component with ``sd`` (the same UNet, VAE, scheduler objects), so they cost no
    memory beyond the ControlNet itself.
    """

    def __init__(self, sd: Any, controlnet_model: str | None, *, allow_pickle: bool = False) -> None:
        self.sd = sd
        self.controlnet_model = controlnet_model
        self.allow_pickle = allow_pickle
        self._controlnet: Any = None
        self._pipelines: dict[str, Any] = {}

    @property
    def native_size(self) -> int:
        """The model's native side in pixels (512 for SD 1.x)."""
        return int(self.sd.unet.config.sample_size * self.sd.vae_scale_factor)

    def controlnet(self, model: str | None = None, on_status: StatusCallback | None = None) -> Any:
        """The ControlNet (loaded once); ``model`` replaces the preset's, e.g. for a custom model pair."""
        if model is not None and model != self.controlnet_model:
            self.controlnet_model, self._controlnet = model, None
            self._pipelines.pop("edges", None)
        if self._controlnet is None:
            if not self.controlnet_model:
                raise SettingsError(
                    "structure='edges' needs a canny ControlNet and this model has none: use a preset that "
                    "has one (sd14, sd15, tiny) or call pipe.load_controlnet('lllyasviel/sd-controlnet-canny')."
                )
            self._controlnet = load_controlnet(
                self.controlnet_model, execution_device(self.sd), self.sd.unet.dtype,
                allow_pickle=self.allow_pickle, on_status=on_status,
            )
        return self._controlnet

    def pipeline(self, structure: str, on_status: StatusCallback | None = None) -> Any:
        """The diffusers pipeline for ``structure``: ``sd`` itself, its ControlNet twin or its img2img twin."""
        if structure == "none":
            return self.sd
        if structure not in self._pipelines:
            from diffusers import StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline

            components = dict(self.sd.components)
            requires_checker = bool(self.sd.config.get("requires_safety_checker", False))
            requires_checker = requires_checker and components.get("safety_checker") is not None
            if structure == "edges":
                controlnet = self.controlnet(on_status=on_status)
                runner = StableDiffusionControlNetPipeline(
                    **components, controlnet=controlnet, requires_safety_checker=requires_checker
                )
            else:
                runner = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=requires_checker)
            runner.set_progress_bar_config(disable=True)
            self._pipelines[structure] = runner
        return self._pipelines[structure]

    def plan(
        self,
        settings: GenerationSettings,
        structure_image: Any,
        batch: int,
        on_status: StatusCallback | None = None,
    ) -> StructurePlan:
        """What to call for these settings; ``structure_image`` is an RGB PIL image (ignored for ``none``)."""
        if settings.structure == "none":
            return StructurePlan(self.sd, {"height": settings.height, "width": settings.width})
        size = fit_size(structure_image.size, settings.height, settings.width, self.native_size)
        width, height = size
        if settings.structure == "edges":
            edges = edge_map(structure_image, settings.canny_low, settings.canny_high, size)
            runner = self.pipeline("edges", on_status)
            kwargs = {
                "image": edges.convert("RGB"),
                "height": height,
                "width": width,
                "controlnet_conditioning_scale": settings.control_scale,
                "control_guidance_start": settings.control_start,
                "control_guidance_end": settings.control_end,
            }
            return StructurePlan(
                runner, kwargs, extras={"control_image": control_tensor(edges)},
                notes={"controlnet": self.controlnet_model}, edge_map=edges, structure_image=structure_image,
            )
        runner = self.pipeline("img2img", on_status)
        init = resized(structure_image, size)
        # One copy per output image: diffusers deprecates repeating a single image to the batch itself.
        kwargs = {"image": [init] * batch, "strength": settings.strength}
        return StructurePlan(runner, kwargs, structure_image=structure_image)


@contextlib.contextmanager
def recording_start_latents(runner: Any, extras: dict[str, torch.Tensor]) -> Iterator[None]:
    """Keep what ``runner.prepare_latents`` returns (the latents the first step starts from) as ``extras["start_latents"]``.

    For img2img that is the structure image's latents noised to the first timestep; for a ControlNet run
    it is the initial noise.
    """
    original: Callable[..., torch.Tensor] = runner.prepare_latents

    def prepare_and_record(*args: Any, **kwargs: Any) -> torch.Tensor:
        latents = original(*args, **kwargs)
        extras["start_latents"] = latents.detach().to("cpu", copy=True)
        return latents

    runner.prepare_latents = prepare_and_record  # shadows the method on this instance only, for this run
    try:
        yield
    finally:
        del runner.prepare_latents


@contextlib.contextmanager
def masked_cross_attention(controlnet: Any, mask: torch.Tensor) -> Iterator[None]:
    """Give the ControlNet's cross-attention the padding mask the UNet gets (``encoder_attention_mask``).

    ``ControlNetModel.forward`` has no ``encoder_attention_mask``; its transformer blocks call ``attn2``
    with ``attention_mask=None``. This hook passes the additive bias the UNet builds from the mask
    (``(1 - mask) * -10000``), so zero padding tokens are removed exactly as in the UNet.
    """
    bias = ((1 - mask.float()) * -10000.0).unsqueeze(1)

    def add_mask(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        context = kwargs.get("encoder_hidden_states")
        if context is not None and context.shape[0] == bias.shape[0] and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = bias.to(context.device, context.dtype)
        return args, kwargs

    handles = [
        module.register_forward_pre_hook(add_mask, with_kwargs=True)
        for name, module in controlnet.named_modules()
        if name.endswith("attn2")
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
