"""The ControlNet kinds: which map each ControlNet reads, who makes that map, and which models to load.

A ControlNet is trained on one kind of map: a canny ControlNet on Canny edges, a depth ControlNet on depth
maps. Feeding it another map is a silent mistake (it runs, and steers badly), so each kind is named once
here with its preprocessor, its default ControlNet for SD 1.x, its offline twin and the settings a unit
of that kind reads. ``structure="edges"`` / ``"depth"`` and each entry of ``control_units`` name a kind.

Maps come from libraries already installed: OpenCV's Canny (the ``edges`` extra) and a transformers depth
estimator (Depth Anything V2 Small through ``AutoModelForDepthEstimation``). Kinds whose preprocessors need
another model family or a new dependency (HED/PiDiNet soft edges, OpenPose, line art, MLSD, segmentation,
normal maps from ``controlnet_aux``) are left out.

This module imports nothing heavy: faces read the table before any model is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..settings import UNIT_SETTINGS, SettingsError

#: ControlNet families a preset can name (``Preset.controlnet``): lllyasviel's SD 1.x ControlNets, the offline twins
#: built from the tiny UNet, diffusers' SDXL ControlNets, and their twins built from the tiny SDXL UNet.
FAMILIES = ("sd15", "tiny", "sdxl", "tiny-sdxl")
#: The families whose ControlNets are SDXL's (they run in diffusers' ``StableDiffusionXLControlNetPipeline``).
SDXL_FAMILIES = ("sdxl", "tiny-sdxl")


@dataclass(frozen=True)
class ControlKind:
    """One kind of map a ControlNet reads, and everything needed to make it and to load the ControlNet."""

    name: str  # the structure value ("edges", "depth")
    map_name: str  # what the ControlNet reads, for messages and the panel ("Canny edges")
    summary: str
    preprocessor: str  # how the map is made, in words (the library call)
    controlnet: str  # the SD 1.x ControlNet (Hub id) trained on this map
    controlnet_size: str  # its download
    twin: str  # the offline ControlNet twin's name (loading/offline.py builds it)
    estimator: str | None = None  # the model the preprocessor runs (Hub id); None: no model (Canny)
    estimator_size: str = ""
    estimator_twin: str | None = None  # its offline twin's name
    name_hints: tuple[str, ...] = ()  # words in a ControlNet's id that say it reads this map
    sdxl_controlnet: str = ""  # the SDXL ControlNet (Hub id) trained on this map
    sdxl_controlnet_size: str = ""
    sdxl_twin: str = ""  # its offline twin's name (loading/offline_sdxl.py builds it)

    @property
    def reads(self) -> tuple[str, ...]:
        """The :class:`~imageprompt_widgets.settings.ControlUnit` fields a unit of this kind reads."""
        return UNIT_SETTINGS[self.name]


CONTROL_KINDS: dict[str, ControlKind] = {
    kind.name: kind
    for kind in (
        ControlKind(
            name="edges",
            map_name="Canny edges",
            summary="OpenCV's Canny edges of the picture: keep outlines exactly",
            preprocessor="cv2.Canny on the grayscale picture, resized to the output size first",
            controlnet="lllyasviel/sd-controlnet-canny",
            controlnet_size="about 1.4 GB",
            twin="tiny",
            name_hints=("canny",),
            sdxl_controlnet="diffusers/controlnet-canny-sdxl-1.0",
            sdxl_controlnet_size="about 5 GB (fp32 safetensors; 2.5 GB as the fp16 variant)",
            sdxl_twin="tiny-sdxl-canny",
        ),
        ControlKind(
            name="depth",
            map_name="depth",
            summary="a depth map estimated from the picture: keep the 3-D layout, not the outlines",
            preprocessor="transformers' depth-estimation pipeline (relative depth, near = bright) on the picture "
                         "resized to the output size",
            controlnet="lllyasviel/control_v11f1p_sd15_depth",
            controlnet_size="about 1.4 GB",
            twin="tiny-depth",
            estimator="depth-anything/Depth-Anything-V2-Small-hf",
            estimator_size="about 100 MB",
            estimator_twin="tiny",
            name_hints=("depth",),
            sdxl_controlnet="diffusers/controlnet-depth-sdxl-1.0",
            sdxl_controlnet_size="about 5 GB (fp32 safetensors; 2.5 GB as the fp16 variant)",
            sdxl_twin="tiny-sdxl-depth",
        ),
    )
}


def control_kind(name: str) -> ControlKind:
    """The registry entry of a ControlNet kind, or a sentence naming the kinds there are."""
    try:
        return CONTROL_KINDS[name]
    except KeyError:
        raise SettingsError(f"{name!r} is not a ControlNet kind: use one of {', '.join(CONTROL_KINDS)}.") from None


def controlnet_for(kind: str, family: str | None) -> str | None:
    """The ControlNet of ``kind`` in a preset's family (``Preset.controlnet``): its Hub id, its offline twin, or
    for a family that is a model id itself (a preset made before kinds existed), that id for ``edges``."""
    if family is None:
        return None
    entry = control_kind(kind)
    if family == "sd15":
        return entry.controlnet
    if family == "tiny":
        return entry.twin
    if family == "sdxl":
        return entry.sdxl_controlnet
    if family == "tiny-sdxl":
        return entry.sdxl_twin
    return family if kind == "edges" else None


def estimator_for(kind: str, family: str | None) -> str | None:
    """The model that makes ``kind``'s map for a preset's family (``None`` where the map needs none)."""
    entry = control_kind(kind)
    return entry.estimator_twin if family in ("tiny", "tiny-sdxl") else entry.estimator


def kind_of_controlnet(model: str) -> str | None:
    """Which map a ControlNet reads, told by its name: an offline twin's exact name, else the one kind whose
    hint word (``canny``, ``depth``) its Hub id or folder name contains; ``None`` when that does not decide."""
    for kind in CONTROL_KINDS.values():
        if model in (kind.twin, kind.sdxl_twin):
            return kind.name
    name = os.path.basename(os.path.normpath(model)).lower() or model.lower()
    found = [kind.name for kind in CONTROL_KINDS.values() if any(hint in name for hint in kind.name_hints)]
    return found[0] if len(found) == 1 else None
