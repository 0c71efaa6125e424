"""Real-size SD 1.x and CLIP ViT-L/14 architectures with random weights, for benchmarks.

Speed and memory depend on shapes, not on weight values, so these models give honest timing and
memory figures on machines that cannot download the real checkpoints. They are built once (about
6 GB of fp32 safetensors) into ``imageprompt_widgets.loading.offline.cache_dir() / "realsize-v1"`` and loaded through the same
``from_pretrained`` path as real weights. Their pictures are noise; never use them for anything else.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Bump when a config below changes, so stale builds are rebuilt rather than reused.
REALSIZE_VERSION = "v1"
REALSIZE_SEED = 0

#: SD 1.4's UNet (about 860 M parameters).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
#: SD 1.4's VAE (about 84 M parameters).
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
}
#: CLIP ViT-L/14's text tower, which is also SD 1.x's text encoder (about 123 M parameters).
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
#: CLIP ViT-L/14's vision tower (about 303 M parameters, plus a 1024 x 768 projection).
VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def realsize_model_dir() -> Path:
    from imageprompt_widgets.loading.offline import cache_dir

    return cache_dir() / f"realsize-{REALSIZE_VERSION}"


def ensure_realsize_models() -> tuple[str, str]:
    """Build the real-size random models once (atomically) and return ``(sd_folder, clip_folder)``.

    The first call takes a minute or two and writes about 6 GB; later calls return at once.
    """
    from imageprompt_widgets.loading.offline import build_once

    final = build_once(realsize_model_dir(), build_realsize_models, "sd/model_index.json")
    return str(final / "sd"), str(final / "clip")


def build_realsize_models(folder: str | os.PathLike, seed: int = REALSIZE_SEED) -> tuple[str, str]:
    """Write an SD 1.4-shaped pipeline to ``folder/sd`` and a full ViT-L/14 ``CLIPModel`` to ``folder/clip``.

    The CLIP folder holds the text tower too, as openai's checkpoint does, so that the guide's way
    (load all of ``CLIPModel``) can be measured against the engine's (vision tower + projection).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    from imageprompt_widgets.loading.offline import save_sd_pipeline, write_byte_level_tokenizer
    from imageprompt_widgets.loading.quiet import quiet_loaders

    folder = Path(folder)
    sd_dir, clip_dir, tok_dir = folder / "sd", folder / "clip", folder / "tokenizer-src"
    write_byte_level_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text_config = CLIPTextConfig(**TEXT_CONFIG, **special_ids)
    vision_config = CLIPVisionConfig(**VISION_CONFIG)

    with _uninitialised_modules():
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(text_config)
    for offset, module in enumerate((unet, vae, text_encoder)):
        fill_random(module, seed + offset)
    save_sd_pipeline(sd_dir, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)
    del unet, vae, text_encoder  # keep the build's peak memory to one model at a time

    with _uninitialised_modules():
        clip = CLIPModel(
            CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                       projection_dim=vision_config.projection_dim)
        )
    fill_random(clip, seed + 3)
    with quiet_loaders():
        clip.save_pretrained(str(clip_dir), safe_serialization=True)
    del clip
    tokenizer.save_pretrained(str(clip_dir))
    size = vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        str(clip_dir)
    )
    shutil.rmtree(tok_dir)
    return str(sd_dir), str(clip_dir)


@contextlib.contextmanager
def _uninitialised_modules() -> Iterator[None]:
    """Skip the libraries' weight initialisation (13 s for the UNet alone); :func:`fill_random` follows."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        yield


def fill_random(module: Any, seed: int, block_size: int = (1 << 20) + 7) -> None:
    """Fill every parameter with finite, well-scaled pseudo-random values, fast.

    One block of Gaussian noise is drawn and tiled (copies run at memory speed, drawing 1.2 G
    fresh numbers does not). Weights get ``1/sqrt(fan_in)`` scale so activations stay O(1) through
    every layer; norm weights are 1 and biases 0, as freshly initialised models have them.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(block_size, generator=generator)
    with torch.no_grad():
        for module_name, submodule in module.named_modules():
            for short_name, param in submodule.named_parameters(recurse=False):
                name = f"{module_name}.{short_name}"
                flat = param.data.view(-1)
                if param.dim() == 0:
                    flat.fill_(math.log(1 / 0.07))  # CLIP's logit_scale, the only scalar parameter, as CLIP sets it
                elif short_name == "bias":
                    flat.zero_()
                elif param.dim() == 1 and short_name == "weight":
                    flat.fill_(1.0)  # GroupNorm / LayerNorm scales
                else:
                    fan_in = math.prod(param.shape[1:]) if param.dim() > 1 else param.shape[0]
                    scale = 0.02 if isinstance(submodule, torch.nn.Embedding) else fan_in**-0.5
                    _tile(flat, noise, zlib.crc32(name.encode()) % block_size, scale)


def _tile(flat: Any, noise: Any, start: int, scale: float) -> None:
    """Copy ``noise`` (from ``start``, wrapping around) into ``flat`` and scale it."""
    size = noise.numel()
    for begin in range(0, flat.numel(), size):
        count = min(size, flat.numel() - begin)
        first = min(count, size - start)
        flat[begin : begin + first].copy_(noise[start : start + first])
        if first < count:
            flat[begin + first : begin + count].copy_(noise[: count - first])
    flat.mul_(scale)


#: LCM-LoRA for SD 1.5 has rank 64 on every layer it adapts (about 67 M parameters).
REALSIZE_LCM_LORA_RANK = 64


def ensure_realsize_lcm_lora() -> str:
    """A random LoRA of LCM-LoRA's shape for the real-size UNet (its folder; built once, about 270 MB).

    Its values are noise like the models'; what it measures is the cost of running LoRA layers of that size.
    """
    from imageprompt_widgets.loading.offline import LORA_WEIGHT_NAME, build_once, cache_dir

    final = cache_dir() / f"realsize-lcm-lora-{REALSIZE_VERSION}"
    return str(build_once(final, build_realsize_lcm_lora, LORA_WEIGHT_NAME))


def build_realsize_lcm_lora(folder: str | os.PathLike, seed: int = REALSIZE_SEED) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from imageprompt_widgets.loading.offline import LCM_LORA_TARGETS, random_lora_layers
    from imageprompt_widgets.loading.quiet import quiet_loaders

    sd_folder, _ = ensure_realsize_models()
    with quiet_loaders():
        unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet", use_safetensors=True)
    layers = random_lora_layers(unet, LCM_LORA_TARGETS, REALSIZE_LCM_LORA_RANK, seed, up_std=0.01)
    del unet
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)


def realsize_taesd() -> Any:
    """A random ``AutoencoderTiny`` of TAESD's size (madebyollin/taesd's config: 4 latent channels, 64-wide blocks,
    about 2.4 M weights): what ``decoder="tiny"`` costs on SD 1.x, without the download."""
    import torch
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(REALSIZE_SEED)
        return AutoencoderTiny().eval()
