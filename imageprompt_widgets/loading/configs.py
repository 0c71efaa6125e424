"""What the configs of a local model folder may ask for, checked before any loader allocates memory.

``from_pretrained`` builds what a folder's JSON says before it reads a single weight: a scheduler with
``num_train_timesteps: 1e9`` allocates its tables (over 8 GB), a vision tower with ``image_size: 2048,
patch_size: 1`` a position table of four million tokens. A folder is data anyone can hand around, so its
configs are read here first and every value that sizes an allocation is held to a bound that real Stable
Diffusion 1.x/2.x/XL, CLIP ViT-L/H/bigG and BLIP configs pass many times over.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import Any

from ..faults import ModelLoadError

#: The files of a diffusers or transformers folder that configure what gets built (weights and vocabularies
#: are not configs: their sizes are what the file holds).
CONFIG_FILES = ("model_index.json", "config.json", "scheduler_config.json", "tokenizer_config.json",
                "preprocessor_config.json", "processor_config.json", "generation_config.json")
#: A config larger than this is not a config (real ones are a few KB; a scheduler's trained betas ~20 KB).
MAX_CONFIG_BYTES = 4 * 2**20
#: The most tokens a vision tower may cut an image into ((image_size / patch_size) ** 2; ViT-L/14 at 336 px: 576).
MAX_VISION_TOKENS = 16_384
#: The largest latent side a UNet may declare as its native size (SDXL: 128, i.e. 1024 px).
MAX_UNET_SAMPLE_SIZE = 512

#: The largest value each key may have, wherever it appears (top level or nested, e.g. ``vision_config``);
#: for a list (``block_out_channels``) every entry. The largest real values are in the comments.
LIMITS: dict[str, int] = {
    "num_train_timesteps": 100_000,  # 1000
    # widths
    "hidden_size": 16_384,  # 1664 (ViT-bigG)
    "intermediate_size": 65_536,  # 8192 (ViT-bigG)
    "projection_dim": 16_384,  # 1280
    "cross_attention_dim": 16_384,  # 2048 (SDXL)
    "encoder_hid_dim": 16_384,
    "encoder_hidden_size": 16_384,
    "d_model": 16_384,
    "embed_dim": 16_384,
    "time_embedding_dim": 65_536,
    "addition_time_embed_dim": 16_384,  # 256 (SDXL)
    "projection_class_embeddings_input_dim": 65_536,  # 2816 (SDXL)
    "block_out_channels": 16_384,  # 1280
    "conditioning_embedding_out_channels": 16_384,  # 256 (ControlNet)
    "attention_head_dim": 16_384,  # 64; diffusers' SD configs misuse it for head counts (20)
    "num_attention_heads": 1_024,  # 20
    "in_channels": 1_024,  # 9 (inpainting)
    "out_channels": 1_024,
    "latent_channels": 1_024,  # 16 (SD 3)
    "norm_num_groups": 1_024,  # 32
    # depths
    "num_hidden_layers": 512,  # 48 (ViT-bigG)
    "num_layers": 512,
    "layers_per_block": 64,  # 2
    "transformer_layers_per_block": 128,  # 10 (SDXL)
    # tables
    "vocab_size": 1_048_576,  # 49408 (CLIP)
    "max_position_embeddings": 131_072,  # 512 (BLIP)
    "num_class_embeds": 1_000_000,
    "type_vocab_size": 1_024,
    "model_max_length": 1_000_000,  # 77 (CLIP's tokenizer, which SD pads every prompt to)
    # pictures, in pixels (the VAE's sample_size is one: 1024 for SDXL)
    "sample_size": 8_192,
    "image_size": 8_192,  # 384 (BLIP)
    "size": 8_192,  # an image processor's resize target ({"shortest_edge": 224})
    "crop_size": 8_192,
}


def check_folder_configs(folder: str, name: str) -> None:
    """Raise :class:`ModelLoadError` naming the file and the value where a config in ``folder`` (or one folder
    down: a pipeline's components) asks for more than :data:`LIMITS` allow; reads only the small JSON files."""
    for path in _config_paths(folder):
        config = _read_config(path, name)
        problem = config_problem(config)
        if problem:
            raise ModelLoadError(
                f"The model folder {name!r} asks for {problem} in {path}, far more than any real model: the file "
                "is damaged or hostile, so it is not loaded; restore the model from its source."
            )


def config_problem(config: Any) -> str | None:
    """The first value in a parsed config that exceeds its bound, as ``"key=value"`` (``None`` where all fit)."""
    for key, value, owner in _items(config):
        limit = LIMITS.get(key)
        if limit is not None:
            for number in _numbers(value):
                if not number <= limit:  # also catches NaN
                    return f"{key}={_shown(number)} (the bound is {limit:,})"
        if key == "sample_size" and _is_unet(owner):
            for number in _numbers(value):
                if not number <= MAX_UNET_SAMPLE_SIZE:
                    return f"sample_size={_shown(number)} for a UNet (the bound is {MAX_UNET_SAMPLE_SIZE:,})"
    for _, _, owner in _items(config):
        tokens = _vision_tokens(owner)
        if tokens is not None and not tokens <= MAX_VISION_TOKENS:
            return (f"image_size={_shown(owner['image_size'])} with patch_size={_shown(owner['patch_size'])} "
                    f"({_shown(tokens)} tokens per image; the bound is {MAX_VISION_TOKENS:,})")
    return None


def _config_paths(folder: str) -> Iterator[str]:
    for directory in [folder, *sorted(entry.path for entry in os.scandir(folder) if entry.is_dir())]:
        for filename in CONFIG_FILES:
            path = os.path.join(directory, filename)
            if os.path.isfile(path):
                yield path


def _read_config(path: str, name: str) -> Any:
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ModelLoadError(
            f"The model folder {name!r} has a {size:,}-byte config {path}, far larger than any real one "
            f"({MAX_CONFIG_BYTES // 2**20} MiB at most): the file is damaged or hostile, so it is not loaded."
        )
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except RecursionError:
        raise ModelLoadError(
            f"The model folder {name!r} has a config nested too deeply to read, {path}: the file is damaged or "
            "hostile, so it is not loaded."
        ) from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ModelLoadError(
            f"The config {path} of the model folder {name!r} is not valid JSON ({err}): restore the model from "
            "its source."
        ) from None


def _items(config: Any) -> Iterator[tuple[str, Any, dict]]:
    """Every ``(key, value, dict holding it)`` in a parsed config, depth first."""
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                yield str(key), value, node
                if isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(item for item in node if isinstance(item, (dict, list)))


def _numbers(value: Any) -> Iterator[float]:
    """The numbers in a value: itself, or those in a (nested) list or dict; booleans are not numbers here."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            continue
        if isinstance(item, (int, float)):
            yield item
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())


def _is_unet(owner: dict) -> bool:
    return "UNet" in str(owner.get("_class_name", "")) or ("cross_attention_dim" in owner and "down_block_types" in owner)


def _vision_tokens(owner: dict) -> float | None:
    """``(image_size / patch_size) ** 2`` where a dict has both (sides may be ``[h, w]`` lists)."""
    if "image_size" not in owner or "patch_size" not in owner:
        return None
    sides, patches = list(_numbers(owner["image_size"])), list(_numbers(owner["patch_size"]))
    if not sides or not patches:
        return None
    patch = min(patches)
    if not patch >= 1:
        return math.inf
    tokens = 1.0
    for side in sides[:2] if len(sides) > 1 else sides * 2:
        tokens *= side / patch
    return tokens


def _shown(number: Any) -> str:
    if isinstance(number, float) and number.is_integer():
        return str(int(number))
    return str(number)
