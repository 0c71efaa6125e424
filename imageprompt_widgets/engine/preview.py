"""Cheap pictures of a run in progress: the predicted clean latents (x0) turned into small RGB images.

A full VAE decode per step would cost more than the step itself on Stable Diffusion, so previews use one of:

- the **model's own VAE** where it is cheap (the toy world's and the tiny presets' decoders have under
  :data:`CHEAP_VAE_PARAMETERS` weights): the previews are in the final picture's colours, and the last one is
  the final picture;
- a **linear map** latent → RGB (a 1×1 convolution). For Stable Diffusion 1.x the coefficients are the
  public ones that ComfyUI ships (``comfy/latent_formats.py``, class ``SD15``; they act on the scaled
  latents the UNet sees, and the result is mapped from [-1, 1] to [0, 1]). Any other VAE (the tiny
  preset's random one, a custom model) gets coefficients fitted here by least squares against its own
  decoder on a few random latents, once per VAE, which costs one small decode;
- **TAESD** (diffusers' ``AutoencoderTiny``), a distilled decoder that gives near-final previews: the one the
  pipeline holds for ``decoder="tiny"`` runs, or one already on disk (it is never downloaded from here).

Pure functions of tensors; the widget decides when to call them (throttled) and how to show them.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch loads lazily: the widget builds its panel without it
    import torch

#: Stable Diffusion 1.x latent → RGB, rows are the four latent channels (ComfyUI, ``SD15``).
SD1_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
#: The scaling factor of SD 1.x's VAE: how the linear map above recognises a compatible VAE.
SD1_SCALING_FACTOR = 0.18215
#: Where TAESD for SD 1.x lives on the Hub; used only if it is already in the local cache.
TAESD_SD1 = "madebyollin/taesd"
#: TAESDXL, the same tiny decoder distilled for SDXL's VAE (``decoder="tiny"`` on SDXL).
TAESD_SDXL = "madebyollin/taesdxl"
#: The scaling factor of SDXL's VAE (its blocks are SD 1.x's: the factor tells them apart).
SDXL_SCALING_FACTOR = 0.13025
PREVIEW_KINDS = ("auto", "linear", "taesd", "vae")
#: A VAE decoder with at most this many weights decodes every preview itself (the toy world's has 0.16 M, the
#: tiny preset's 0.4 M; SD 1.x's has 49 M).
CHEAP_VAE_PARAMETERS = 2_000_000


class LatentDecoder(Protocol):
    """Turns scaled latents ``[B, C, h, w]`` into RGB in [0, 1], ``[B, 3, H, W]``."""

    name: str

    def __call__(self, latents: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class LinearLatentDecoder:
    """``rgb = latents · weight + bias`` per pixel, read in [-1, 1] and mapped to [0, 1]."""

    weight: torch.Tensor  # [C, 3]
    bias: torch.Tensor  # [3]
    name: str = "linear"

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            latents = latents.detach().float()
            rgb = torch.einsum("bchw,cr->brhw", latents, self.weight.to(latents.device))
            rgb = rgb + self.bias.to(latents.device)[None, :, None, None]
            return ((rgb + 1) / 2).clamp(0, 1)


def sd1_linear_decoder() -> LinearLatentDecoder:
    """The public SD 1.x coefficients (no bias)."""
    import torch

    return LinearLatentDecoder(torch.tensor(SD1_LATENT_RGB_FACTORS), torch.zeros(3), name="linear (SD 1.x)")


def is_sd1_vae(vae: Any) -> bool:
    """SD 1.x's VAE: four latent channels, scaling 0.18215, four blocks of (128, 256, 512, 512) channels."""
    return _full_size_vae_scaled(vae, SD1_SCALING_FACTOR)


def is_sdxl_vae(vae: Any) -> bool:
    """SDXL's VAE: SD 1.x's layout (four latent channels, blocks of 128, 256, 512, 512) with scaling 0.13025."""
    return _full_size_vae_scaled(vae, SDXL_SCALING_FACTOR)


def _full_size_vae_scaled(vae: Any, scaling_factor: float) -> bool:
    """The real SD VAE's layout (the two families share it) with the given latent scaling: what tells them apart."""
    config = vae.config
    return (
        config.get("latent_channels") == 4
        and abs(float(config.get("scaling_factor", 0)) - scaling_factor) < 1e-6
        and list(config.get("block_out_channels", [])) == [128, 256, 512, 512]
    )


def fit_linear_decoder(vae: Any, *, samples: int = 4, latent_size: int = 16, seed: int = 0) -> LinearLatentDecoder:
    """Least-squares latent → RGB coefficients for any VAE, fitted against its own decoder.

    Random scaled latents ``N(0, 1)`` are decoded; the decoded pictures are averaged down to the
    latent grid, and ``[latent, 1] @ W ≈ rgb`` is solved for ``W``. Costs one decode of
    ``samples`` latents of ``latent_size²``.
    """
    import torch

    channels = int(vae.config.latent_channels)
    scaling = float(vae.config.get("scaling_factor", 1.0))
    param = next(vae.parameters())
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(samples, channels, latent_size, latent_size, generator=generator)
    with torch.no_grad():
        decoded = vae.decode(latents.to(param.device, param.dtype) / scaling).sample.float().cpu()
    factor = decoded.shape[-1] // latent_size
    target = torch.nn.functional.avg_pool2d(decoded, factor) if factor > 1 else decoded
    x = latents.permute(0, 2, 3, 1).reshape(-1, channels)
    y = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # [C + 1, 3]
    return LinearLatentDecoder(solution[:channels].contiguous(), solution[channels].contiguous(), name="linear (fitted)")


class VaeDecoder:
    """The model's own VAE: exact previews (what the run would decode now), for VAEs cheap enough per step."""

    name = "vae"

    def __init__(self, vae: Any) -> None:
        self.vae = vae

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        import torch

        param = next(self.vae.parameters())
        scaled = latents.to(param.device, param.dtype) / float(self.vae.config.scaling_factor)
        with torch.no_grad():
            rgb = self.vae.decode(scaled).sample.float()
        return ((rgb + 1) / 2).clamp(0, 1)


def is_cheap_vae(vae: Any) -> bool:
    """Whether decoding every preview with ``vae`` itself costs little (its decoder's weights are few)."""
    decoder = getattr(vae, "decoder", None)
    if decoder is None:
        return False
    return sum(parameter.numel() for parameter in decoder.parameters()) <= CHEAP_VAE_PARAMETERS


class TaesdDecoder:
    """TAESD (``AutoencoderTiny``): decodes scaled latents directly (its scaling factor is 1)."""

    name = "taesd"

    def __init__(self, model: Any) -> None:
        self.model = model

    @classmethod
    def load(cls, source: str | os.PathLike, *, device: Any = "cpu", dtype: Any = None) -> TaesdDecoder:
        """From a local folder, or a Hub id that is already in the local cache (never downloads)."""
        from diffusers import AutoencoderTiny

        from ..loading.quiet import quiet_loaders

        with quiet_loaders():  # also the process's loading lock: no from_pretrained runs beside another
            model = AutoencoderTiny.from_pretrained(str(source), local_files_only=True, use_safetensors=True)
        return cls(model.to(device=device, dtype=dtype).eval())

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        import torch

        param = next(self.model.parameters())
        with torch.no_grad():
            rgb = self.model.decode(latents.to(param.device, param.dtype)).sample.float()
        return ((rgb + 1) / 2).clamp(0, 1)


def decoder_for(pipeline: Any, kind: str = "auto", taesd: str | os.PathLike | None = None) -> LatentDecoder:
    """The preview decoder for a pipeline's VAE.

    ``"linear"``: the SD 1.x coefficients for SD 1.x's VAE, fitted ones for any other.
    ``"taesd"``: ``taesd`` (a folder or a cached Hub id; default :data:`TAESD_SD1`, :data:`TAESD_SDXL` for SDXL's
    VAE), an error if missing.
    ``"vae"``: the model's own VAE (exact, and as slow as the final decode).
    ``"auto"``: the tiny decoder the pipeline holds (after a ``decoder="tiny"`` run) unless ``taesd`` is given;
    else the model's own VAE where it is cheap (:func:`is_cheap_vae`: the toy world, the tiny presets); else TAESD
    where ``taesd`` is given or the VAE's TAESD (SD 1.x's, SDXL's) is in the local cache; else linear.
    """
    if kind not in PREVIEW_KINDS:
        raise ValueError(f"preview={kind!r} is not one of {', '.join(PREVIEW_KINDS)}.")
    vae = pipeline.sd.vae
    held = getattr(pipeline, "tiny_decoder_loaded", None)
    if kind == "auto" and taesd is None and held is not None:
        return TaesdDecoder(held)
    if kind == "vae" or (kind == "auto" and taesd is None and is_cheap_vae(vae)):
        return VaeDecoder(vae)
    default_taesd = TAESD_SDXL if is_sdxl_vae(vae) else TAESD_SD1
    if kind == "taesd" or (kind == "auto" and (taesd is not None or is_sd1_vae(vae) or is_sdxl_vae(vae))):
        try:
            return TaesdDecoder.load(taesd or default_taesd, device=pipeline.device, dtype=pipeline.dtype)
        except Exception as err:  # a missing optional decoder falls back (auto) or is named
            if kind == "taesd":
                raise ValueError(
                    f"The TAESD preview decoder {str(taesd or default_taesd)!r} could not be loaded from disk "
                    f"({type(err).__name__}); pass taesd= a local AutoencoderTiny folder or use preview='linear'."
                ) from err
    return sd1_linear_decoder() if is_sd1_vae(vae) else fit_linear_decoder(vae)


def to_pil(rgb: torch.Tensor, max_side: int | None = None) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [0, 1] → PIL images, upscaled (bilinear) so the longer side is ``max_side``."""
    arrays = (rgb.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    images = [Image.fromarray(array) for array in arrays]
    if max_side is None:
        return images
    return [_fit(image, max_side) for image in images]


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(image.size)
    if abs(scale - 1) < 1e-9:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def encode_jpeg(image: Image.Image, quality: int = 70) -> bytes:
    """Small JPEG bytes for a preview tile (a few kB: cheap to send many times a second)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def preview_jpegs(
    x0: torch.Tensor, decoder: LatentDecoder, *, max_side: int = 256, quality: int = 70
) -> list[bytes]:
    """One JPEG per image in the batch, from predicted clean latents."""
    return [encode_jpeg(image, quality) for image in to_pil(decoder(x0), max_side)]


def thumbnail(image: Image.Image, max_side: int) -> Image.Image:
    """A copy no larger than ``max_side`` on its longer side (never upscaled)."""
    copy = image.copy()
    copy.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return copy
