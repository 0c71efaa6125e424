"""The offline twins of the SDXL IP-Adapter presets: ``tiny-sdxl-ip-adapter`` and ``tiny-sdxl-ip-adapter-plus``.

Built like the SD 1.x adapter twins (offline.py: random, seeded weights in IP-Adapter's own key layout, which
diffusers' converter reads as it reads h94's files), for the tiny SDXL UNet (offline_sdxl.py). The real pair is
``ip-adapter_sdxl`` (it reads OpenCLIP bigG's projected embedding) and ``ip-adapter-plus_sdxl_vit-h`` (a resampler
over ViT-H's hidden states), the pairing people get wrong most often; the twins keep it:

- the plain twin reads the tiny SDXL's bigG analog's projected embedding (32 wide: the pooled slot's width);
- the Plus twin reads the hidden states of a "ViT-H analog" built here (32 wide hidden, 40 wide projection:
  no other tiny encoder has that projection, so nothing but the shapes decides which encoder a twin gets).

Which encoder each twin loads is not written in its preset: :func:`tiny_sdxl_encoder_for` reads the adapter
file's shapes (adapter_fit.py) and picks the one tiny encoder that fits, as a person should pick a real one.
:func:`materialize` is the loader's one call that turns every offline name (SD 1.x, SDXL, these) into folders.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..faults import DamagedModelError, ModelLoadError
from .adapter_fit import adapter_needs, read_adapter_shapes
from .offline import (
    TINY_METHODS_VERSION,
    TINY_SEED,
    _tiny_image_processor,
    _tiny_vision_config,
    build_once,
    cache_dir,
    discard_build,
    tiny_ip_adapter_plus_state_dict,
    tiny_ip_adapter_state_dict,
)
from .offline_sdxl import ensure_tiny_sdxl
from .offline_sdxl import materialize as materialize_sdxl

#: The offline adapter names (``Preset.ip_adapter``, ``Preset.clip_model``) and their files; each twin is built in
#: a folder of its own (``{name}-{TINY_METHODS_VERSION}``, as availability.py looks for it).
TINY_SDXL_ADAPTER_NAMES = {
    "tiny-sdxl-ip-adapter": "ip-adapter_sdxl_tiny.safetensors",
    "tiny-sdxl-ip-adapter-plus": "ip-adapter-plus_sdxl_vit-h_tiny.safetensors",
}
#: The ViT-H analog's projection width (its hidden states are the tiny encoders' 32).
TINY_VIT_H_PROJECTION = 40


def materialize(preset: Any, say: Callable[[str], None] = lambda message: None) -> Any:
    """offline_sdxl.materialize, and the SDXL adapter twins: their weights as ``"folder::weight_name"`` specs and
    their image encoder (``clip_model`` named like the twin) as the folder of the tiny encoder its file fits."""
    preset = materialize_sdxl(preset, say)
    changes: dict[str, Any] = {}
    if preset.clip_model in TINY_SDXL_ADAPTER_NAMES:
        say("Building the tiny SDXL IP-Adapters (first use only)…")
        changes["clip_model"] = tiny_sdxl_encoder_for(preset.clip_model, say)
    if any(spec in TINY_SDXL_ADAPTER_NAMES for spec in preset.ip_adapters):
        specs = tuple(tiny_sdxl_adapter_spec(spec) if spec in TINY_SDXL_ADAPTER_NAMES else spec
                      for spec in preset.ip_adapters)
        changes["ip_adapter"] = specs[0] if isinstance(preset.ip_adapter, str) else specs
    return dataclasses.replace(preset, **changes) if changes else preset


def tiny_sdxl_adapter_dir(name: str) -> Path:
    return cache_dir() / f"{name}-{TINY_METHODS_VERSION}"


def ensure_tiny_sdxl_adapter(name: str) -> str:
    """The folder of twin ``name``'s weights (the Plus twin's also holds the ViT-H analog, ``vit_h/``)."""
    marker = "vit_h/config.json" if name == "tiny-sdxl-ip-adapter-plus" else TINY_SDXL_ADAPTER_NAMES[name]
    return str(build_once(tiny_sdxl_adapter_dir(name), lambda folder: build_tiny_sdxl_adapter(folder, name), marker))


def build_tiny_sdxl_adapter(folder: str | os.PathLike, name: str, seed: int = TINY_SEED) -> None:
    """A random adapter for the tiny SDXL UNet: plain over the bigG analog's embedding, or Plus over the ViT-H
    analog's hidden states (with that analog, saved beside it)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    from .quiet import quiet_loaders

    folder = Path(folder)
    sd, _, bigg = ensure_tiny_sdxl()
    with quiet_loaders():
        unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet", use_safetensors=True)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        if name == "tiny-sdxl-ip-adapter":
            torch.manual_seed(seed + 21)
            state = tiny_ip_adapter_state_dict(unet, encoder_widths(bigg)[0])
        else:
            torch.manual_seed(seed + 20)
            vit_h = CLIPVisionModelWithProjection(_tiny_vision_config(TINY_VIT_H_PROJECTION))
            with quiet_loaders():
                vit_h.save_pretrained(str(folder / "vit_h"), safe_serialization=True)
            _tiny_image_processor().save_pretrained(str(folder / "vit_h"))
            torch.manual_seed(seed + 22)
            state = tiny_ip_adapter_plus_state_dict(unet, vit_h.config.hidden_size)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / TINY_SDXL_ADAPTER_NAMES[name]))


def tiny_sdxl_adapter_spec(name: str) -> str:
    """A twin's adapter name → its ``"folder::weight_name"`` spec (built on first use)."""
    return f"{ensure_tiny_sdxl_adapter(name)}::{TINY_SDXL_ADAPTER_NAMES[name]}"


def encoder_widths(folder: str | os.PathLike) -> tuple[int, int]:
    """``(projection width, hidden width)`` of the CLIP vision tower saved in ``folder`` (a ``CLIPModel`` or a
    ``CLIPVisionModelWithProjection``), from its config alone."""
    config = json.loads((Path(folder) / "config.json").read_text())
    vision = config.get("vision_config") or config
    return config.get("projection_dim") or vision["projection_dim"], vision["hidden_size"]


def tiny_sdxl_encoders() -> dict[str, str]:
    """The image encoders of the tiny SDXL world, by the real one each stands for."""
    _, _, bigg = ensure_tiny_sdxl()
    return {"ViT-bigG/14 analog": bigg,
            "ViT-H/14 analog": str(Path(ensure_tiny_sdxl_adapter("tiny-sdxl-ip-adapter-plus")) / "vit_h")}


def tiny_sdxl_encoder_for(name: str, say: Callable[[str], None] = lambda message: None) -> str:
    """The folder of the one tiny encoder that fits twin ``name``'s adapter, chosen from the file's shapes (a
    damaged build is rebuilt once, as the loader rebuilds the others)."""
    path = Path(ensure_tiny_sdxl_adapter(name)) / TINY_SDXL_ADAPTER_NAMES[name]
    try:
        shapes = read_adapter_shapes(path)
    except DamagedModelError as err:
        say(f"The offline models in {path.parent} are damaged ({err}); rebuilding them…")
        discard_build(path.parent)
        path = Path(ensure_tiny_sdxl_adapter(name)) / TINY_SDXL_ADAPTER_NAMES[name]
        shapes = read_adapter_shapes(path)
    needs = adapter_needs(shapes, path.name)
    index = 0 if needs.reads == "image_embeds" else 1
    fitting = [folder for folder in tiny_sdxl_encoders().values() if encoder_widths(folder)[index] == needs.input_width]
    if len(fitting) != 1:
        raise ModelLoadError(f"The offline twin {name!r} fits {len(fitting)} of the tiny image encoders, not one: "
                             f"delete {tiny_sdxl_adapter_dir(name)} to rebuild it.")
    return fitting[0]
