"""Generation settings: one dataclass whose field metadata holds every range and default.

The engine validates against these ranges and the widget builds its sliders from them, so a range
is written exactly once. Everything here is JSON-able: a run's recipe is these settings plus the
model and a fingerprint of the inputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import operator
import reprlib
from dataclasses import dataclass, field
from typing import Any

#: How image embeddings become prompt embeddings (see conditioning.py for the exact definitions).
#: ``ip_adapter`` and ``caption`` need a preset that carries an adapter or a captioner, ``projector`` a trained
#: projector; ``text`` is words only (plain text-to-image, no image): the baseline every image method is compared
#: with. ``revision`` (SDXL only) puts the image's OpenCLIP bigG embedding in SDXL's pooled slot.
MODES = ("repeat", "single", "tokens", "blend", "ip_adapter", "caption", "text", "words", "projector", "revision")
#: How ``words`` finds words for the picture (methods/words.py): a greedy phrase chain, or a hard-prompt search.
WORDS_ROUTES = ("chain", "search")
#: How several images become one conditioning (conditioning.COMBINE_FUNCTIONS).
COMBINES = ("average", "norm_average", "concat", "add", "subtract", "max", "min", "slerp")
#: How ``blend`` mixes the text prompt with the image (conditioning.BLEND_FUNCTIONS).
BLENDS = ("interpolate", "concat")
#: What the unconditional branch of classifier-free guidance sees: SD's text encoder on ``negative_prompt``
#: (the empty prompt unless one is typed: diffusers' default), zeros, or the negative images (together with
#: the negative text where one is typed; see docs/samplers.md, "Negative text").
NEGATIVES = ("empty_prompt", "zeros", "image")
#: The denoising schedulers (samplers) a run can use; each is built from the loaded model's own scheduler
#: config (engine/samplers.py). ``pndm`` is SD 1.x's own, the guide's.
SCHEDULERS = ("pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "lcm", "ddim_trailing")
#: Where the starting noise comes from: a generator on the model's device (diffusers' way, the contract's
#: default) or always the CPU's, so one seed gives the same picture on CPU, CUDA and MPS.
NOISE_SOURCES = ("device", "cpu")
#: The LCM scheduler plans its steps inside this many of the original schedule's (diffusers' LCMScheduler
#: ``original_inference_steps``): more steps than this are refused.
LCM_MAX_STEPS = 50
#: The VAE decoder that turns the final latents into the picture: the model's own (``full``) or TAESD
#: (``tiny``: diffusers' ``AutoencoderTiny``, about 18x less work at 512 px, slightly softer; the live presets' choice).
DECODERS = ("full", "tiny")
#: The arithmetic a run computes in: ``auto`` picks bfloat16 autocast for few-step (live) runs on a CPU that has
#: bfloat16 instructions and float32 otherwise; ``float32`` never autocasts; ``bfloat16`` always does.
PRECISIONS = ("auto", "float32", "bfloat16")
#: ``precision="auto"`` autocasts runs of at most this many steps (live and few-step runs; the 30-step default
#: run stays in float32, so its pixels equal bare diffusers').
AUTOCAST_MAX_STEPS = 8
#: How an image is made square for CLIP: CLIP's own center crop, a squash, or padding.
CROPS = ("center_crop", "squash", "pad")
#: IP-Adapter layers that receive the image ("style" and "composition" after InstantStyle: its SD 1.5 script's
#: blocks on SD 1.x, its SDXL layers on SDXL; methods/ip_adapter.py BLOCK_PRESETS, SDXL_BLOCK_PRESETS); "custom":
#: the per-block scales of ``adapter_block_scales``.
ADAPTER_BLOCKS = ("all", "style", "composition", "style_and_composition", "custom")
#: The UNet parts diffusers' ``set_ip_adapter_scale`` dictionaries name.
ADAPTER_BLOCK_PARTS = ("down", "mid", "up")
#: How much of the input's layout a run keeps (structure/plan.py): nothing, a map of it through a ControlNet (its
#: Canny edges or its depth; structure/controlnets.py names each kind), or its noised latents as the start (img2img).
STRUCTURES = ("none", "edges", "depth", "img2img")
#: The structures that steer through a ControlNet (controlnets.CONTROL_KINDS); ``control_units`` kinds.
CONTROLNET_STRUCTURES = ("edges", "depth")
_CONTROL = ("control_scale", "control_start", "control_end", "control_units")
#: The settings each structure reads (the Structure section shows only these).
STRUCTURE_SETTINGS: dict[str, tuple[str, ...]] = {
    "none": (),
    "edges": ("canny_low", "canny_high", *_CONTROL),
    "depth": _CONTROL,
    "img2img": ("strength",),
}
#: The :class:`ControlUnit` fields each ControlNet kind reads (a panel shows these per unit).
UNIT_SETTINGS: dict[str, tuple[str, ...]] = {
    "edges": ("kind", "scale", "start", "end", "canny_low", "canny_high"),
    "depth": ("kind", "scale", "start", "end"),
}
#: Most ControlNets one run uses (each SD 1.x ControlNet is about 1.4 GB in float32).
MAX_CONTROL_UNITS = 4

#: SDXL's micro-conditioning (diffusers' ``original_size``, ``crops_coords_top_left``, ``target_size``): each is
#: ``(height, width)`` / ``(top, left)`` in pixels, empty for diffusers' default; SDXL presets only.
MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size")
#: The largest number a micro-conditioning pair takes (SDXL saw originals up to a few thousand pixels).
MAX_MICRO_PIXELS = 8192

#: The largest side a run takes: SDXL's widest training bucket (1,536 x 640); SD 1.x was trained at 512.
MAX_SIDE = 1536
MAX_SEED = 2**32 - 1
#: The longest text one text setting holds (prompts, and control_units / adapter_block_scales as JSON): far
#: beyond the 77 tokens CLIP reads; refused before anything else looks at it.
MAX_TEXT_CHARS = 200_000
#: The most characters all settings may take as JSON (non-ASCII text takes 6 to 12 per character there):
#: half of what ``engine.results.recipe_from_png`` reads back, so any run's saved PNG can be read again.
MAX_SETTINGS_JSON_CHARS = 2**19
#: The largest per-block IP-Adapter scale, either sign (each multiplies the adapter's scale, at most 5).
MAX_BLOCK_SCALE = 10.0


class SettingsError(ValueError):
    """A setting out of its range, of the wrong type, or unknown."""


@dataclass(frozen=True)
class SettingSpec:
    """What a control needs to know about one setting: its kind, range, label and help."""

    name: str
    kind: str  # "float", "int", "choice", "bool", "text", "size", "floats" (a list of numbers), "units" (ControlNet
    #            units as JSON text: a panel edits them as rows, the command line takes the JSON)
    default: Any
    label: str
    help: str = ""
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    advanced: bool = False
    #: The group of controls it belongs to in the panel ("method", "generation", "structure", or a new
    #: name for a new group). "" lets the panel decide: "advanced" when ``advanced``, else "generation" for
    #: settings every method reads (methods.SHARED_SETTINGS) and "method" for the others.
    section: str = ""


def _spec(kind: str, default: Any, label: str, help: str = "", **extra: Any) -> Any:
    return field(default=default, metadata={"spec": dict(kind=kind, label=label, help=help, **extra)})


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet of a run: the map it reads, how strongly and when it steers, and its map's settings.

    A run with ``structure="edges"`` or ``"depth"`` has one unit made of the flat settings
    (``control_scale``, ``canny_low``, ...); ``control_units`` adds more. Ranges and defaults live here once;
    the flat settings copy them.
    """

    kind: str = _spec("choice", "edges", "kind", "the map the ControlNet reads: Canny edges or depth",
                      choices=CONTROLNET_STRUCTURES)
    scale: float = _spec("float", 1.0, "control scale", "how strongly the ControlNet steers the UNet (0 = not at all)",
                         min=0.0, max=2.0, step=0.05)
    start: float = _spec("float", 0.0, "control start", "fraction of the steps before the ControlNet acts",
                         min=0.0, max=1.0, step=0.05)
    end: float = _spec("float", 1.0, "control end", "fraction of the steps after which the ControlNet stops acting",
                       min=0.0, max=1.0, step=0.05)
    canny_low: int = _spec("int", 100, "canny low", "edges: weaker gradients count as edges only where they touch "
                           "strong ones", min=0, max=255, step=1)
    canny_high: int = _spec("int", 200, "canny high", "edges: gradients above this are edges (higher = fewer, "
                            "stronger edges)", min=0, max=255, step=1)

    def __post_init__(self) -> None:
        for spec in unit_specs():
            object.__setattr__(self, spec.name, _validated(spec, getattr(self, spec.name)))
        if self.start >= self.end:
            raise SettingsError(f"start={self.start:g} must be less than end={self.end:g}.")
        if self.canny_low > self.canny_high:
            raise SettingsError(f"canny_low={self.canny_low} must not be above canny_high={self.canny_high}.")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ControlUnit:
        """Like the constructor, but an unknown name is a :class:`SettingsError` that lists the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise SettingsError(f"Unknown unit setting {', '.join(unknown)}: a unit has {', '.join(known)}.")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def unit_specs() -> list[SettingSpec]:
    """The specs of a :class:`ControlUnit`'s fields: what a panel builds each unit's controls from."""
    return [SettingSpec(name=f.name, default=f.default, **f.metadata["spec"]) for f in dataclasses.fields(ControlUnit)]


def _unit_spec(name: str, label: str, help: str) -> Any:
    """A flat setting that is a field of the run's first ControlNet unit: the unit field's kind, range and default."""
    (unit_field,) = [f for f in dataclasses.fields(ControlUnit) if f.name == name]
    spec = {**unit_field.metadata["spec"], "label": label, "help": help, "section": "structure"}
    return field(default=unit_field.default, metadata={"spec": spec})


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides a generation besides the images themselves."""

    mode: str = _spec(
        "choice", "repeat", "method", "how the image becomes the prompt", choices=MODES, section="method"
    )
    scale: float = _spec(
        "float", 1.0, "image strength", "multiplies the image conditioning (the adapter's strength for ip_adapter)",
        min=0.0, max=5.0, step=0.05,
    )
    prompt: str = _spec("text", "", "prompt", "the words to draw from (text, blend, ip_adapter and caption)")
    negative_prompt: str = _spec(
        "text", "", "avoid words",
        "text guidance pushes away from (with negative=image: beside the negative images)",
    )
    image_weight: float = _spec(
        "float", 0.5, "image share", "blend: 0 = the words alone, 1 = the image alone", min=0.0, max=1.0, step=0.05
    )
    blend: str = _spec(
        "choice", "interpolate", "mixing", "how blend mixes word and image tokens", choices=BLENDS, advanced=True
    )
    norm_match: bool = _spec(
        "bool", False, "word-sized tokens", "rescale image tokens to the typical length of SD's text tokens"
    )
    combine: str = _spec("choice", "average", "several images", "how several images become one", choices=COMBINES)
    weights: tuple[float, ...] = _spec(
        "floats", (), "weights", "one number per image, comma-separated; empty = equal", min=-10.0, max=10.0,
        step=0.1,
    )
    steps: int = _spec("int", 30, "steps", "denoising steps", min=1, max=150, step=1)
    scheduler: str = _spec(
        "choice", "pndm", "sampler", "the scheduler that plans the steps: pndm is SD's own; lcm needs an LCM model "
        "(the -live presets); ddim_trailing is DDIM ending on the last timestep, for few-step models (the -hyper presets)",
        choices=SCHEDULERS,
    )
    guidance_scale: float = _spec(
        "float", 7.5, "guidance", "classifier-free guidance: how hard each step pulls towards the prompt and away from the negative; 1 or less turns it off", min=0.0, max=20.0, step=0.5
    )
    seed: int = _spec("int", 0, "seed", "same seed, same picture", min=0, max=MAX_SEED, step=1)
    noise: str = _spec(
        "choice", "device", "noise from", "where the seed's noise is drawn: the model's device, or the CPU (the same "
        "picture on every machine)", choices=NOISE_SOURCES, advanced=True,
    )
    decoder: str = _spec(
        "choice", "full", "decoder", "what turns the final latents into the picture: full (the model's own VAE) or "
        "tiny (TAESD: much faster, slightly softer)", choices=DECODERS, advanced=True,
    )
    precision: str = _spec(
        "choice", "auto", "precision", "auto: bfloat16 on CPUs that have it for runs of at most "
        f"{AUTOCAST_MAX_STEPS} steps (live), float32 otherwise; float32: never bfloat16",
        choices=PRECISIONS, advanced=True,
    )
    num_images: int = _spec("int", 1, "how many", "how many images, batched", min=1, max=8, step=1)
    height: int | None = _spec(
        "size", None, "height", "pixels, a multiple of 8; empty = the model's native size (512 on SD 1.x, 1024 on "
        "SDXL)", min=64, max=MAX_SIDE, step=8, advanced=True,
    )
    width: int | None = _spec(
        "size", None, "width", "pixels, a multiple of 8; empty = the model's native size (512 on SD 1.x, 1024 on "
        "SDXL)", min=64, max=MAX_SIDE, step=8, advanced=True,
    )
    negative: str = _spec(
        "choice", "empty_prompt", "avoid",
        "what guidance pushes away from: the negative prompt (empty by default), zeros, or negative images",
        choices=NEGATIVES, advanced=True,
    )
    crop: str = _spec(
        "choice", "center_crop", "make square", "how the image is made square for CLIP", choices=CROPS, advanced=True
    )
    adapter_start: float = _spec(
        "float", 0.0, "adapter from", "ip_adapter: fraction of the steps before the image acts",
        min=0.0, max=1.0, step=0.05, advanced=True,
    )
    adapter_end: float = _spec(
        "float", 1.0, "adapter until", "ip_adapter: fraction of the steps after which the image stops acting",
        min=0.0, max=1.0, step=0.05, advanced=True,
    )
    adapter_blocks: str = _spec(
        "choice", "all", "adapter layers", "ip_adapter: which UNet blocks see the image",
        choices=ADAPTER_BLOCKS, advanced=True,
    )
    adapter_scales: tuple[float, ...] = _spec(
        "floats", (), "adapter strengths",
        "ip_adapter with several adapters: one strength per adapter, comma-separated; empty = scale for each",
        min=0.0, max=5.0, step=0.05, advanced=True,
    )
    adapter_block_scales: str = _spec(
        "text", "", "per-layer strengths",
        'ip_adapter: per-block scales in diffusers\' set_ip_adapter_scale format, as JSON, e.g. '
        '{"up": {"block_1": [0, 1, 0]}}; each number is multiplied by the adapter\'s scale; '
        "a list gives one per adapter; sets adapter blocks to custom",
        advanced=True,
    )
    words: str = _spec(
        "choice", "chain", "words", "words: chain adds table phrases while they raise CLIP's cosine with the picture; "
        "search optimises free tokens towards it (PEZ)", choices=WORDS_ROUTES,
    )
    words_tokens: int = _spec(
        "int", 8, "search tokens", "words, search: how many tokens the search finds", min=1, max=32, step=1,
        advanced=True,
    )
    words_steps: int = _spec(
        "int", 80, "search steps", "words, search: optimisation steps (each runs the text tower forward and back)",
        min=1, max=3000, step=1, advanced=True,
    )
    words_min_gain: float = _spec(
        "float", 0.0, "chain min gain", "words, chain: stop when the best phrase raises the cosine by no more than "
        "this", min=0.0, max=0.5, step=0.01, advanced=True,
    )
    revision_strength: float = _spec(
        "float", 1.0, "pooled image", "revision: how much of SDXL's pooled slot is the image's bigG embedding "
        "(0 = the prompt's own, exactly text-to-image; 1 = the image's alone)", min=0.0, max=1.0, step=0.05,
    )
    noise_augmentation: float = _spec(
        "float", 0.0, "noise on image", "revision: noise added to the image embedding as unCLIP's noise augmentation "
        "does (0 = none; higher keeps less of the image, more freedom), seeded by the seed", min=0.0, max=1.0,
        step=0.01,
    )
    original_size: tuple[int, ...] = _spec(
        "floats", (), "original size", "SDXL: the size (height, width) SDXL is told the picture had before it was "
        "resized; empty = the output size (diffusers' default)", min=1, max=MAX_MICRO_PIXELS, step=8, advanced=True,
    )
    crops_coords_top_left: tuple[int, ...] = _spec(
        "floats", (), "crop corner", "SDXL: the top-left corner (top, left) SDXL is told the picture was cropped at; "
        "empty = (0, 0), uncropped (diffusers' default)", min=0, max=MAX_MICRO_PIXELS, step=8, advanced=True,
    )
    target_size: tuple[int, ...] = _spec(
        "floats", (), "target size", "SDXL: the size (height, width) SDXL is asked to compose for; empty = the output "
        "size (diffusers' default)", min=1, max=MAX_MICRO_PIXELS, step=8, advanced=True,
    )
    structure: str = _spec(
        "choice", "none", "keep layout",
        "keep the input's layout: none, edges or depth (a ControlNet on its Canny edges or its depth map) or "
        "img2img (start from it, noised)",
        choices=STRUCTURES, section="structure",
    )
    canny_low: int = _unit_spec(
        "canny_low", "edges low", "edges: weaker gradients count as edges only where they touch strong ones"
    )
    canny_high: int = _unit_spec(
        "canny_high", "edges high", "edges: gradients above this are edges (higher = fewer, stronger edges)"
    )
    control_scale: float = _unit_spec(
        "scale", "layout strength", "edges, depth: how strongly the ControlNet steers the UNet (0 = not at all)"
    )
    control_start: float = _unit_spec(
        "start", "layout from", "edges, depth: fraction of the steps before the ControlNet acts"
    )
    control_end: float = _unit_spec(
        "end", "layout until", "edges, depth: fraction of the steps after which the ControlNet stops acting"
    )
    strength: float = _spec(
        "float", 0.75, "how much changes", "img2img: how much of the input is replaced by noise (0 = keep it, 1 = almost all)",
        min=0.0, max=1.0, step=0.05, section="structure",
    )
    control_units: str = _spec(
        "units", "", "more ControlNets",
        'edges, depth: more ControlNet units beside the structure\'s own, as JSON, e.g. [{"kind": "depth", '
        '"scale": 0.5, "end": 0.6}] (fields: kind, scale, start, end, canny_low, canny_high); one structure image '
        "per unit, or one for all",
        section="structure",
    )

    def __post_init__(self) -> None:
        if not isinstance(self.adapter_block_scales, str):  # a dict or list as diffusers takes it: kept as JSON
            object.__setattr__(self, "adapter_block_scales", block_scales_text(self.adapter_block_scales))
        if not isinstance(self.control_units, str):  # ControlUnits or dicts: kept as JSON
            object.__setattr__(self, "control_units", units_text(self.control_units))
        for spec in setting_specs():
            object.__setattr__(self, spec.name, _validated(spec, getattr(self, spec.name)))
        for name in MICRO_CONDITIONING:
            object.__setattr__(self, name, _pixel_pair(name, getattr(self, name)))
        if self.control_units.strip():
            extra = parse_units(self.control_units)
            object.__setattr__(self, "control_units", units_text(extra))  # one spelling: every field, in order
            if self.structure not in CONTROLNET_STRUCTURES:
                raise SettingsError(
                    f"control_units add ControlNets beside the structure's own: set structure='edges' or 'depth' "
                    f"(the first unit), not {self.structure!r}."
                )
            if len(extra) + 1 > MAX_CONTROL_UNITS:
                raise SettingsError(
                    f"A run takes at most {MAX_CONTROL_UNITS} ControlNets; control_units adds {len(extra)} to the "
                    "structure's own."
                )
        if self.adapter_block_scales.strip():
            parse_block_scales(self.adapter_block_scales)  # a SettingsError naming the bad part
            if self.adapter_blocks == "all":  # the explicit dictionary wins over the default, as negative_image does
                object.__setattr__(self, "adapter_blocks", "custom")
            elif self.adapter_blocks != "custom":
                raise SettingsError(
                    f"adapter_block_scales replaces adapter_blocks={self.adapter_blocks!r}: use adapter_blocks='custom' "
                    "with it, or clear adapter_block_scales."
                )
        elif self.adapter_blocks == "custom":
            raise SettingsError(
                "adapter_blocks='custom' needs adapter_block_scales, e.g. '{\"up\": {\"block_1\": 1.0}}' "
                "(diffusers' set_ip_adapter_scale format)."
            )
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
        written = len(json.dumps(dataclasses.asdict(self)))
        if written > MAX_SETTINGS_JSON_CHARS:
            raise SettingsError(
                f"These settings take {written:,} characters as JSON, more than the {MAX_SETTINGS_JSON_CHARS:,} a "
                "saved recipe holds: shorten prompt or negative_prompt."
            )

    def micro_conditioning(self) -> dict[str, tuple[int, int]]:
        """The SDXL micro-conditioning set explicitly, as diffusers' keyword arguments (empty ones left out: diffusers
        then uses its defaults, the output size and ``(0, 0)``)."""
        return {name: (int(value[0]), int(value[1])) for name in MICRO_CONDITIONING
                if (value := getattr(self, name))}

    def units(self) -> tuple[ControlUnit, ...]:
        """The run's ControlNet units: the structure's own (from the flat settings) then ``control_units``;
        empty when the structure is not a ControlNet."""
        if self.structure not in CONTROLNET_STRUCTURES:
            return ()
        first = ControlUnit(kind=self.structure, scale=self.control_scale, start=self.control_start,
                            end=self.control_end, canny_low=self.canny_low, canny_high=self.canny_high)
        return (first, *(parse_units(self.control_units) if self.control_units.strip() else ()))

    def block_scales(self) -> Any:
        """``adapter_block_scales`` parsed (a dict, or a list with one entry per adapter); ``None`` when empty."""
        return parse_block_scales(self.adapter_block_scales) if self.adapter_block_scales.strip() else None

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs: above 1 it does, with an unconditional (negative) branch;
        at 1 or below diffusers runs the prompt alone, so nothing negative is computed or fed. The one
        place this rule is written."""
        return self.guidance_scale > 1

    @property
    def text_only(self) -> bool:
        """Whether the run draws from the prompt alone and needs no image: ``mode="text"``, or ``blend`` with
        its image weight at 0 (exactly text-to-image)."""
        return self.mode == "text" or (self.mode == "blend" and self.image_weight == 0)

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


#: Plain words for the choices a class meets, shown in the panel's dropdowns as "words (name)"; the name is what
#: recipes, the command line and the docs use. A choice missing here shows as its name.
CHOICE_WORDS: dict[str, dict[str, str]] = {
    "mode": {"repeat": "image token ×77", "single": "one image token", "tokens": "every image patch",
             "blend": "words + image", "ip_adapter": "image beside words", "caption": "image → caption → words",
             "text": "words only, no image", "words": "image → nearest words → picture",
             "projector": "image tokens, trained into words' space",
             "revision": "image in SDXL's pooled slot"},
    "words": {"chain": "phrase by phrase", "search": "token search"},
    "blend": {"interpolate": "token by token", "concat": "side by side"},
    "combine": {"average": "average", "norm_average": "average, then rescale", "concat": "side by side",
                "add": "sum", "subtract": "first minus the rest", "max": "largest number", "min": "smallest number",
                "slerp": "along the sphere"},
    "scheduler": {"pndm": "SD's own", "ddim": "DDIM", "euler": "Euler", "euler_a": "Euler, random",
                  "dpmpp_2m": "DPM++", "dpmpp_2m_karras": "DPM++ Karras", "unipc": "UniPC",
                  "lcm": "LCM, few steps", "ddim_trailing": "DDIM, few steps (Hyper-SD)"},
    "decoder": {"full": "the model's own (exact)", "tiny": "tiny (TAESD: fast, softer)"},
    "precision": {"auto": "automatic (bfloat16 for live runs)", "float32": "float32 always",
                  "bfloat16": "bfloat16 always"},
    "noise": {"device": "the model's chip", "cpu": "the CPU: same everywhere"},
    "negative": {"empty_prompt": "the negative prompt", "zeros": "nothing (zeros)", "image": "negative images"},
    "crop": {"center_crop": "cut the middle", "squash": "squash", "pad": "pad with white"},
    "adapter_blocks": {"all": "all", "style": "style only", "composition": "layout only",
                       "style_and_composition": "style and layout", "custom": "per-layer strengths"},
    "structure": {"none": "no", "edges": "its edges", "depth": "its depth", "img2img": "start from it"},
    "kind": {"edges": "edges", "depth": "depth"},
}


def choice_label(setting: str, choice: str) -> str:
    """A dropdown's line for one choice: ``"words only, no image (text)"``; the name alone where the words are it."""
    words = CHOICE_WORDS.get(setting, {}).get(choice, choice)
    return choice if words.lower() == choice.lower() else f"{words} ({choice})"


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
        if _is_numpy_bool(value):
            value = bool(value)
        if not isinstance(value, bool):
            raise SettingsError(f"{spec.name} must be True or False, not {value!r}.")
        return value
    if spec.kind in ("text", "units"):
        if not isinstance(value, str):
            raise SettingsError(f"{spec.name} must be text, not {type(value).__name__}.")
        _check_length(value, spec.name)
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
    """A plain Python number from an int, a float, a numpy scalar (``np.float32(0.5)``, ``np.int64(3)``) or an
    integer scalar tensor; booleans (numpy's too) and arrays are not numbers here."""
    if isinstance(value, bool) or _is_numpy_bool(value):
        raise SettingsError(f"{spec.name} must be a number, not {value!r}.")
    if not isinstance(value, numbers.Real):
        try:
            value = operator.index(value)  # integer scalars of other libraries (a torch.tensor(3))
        except TypeError:
            raise SettingsError(f"{spec.name} must be a number, not {value!r}.") from None
    if spec.kind == "float":
        number = float(value)
        if math.isnan(number):
            raise SettingsError(f"{spec.name} must be a number, not NaN.")
        return number
    if not isinstance(value, numbers.Integral) and not float(value).is_integer():
        raise SettingsError(f"{spec.name} must be a whole number, not {value!r}.")
    return int(value)


def _check_length(text: str, name: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise SettingsError(
            f"{name} is {len(text):,} characters long, more than the {MAX_TEXT_CHARS:,} a setting holds: shorten it."
        )


def _is_numpy_bool(value: Any) -> bool:
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")


def _validated_floats(spec: SettingSpec, value: Any) -> tuple[float, ...]:
    if isinstance(value, str) and spec.name in MICRO_CONDITIONING:
        value = value.lower().replace("x", ",")  # "1024x1024" as sizes are written, or "1024, 1024"
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


def _pixel_pair(name: str, value: tuple[float, ...]) -> tuple[int, ...]:
    """A micro-conditioning setting (already validated as numbers in range): empty, or two whole numbers."""
    if not value:
        return ()
    if len(value) != 2:
        what = "(top, left)" if name == "crops_coords_top_left" else "(height, width)"
        raise SettingsError(f"{name} takes two numbers, {what} in pixels, not {len(value)}: e.g. 1024, 1024; or leave "
                            "it empty for diffusers' default.")
    if not all(float(number).is_integer() for number in value):
        raise SettingsError(f"{name}={tuple(value)!r} must be whole pixels.")
    return tuple(int(number) for number in value)


def parse_floats(text: str, name: str = "value") -> tuple[float, ...]:
    """``"1, 0.5"`` → ``(1.0, 0.5)``; empty text is the empty tuple. Used by the CLI for "floats" settings."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return tuple(float(part) for part in parts)
    except ValueError:
        raise SettingsError(f"{name} must be comma-separated numbers such as 1,0.5, not {text!r}.") from None


# ---------------------------------------------------------------------------------------------
# Per-block IP-Adapter scales (diffusers' set_ip_adapter_scale format)


def block_scales_text(value: Any) -> str:
    """A block-scale dictionary (or a list of them) as the JSON text the setting keeps; ``None`` → ``""``."""
    if value is None:
        return ""
    try:
        return json.dumps(value, default=_plain_scalar)
    except (TypeError, ValueError, RecursionError):
        raise SettingsError(
            f"adapter_block_scales must be a dictionary such as {{'up': {{'block_1': 1.0}}}} or its JSON text, "
            f"not {reprlib.repr(value)}."
        ) from None


def parse_block_scales(text: str) -> Any:
    """Parse and check ``adapter_block_scales``: a dict (or a list of dicts and numbers, one per adapter) whose
    keys are ``down``/``mid``/``up``, with ``block_N`` entries holding a number or a list of numbers.

    Only the shape is checked here; whether the UNet has those blocks (and that many layers) is checked
    against the loaded UNet at run time.
    """
    value = _json_setting(text, "adapter_block_scales", '{"up": {"block_1": [0.0, 1.0, 0.0]}}')
    if isinstance(value, list):
        if not value:
            raise SettingsError("adapter_block_scales is an empty list: give one entry per adapter, or a dictionary.")
        for index, entry in enumerate(value):
            if not _is_number(entry):
                _check_block_dict(entry, f"adapter_block_scales[{index}]")
    else:
        _check_block_dict(value, "adapter_block_scales")
    for number in _numbers_in(value):  # the shape is checked: at most four levels deep
        if abs(number) > MAX_BLOCK_SCALE:
            raise SettingsError(
                f"adapter_block_scales holds {number:g}: each scale must be between {-MAX_BLOCK_SCALE:g} and "
                f"{MAX_BLOCK_SCALE:g} (it multiplies the adapter's scale)."
            )
    return value


def _numbers_in(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [number for entry in value.values() for number in _numbers_in(entry)]
    if isinstance(value, list):
        return [number for entry in value for number in _numbers_in(entry)]
    return [value] if _is_number(value) else []


def _check_block_dict(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise SettingsError(f"{where} must be a dictionary such as {{\"up\": {{\"block_1\": 1.0}}}}, not {value!r}.")
    for part, entry in value.items():
        if part not in ADAPTER_BLOCK_PARTS:
            raise SettingsError(
                f"{where} has the key {part!r}: use {', '.join(map(repr, ADAPTER_BLOCK_PARTS))} "
                "(diffusers' set_ip_adapter_scale format)."
            )
        here = f"{where}[{part!r}]"
        if part == "mid":  # one attention layer: a number, or a list of one
            if not (_is_number(entry) or isinstance(entry, list) and len(entry) == 1 and _is_number(entry[0])):
                raise SettingsError(f"{here} must be a number (the mid block has one attention layer), not {entry!r}.")
            continue
        if not isinstance(entry, dict):
            _check_layer_scales(entry, here, allow_list=False)
            continue
        for block, scales in entry.items():
            if not (isinstance(block, str) and block.startswith("block_") and block[6:].isdigit()):
                raise SettingsError(f"{here} has the key {block!r}: name blocks 'block_0', 'block_1', ….")
            _check_layer_scales(scales, f"{here}[{block!r}]", allow_list=True)


def _check_layer_scales(value: Any, where: str, allow_list: bool) -> None:
    if _is_number(value):
        return
    if allow_list and isinstance(value, list) and value and all(_is_number(item) for item in value):
        return
    wanted = "a number or a list of numbers (one per attention layer)" if allow_list else "a number"
    raise SettingsError(f"{where} must be {wanted}, not {value!r}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# More ControlNet units (control_units)


def units_text(value: Any) -> str:
    """ControlNet units (:class:`ControlUnit` objects or dicts) as the JSON text the setting keeps."""
    if value is None:
        return ""
    if isinstance(value, (ControlUnit, dict)):
        value = [value]
    if isinstance(value, (list, tuple)) and len(value) + 1 > MAX_CONTROL_UNITS:  # before writing them out
        raise SettingsError(
            f"A run takes at most {MAX_CONTROL_UNITS} ControlNets; control_units adds {len(value)} to the "
            "structure's own."
        )
    try:
        items = [item.to_dict() if isinstance(item, ControlUnit) else item for item in value]
        return json.dumps(items, default=_plain_scalar) if items else ""
    except (TypeError, ValueError, RecursionError):
        raise SettingsError(
            f'control_units must be a list of units such as [{{"kind": "depth", "scale": 0.5}}], not {reprlib.repr(value)}.'
        ) from None


def _json_setting(text: str, name: str, example: str) -> Any:
    """A setting written as JSON text, parsed; a sentence with an example when it is not JSON (or is JSON no
    setting can be: longer than a setting holds, nested too deeply, a number of thousands of digits)."""
    _check_length(text, name)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SettingsError(
            f"{name} is not JSON ({err.msg} at character {err.pos}): write it like {example}."
        ) from None
    except RecursionError:
        raise SettingsError(f"{name} is nested too deeply to be a setting: write it like {example}.") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise SettingsError(f"{name} holds a value JSON cannot give ({_first_words(err)}): write it like {example}.") from None


def _first_words(err: BaseException) -> str:
    text = str(err).split(":", 1)[0].strip()
    return text[:120] or type(err).__name__


def parse_units(text: str) -> tuple[ControlUnit, ...]:
    """``control_units`` JSON → validated :class:`ControlUnit` objects; a sentence naming the bad unit otherwise."""
    items = _json_setting(text, "control_units", '[{"kind": "depth", "scale": 0.5}]')
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        raise SettingsError(f'control_units must be a list of units such as [{{"kind": "depth"}}], not {items!r}.')
    if len(items) + 1 > MAX_CONTROL_UNITS:  # counted before any unit is checked
        raise SettingsError(
            f"A run takes at most {MAX_CONTROL_UNITS} ControlNets; control_units adds {len(items)} to the "
            "structure's own."
        )
    units = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise SettingsError(f'control_units[{index}] must be a dictionary such as {{"kind": "depth"}}, not {item!r}.')
        try:
            units.append(ControlUnit.from_kwargs(**item))
        except SettingsError as err:
            raise SettingsError(f"control_units[{index}]: {err}") from None
    return tuple(units)


def _plain_scalar(value: Any) -> Any:
    """numpy scalars in a dictionary setting, as the plain numbers JSON keeps."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    raise TypeError(f"{type(value).__name__} is not a number")
