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
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    final = build_once(tiny_model_dir(), build_tiny_models, "sd/model_index.json")
    return str(final / "sd"), str(final / "clip")


#: Model names in presets that stand for models this module builds (``Preset.sd_model`` etc.).
OFFLINE_NAMES = ("tiny", "tiny-variations", "tiny-ip-adapter")


def cache_key(name: str) -> str:
    """What a model name means for the model cache: an offline name's folder depends on the cache dir."""
    return str(cache_dir() / name) if name in OFFLINE_NAMES else name


def materialize(preset: Any, say: Callable[[str], None] = lambda message: None) -> Any:
    """The preset with every part this module builds replaced by its folder (built on first use).

    Hub ids and local folders pass through unchanged; the ControlNet twin is built when an ``edges``
    run first asks for it (:func:`ensure_tiny_controlnet`).
    """
    import dataclasses

    changes: dict[str, Any] = {}
    if "tiny" in (preset.sd_model, preset.clip_model):
        if not (tiny_model_dir() / "sd" / "model_index.json").is_file():
            say(f"Building the tiny offline models in {tiny_model_dir()} (first use only)…")
        sd, clip = ensure_tiny_models()
        changes.update({key: path for key, path in (("sd_model", sd), ("clip_model", clip))
                        if getattr(preset, key) == "tiny"})
    if "tiny-variations" in (preset.sd_model, preset.clip_model):
        say("Building the tiny image-variations model (first use only)…")
        folder = ensure_tiny_variations_model()
        changes.update({key: folder for key in ("sd_model", "clip_model") if getattr(preset, key) == "tiny-variations"})
    if preset.sd_model == "tiny-ip-adapter":
        say("Building the tiny IP-Adapter models (first use only)…")
        sd, encoder, adapter = ensure_tiny_ip_adapter_models()
        changes.update(sd_model=sd, clip_model=encoder, ip_adapter=f"{adapter}::{TINY_ADAPTER_WEIGHT_NAME}")
    if preset.captioner == "tiny":
        changes["captioner"] = ensure_tiny_captioner()
    if any(source in TINY_LORAS for source, _ in preset.loras):
        say("Building the tiny LoRA (first use only)…")
        changes["loras"] = tuple((ensure_tiny_lora(source) if source in TINY_LORAS else source, weight)
                                 for source, weight in preset.loras)
    return dataclasses.replace(preset, **changes) if changes else preset


def build_once(final: Path, build: Callable[[Path], Any], marker: str) -> Path:
    """Build into a private temp folder, then rename: a concurrent builder can never see half a model.

    ``marker`` is a file the finished build has; when it exists the build is not repeated.
    """
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first; its copy is identical (same seed), keep it.
            if not (final / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def sd14_scheduler() -> Any:
    """SD 1.4's scheduler config: PNDM with skipped PRK steps, scaled-linear betas."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def save_sd_pipeline(folder: str | os.PathLike, *, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any) -> None:
    """Save SD components as a diffusers folder (SD 1.4's scheduler, no safety checker): real weights' layout."""
    from diffusers import StableDiffusionPipeline

    from .quiet import quiet_loaders

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd14_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with quiet_loaders():
        pipe.save_pretrained(str(folder), safe_serialization=True)


def _tiny_unet(cross_attention_dim: int = TINY_CROSS_ATTENTION_DIM) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
    )


def _tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )


def build_tiny_models(folder: str | os.PathLike, seed: int = TINY_SEED) -> tuple[str, str]:
    """Write a tiny SD 1.x pipeline to ``folder/sd`` and a tiny CLIP to ``folder/clip``."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    from .quiet import quiet_loaders

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
        unet = _tiny_unet(width)
        torch.manual_seed(seed)
        vae = _tiny_vae()
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        torch.manual_seed(seed)
        # The full CLIP (text tower too), as openai/clip-vit-large-patch14 ships: the engine must
        # load only the vision tower and projection from it, exactly as with the real checkpoint.
        clip = CLIPModel(CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                                    projection_dim=width))

    save_sd_pipeline(sd_dir, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)
    with quiet_loaders():
        clip.save_pretrained(str(clip_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(clip_dir))
    size = vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        str(clip_dir)
    )
    shutil.rmtree(tok_dir)
    return str(sd_dir), str(clip_dir)


def sample_image(seed: int = 0, size: tuple[int, int] = (96, 80)):
    """A deterministic, textured RGB picture (gradients plus noise) for tests and offline demos."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, ((x + y) % 17) / 17], axis=-1) * 200
    noise = rng.integers(0, 55, size=(height, width, 3))
    return Image.fromarray((base + noise).astype(np.uint8))


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


# ---------------------------------------------------------------------------------------------
# Tiny twins of the stronger methods (variations, IP-Adapter, BLIP captions): seeded, built atomically

TINY_METHODS_VERSION = "v1"
#: The tiny IP-Adapter's image encoder is wider than the UNet's cross-attention, as ViT-H (1024) is
#: wider than SD 1.5 (768): only the adapter's projection makes them fit.
TINY_ADAPTER_ENCODER_DIM = 48
TINY_ADAPTER_WEIGHT_NAME = "ip-adapter_tiny.safetensors"


def _tiny_vision_config(projection_dim: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
        image_size=32, patch_size=4, projection_dim=projection_dim,
    )


def _tiny_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def ensure_tiny_variations_model() -> str:
    """The ``tiny-variations`` twin: an image-variations pipeline folder (no text encoder), like lambdalabs'."""
    final = cache_dir() / f"tiny-variations-{TINY_METHODS_VERSION}"
    return str(build_once(final, build_tiny_variations_model, "model_index.json"))


def build_tiny_variations_model(folder: str | os.PathLike, seed: int = TINY_SEED) -> str:
    """Write a tiny ``StableDiffusionImageVariationPipeline``: UNet conditioned on one projected image token."""
    import torch
    from diffusers import StableDiffusionImageVariationPipeline
    from transformers import CLIPVisionModelWithProjection

    from .quiet import quiet_loaders

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # a different UNet from the tiny preset's: it stands for a fine-tuned one
        unet = _tiny_unet()
        torch.manual_seed(seed)
        vae = _tiny_vae()
        torch.manual_seed(seed)
        image_encoder = CLIPVisionModelWithProjection(_tiny_vision_config(TINY_CROSS_ATTENTION_DIM))
    pipe = StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=sd14_scheduler(), safety_checker=None,
        feature_extractor=_tiny_image_processor(), requires_safety_checker=False,
    )
    with quiet_loaders():
        pipe.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def ensure_tiny_ip_adapter_models() -> tuple[str, str, str]:
    """The ``tiny-ip-adapter`` twin: ``(sd_folder, image_encoder_folder, adapter_folder)``."""
    final = cache_dir() / f"tiny-ip-adapter-{TINY_METHODS_VERSION}"
    build_once(final, build_tiny_ip_adapter_models, f"adapter/{TINY_ADAPTER_WEIGHT_NAME}")
    return str(final / "sd"), str(final / "image_encoder"), str(final / "adapter")


def build_tiny_ip_adapter_models(folder: str | os.PathLike, seed: int = TINY_SEED) -> None:
    """A tiny SD 1.x with SD's block layout (so the style/composition blocks exist), a wider image
    encoder, and a randomly initialised IP-Adapter state dict of the right shape, as diffusers' tests build one.
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    from .quiet import quiet_loaders

    folder = Path(folder)
    tiny_sd, _ = ensure_tiny_models()
    with quiet_loaders():
        base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # SD 1.x's layout: cross-attention in down 0-2, mid, up 1-3; far fewer channels.
        unet = UNet2DConditionModel(
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
            attention_head_dim=2, in_channels=4, out_channels=4, cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        torch.manual_seed(seed)
        image_encoder = CLIPVisionModelWithProjection(_tiny_vision_config(TINY_ADAPTER_ENCODER_DIM))
        torch.manual_seed(seed)
        adapter = tiny_ip_adapter_state_dict(unet, TINY_ADAPTER_ENCODER_DIM)
    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=base.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with quiet_loaders():
        pipe.save_pretrained(str(folder / "sd"), safe_serialization=True)
        image_encoder.save_pretrained(str(folder / "image_encoder"), safe_serialization=True)
    _tiny_image_processor().save_pretrained(str(folder / "image_encoder"))
    (folder / "adapter").mkdir()
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(folder / "adapter" / TINY_ADAPTER_WEIGHT_NAME))


def tiny_ip_adapter_state_dict(unet, image_embed_dim: int, num_tokens: int = 4) -> dict:
    """An IP-Adapter checkpoint (flat, ``image_proj.*`` and ``ip_adapter.*`` keys) with random weights.

    The shapes follow ``h94/IP-Adapter``'s ``ip-adapter_sd15``: a linear projection of the image
    embedding to ``num_tokens`` tokens, plus ``to_k_ip``/``to_v_ip`` for every cross-attention layer,
    numbered as diffusers numbers attention processors (odd ids: the cross-attention ones).
    """
    import torch

    cross = unet.config.cross_attention_dim
    state = {
        "image_proj.proj.weight": torch.randn(num_tokens * cross, image_embed_dim) / image_embed_dim**0.5,
        "image_proj.proj.bias": torch.zeros(num_tokens * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross) / cross**0.5
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross) / cross**0.5
        key_id += 2
    return state


def ensure_tiny_captioner() -> str:
    """The ``tiny-caption`` twin's BLIP: random weights, a small word vocabulary, real BLIP classes."""
    final = cache_dir() / f"tiny-blip-{TINY_METHODS_VERSION}"
    return str(build_once(final, build_tiny_captioner, "config.json"))


TINY_CAPTION_WORDS = (
    "a", "photo", "of", "the", "cat", "dog", "red", "blue", "green", "house", "tree", "on", "in", "with", "and",
    "sky", "sea", "car", "man", "woman", "painting", "small", "large", "old", "new", "street", "field", "light",
)


def build_tiny_captioner(folder: str | os.PathLike, seed: int = TINY_SEED) -> str:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    from .quiet import quiet_loaders

    folder = Path(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *TINY_CAPTION_WORDS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "encoder_hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 40,
            "bos_token_id": vocab.index("[DEC]"), "eos_token_id": vocab.index("[SEP]"),
            "pad_token_id": 0, "sep_token_id": vocab.index("[SEP]"),
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 32, "patch_size": 4,
        },
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    with quiet_loaders():
        model.save_pretrained(str(folder), safe_serialization=True)
        processor.save_pretrained(str(folder))
    return str(folder)


# ---------------------------------------------------------------------------------------------
# The tiny ControlNet twin (structure="edges" on the tiny presets)

TINY_CONTROLNET_VERSION = "v1"
#: Std of the seeded weights put into the ControlNet's zero convolutions (see build_tiny_controlnet).
TINY_CONTROLNET_ZERO_CONV_STD = 0.1
#: Gain over He initialisation for the conditioning embedding, so sparse edge maps steer the tiny model visibly.
TINY_CONTROLNET_EMBEDDING_GAIN = 2.0


def ensure_tiny_controlnet() -> str:
    """The tiny ControlNet folder (built once, atomically): a twin of ``lllyasviel/sd-controlnet-canny``."""
    final = cache_dir() / f"tiny-controlnet-{TINY_CONTROLNET_VERSION}"
    return str(build_once(final, build_tiny_controlnet, "diffusion_pytorch_model.safetensors"))


def build_tiny_controlnet(folder: str | os.PathLike, seed: int = TINY_SEED) -> str:
    """A ControlNet made from the tiny UNet the way diffusers' training script makes one (``from_unet``).

    ``from_unet`` copies the UNet's encoder and leaves the zero convolutions at zero, so a fresh
    ControlNet changes nothing; a trained one has learned them. Here they get small seeded random
    weights instead, and the conditioning embedding a strong seeded initialisation, so the control
    image measurably reaches the output, as with a trained model. The embedding downsamples once,
    matching the tiny VAE's factor of 2 (SD's is 8).
    """
    import math

    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from .quiet import quiet_loaders

    tiny_sd, _ = ensure_tiny_models()
    with quiet_loaders():
        unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet", use_safetensors=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
        with torch.no_grad():
            for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
                conv.weight.normal_(0.0, TINY_CONTROLNET_ZERO_CONV_STD)
                conv.bias.normal_(0.0, TINY_CONTROLNET_ZERO_CONV_STD)
            for conv in controlnet.controlnet_cond_embedding.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    fan_in = conv.weight[0].numel()
                    conv.weight.normal_(0.0, TINY_CONTROLNET_EMBEDDING_GAIN * math.sqrt(2.0 / fan_in))
                    conv.bias.zero_()
    with quiet_loaders():
        controlnet.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)




# ---------------------------------------------------------------------------------------------
# Tiny LoRA twins: a LoRA on UNet and text encoder, and one shaped like LCM-LoRA (UNet only)

TINY_LORA_VERSION = "v1"
#: The file diffusers writes (``save_lora_weights``) and looks for in a LoRA folder or Hub repository.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TINY_LORA_RANK = 4
#: Std of the seeded LoRA up-projections (trained LoRAs have learned them; a fresh one starts at zero and
#: would change nothing).
TINY_LORA_UP_STD = 0.05
#: The UNet modules LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) adapts: attention, feed-forward, the
#: transformer projections and the ResNet convolutions.
LCM_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)
#: What the plain twin adapts: the UNet's attention and the text encoder's (the usual style-LoRA layout).
UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
#: Offline LoRA names (``Preset.loras``, ``pipe.load_lora``) -> (builder seed offset, adapts the text encoder).
TINY_LORAS = {"tiny-lora": (1, True), "tiny-lcm-lora": (2, False)}


def ensure_tiny_lora(name: str = "tiny-lora") -> str:
    """The folder of an offline LoRA twin (built once, atomically): ``tiny-lora`` or ``tiny-lcm-lora``."""
    seed_offset, text_encoder = TINY_LORAS[name]
    final = cache_dir() / f"{name}-{TINY_LORA_VERSION}"

    def build(folder: Path) -> None:
        build_tiny_lora(folder, seed=TINY_SEED + seed_offset, text_encoder=text_encoder)

    return str(build_once(final, build, LORA_WEIGHT_NAME))


def build_tiny_lora(folder: str | os.PathLike, seed: int = TINY_SEED, *, text_encoder: bool = True) -> None:
    """A random LoRA for the tiny preset, saved as diffusers saves one (``save_lora_weights``: PEFT keys under
    ``unet.`` and ``text_encoder.``, ``pytorch_lora_weights.safetensors``)."""
    from diffusers import StableDiffusionPipeline

    from .quiet import quiet_loaders

    tiny_sd, _ = ensure_tiny_models()
    with quiet_loaders():
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, use_safetensors=True)
    targets = UNET_ATTENTION_TARGETS if text_encoder else LCM_LORA_TARGETS
    unet_layers = random_lora_layers(pipe.unet, targets, TINY_LORA_RANK, seed)
    text_layers = (random_lora_layers(pipe.text_encoder, TEXT_ENCODER_TARGETS, TINY_LORA_RANK, seed)
                   if text_encoder else None)
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers, safe_serialization=True
    )


def random_lora_layers(
    model: Any, targets: tuple[str, ...], rank: int, seed: int, up_std: float = TINY_LORA_UP_STD
) -> dict[str, Any]:
    """A LoRA state dict for ``model`` (PEFT's keys, which diffusers' loader reads) with seeded random weights.

    PEFT adds the adapter as training would (down-projections at their initialisation, up-projections at
    zero); the up-projections then get ``N(0, up_std)`` so the adapter acts. ``model`` keeps the adapter:
    pass a throwaway copy.
    """
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)  # what add_adapter does, without transformers' peft version gate
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, up_std)
    layers = {key: value.detach().clone().contiguous() for key, value in get_peft_model_state_dict(model).items()}
    return layers

