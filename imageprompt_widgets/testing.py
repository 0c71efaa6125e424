"""Models built on this machine, with random seeded weights, saved like real ones.

Tests, CI and offline demos cannot download weights, so the ``tiny`` preset is built here from
architecture-faithful tiny configs (the same classes as SD 1.x and CLIP ViT-L/14, far fewer
channels) and saved to a folder, then loaded through the very ``from_pretrained`` path that real
weights take. Random weights produce noise; that is expected and honest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

#: Bump when the tiny configs change, so stale caches are rebuilt rather than reused.
TINY_VERSION = "v1"
TINY_SEED = 0
CACHE_ENV = "IMAGEPROMPT_CACHE_DIR"

# Widths of the tiny models: the image encoder's projection must equal the UNet's cross-attention
# width, exactly as ViT-L/14 (768) matches SD 1.x.
TINY_CROSS_ATTENTION_DIM = 32


def cache_dir() -> Path:
    """Where built models live: ``$IMAGEPROMPT_CACHE_DIR`` or ``~/.cache/imageprompt_widgets``."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "imageprompt_widgets"


def tiny_model_dir() -> Path:
    return cache_dir() / f"tiny-{TINY_VERSION}"


def ensure_tiny_models() -> tuple[str, str]:
    """Build the tiny preset once (atomically) and return ``(sd_folder, clip_folder)``."""
    final = tiny_model_dir()
    if not (final / "sd" / "model_index.json").is_file():
        _build_atomically(final, build_tiny_models)
    return str(final / "sd"), str(final / "clip")


def _build_atomically(final: Path, build) -> None:
    """Build into a private temp folder, then rename: a concurrent builder can never see half a model."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first; its copy is identical (same seed), keep it.
            if not (final / "sd" / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_tiny_models(folder: str | os.PathLike, seed: int = TINY_SEED) -> tuple[str, str]:
    """Write a tiny SD 1.x pipeline to ``folder/sd`` and a tiny CLIP to ``folder/clip``."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    from .models import quiet_loaders

    folder = Path(folder)
    sd_dir, clip_dir, tok_dir = folder / "sd", folder / "clip", folder / "tokenizer-src"
    vocab_size = write_byte_level_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    width = TINY_CROSS_ATTENTION_DIM

    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=width,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=77,
        projection_dim=width,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        image_size=32,
        patch_size=4,
        projection_dim=width,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=width,
        )
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
        )
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        torch.manual_seed(seed)
        # The full CLIP (text tower too), as openai/clip-vit-large-patch14 ships: the engine must
        # load only the vision tower and projection from it, exactly as with the real checkpoint.
        clip = CLIPModel(CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                                    projection_dim=width))

    # SD 1.4's scheduler config: PNDM with skipped PRK steps, scaled-linear betas.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with quiet_loaders():
        pipe.save_pretrained(str(sd_dir), safe_serialization=True)
        clip.save_pretrained(str(clip_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(clip_dir))
    size = vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        str(clip_dir)
    )
    shutil.rmtree(tok_dir)
    return str(sd_dir), str(clip_dir)


def write_byte_level_tokenizer(folder: str | os.PathLike) -> int:
    """Write a CLIP BPE vocabulary of single bytes with no merges; returns its size.

    It tokenises any text offline (one token per byte) with CLIP's real tokenizer class, which
    is all a tiny text encoder needs.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return len(vocab)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))
