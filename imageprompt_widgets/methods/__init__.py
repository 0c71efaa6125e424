"""The method registry: every way of turning input images into Stable Diffusion's conditioning, in one table.

Each :class:`Method` says what it is called, what a preset must have to run it (so faces offer only what the
loaded model can do), which settings it reads (so faces show only those controls), which offline preset
runs it without a download (its twin), and which module of this package builds it. A method's module
holds ``build(inputs) -> Conditioning`` and, where the method needs parts beyond SD and the image
encoder (an adapter, a captioner), ``load_parts(...)``. Builders receive narrow inputs
(:class:`~imageprompt_widgets.methods.inputs.ConditioningInputs`), never the pipeline.

Adding a method: its name in ``settings.MODES``, one entry here, one module under ``methods/``; presets
that carry its parts in ``presets.py`` and, where it needs parts, an offline twin in ``loading/offline.py``.

This module imports nothing heavy: faces read the table before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from ..presets import PRESETS, Preset, runs_toy_weights
from ..settings import MICRO_CONDITIONING, MODES, STRUCTURE_SETTINGS

#: Settings every run reads, whatever its method (the structure section adds its own, per structure).
SHARED_SETTINGS = ("mode", "steps", "scheduler", "guidance_scale", "seed", "noise", "num_images", "height",
                   "width", "structure", "decoder", "precision")
#: What the image-token methods read: how images become tokens, and what guidance pushes away from.
_IMAGE_TOKEN_SETTINGS = ("scale", "norm_match", "combine", "weights", "negative", "negative_prompt", "crop")
#: Settings that only act through SD's text encoder (hidden for a model without one, e.g. image variations).
TEXT_ONLY_SETTINGS = ("negative_prompt",)

#: Settings only SDXL reads (its micro-conditioning): hidden for a model known not to be SDXL.
SDXL_SETTINGS = MICRO_CONDITIONING

#: Capabilities a preset (or a loaded pipeline) can have; methods name the ones they need. ``sdxl``: SDXL's pooled
#: slot and micro-conditioning; ``pooled_image``: a second image tower (bigG) whose embedding fits the pooled slot.
CAPABILITIES = ("image_tokens", "text", "ip_adapter", "captioner", "projector", "sdxl", "pooled_image")


@dataclass(frozen=True)
class Method:
    """One conditioning method: name, what it needs and reads, its offline twin, and its module."""

    name: str
    summary: str
    module: str  # under imageprompt_widgets.methods: defines build(inputs) and optionally load_parts(...)
    reads: tuple[str, ...]  # settings it reads beyond SHARED_SETTINGS
    needs: frozenset[str]  # capabilities a preset must have to offer it
    twin: str  # an offline preset that runs it (no download)
    #: The toy world's preset that runs it with trained weights (None: ``toy`` itself does).
    toy_twin: str | None = None

    def available(self, capabilities: Iterable[str]) -> bool:
        """Whether a preset or pipeline with these capabilities can run the method."""
        return self.needs <= set(capabilities)

    def builder(self) -> Callable[[Any], Any]:
        """``build(inputs) -> Conditioning`` from the method's module (imported on first use)."""
        return import_module(f"{__name__}.{self.module}").build

    def part_loader(self) -> Callable[..., dict[str, Any]] | None:
        """``load_parts(...)`` where the method loads parts of its own (adapter weights, a captioner)."""
        return getattr(import_module(f"{__name__}.{self.module}"), "load_parts", None)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "repeat", "the guide's method: the projected image embedding repeated to 77 prompt tokens",
            "image_tokens", _IMAGE_TOKEN_SETTINGS, frozenset({"image_tokens"}), "tiny",
        ),
        Method(
            "single", "one token per image: what repeat really is, without the copies",
            "image_tokens", _IMAGE_TOKEN_SETTINGS, frozenset({"image_tokens"}), "tiny",
        ),
        Method(
            "tokens", "every projected vision token (257 for ViT-L/14): the patches too",
            "image_tokens", _IMAGE_TOKEN_SETTINGS, frozenset({"image_tokens"}), "tiny",
        ),
        Method(
            "blend", "a text prompt mixed with the image's tokens by image_weight",
            "blend", (*_IMAGE_TOKEN_SETTINGS, "prompt", "image_weight", "blend"),
            frozenset({"image_tokens", "text"}), "tiny",
        ),
        Method(
            "ip_adapter", "IP-Adapter: image tokens through the adapter's own cross-attention, beside the text",
            "ip_adapter",
            ("scale", "combine", "weights", "negative", "negative_prompt", "crop", "prompt", "adapter_start",
             "adapter_end", "adapter_blocks", "adapter_scales", "adapter_block_scales"),
            frozenset({"ip_adapter", "text"}), "tiny-ip-adapter", "toy-ip-adapter",
        ),
        Method(
            "caption", "BLIP captions the image (on toy: CLIP picks the world's caption), SD draws from the words",
            "caption", ("prompt", "negative", "negative_prompt"), frozenset({"captioner", "text"}), "tiny-caption",
        ),
        Method(
            "text", "words only: the prompt through SD's text encoder, no image (plain text-to-image)",
            "text", ("prompt", "negative", "negative_prompt"), frozenset({"text"}), "tiny",
        ),
        Method(
            "words", "words for the picture through CLIP's text tower (a phrase chain or a hard-prompt search); SD "
            "draws from them", "words",
            ("prompt", "negative", "negative_prompt", "words", "words_tokens", "words_steps", "words_min_gain"),
            # image_tokens: the encoder's projection is SD's width, i.e. the CLIP whose text tower SD reads
            frozenset({"image_tokens", "text"}), "tiny",
        ),
        Method(
            "projector", "a trained projector (Redux for SD 1.x): vision tokens into text-token space, after the "
            "prompt's tokens", "projector", ("scale", "weights", "negative", "negative_prompt", "crop", "prompt"),
            frozenset({"projector", "text"}), "toy",
        ),
        Method(
            "revision", "Revision (SDXL): bigG's image embedding in the pooled slot, beside an optional text prompt",
            "revision",
            ("prompt", "negative", "negative_prompt", "combine", "weights", "crop", "revision_strength",
             "noise_augmentation"),
            frozenset({"sdxl", "pooled_image", "text"}), "tiny-sdxl",
        ),
    )
}


def method(name: str) -> Method:
    """The registry entry of ``name`` (a ``settings.MODES`` value)."""
    return METHODS[name]


def preset_capabilities(preset: Preset) -> frozenset[str]:
    """What a preset can do before it is loaded, from what it declares."""
    capabilities = set()
    if preset.image_tokens_fit:
        capabilities.add("image_tokens")
    if preset.text_encoder:
        capabilities.add("text")
    if preset.ip_adapter:
        capabilities.add("ip_adapter")
    if preset.captioner:
        capabilities.add("captioner")
    if preset.projector:
        capabilities.add("projector")
    if preset.is_sdxl:
        capabilities.add("sdxl")
        if preset.clip_model_2:
            capabilities.add("pooled_image")
    return frozenset(capabilities)


def is_toy_preset(preset: Preset) -> bool:
    """Whether a preset runs the toy world's shipped weights (presets.runs_toy_weights)."""
    return runs_toy_weights(preset)


def offline_twin(name: str, current: Preset) -> str:
    """The offline preset that runs method ``name`` (a mode, or ``"variations"``) next to ``current``: the toy
    world's trained one when ``current`` is a toy preset (``toy`` itself where it can), else the tiny twin
    (random weights)."""
    if name == "variations":
        return "toy-variations" if is_toy_preset(current) else "tiny-variations"
    entry = METHODS[name]
    if is_toy_preset(current):
        if entry.available(preset_capabilities(PRESETS["toy"])):
            return "toy"
        return entry.toy_twin or entry.twin
    return entry.twin


def part_loaders(preset: Preset) -> list[Callable[..., dict[str, Any]]]:
    """The ``load_parts`` of every method module the preset offers, each once (a module serving several
    methods loads its parts once): what the engine hands the loader."""
    capabilities = preset_capabilities(preset)
    modules = sorted({method.module for method in METHODS.values() if method.available(capabilities)})
    loaders = (next(m for m in METHODS.values() if m.module == module).part_loader() for module in modules)
    return [loader for loader in loaders if loader is not None]


def methods_for(preset: Preset) -> list[str]:
    """The methods a preset can run, in ``settings.MODES`` order."""
    capabilities = preset_capabilities(preset)
    return [name for name in MODES if METHODS[name].available(capabilities)]


def presets_providing(name: str) -> list[str]:
    """The presets that can run method ``name``."""
    return [preset.name for preset in PRESETS.values() if METHODS[name].available(preset_capabilities(preset))]


def settings_read(
    mode: str, structure: str = "none", capabilities: Iterable[str] | None = None
) -> frozenset[str]:
    """Every setting a run with this method and structure reads: what a face should show. With the model's
    ``capabilities`` (``pipe.capabilities()``), settings that need SD's text encoder drop out where it has none,
    and SDXL's micro-conditioning where the model is not SDXL."""
    read = {*SHARED_SETTINGS, *METHODS[mode].reads, *STRUCTURE_SETTINGS[structure], *SDXL_SETTINGS}
    if capabilities is not None and "text" not in set(capabilities):
        read -= set(TEXT_ONLY_SETTINGS)
    if capabilities is not None and "sdxl" not in set(capabilities):
        read -= set(SDXL_SETTINGS)
    return frozenset(read)
