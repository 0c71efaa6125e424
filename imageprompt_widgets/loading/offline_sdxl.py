"""The offline SDXL twins: a tiny ``StableDiffusionXLPipeline`` and its two CLIP towers, built on this machine.

Built like the SD 1.x twins (offline.py): seeded random weights, the real classes, saved with
``save_pretrained`` into a folder built atomically, loaded back through ``from_pretrained``. The widths keep
SDXL's arithmetic at a tiny scale:

- ``text_encoder`` (CLIP ViT-L/14's text tower in SDXL, 768 wide) is 32 wide; ``text_encoder_2`` (OpenCLIP
  ViT-bigG-14's text tower with its projection, 1,280) is 32 wide with a 32-wide projection (the pooled slot);
- the UNet cross-attends to their hidden states side by side: 32 + 32 = 64 (SDXL: 768 + 1,280 = 2,048), and
  its ``text_time`` embedding reads the pooled embedding plus six micro-conditioning numbers (diffusers' own
  SDXL tests' tiny config: ``projection_class_embeddings_input_dim = 6 * 8 + 32``);
- two vision towers with projection: a "ViT-L analog" projecting to the first text tower's width (32) and a
  "bigG analog" projecting to ``text_encoder_2``'s projection width (32), both with 65 tokens (8 x 8 patches
  and the class token; the real ones have 257 each). Each is saved as a full ``CLIPModel`` whose text tower
  *is* SDXL's matching text encoder (copied weights), as openai's ViT-L/14 and LAION's bigG ship theirs: the
  bigG analog's image projection lives in the same space as SDXL's pooled text embedding, as in the real model.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .offline import (
    LCM_LORA_TARGETS,
    LORA_WEIGHT_NAME,
    TINY_LORA_RANK,
    TINY_SEED,
    build_once,
    cache_dir,
    random_lora_layers,
    write_byte_level_tokenizer,
)
from .offline import materialize as materialize_sd1

#: Bump when the tiny SDXL configs change, so stale caches are rebuilt rather than reused.
TINY_SDXL_VERSION = "v1"
#: The model name presets use for the twin (``Preset.sd_model``, ``clip_model``, ``clip_model_2``).
TINY_SDXL = "tiny-sdxl"
#: The offline twin of ``latent-consistency/lcm-lora-sdxl`` (``Preset.loras``).
TINY_SDXL_LCM_LORA = "tiny-sdxl-lcm-lora"
#: The offline SDXL LoRA names (``Preset.loras``, ``pipe.load_lora``) -> their seed offset.
TINY_SDXL_LORAS = {TINY_SDXL_LCM_LORA: 4}
#: Widths: the first text tower's hidden size, the second's hidden size and its projection (the pooled slot).
TINY_SDXL_TEXT_WIDTH = 32
TINY_SDXL_TEXT_2_WIDTH = 32
TINY_SDXL_POOLED_WIDTH = 32
#: SDXL's micro-conditioning embedding per number (256 in SDXL; 8 in diffusers' tiny test config).
TINY_SDXL_TIME_EMBED_DIM = 8
#: The bigG analog's vision tower is wider than the ViT-L analog's (bigG: 1,664, ViT-L: 1,024): only their
#: projections meet SDXL's widths.
TINY_SDXL_BIGG_VISION_WIDTH = 48
#: SDXL base's VAE scaling factor.
SDXL_VAE_SCALING_FACTOR = 0.13025


def tiny_sdxl_dir() -> Path:
    return cache_dir() / f"{TINY_SDXL}-{TINY_SDXL_VERSION}"


def materialize(preset: Any, say: Callable[[str], None] = lambda message: None) -> Any:
    """offline.materialize, and the tiny SDXL twin's parts (``"tiny-sdxl"`` models, its LoRA) as their folders: the
    one call that turns any preset's offline names into folders."""
    preset = materialize_sd1(preset, say)
    changes: dict[str, Any] = {}
    if TINY_SDXL in (preset.sd_model, preset.clip_model, preset.clip_model_2):
        if not (tiny_sdxl_dir() / "clip_g" / "config.json").is_file():
            say(f"Building the tiny offline SDXL models in {tiny_sdxl_dir()} (first use only)…")
        folders = dict(zip(("sd_model", "clip_model", "clip_model_2"), ensure_tiny_sdxl()))
        changes.update({key: path for key, path in folders.items() if getattr(preset, key) == TINY_SDXL})
    if any(source in TINY_SDXL_LORAS for source, _ in preset.loras):
        say("Building the tiny SDXL LoRA (first use only)…")
        changes["loras"] = tuple((ensure_tiny_sdxl_lora(source) if source in TINY_SDXL_LORAS else source, weight)
                                 for source, weight in preset.loras)
    return dataclasses.replace(preset, **changes) if changes else preset


def ensure_tiny_sdxl() -> tuple[str, str, str]:
    """Build the tiny SDXL twin once (atomically); ``(sd_folder, vit_l_folder, bigg_folder)``."""
    final = build_once(tiny_sdxl_dir(), build_tiny_sdxl, "clip_g/config.json")
    return str(final / "sd"), str(final / "clip_l"), str(final / "clip_g")


def sdxl_scheduler() -> Any:
    """SDXL base 1.0's scheduler config: Euler on scaled-linear betas, leading timesteps, one step offset."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
        prediction_type="epsilon",
    )


def tiny_sdxl_unet() -> Any:
    """The tiny SDXL UNet: SD 1.x's tiny block layout with SDXL's linear projections, transformer depth per block
    and ``text_time`` added embedding (diffusers' SDXL tests' config, at 16/32 channels: about 2 MB)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        norm_num_groups=8,
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED_DIM + TINY_SDXL_POOLED_WIDTH,
        cross_attention_dim=TINY_SDXL_TEXT_WIDTH + TINY_SDXL_TEXT_2_WIDTH,
    )


def tiny_sdxl_vae() -> Any:
    """The tiny VAE's layout (offline.py: two blocks, 4 latent channels, downsampling by 2) at 16/32 channels, with
    SDXL's scaling factor."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[16, 32], norm_num_groups=8, in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4,
        scaling_factor=SDXL_VAE_SCALING_FACTOR,
    )


def _text_config(vocab_size: int, width: int, projection_dim: int, activation: str) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1, hidden_size=width, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=5, max_position_embeddings=77, projection_dim=projection_dim, hidden_act=activation,
    )


def _vision_config(width: int, projection_dim: int) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
        image_size=32, patch_size=4, projection_dim=projection_dim,
    )


def build_tiny_sdxl(folder: str | os.PathLike, seed: int = TINY_SEED) -> tuple[str, str, str]:
    """Write the tiny SDXL pipeline to ``folder/sd`` and its ViT-L and bigG analogs to ``folder/clip_l`` and
    ``folder/clip_g`` (see the module docstring for the widths)."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .offline import _tiny_image_processor
    from .quiet import quiet_loaders

    folder = Path(folder)
    tok_dir = folder / "tokenizer-src"
    vocab_size = write_byte_level_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    # CLIP ViT-L's text tower uses quick GELU, OpenCLIP bigG's exact GELU (as their configs in SDXL say).
    text_1 = _text_config(vocab_size, TINY_SDXL_TEXT_WIDTH, TINY_SDXL_TEXT_WIDTH, "quick_gelu")
    text_2 = _text_config(vocab_size, TINY_SDXL_TEXT_2_WIDTH, TINY_SDXL_POOLED_WIDTH, "gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_sdxl_unet()
        torch.manual_seed(seed)
        vae = tiny_sdxl_vae()
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_1)
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(text_2)
        torch.manual_seed(seed + 2)
        clip_l = CLIPModel(CLIPConfig(text_config=text_1.to_dict(),
                                      vision_config=_vision_config(32, TINY_SDXL_TEXT_WIDTH).to_dict(),
                                      projection_dim=TINY_SDXL_TEXT_WIDTH))
        torch.manual_seed(seed + 3)
        clip_g = CLIPModel(CLIPConfig(text_config=text_2.to_dict(),
                                      vision_config=_vision_config(TINY_SDXL_BIGG_VISION_WIDTH,
                                                                   TINY_SDXL_POOLED_WIDTH).to_dict(),
                                      projection_dim=TINY_SDXL_POOLED_WIDTH))
    # The towers' text halves are SDXL's own text encoders, as in the real checkpoints.
    # (transformers 5's CLIPTextModel is the text transformer itself; 4.x's wraps it as .text_model)
    clip_l.text_model.load_state_dict(getattr(text_encoder, "text_model", text_encoder).state_dict())
    clip_g.text_model.load_state_dict(text_encoder_2.text_model.state_dict())
    clip_g.text_projection.load_state_dict(text_encoder_2.text_projection.state_dict())

    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=sdxl_scheduler(), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    with quiet_loaders():
        pipe.save_pretrained(str(folder / "sd"), safe_serialization=True)
        for name, clip in (("clip_l", clip_l), ("clip_g", clip_g)):
            clip.save_pretrained(str(folder / name), safe_serialization=True)
            tokenizer.save_pretrained(str(folder / name))
            _tiny_image_processor().save_pretrained(str(folder / name))
    shutil.rmtree(tok_dir)
    return str(folder / "sd"), str(folder / "clip_l"), str(folder / "clip_g")


# ---------------------------------------------------------------------------------------------
# The LCM-LoRA twin for the tiny SDXL UNet (tiny-sdxl-live)


def ensure_tiny_sdxl_lora(name: str = TINY_SDXL_LCM_LORA) -> str:
    """The folder of the tiny SDXL LCM-LoRA twin (built once, atomically)."""
    final = cache_dir() / f"{name}-{TINY_SDXL_VERSION}"
    seed = TINY_SEED + TINY_SDXL_LORAS[name]
    return str(build_once(final, lambda path: build_tiny_sdxl_lora(path, seed), LORA_WEIGHT_NAME))


def build_tiny_sdxl_lora(folder: str | os.PathLike, seed: int = TINY_SEED) -> None:
    """A random LoRA on the tiny SDXL UNet's layers that LCM-LoRA SDXL adapts (offline.LCM_LORA_TARGETS), saved
    as diffusers saves one (``StableDiffusionXLPipeline.save_lora_weights``)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from .quiet import quiet_loaders

    sd, _, _ = ensure_tiny_sdxl()
    with quiet_loaders():
        unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet", use_safetensors=True)
    layers = random_lora_layers(unet, LCM_LORA_TARGETS, TINY_LORA_RANK, seed)
    StableDiffusionXLPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)


# ---------------------------------------------------------------------------------------------
# The SDXL ControlNet twins (structure="edges"/"depth" on tiny-sdxl)

#: The twins of diffusers/controlnet-canny-sdxl-1.0 and diffusers/controlnet-depth-sdxl-1.0 (structure/controlnets.py
#: names them per kind): folder prefix and seed. Same architecture, different seeds, as for the SD 1.x twins.
TINY_SDXL_CONTROLNETS = {
    "tiny-sdxl-canny": ("tiny-sdxl-controlnet-canny", TINY_SEED + 10),
    "tiny-sdxl-depth": ("tiny-sdxl-controlnet-depth", TINY_SEED + 11),
}


def ensure_tiny_sdxl_controlnet(name: str = "tiny-sdxl-canny") -> str:
    """A tiny SDXL ControlNet folder (built once, atomically)."""
    prefix, seed = TINY_SDXL_CONTROLNETS[name]
    final = cache_dir() / f"{prefix}-{TINY_SDXL_VERSION}"
    return str(build_once(final, lambda folder: build_tiny_sdxl_controlnet(folder, seed),
                          "diffusion_pytorch_model.safetensors"))


def build_tiny_sdxl_controlnet(folder: str | os.PathLike, seed: int = TINY_SEED) -> str:
    """A ControlNet made from the tiny SDXL UNet as diffusers' SDXL ControlNet training script makes one
    (``ControlNetModel.from_unet``: the encoder copied, with SDXL's ``text_time`` embedding), its zero convolutions
    and conditioning embedding seeded as the SD 1.x twins' are (offline.save_seeded_controlnet)."""
    from diffusers import UNet2DConditionModel

    from .offline import save_seeded_controlnet
    from .quiet import quiet_loaders

    sd, _, _ = ensure_tiny_sdxl()
    with quiet_loaders():
        unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet", use_safetensors=True)
    return save_seeded_controlnet(unet, folder, seed)
