"""Keep the input's structure: a map of it through ControlNets, or img2img from the noised input.

An image prompt carries what a picture shows and how it looks, not where things are. Two classic
ways put the layout back, and both work with every image-prompt method, because the method's
conditioning is still handed to diffusers as ``prompt_embeds``/``negative_prompt_embeds``:

- ``structure="edges"`` / ``"depth"``: a map of the structure image (OpenCV's Canny edges, or a transformers
  depth estimator's depth map) goes to the ControlNet trained on that map (``lllyasviel/sd-controlnet-canny``,
  ``lllyasviel/control_v11f1p_sd15_depth`` for SD 1.x) through diffusers' ``StableDiffusionControlNetPipeline``;
  ``control_units`` adds more ControlNets (diffusers' multi-ControlNet), each with its own map, scale and
  window. Each kind and its preprocessor are named once in :mod:`~imageprompt_widgets.structure.controlnets`, so a
  depth ControlNet never receives edges;
- ``structure="img2img"``: diffusers' ``StableDiffusionImg2ImgPipeline`` starts from the structure
  image's latents noised to ``strength`` instead of pure noise.

The diffusers pipelines are built once per :class:`~imageprompt_widgets.engine.pipeline.ImagePromptPipeline` (and
set of ControlNets) from the components it already holds (one copy of SD in memory); each ControlNet and
the depth estimator load once, on first use. The structure image is the first input image unless one is
given separately (one for every unit, or one per unit); without an explicit ``height``/``width`` it keeps
its aspect ratio, its longer side at the model's native size.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..loading.cache import StatusCallback, diffusers_dtype_kwarg
from ..loading.memory import execution_device
from ..loading.quiet import quiet_loaders
from ..settings import CONTROLNET_STRUCTURES, ControlUnit, GenerationSettings, SettingsError
from .controlnets import control_kind, controlnet_for, estimator_for, kind_of_controlnet

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
    """A map (edges, depth) as the ControlNet receives it: ``[1, 3, H, W]`` float32 in 0..1 (three equal channels)."""
    gray = torch.from_numpy(np.asarray(edges.convert("L"), dtype=np.float32) / 255.0)
    return gray[None, None].expand(1, 3, *gray.shape).contiguous()


def control_map(unit: ControlUnit, image: Any, size: tuple[int, int] | None = None, depth: Any = None) -> Any:
    """The map a ControlNet unit of ``unit.kind`` reads, of ``image`` resized to ``size`` (width, height) first:
    Canny edges (:func:`edge_map`) or the depth estimator's map (``depth``: a
    :class:`~imageprompt_widgets.structure.depth.DepthEstimator`). A grayscale PIL image; the kind decides, never the caller.
    """
    from PIL import Image

    picture = resized(image, size)
    if unit.kind == "edges":
        return Image.fromarray(canny_edges(picture, unit.canny_low, unit.canny_high))
    if depth is None:
        raise SettingsError(f"A {control_kind(unit.kind).map_name} map needs its estimator: pass depth=.")
    return depth.depth_map(picture)


@dataclass
class ControlMap:
    """One unit's map as a run uses it (and the panel previews it): the unit, its picture and its ControlNet."""

    index: int  # the unit's place: 0 = the structure's own, 1... = control_units
    unit: ControlUnit
    image: Any  # grayscale PIL image at the run's size
    controlnet: str  # the ControlNet that reads it (Hub id, folder or offline name)
    estimator: str | None = None  # the model that made it (depth), None for Canny

    @property
    def kind(self) -> str:
        return self.unit.kind

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def control_trace_name(index: int) -> str:
    """The trace name of unit ``index``'s map: ``control_image`` for the first, ``control_image_1``, ... after."""
    return "control_image" if index == 0 else f"control_image_{index}"


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
    """A diffusers ``ControlNetModel`` from a Hub id or folder (``"tiny"``, ``"tiny-depth"``, ``"tiny-sdxl-canny"``,
    ``"tiny-sdxl-depth"``: the offline twins), on ``device``."""
    from diffusers import ControlNetModel

    from ..loading.cache import check_local_folder, translate_load_errors
    from ..loading.offline import TINY_CONTROLNETS, ensure_tiny_controlnet
    from ..loading.offline_sdxl import TINY_SDXL_CONTROLNETS, ensure_tiny_sdxl_controlnet

    say = on_status or (lambda message: None)
    path = model
    if model in TINY_CONTROLNETS:
        say("Building the tiny ControlNet (first use only)…")
        path = ensure_tiny_controlnet(model)
    elif model in TINY_SDXL_CONTROLNETS:
        say("Building the tiny SDXL ControlNet (first use only)…")
        path = ensure_tiny_sdxl_controlnet(model)
    check_local_folder(path, model, "config.json", "a ControlNet (diffusers format)")
    say(f"Loading the ControlNet {model!r} onto {device}…")
    kwargs = {diffusers_dtype_kwarg(): dtype, "use_safetensors": None if allow_pickle else True}
    with translate_load_errors(model, allow_pickle), quiet_loaders():
        controlnet = ControlNetModel.from_pretrained(path, **kwargs)
    return controlnet.to(device).eval()


class ControlNetMismatchError(SettingsError):
    """A ControlNet made for another family of UNet (an SD 1.x one on SDXL, or the reverse)."""


def _family_words(config: Any) -> str:
    xl = config.get("addition_embed_type") == "text_time"
    return f"{'SDXL' if xl else 'SD 1.x'} (cross-attention {config.get('cross_attention_dim')} wide)"


def check_controlnet_fits(controlnet: Any, unet: Any, name: str, kind: str) -> None:
    """Refuse a ControlNet whose UNet family differs from the model's before diffusers fails deep inside a run
    with a shape error: SDXL's ControlNets read SDXL's 2,048-wide tokens and its pooled slot, SD 1.x's do not."""
    theirs, ours = controlnet.config, unet.config
    same_family = (theirs.get("addition_embed_type") == "text_time") == (ours.get("addition_embed_type") == "text_time")
    if same_family and theirs.get("cross_attention_dim") == ours.get("cross_attention_dim"):
        return
    entry = control_kind(kind)
    example = entry.sdxl_controlnet if ours.get("addition_embed_type") == "text_time" else entry.controlnet
    raise ControlNetMismatchError(
        f"The ControlNet {name!r} was made for {_family_words(theirs)}, and this model is {_family_words(ours)}: "
        f"load a ControlNet made for it, e.g. pipe.load_controlnet({example!r})."
    )


# ---------------------------------------------------------------------------------------------
# What one run hands diffusers


@dataclass
class StructurePlan:
    """The diffusers pipeline a run calls, its structure arguments, and what goes into the trace.

    ``kwargs`` replace ``height``/``width`` in the call (img2img takes its size from the image).
    ``extras`` are traced tensors (``control_image`` ``[1, 3, H, W]`` in 0..1, ``control_image_1``... for more
    units); ``maps`` are the units' maps, ``edge_map`` the first, the picture shown to the user.
    """

    runner: Any
    kwargs: dict[str, Any]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    edge_map: Any = None
    structure_image: Any = None
    maps: list[ControlMap] = field(default_factory=list)

    def contexts(self, extras: dict[str, torch.Tensor], mask: torch.Tensor | None) -> list[Any]:
        """Context managers for the diffusers call: record the start latents into ``extras``; give the
        ControlNet the same padding mask as the UNet."""
        if self.structure_image is None:
            return []
        managers: list[Any] = [recording_start_latents(self.runner, extras)]
        if is_sdxl(self.runner):
            managers.append(without_empty_upcast_warning())
        controlnet = getattr(self.runner, "controlnet", None)
        if mask is not None and controlnet is not None:
            managers.append(masked_cross_attention(controlnet, mask))
        return managers


class StructureRunners:
    """The ControlNets, the depth estimator and the structure pipelines of one SD pipeline, built on first
    use and kept.

    The pipelines share every component with ``sd`` (the same UNet, VAE, scheduler objects), so they cost no
    memory beyond the ControlNets and the estimator. ``controlnet_family`` is the preset's
    :attr:`~imageprompt_widgets.presets.Preset.controlnet`: which ControlNet each kind loads by default.
    """

    def __init__(self, sd: Any, controlnet_family: str | None, *, allow_pickle: bool = False) -> None:
        self.sd = sd
        self.family = controlnet_family
        self.allow_pickle = allow_pickle
        self._chosen: dict[str, str] = {}  # kind -> ControlNet named with load_controlnet
        self._controlnets: dict[str, Any] = {}  # model -> ControlNetModel
        self._estimators: dict[str, Any] = {}  # model -> DepthEstimator
        self._pipelines: dict[Any, Any] = {}
        self._loading = threading.Lock()  # previews may load the estimator while a run holds the pipeline

    @property
    def native_size(self) -> int:
        """The model's native side in pixels (512 for SD 1.x)."""
        return int(self.sd.unet.config.sample_size * self.sd.vae_scale_factor)

    def model_for(self, kind: str) -> str:
        """The ControlNet a unit of ``kind`` uses: the one named with :meth:`controlnet`, else the family's."""
        entry = control_kind(kind)
        model = self._chosen.get(kind) or controlnet_for(kind, self.family)
        if not model:
            presets, example = (("sdxl, tiny-sdxl", entry.sdxl_controlnet) if is_sdxl(self.sd)
                                else ("sd14, sd15, tiny", entry.controlnet))
            raise SettingsError(
                f"structure={kind!r} needs a ControlNet trained on {entry.map_name} and this model has none: use a "
                f"preset that has one ({presets}) or call pipe.load_controlnet({example!r})."
            )
        return model

    def controlnet(
        self, model: str | None = None, on_status: StatusCallback | None = None, *, kind: str | None = None
    ) -> Any:
        """The ControlNet of ``kind`` (default ``edges``), loaded once; ``model`` replaces the preset's for the kind
        it reads, which its name tells (``canny``, ``depth``) or ``kind`` says."""
        if model is not None:
            kind = kind or kind_of_controlnet(model)
            if kind is None:
                raise SettingsError(
                    f"Which map does the ControlNet {model!r} read? Its name does not say: pass kind="
                    f"{' or '.join(repr(name) for name in CONTROLNET_STRUCTURES)}."
                )
            control_kind(kind)
            if self._chosen.get(kind, controlnet_for(kind, self.family)) != model:
                self._chosen[kind] = model
                self._pipelines = {key: runner for key, runner in self._pipelines.items() if key == "img2img"}
        kind = kind or "edges"
        name = self.model_for(kind)
        with self._loading:
            if name not in self._controlnets:
                controlnet = load_controlnet(
                    name, execution_device(self.sd), self.sd.unet.dtype, allow_pickle=self.allow_pickle,
                    on_status=on_status,
                )
                check_controlnet_fits(controlnet, self.sd.unet, name, kind)
                self._controlnets[name] = controlnet
        return self._controlnets[name]

    def estimator(self, kind: str, on_status: StatusCallback | None = None) -> Any:
        """The model that makes ``kind``'s map (the depth estimator), loaded once; ``None`` for Canny edges."""
        name = estimator_for(kind, self.family)
        if name is None:
            return None
        from .depth import load_depth_estimator

        with self._loading:
            if name not in self._estimators:
                self._estimators[name] = load_depth_estimator(
                    name, execution_device(self.sd), self.sd.unet.dtype, allow_pickle=self.allow_pickle,
                    on_status=on_status,
                )
        return self._estimators[name]

    def pipeline(
        self, structure: str, on_status: StatusCallback | None = None, kinds: Sequence[str] | None = None
    ) -> Any:
        """The diffusers pipeline for ``structure``: ``sd`` itself, its img2img twin, or its ControlNet twin with
        the ControlNets of ``kinds`` (the run's units, in order; default: the structure's own alone)."""
        if structure == "none":
            return self.sd
        kinds = tuple(kinds or (structure,)) if structure != "img2img" else ()
        key: Any = "img2img" if structure == "img2img" else ("controlnet", tuple(self.model_for(k) for k in kinds))
        if key not in self._pipelines:
            nets = [self.controlnet(on_status=on_status, kind=kind) for kind in kinds]
            # One ControlNet as itself (the single-unit call stays diffusers' plain one); several as a list,
            # which diffusers wraps in its MultiControlNetModel.
            controlnet = None if not nets else nets[0] if len(nets) == 1 else nets
            runner = (_sdxl_runner if is_sdxl(self.sd) else _sd_runner)(self.sd, controlnet)
            runner.set_progress_bar_config(disable=True)
            self._pipelines[key] = runner
        return self._pipelines[key]

    def maps(
        self, settings: GenerationSettings, structure_images: Sequence[Any], on_status: StatusCallback | None = None,
    ) -> list[ControlMap]:
        """Each ControlNet unit's map at the run's size: one structure image for every unit, or one per unit."""
        units = settings.units()
        if not units:
            return []
        pictures = unit_pictures(structure_images, len(units))
        size = fit_size(pictures[0].size, settings.height, settings.width, self.native_size)
        maps = []
        for index, (unit, picture) in enumerate(zip(units, pictures)):
            controlnet = self.model_for(unit.kind)  # no ControlNet for this kind: say so before loading anything
            estimator = self.estimator(unit.kind, on_status)
            maps.append(ControlMap(index, unit, control_map(unit, picture, size, estimator), controlnet,
                                   getattr(estimator, "source", None)))
        return maps

    def plan(
        self,
        settings: GenerationSettings,
        structure_images: Any,
        batch: int,
        on_status: StatusCallback | None = None,
    ) -> StructurePlan:
        """What to call for these settings; ``structure_images`` is an RGB PIL image or one per ControlNet unit
        (ignored for ``none``)."""
        if settings.structure == "none":
            return StructurePlan(self.sd, {"height": settings.height, "width": settings.width})
        pictures = list(structure_images) if isinstance(structure_images, (list, tuple)) else [structure_images]
        if settings.structure == "img2img":
            size = fit_size(pictures[0].size, settings.height, settings.width, self.native_size)
            runner = self.pipeline("img2img", on_status)
            init = resized(pictures[0], size)
            # One copy per output image: diffusers deprecates repeating a single image to the batch itself.
            kwargs = {"image": [init] * batch, "strength": settings.strength}
            return StructurePlan(runner, kwargs, structure_image=pictures[0])
        maps = self.maps(settings, pictures, on_status)
        runner = self.pipeline(settings.structure, on_status, [m.kind for m in maps])
        width, height = maps[0].size

        def per_unit(values: list[Any]) -> Any:  # diffusers takes a value for one ControlNet, a list for several
            return values[0] if len(values) == 1 else values

        kwargs = {
            "image": per_unit([m.image.convert("RGB") for m in maps]),
            "height": height,
            "width": width,
            "controlnet_conditioning_scale": per_unit([m.unit.scale for m in maps]),
            "control_guidance_start": per_unit([m.unit.start for m in maps]),
            "control_guidance_end": per_unit([m.unit.end for m in maps]),
        }
        notes: dict[str, Any] = {"controlnet": per_unit([m.controlnet for m in maps])}
        estimators = [m.estimator for m in maps if m.estimator]
        if estimators:
            notes["depth_estimator"] = estimators[0]
        return StructurePlan(
            runner, kwargs, extras={control_trace_name(m.index): control_tensor(m.image) for m in maps},
            notes=notes, edge_map=maps[0].image, structure_image=pictures[0], maps=maps,
        )


def is_sdxl(sd: Any) -> bool:
    """Whether ``sd`` is an SDXL pipeline (two text encoders: its structure runs need diffusers' XL pipelines)."""
    return "text_encoder_2" in getattr(sd, "components", {})


def _sd_runner(sd: Any, controlnet: Any) -> Any:
    """SD 1.x's img2img pipeline (``controlnet`` None) or ControlNet pipeline over ``sd``'s own components."""
    from diffusers import StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline

    components = dict(sd.components)
    requires_checker = bool(sd.config.get("requires_safety_checker", False))
    requires_checker = requires_checker and components.get("safety_checker") is not None
    if controlnet is None:
        return StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=requires_checker)
    return StableDiffusionControlNetPipeline(**components, controlnet=controlnet,
                                             requires_safety_checker=requires_checker)


def _sdxl_runner(sd: Any, controlnet: Any) -> Any:
    """SDXL's img2img pipeline (``controlnet`` None) or ControlNet pipeline over ``sd``'s own components, with its
    settings: zeros for an empty negative prompt as SDXL base says, its watermarker only where it has one."""
    from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLImg2ImgPipeline

    components = dict(sd.components)
    options = {
        "force_zeros_for_empty_prompt": bool(sd.config.get("force_zeros_for_empty_prompt", True)),
        "add_watermarker": getattr(sd, "watermark", None) is not None,
    }
    if controlnet is None:
        return StableDiffusionXLImg2ImgPipeline(**components, **options)
    return StableDiffusionXLControlNetPipeline(**components, controlnet=controlnet, **options)


def unit_pictures(structure_images: Sequence[Any], units: int) -> list[Any]:
    """The structure image of each of ``units`` ControlNet units: one picture for all, or one each."""
    pictures = list(structure_images)
    if len(pictures) == 1:
        return pictures * units
    if len(pictures) != units:
        raise SettingsError(
            f"{len(pictures)} structure images for {units} ControlNet unit{'s' if units != 1 else ''}: give one "
            "for all, or one per unit (the structure's own first, then control_units)."
        )
    return pictures


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


#: diffusers' ModelMixin.to warns on every dtype cast that lists the modules to keep in float32, also when there are
#: none; SDXL's img2img pipeline casts its VAE to float32 and back on every run (``force_upcast``), so each run would
#: print it.
EMPTY_UPCAST_WARNING = "should be kept in float32: []."


@contextlib.contextmanager
def without_empty_upcast_warning() -> Iterator[None]:
    """Drop diffusers' float32 warning where it names no module (SDXL img2img's own upcast of its VAE), for one run;
    every other message passes."""
    import logging

    logger = logging.getLogger("diffusers.models.modeling_utils")

    def keep(record: logging.LogRecord) -> bool:
        return EMPTY_UPCAST_WARNING not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


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
