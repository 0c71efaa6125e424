"""LoRA adapters on a loaded pipeline, through diffusers' own LoRA loader (PEFT backend).

A LoRA is part of the model a run uses, like the checkpoint: it is loaded once into the pipeline's UNet
(and text encoder, where it has weights for it) and acts on every run of that pipeline until it is
unloaded. Each has a name and a weight (diffusers' ``set_adapters``); the recipe lists them in its model
section. A LoRA loaded with ``pipe.load_lora`` stays a separate adapter: unloading removes its layers and
leaves the base weights exactly as they were (the base tensors are never written). A preset's LoRAs (the
live presets' LCM-LoRA) are fused into that preset's own copy of the model when it loads, because
unfused adapter layers cost time on every step (on the CPU LCM-LoRA's doubled the UNet's time); they are
part of that model from then on and cannot be unloaded or re-weighted.

Only safetensors files are accepted: pickled LoRA files (``.bin``, ``.pt``, ``.ckpt``) can run code.
diffusers needs ``peft`` for this, in the ``lora`` extra: ``pip install 'imageprompt_widgets[lora]'``.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..faults import hub_offline
from .cache import ModelLoadError, translate_load_errors
from .offline import LORA_WEIGHT_NAME
from .quiet import quiet_loaders

#: The optional dependency group that brings peft, which diffusers' LoRA loader needs.
LORA_EXTRA = "lora"
#: Weights a LoRA may have (negative weights invert it; beyond a few it only breaks the model).
MIN_LORA_WEIGHT, MAX_LORA_WEIGHT = -4.0, 4.0
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class LoraError(ModelLoadError):
    """A LoRA that cannot be loaded or used: not safetensors, peft missing, a bad name or weight."""


@dataclass(frozen=True)
class LoraInfo:
    """One loaded LoRA: its adapter name, where it came from (Hub id, folder or file), and its weight."""

    name: str
    source: str
    weight: float
    fused: bool = False  # merged into the model's weights (a preset's LoRA), no longer a separate adapter

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "weight": self.weight, "fused": self.fused}


def require_peft() -> None:
    """A :class:`LoraError` naming the extra when diffusers has no PEFT backend."""
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        raise LoraError(
            "Loading a LoRA needs the peft package, which is not installed: "
            f"pip install 'imageprompt_widgets[{LORA_EXTRA}]'."
        )


def split_source(source: str) -> tuple[str, str | None]:
    """``(folder_or_repo, weight_name)``: a ``.safetensors`` file becomes its folder and file name; a Hub id
    may name its file after a colon (``"owner/repo:file.safetensors"``); a folder or bare Hub id uses
    diffusers' default file. Pickled files are refused."""
    path = os.path.expanduser(source)
    if path.lower().endswith(_PICKLE_SUFFIXES):
        raise LoraError(
            f"The LoRA {source!r} is a pickle file, which can run code when loaded: use its .safetensors version."
        )
    if os.path.isfile(path):
        if not path.lower().endswith(".safetensors"):
            raise LoraError(f"The LoRA file {source!r} is not a .safetensors file: only safetensors LoRAs load.")
        return str(Path(path).parent), Path(path).name
    if os.path.isdir(path):
        return path, folder_weight_name(path)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise LoraError(f"The LoRA file or folder {source!r} does not exist.")
    if path.lower().endswith(".safetensors") and ":" not in source:  # a file name, not a Hub id
        raise LoraError(
            f"The LoRA file {source!r} does not exist: check the path (a Hub LoRA is OWNER/NAME, or "
            "OWNER/NAME:FILE.safetensors)."
        )
    repo, _, weight_name = source.partition(":")
    if weight_name and not weight_name.lower().endswith(".safetensors"):
        raise LoraError(f"The LoRA {source!r} names {weight_name!r}: only .safetensors files load.")
    if not weight_name and hub_offline():  # diffusers cannot list a repository's files offline
        weight_name = LORA_WEIGHT_NAME
    return repo, weight_name or None


def folder_weight_name(folder: str) -> str | None:
    """The LoRA file in ``folder``: diffusers' default name, else its only ``.safetensors`` file. Named here
    because some diffusers versions refuse to guess it when HF_HUB_OFFLINE is set."""
    if os.path.isfile(os.path.join(folder, LORA_WEIGHT_NAME)):
        return LORA_WEIGHT_NAME
    candidates = sorted(name for name in os.listdir(folder) if name.lower().endswith(".safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise LoraError(f"The LoRA folder {folder!r} holds no .safetensors file.")
    return None  # several: diffusers' own choice (and its message) decides


def default_name(source: str, taken: set[str]) -> str:
    """An adapter name from the source (its file, folder or repository name), unique among ``taken``."""
    if ":" in source and not os.path.exists(os.path.expanduser(source)):
        location, weight_name = source.split(":", 1)
    else:
        location, weight_name = source, ""
    path = Path(location.rstrip("/\\"))
    stem = Path(weight_name).stem if weight_name else path.stem
    if stem == Path(LORA_WEIGHT_NAME).stem:  # diffusers' file name says nothing: use its folder or repository
        stem = path.name if weight_name else path.parent.name
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "lora"
    name, counter = base, 2
    while name in taken:
        name, counter = f"{base}_{counter}", counter + 1
    return name


def check_weight(weight: float, name: str) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise LoraError(f"The weight of LoRA {name!r} must be a number, not {weight!r}.") from None
    if not MIN_LORA_WEIGHT <= value <= MAX_LORA_WEIGHT:
        raise LoraError(
            f"The weight of LoRA {name!r} is {value:g}, outside {MIN_LORA_WEIGHT:g} to {MAX_LORA_WEIGHT:g}."
        )
    return value


def load_lora(sd: Any, source: str, local: str, name: str, weight: float) -> LoraInfo:
    """Load ``local`` (a folder, file or Hub id that stands for ``source``) into ``sd`` as adapter ``name``.

    The caller activates the adapters afterwards (:func:`activate`).
    """
    require_peft()
    location, weight_name = split_source(local)
    kwargs: dict[str, Any] = {"adapter_name": name, "use_safetensors": True}
    if weight_name:
        kwargs["weight_name"] = weight_name
    with translate_load_errors(source, False), quiet_loaders(), warnings.catch_warnings():
        # A second adapter on the same model is what we ask for; peft warns about it every time.
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        try:
            sd.load_lora_weights(location, **kwargs)
        except (RuntimeError, ValueError) as err:
            if not _MISMATCH.search(str(err)):
                raise
            _remove_half_loaded(sd, name)
            raise LoraError(
                f"The LoRA {source!r} does not fit this model: its layers have other shapes than the model's "
                "(it was made for another Stable Diffusion, such as SDXL or SD 2, or its file is damaged). Use a "
                "LoRA trained for this model's base."
            ) from None
    return LoraInfo(name, source, weight)


def _remove_half_loaded(sd: Any, name: str) -> None:
    """Some diffusers versions inject the layers they could load before the mismatch stops them: take them out
    again, so the model computes as before the failed load (other LoRAs stay)."""
    with contextlib.suppress(Exception):  # nothing of it was injected: nothing to remove
        sd.delete_adapters(name)


#: What diffusers and peft say when a LoRA's tensors do not fit the layers they name (a "report" of every
#: mismatched layer, logged, then a line pointing at it): never shown raw.
_MISMATCH = re.compile(r"size mismatch|ignore_mismatched_sizes|Error\(s\) in loading state_dict", re.IGNORECASE)


def activate(sd: Any, loras: list[LoraInfo]) -> None:
    """Make exactly the adapters among ``loras`` act, each with its weight (``set_adapters``); fused ones are
    part of the weights already."""
    adapters = [lora for lora in loras if not lora.fused]
    if adapters:
        sd.set_adapters([lora.name for lora in adapters], adapter_weights=[lora.weight for lora in adapters])


def fuse_into_model(sd: Any, loras: list[LoraInfo]) -> list[LoraInfo]:
    """Merge ``loras`` (just loaded, nothing else loaded) into the weights at their weights and drop their
    adapter layers (diffusers' ``fuse_lora`` then ``unload_lora_weights``): no cost per step from here on."""
    if not loras:
        return []
    activate(sd, loras)
    with quiet_loaders():
        sd.fuse_lora(adapter_names=[lora.name for lora in loras], lora_scale=1.0)
        sd.unload_lora_weights()
    return [LoraInfo(lora.name, lora.source, lora.weight, fused=True) for lora in loras]


def unload_all(sd: Any) -> None:
    """Remove every LoRA layer: the UNet and text encoder hold their base weights again, bit for bit."""
    sd.unload_lora_weights()


def describe(loras: tuple[LoraInfo, ...] | list[LoraInfo]) -> str:
    """One line for a face's read-only label: ``"LoRA: style 0.8, lcm 1"`` (``"LoRA: none"``)."""
    return "LoRA: " + (", ".join(f"{info.name} {info.weight:g}{' (fused)' if info.fused else ''}" for info in loras)
                       or "none")
