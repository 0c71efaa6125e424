"""Memory levels for small GPUs (4-8 GB laptops, shared class servers): diffusers' own savings, by name.

A level is a load option of the pipeline, not a per-run setting: offloading decides where the weights
live, so it is applied once, when the models load, and it is part of the model cache's key. Two panels that
ask for different levels therefore hold two pipelines (with offloading, the second copy lives mostly in
CPU memory); panels that ask for the same level share one. The recipe records the level and what it did.

| level | what it does | cost |
| --- | --- | --- |
| ``default`` | everything on the device | - |
| ``balanced`` | attention slicing, VAE tiling (lower activation peaks at large sizes) | a little speed |
| ``low`` | + model CPU offload: each model (text encoder, UNet, VAE, image encoder) moves to the GPU only while it runs | some speed |
| ``lowest`` | sequential CPU offload instead: every layer moves to the GPU only while it runs | much slower |

On a CPU device offloading has nothing to do (the weights already live in RAM) and is skipped; slicing and
tiling still apply. Attention slicing computes the same attention in pieces (the classic attention maths
instead of PyTorch's fused kernel); VAE tiling decodes overlapping tiles and blends their seams, so above the
tile size its pixels differ slightly from a whole decode (by design: that is what saves the memory).

When the caller names no level, :func:`automatic_level` chooses: ``default`` everywhere, except an SDXL model on a
CUDA device with less than :data:`SDXL_OFFLOAD_BELOW_BYTES` of memory, which gets ``low`` (float16, the CUDA
default dtype, plus model CPU offload). SDXL's models are about 10 GiB in float16 with its vision towers, the UNet
alone 4.8 GiB; with offload a 1,024 px run needs about 5.4 GiB on the GPU and the models wait in host RAM
(``python -m benchmarks.sdxl_memory``; docs/benchmarks.md, "SDXL's memory plan"). That is how ``sdxl`` fits a
16 GB Colab T4.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports the levels before torch is needed
    import torch

from ..settings import SettingsError

#: Level -> the measures it takes, in the order they are applied.
MEMORY_LEVELS: dict[str, tuple[str, ...]] = {
    "default": (),
    "balanced": ("attention_slicing", "vae_tiling"),
    "low": ("model_cpu_offload", "attention_slicing", "vae_tiling"),
    "lowest": ("sequential_cpu_offload", "attention_slicing", "vae_tiling"),
}
DEFAULT_MEMORY = "default"
OFFLOADING = ("model_cpu_offload", "sequential_cpu_offload")
#: The optional dependency group that brings accelerate, which diffusers' offloading needs.
OFFLOAD_EXTRA = "lowmem"
#: Below this much accelerator memory an SDXL model loads with model CPU offload unless the caller names a level:
#: all its models resident (about 10 GiB in float16) plus a 1,024 px run's activations and the VAE's float32
#: decode need more than a 16 GB T4 has; 24 GB cards (and larger) hold them all.
SDXL_OFFLOAD_BELOW_BYTES = 20 * 10**9
#: The level :func:`automatic_level` gives SDXL on a smaller accelerator.
SDXL_SMALL_GPU_LEVEL = "low"


class MemoryLevelError(SettingsError):
    """An unknown memory level, or offloading without accelerate installed."""


def check_level(level: str) -> str:
    if level not in MEMORY_LEVELS:
        raise MemoryLevelError(f"memory={level!r} is not one of {', '.join(MEMORY_LEVELS)}.")
    return level


def automatic_level(sdxl: bool, device: torch.device, total_memory: int | None = None) -> str:
    """The level a load gets when its caller names none: ``low`` for SDXL on a CUDA device with less than
    :data:`SDXL_OFFLOAD_BELOW_BYTES` (``total_memory``: the device's bytes, read from CUDA when not given), else
    ``default``. SD 1.x models (about 2 GiB in float16) fit every supported GPU whole."""
    if not sdxl or device.type != "cuda":
        return DEFAULT_MEMORY
    if total_memory is None:
        import torch

        total_memory = torch.cuda.get_device_properties(device).total_memory
    return SDXL_SMALL_GPU_LEVEL if total_memory < SDXL_OFFLOAD_BELOW_BYTES else DEFAULT_MEMORY


def measures(level: str, device: torch.device) -> tuple[str, ...]:
    """What ``level`` does on ``device`` (offloading only where there is an accelerator to offload from)."""
    return tuple(m for m in MEMORY_LEVELS[check_level(level)] if device.type != "cpu" or m not in OFFLOADING)


def place(sd: Any, image_encoder: Any, level: str, device: torch.device) -> tuple[str, ...]:
    """Put the loaded models where ``level`` wants them and switch its savings on; returns what was done.

    Without offloading every model moves to ``device``. With it, diffusers' offload hooks move the SD
    components (and the image encoder, layer by layer through accelerate, unless SD already holds it) to ``device``
    while they run: the weights are never all on the device at once, not even while loading.
    """
    done = measures(level, device)
    offload = next((m for m in done if m in OFFLOADING), None)
    if offload is None:
        sd.to(device)
        image_encoder.to(device)
    else:
        _require_accelerate(level)
        if offload == "model_cpu_offload":
            sd.enable_model_cpu_offload(device=device)
        else:
            sd.enable_sequential_cpu_offload(device=device)
        if getattr(sd, "image_encoder", None) is not image_encoder:  # SD's offload covers a registered one
            _offload_module(image_encoder, device)
    if "attention_slicing" in done:
        sd.enable_attention_slicing()
    if "vae_tiling" in done:
        sd.vae.enable_tiling()
    return done


def place_module(module: Any, done: tuple[str, ...], device: torch.device) -> None:
    """A further model beside SD (SDXL's second image encoder) placed as :func:`place` placed the first: on
    ``device``, or offloaded layer by layer where ``done`` (what :func:`place` returned) offloads."""
    if any(measure in OFFLOADING for measure in done):
        _offload_module(module, device)
    else:
        module.to(device)


def execution_device(sd: Any) -> torch.device:
    """Where SD's models compute: the device, also when offloading keeps their weights on the CPU."""
    return getattr(sd, "_execution_device", sd.device)


def _offload_module(module: Any, device: torch.device) -> None:
    """Layer by layer (accelerate's ``cpu_offload``): the image encoder runs once per new picture (its
    embeddings are cached), so the slower way costs little and keeps it off the device between uses."""
    import accelerate

    accelerate.cpu_offload(module, execution_device=device)


def _require_accelerate(level: str) -> None:
    try:
        import accelerate  # noqa: F401 - only its presence is checked here
    except ImportError as err:
        raise MemoryLevelError(
            f"memory={level!r} offloads weights with accelerate, which is not installed: "
            f"pip install 'imageprompt_widgets[{OFFLOAD_EXTRA}]'."
        ) from err
