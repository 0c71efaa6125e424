"""Models built on this machine, with random seeded weights, saved like real ones.

Tests, CI and offline demos cannot download weights, so the ``tiny`` preset is built here from
architecture-faithful tiny configs (the same classes as SD 1.x and CLIP ViT-L/14, far fewer
channels) and saved to a folder, then loaded through the very ``from_pretrained`` path that real
weights take. Random weights produce noise; that is expected and honest.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..faults import ModelLoadError, filesystem_fault

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
OFFLINE_NAMES = ("tiny", "tiny-variations", "tiny-ip-adapter", "tiny-sdxl", "tiny-sdxl-ip-adapter",
                 "tiny-sdxl-ip-adapter-plus")
#: IP-Adapter names (``Preset.ip_adapter``) that stand for the offline twins' weights.
TINY_ADAPTER_NAMES = ("tiny-ip-adapter", "tiny-ip-adapter-plus", "tiny-ip-adapter-plus-face")


def cache_key(name: str) -> str:
    """What a model name means for the model cache: an offline name's folder depends on the cache dir."""
    return str(cache_dir() / name) if name in OFFLINE_NAMES else name


def materialize(preset: Any, say: Callable[[str], None] = lambda message: None) -> Any:
    """The preset with every part this module builds replaced by its folder (built on first use; the SDXL twins'
    parts are offline_sdxl.materialize's, which calls this one).

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
        sd, encoder, _ = ensure_tiny_ip_adapter_models()
        changes.update(sd_model=sd, clip_model=encoder)
    if any(spec in TINY_ADAPTER_NAMES for spec in preset.ip_adapters):
        specs = tuple(tiny_adapter_spec(spec) if spec in TINY_ADAPTER_NAMES else spec for spec in preset.ip_adapters)
        changes["ip_adapter"] = specs[0] if isinstance(preset.ip_adapter, str) else specs
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
        _open_up_private_build(final)
        return final
    from .quiet import quiet_loaders

    with quiet_loaders():  # one builder or loader at a time in this process (see quiet.py)
        if (final / marker).is_file():  # another thread built it while this one waited
            return final
        try:
            return _build_atomically(final, build, marker)
        except Exception as err:  # a full disk, a read-only folder, a file in the way: say which, and what to do
            fault = filesystem_fault(err, final.parent)
            if fault is None:
                raise
            room = "a folder on a disk with room" if fault.disk_full else "a folder you can write to"
            raise ModelLoadError(fault.sentence(f"The offline models could not be built in {final.parent}",
                                                f"set {CACHE_ENV} to {room}")) from err


def _build_atomically(final: Path, build: Callable[[Path], Any], marker: str) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        share_as_umask_allows(tmp)  # mkdtemp made it 0700: a class's shared cache must be readable by the class
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / marker).is_file():
                pass  # another process finished first; its copy is identical (same seed), keep it
            elif final.exists():  # a damaged build that lost its marker: replace it
                discard_build(final)
                os.rename(tmp, final)
            else:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else by setting and
    restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask_allows(folder: Path) -> None:
    """Give a build the modes a plain ``mkdir``/``open`` would have given it (0755 folders and 0644 files under
    the usual umask 022; private under umask 077)."""
    umask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        with contextlib.suppress(OSError):  # not ours (a shared cache): leave it
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _open_up_private_build(final: Path) -> None:
    """A build from before :func:`share_as_umask_allows` is 0700 at its top: open it up (one stat when it is not)."""
    if not hasattr(os, "geteuid"):  # Windows: no POSIX modes to open up
        return
    with contextlib.suppress(OSError):
        info = final.stat()
        if info.st_mode & 0o777 == 0o700 and info.st_uid == os.geteuid():
            final.chmod(0o777 & ~current_umask())


def discard_build(folder: Path) -> None:
    """Move a damaged build aside (one rename, so no reader meets it half-deleted) and delete it: the next
    use builds it again."""
    aside = folder.with_name(f".{folder.name}-damaged-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(folder, aside)
    except FileNotFoundError:
        return  # another thread or process discarded it first
    shutil.rmtree(aside, ignore_errors=True)


def builds_of(local: Any, damaged_path: str | None = None) -> list[Path]:
    """The build folders (directly under :func:`cache_dir`) that a materialized preset's models lie in; where
    ``damaged_path`` is known, only the one holding it (none when it lies outside the cache: Hub ids and
    folders elsewhere are not ours to rebuild)."""
    import dataclasses

    root = cache_dir().resolve()
    values = [damaged_path] if damaged_path else [v for v in dataclasses.asdict(local).values() if isinstance(v, str)]
    folders = set()
    for value in values:
        try:
            relative = Path(value.split("::")[0]).resolve().relative_to(root)  # ip_adapter is "folder::weights"
        except (ValueError, OSError):
            continue
        if relative.parts:
            folders.add(root / relative.parts[0])
    return sorted(folders)


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


def shape_image(kind: str, size: int = 64):
    """White canvas with one flat shape (``"square"`` or a circle): clear outlines for Canny, and something for
    a depth estimator to see. For structure tests and demos."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    if kind == "square":
        draw.rectangle((size * 0.15, size * 0.15, size * 0.6, size * 0.8), fill=(20, 40, 160))
    else:
        draw.ellipse((size * 0.3, size * 0.05, size * 0.95, size * 0.7), fill=(160, 30, 20))
    return image


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


def tiny_adapter_spec(name: str) -> str:
    """An offline adapter name → its ``"folder::weight_name"`` spec (built on first use)."""
    if name == "tiny-ip-adapter":
        return f"{ensure_tiny_ip_adapter_models()[2]}::{TINY_ADAPTER_WEIGHT_NAME}"
    return f"{ensure_tiny_ip_adapter_plus()}::{TINY_PLUS_WEIGHT_NAMES[name]}"


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
    state.update(_tiny_adapter_attention_weights(unet))
    return state


def _tiny_adapter_attention_weights(unet) -> dict:
    """``ip_adapter.{id}.to_k_ip/to_v_ip`` for every cross-attention processor, random, as IP-Adapter numbers them."""
    import torch

    cross = unet.config.cross_attention_dim
    state = {}
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


#: IP-Adapter Plus twins: a resampler (16 learned queries attending over the encoder's penultimate hidden
#: states, depth 4 as diffusers' converter expects, 64-d heads), like ``ip-adapter-plus_sd15`` and
#: ``ip-adapter-plus-face_sd15`` (hidden 768, 12 heads, over ViT-H's 1280-d states), far narrower.
TINY_PLUS_VERSION = "v1"
TINY_PLUS_WEIGHT_NAMES = {
    "tiny-ip-adapter-plus": "ip-adapter-plus_tiny.safetensors",
    "tiny-ip-adapter-plus-face": "ip-adapter-plus-face_tiny.safetensors",
}
TINY_PLUS_QUERIES = 16
TINY_PLUS_HIDDEN = 64  # one 64-d head: diffusers reads heads = to_q rows // 64


def ensure_tiny_ip_adapter_plus() -> str:
    """The folder holding the Plus and Plus-Face twins' weights (for the ``tiny-ip-adapter`` SD and encoder)."""
    final = cache_dir() / f"tiny-ip-adapter-plus-{TINY_PLUS_VERSION}"
    marker = TINY_PLUS_WEIGHT_NAMES["tiny-ip-adapter-plus-face"]
    return str(build_once(final, build_tiny_ip_adapter_plus, marker))


def build_tiny_ip_adapter_plus(folder: str | os.PathLike, seed: int = TINY_SEED) -> None:
    """Random Plus and Plus-Face checkpoints in IP-Adapter's own key layout, so diffusers' converter loads them
    exactly as it loads h94's files (each with its own seed: two different adapters of one architecture)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from .quiet import quiet_loaders

    folder = Path(folder)
    sd, _, _ = ensure_tiny_ip_adapter_models()
    with quiet_loaders():
        unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet", use_safetensors=True)
    encoder_width = _tiny_vision_config(TINY_ADAPTER_ENCODER_DIM).hidden_size
    folder.mkdir(parents=True, exist_ok=True)
    for offset, (name, weight_name) in enumerate(TINY_PLUS_WEIGHT_NAMES.items()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 10 + offset)
            state = tiny_ip_adapter_plus_state_dict(unet, encoder_width)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / weight_name))


def tiny_ip_adapter_plus_state_dict(unet, encoder_width: int) -> dict:
    """An IP-Adapter Plus checkpoint (flat ``image_proj.*``/``ip_adapter.*`` keys) with random weights.

    The resampler is diffusers' ``IPAdapterPlusImageProjection`` with seeded weights, written back in the
    original Resampler's key names (``layers.i.0.to_kv`` = keys and values stacked, ``layers.i.1.*`` = the
    feed-forward), which ``load_ip_adapter`` converts on load.
    """
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    resampler = IPAdapterPlusImageProjection(
        embed_dims=encoder_width, output_dims=unet.config.cross_attention_dim, hidden_dims=TINY_PLUS_HIDDEN,
        heads=TINY_PLUS_HIDDEN // 64, num_queries=TINY_PLUS_QUERIES,
    )
    state = {f"image_proj.{k}": v for k, v in resampler_to_original_keys(resampler.state_dict()).items()}
    state.update(_tiny_adapter_attention_weights(unet))
    return state


def resampler_to_original_keys(state: dict) -> dict:
    """diffusers' ``IPAdapterPlusImageProjection`` state dict → IP-Adapter's Resampler key names (the inverse
    of diffusers' ``_convert_ip_adapter_image_proj_to_diffusers`` for Plus checkpoints)."""
    import torch

    renamed = {}
    for key, value in state.items():
        if not key.startswith("layers."):
            renamed[key] = value
            continue
        _, index, rest = key.split(".", 2)
        attention, feed_forward = f"layers.{index}.0", f"layers.{index}.1"
        if rest.startswith(("ln0.", "ln1.")):
            renamed[f"{attention}.norm{int(rest[2]) + 1}.{rest[4:]}"] = value
        elif rest == "attn.to_q.weight":
            renamed[f"{attention}.to_q.weight"] = value
        elif rest == "attn.to_k.weight":
            renamed[f"{attention}.to_kv.weight"] = torch.cat([value, state[key.replace("to_k", "to_v")]])
        elif rest == "attn.to_out.0.weight":
            renamed[f"{attention}.to_out.weight"] = value
        elif rest.startswith("ff.0."):
            renamed[f"{feed_forward}.0.{rest[5:]}"] = value
        elif rest == "ff.1.net.0.proj.weight":
            renamed[f"{feed_forward}.1.weight"] = value
        elif rest == "ff.1.net.2.weight":
            renamed[f"{feed_forward}.3.weight"] = value
        elif rest != "attn.to_v.weight":  # to_v went into to_kv
            raise ValueError(f"unexpected resampler weight {key!r}")
    return renamed


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


#: The ControlNet twins (structure/controlnets.py names them per kind): folder prefix and seed. Same architecture,
#: different seeds: two ControlNets that steer differently, as a canny and a depth one do.
TINY_CONTROLNETS = {"tiny": ("tiny-controlnet", TINY_SEED), "tiny-depth": ("tiny-controlnet-depth", TINY_SEED + 1)}


def ensure_tiny_controlnet(name: str = "tiny") -> str:
    """A tiny ControlNet folder (built once, atomically): ``"tiny"`` twins ``lllyasviel/sd-controlnet-canny``,
    ``"tiny-depth"`` twins ``lllyasviel/control_v11f1p_sd15_depth``."""
    prefix, seed = TINY_CONTROLNETS[name]
    final = cache_dir() / f"{prefix}-{TINY_CONTROLNET_VERSION}"
    return str(build_once(final, lambda folder: build_tiny_controlnet(folder, seed),
                          "diffusion_pytorch_model.safetensors"))


def build_tiny_controlnet(folder: str | os.PathLike, seed: int = TINY_SEED) -> str:
    """A ControlNet made from the tiny UNet the way diffusers' training script makes one (``from_unet``).

    ``from_unet`` copies the UNet's encoder and leaves the zero convolutions at zero, so a fresh
    ControlNet changes nothing; a trained one has learned them. Here they get small seeded random
    weights instead, and the conditioning embedding a strong seeded initialisation, so the control
    image measurably reaches the output, as with a trained model. The embedding downsamples once,
    matching the tiny VAE's factor of 2 (SD's is 8).
    """
    from diffusers import UNet2DConditionModel

    from .quiet import quiet_loaders

    tiny_sd, _ = ensure_tiny_models()
    with quiet_loaders():
        unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet", use_safetensors=True)
    return save_seeded_controlnet(unet, folder, seed)


def save_seeded_controlnet(unet: Any, folder: str | os.PathLike, seed: int) -> str:
    """``ControlNetModel.from_unet(unet)`` with seeded zero convolutions and a strong conditioning embedding (see
    :func:`build_tiny_controlnet`), saved to ``folder``; the SDXL twins (offline_sdxl.py) are made the same way."""
    import math

    import torch
    from diffusers import ControlNetModel

    from .quiet import quiet_loaders

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
# The tiny depth estimator twin (structure="depth" on the tiny presets)

TINY_DEPTH_VERSION = "v1"
#: Depth Anything's patch size; the twin sees 28 x 28 pictures (2 x 2 patches), the real one 518 x 518.
TINY_DEPTH_PATCH = 14


def ensure_tiny_depth_estimator() -> str:
    """The tiny depth estimator folder (built once, atomically): a twin of ``Depth-Anything-V2-Small-hf``."""
    final = cache_dir() / f"tiny-depth-anything-{TINY_DEPTH_VERSION}"
    return str(build_once(final, build_tiny_depth_estimator, "preprocessor_config.json"))


def build_tiny_depth_estimator(folder: str | os.PathLike, seed: int = TINY_SEED) -> str:
    """Depth Anything (a DINOv2 backbone, DPT neck and head) with tiny random weights and the real model's
    preprocessing (keep the aspect ratio, sides a multiple of 14, bicubic, ImageNet mean and std), saved as
    transformers saves it so ``AutoModelForDepthEstimation.from_pretrained`` loads it."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    from .quiet import quiet_loaders

    with quiet_loaders():  # without torchvision, transformers names its PIL fallback once, on import
        from transformers import DPTImageProcessor

    backbone = Dinov2Config(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
        image_size=2 * TINY_DEPTH_PATCH, patch_size=TINY_DEPTH_PATCH,
        out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=16, patch_size=TINY_DEPTH_PATCH,
        neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8, head_hidden_size=8, depth_estimation_type="relative",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(config)
    side = 2 * TINY_DEPTH_PATCH
    with quiet_loaders():
        processor = DPTImageProcessor(
            do_resize=True, size={"height": side, "width": side}, keep_aspect_ratio=True,
            ensure_multiple_of=TINY_DEPTH_PATCH, resample=3, do_pad=False,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        )
        model.save_pretrained(str(folder), safe_serialization=True)
        processor.save_pretrained(str(folder))
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
TINY_LORAS = {"tiny-lora": (1, True), "tiny-lcm-lora": (2, False), "tiny-hyper-lora": (3, False)}


def ensure_tiny_lora(name: str = "tiny-lora") -> str:
    """The folder of an offline LoRA twin (built once, atomically): ``tiny-lora``, ``tiny-lcm-lora`` or
    ``tiny-hyper-lora`` (the last two adapt the UNet's layers as LCM-LoRA and Hyper-SD's LoRA do)."""
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



# ---------------------------------------------------------------------------------------------
# The tiny decoder twin: TAESD (madebyollin/taesd, diffusers' AutoencoderTiny) shaped for the tiny VAE

TINY_TAESD_VERSION = "v1"
#: The name a tiny decoder source takes for the offline twin (``decoder="tiny"`` on the tiny presets).
TINY_TAESD = "tiny-taesd"
#: Seed offset of the twin's weights (beside the tiny models' own seed).
TINY_TAESD_SEED_OFFSET = 7


def ensure_tiny_taesd() -> str:
    """The folder of the offline TAESD twin (built once, atomically)."""
    final = cache_dir() / f"{TINY_TAESD}-{TINY_TAESD_VERSION}"
    return str(build_once(final, lambda folder: build_tiny_taesd(folder, TINY_SEED + TINY_TAESD_SEED_OFFSET),
                          "diffusion_pytorch_model.safetensors"))


def build_tiny_taesd(folder: str | os.PathLike, seed: int = TINY_SEED) -> str:
    """An ``AutoencoderTiny`` with TAESD's layout shrunk to the tiny VAE: 4 latent channels and one ×2
    upsampling (the tiny VAE downsamples by 2, SD's by 8), seeded random weights, saved as safetensors."""
    import torch
    from diffusers import AutoencoderTiny

    from .quiet import quiet_loaders

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderTiny(
            encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
            num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4,
        )
    with quiet_loaders():
        model.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)
