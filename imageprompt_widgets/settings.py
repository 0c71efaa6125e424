"""Generation settings: one dataclass whose field metadata holds every range and default.

The engine validates against these ranges and the widget builds its sliders from them, so a range
is written exactly once. Everything here is JSON-able: a run's recipe is these settings plus the
model and a fingerprint of the inputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

#: How image embeddings become prompt embeddings (see conditioning.py for the exact definitions).
#: ``ip_adapter`` and ``caption`` need a preset that carries an adapter or a captioner.
MODES = ("repeat", "single", "tokens", "blend", "ip_adapter", "caption")
#: How several images become one conditioning (conditioning.COMBINE_FUNCTIONS).
COMBINES = ("average", "norm_average", "concat", "add", "subtract", "max", "min", "slerp")
#: How ``blend`` mixes the text prompt with the image (conditioning.BLEND_FUNCTIONS).
BLENDS = ("interpolate", "concat")
#: What the unconditional branch of classifier-free guidance sees: SD's text encoder on ``negative_prompt``
#: (the empty prompt unless one is typed: diffusers' default), zeros, or the negative images (together with
#: the negative text where one is typed; see the README's "Negative text").
NEGATIVES = ("empty_prompt", "zeros", "image")
#: The denoising schedulers (samplers) a run can use; each is built from the loaded model's own scheduler
#: config (samplers.py). ``pndm`` is SD 1.x's own, the guide's.
SCHEDULERS = ("pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "lcm")
#: Where the starting noise comes from: a generator on the model's device (diffusers' way, the contract's
#: default) or always the CPU's, so one seed gives the same picture on CPU, CUDA and MPS.
NOISE_SOURCES = ("device", "cpu")
#: The LCM scheduler plans its steps inside this many of the original schedule's (diffusers' LCMScheduler
#: ``original_inference_steps``): more steps than this are refused.
LCM_MAX_STEPS = 50
#: How an image is made square for CLIP: CLIP's own center crop, a squash, or padding.
CROPS = ("center_crop", "squash", "pad")
#: IP-Adapter layers that receive the image (SD 1.x; "style" and "composition" after InstantStyle).
ADAPTER_BLOCKS = ("all", "style", "composition", "style_and_composition")
#: How much of the input's layout a run keeps (structure.py): nothing, its Canny edges through a
#: ControlNet, or its noised latents as the starting point (img2img).
STRUCTURES = ("none", "edges", "img2img")
#: The settings each structure reads (the Structure section shows only these).
STRUCTURE_SETTINGS: dict[str, tuple[str, ...]] = {
    "none": (),
    "edges": ("canny_low", "canny_high", "control_scale", "control_start", "control_end"),
    "img2img": ("strength",),
}

MAX_SEED = 2**32 - 1


class SettingsError(ValueError):
    """A setting out of its range, of the wrong type, or unknown."""


@dataclass(frozen=True)
class SettingSpec:
    """What a control needs to know about one setting: its kind, range, label and help."""

    name: str
    kind: str  # "float", "int", "choice", "bool", "text", "size", "floats" (a list of numbers)
    default: Any
    label: str
    help: str = ""
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    advanced: bool = False
    #: The group of controls it belongs to ("structure": the widget's Structure section); "" = the main list.
    section: str = ""


def _spec(kind: str, default: Any, label: str, help: str = "", **extra: Any) -> Any:
    return field(default=default, metadata={"spec": dict(kind=kind, label=label, help=help, **extra)})


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides a generation besides the images themselves."""

    mode: str = _spec("choice", "repeat", "mode", "how the image embedding becomes the prompt", choices=MODES)
    scale: float = _spec(
        "float", 1.0, "scale", "multiplies the image conditioning (the adapter's strength for ip_adapter)",
        min=0.0, max=5.0, step=0.05,
    )
    prompt: str = _spec("text", "", "prompt", "text used by the blend, ip_adapter and caption modes")
    negative_prompt: str = _spec(
        "text", "", "negative prompt",
        "text guidance pushes away from (with negative=image: beside the negative images)",
    )
    image_weight: float = _spec(
        "float", 0.5, "image weight", "blend: 0 = the text alone, 1 = the image alone", min=0.0, max=1.0, step=0.05
    )
    blend: str = _spec(
        "choice", "interpolate", "blend", "how blend mixes text and image tokens", choices=BLENDS, advanced=True
    )
    norm_match: bool = _spec(
        "bool", False, "match text norm", "rescale image tokens to the typical length of SD's text tokens"
    )
    combine: str = _spec("choice", "average", "combine", "how several images become one", choices=COMBINES)
    weights: tuple[float, ...] = _spec(
        "floats", (), "weights", "one number per image, comma-separated; empty = equal", min=-10.0, max=10.0,
        step=0.1,
    )
    steps: int = _spec("int", 30, "steps", "denoising steps", min=1, max=150, step=1)
    scheduler: str = _spec(
        "choice", "pndm", "scheduler", "the sampler: pndm is SD's own; lcm needs an LCM model (the -live presets)",
        choices=SCHEDULERS,
    )
    guidance_scale: float = _spec(
        "float", 7.5, "guidance", "classifier-free guidance; 1 or less turns it off", min=0.0, max=20.0, step=0.5
    )
    seed: int = _spec("int", 0, "seed", "same seed, same picture", min=0, max=MAX_SEED, step=1)
    noise: str = _spec(
        "choice", "device", "noise", "where the seed's noise is drawn: the model's device, or the CPU (the same "
        "picture on every machine)", choices=NOISE_SOURCES, advanced=True,
    )
    num_images: int = _spec("int", 1, "images", "how many images, batched", min=1, max=8, step=1)
    height: int | None = _spec(
        "size", None, "height", "pixels, a multiple of 8; empty = the model's native size",
        min=64, max=1024, step=8, advanced=True,
    )
    width: int | None = _spec(
        "size", None, "width", "pixels, a multiple of 8; empty = the model's native size",
        min=64, max=1024, step=8, advanced=True,
    )
    negative: str = _spec(
        "choice", "empty_prompt", "negative",
        "what guidance pushes away from: the negative prompt (empty by default), zeros, or negative images",
        choices=NEGATIVES, advanced=True,
    )
    crop: str = _spec(
        "choice", "center_crop", "crop", "how the image is made square for CLIP", choices=CROPS, advanced=True
    )
    adapter_start: float = _spec(
        "float", 0.0, "adapter start", "ip_adapter: fraction of the steps before the image acts",
        min=0.0, max=1.0, step=0.05, advanced=True,
    )
    adapter_end: float = _spec(
        "float", 1.0, "adapter end", "ip_adapter: fraction of the steps after which the image stops acting",
        min=0.0, max=1.0, step=0.05, advanced=True,
    )
    adapter_blocks: str = _spec(
        "choice", "all", "adapter blocks", "ip_adapter: which UNet blocks see the image",
        choices=ADAPTER_BLOCKS, advanced=True,
    )
    structure: str = _spec(
        "choice", "none", "structure",
        "keep the input's layout: none, edges (a ControlNet on its Canny edges) or img2img (start from it, noised)",
        choices=STRUCTURES, section="structure",
    )
    canny_low: int = _spec(
        "int", 100, "canny low", "edges: weaker gradients count as edges only where they touch strong ones",
        min=0, max=255, step=1, section="structure",
    )
    canny_high: int = _spec(
        "int", 200, "canny high", "edges: gradients above this are edges (higher = fewer, stronger edges)",
        min=0, max=255, step=1, section="structure",
    )
    control_scale: float = _spec(
        "float", 1.0, "control scale", "edges: how strongly the ControlNet steers the UNet (0 = not at all)",
        min=0.0, max=2.0, step=0.05, section="structure",
    )
    control_start: float = _spec(
        "float", 0.0, "control start", "edges: fraction of the steps before the ControlNet acts",
        min=0.0, max=1.0, step=0.05, section="structure",
    )
    control_end: float = _spec(
        "float", 1.0, "control end", "edges: fraction of the steps after which the ControlNet stops acting",
        min=0.0, max=1.0, step=0.05, section="structure",
    )
    strength: float = _spec(
        "float", 0.75, "strength", "img2img: how much of the input is replaced by noise (0 = keep it, 1 = almost all)",
        min=0.0, max=1.0, step=0.05, section="structure",
    )

    def __post_init__(self) -> None:
        for spec in setting_specs():
            object.__setattr__(self, spec.name, _validated(spec, getattr(self, spec.name)))
        if self.adapter_start >= self.adapter_end:
            raise SettingsError(
                f"adapter_start={self.adapter_start:g} must be less than adapter_end={self.adapter_end:g}."
            )
        if self.control_start >= self.control_end:
            raise SettingsError(
                f"control_start={self.control_start:g} must be less than control_end={self.control_end:g}."
            )
        if self.canny_low > self.canny_high:
            raise SettingsError(
                f"canny_low={self.canny_low} must not be above canny_high={self.canny_high}."
            )
        if self.scheduler == "lcm" and self.steps > LCM_MAX_STEPS:
            raise SettingsError(
                f"scheduler='lcm' runs at most {LCM_MAX_STEPS} steps (it picks them from a {LCM_MAX_STEPS}-step "
                f"schedule), not {self.steps}: use 2 to 8 steps, its intended range."
            )
        if self.negative == "zeros" and self.negative_prompt.strip():
            raise SettingsError(
                "negative_prompt is text for the negative branch, but negative='zeros' feeds zeros there: use "
                "negative='empty_prompt' (the text) or 'image' (images and text together), or clear negative_prompt."
            )
        if self.structure == "img2img" and int(self.steps * self.strength) < 1:
            raise SettingsError(
                f"strength={self.strength:g} with steps={self.steps} leaves no denoising step (img2img runs "
                f"int(steps * strength) of them): raise strength to at least {1 / self.steps:.3g} or add steps."
            )

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs: above 1 it does, with an unconditional (negative) branch;
        at 1 or below diffusers runs the prompt alone, so nothing negative is computed or fed. The one
        place this rule is written."""
        return self.guidance_scale > 1

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> GenerationSettings:
        """Like the constructor, but an unknown name is a :class:`SettingsError` that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise SettingsError(
                f"Unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
                f"the settings are {', '.join(sorted(known))}."
            )
        return cls(**kwargs)

    def replace(self, **changes: Any) -> GenerationSettings:
        return self.from_kwargs(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (tuples become lists): a recipe equals itself after a JSON round trip."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def setting_specs() -> list[SettingSpec]:
    """The specs of every setting, in declaration order (the order of the widget's controls)."""
    return [
        SettingSpec(name=f.name, default=f.default, **f.metadata["spec"])
        for f in dataclasses.fields(GenerationSettings)
    ]


def _validated(spec: SettingSpec, value: Any) -> Any:
    if spec.kind == "choice":
        if value not in spec.choices:
            raise SettingsError(f"{spec.name}={value!r} is not one of {', '.join(spec.choices)}.")
        return value
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise SettingsError(f"{spec.name} must be True or False, not {value!r}.")
        return value
    if spec.kind == "text":
        if not isinstance(value, str):
            raise SettingsError(f"{spec.name} must be text, not {type(value).__name__}.")
        return value
    if spec.kind == "size" and value is None:
        return None
    if spec.kind == "floats":
        return _validated_floats(spec, value)
    number = _as_number(spec, value)
    if not (spec.min <= number <= spec.max):
        raise SettingsError(f"{spec.name}={value!r} is outside its range {spec.min:g} to {spec.max:g}.")
    if spec.kind == "size" and number % 8:
        raise SettingsError(f"{spec.name}={value!r} must be a multiple of 8 (the VAE downsamples by 8).")
    return number


def _as_number(spec: SettingSpec, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__index__"):
        raise SettingsError(f"{spec.name} must be a number, not {value!r}.")
    if spec.kind == "float":
        number = float(value)
        if math.isnan(number):
            raise SettingsError(f"{spec.name} must be a number, not NaN.")
        return number
    if isinstance(value, float) and not value.is_integer():
        raise SettingsError(f"{spec.name} must be a whole number, not {value!r}.")
    return int(value)


def _validated_floats(spec: SettingSpec, value: Any) -> tuple[float, ...]:
    if isinstance(value, str):
        value = parse_floats(value, spec.name)
    if value is None:
        return ()
    try:
        items = tuple(value)
    except TypeError:
        raise SettingsError(f"{spec.name} must be a list of numbers, not {value!r}.") from None
    item_spec = dataclasses.replace(spec, kind="float")
    return tuple(_validated(item_spec, item) for item in items)


def parse_floats(text: str, name: str = "value") -> tuple[float, ...]:
    """``"1, 0.5"`` → ``(1.0, 0.5)``; empty text is the empty tuple. Used by the CLI for "floats" settings."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return tuple(float(part) for part in parts)
    except ValueError:
        raise SettingsError(f"{name} must be comma-separated numbers such as 1,0.5, not {text!r}.") from None
