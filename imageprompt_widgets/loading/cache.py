"""Loading models, choosing device and dtype, and the one process-wide cache.

Loading Stable Diffusion takes seconds to minutes and gigabytes, so every widget and script in a
kernel shares one loaded copy per (models, device, dtype, options). This module holds that cache
(the package's only global state) and turns the many ways loading fails into one clear sentence.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..faults import (  # noqa: F401 - the error types are re-exported
    DamagedModelError,
    EncoderMismatchError,
    ModelLoadError,
    load_error,
)
from ..presets import Preset
from .configs import check_folder_configs
from .offline import OFFLINE_NAMES, cache_key

StatusCallback = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Device and dtype policy


def default_device() -> torch.device:
    """CUDA where available, then Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """Half precision on accelerators (it halves memory at no visible cost), float32 on the CPU."""
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


#: Environment variable: ``0`` makes :func:`cpu_has_bfloat16` say no (precision "auto" then stays float32).
CPU_BFLOAT16_ENV = "IMAGEPROMPT_CPU_BFLOAT16"


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512-BF16 or AMX): where it does, bfloat16 autocast runs
    a 512 px UNet call about 2.5x faster than float32; where it does not, bfloat16 is emulated and slower.

    ``IMAGEPROMPT_CPU_BFLOAT16=0`` says no for every process that inherits it (a machine-wide "float32 only", and
    what the test suite sets so that its subprocesses compute as the suite does)."""
    if os.environ.get(CPU_BFLOAT16_ENV) == "0":
        return False
    checker = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        if checker is None or not checker():
            return False
    except (RuntimeError, AttributeError):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = info.read()
    except OSError:  # not Linux: oneDNN's answer stands
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_device_dtype(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """Fill in the defaults and accept the usual spellings (``"cuda"``, ``"fp16"``, ...)."""
    try:
        dev = default_device() if device is None else torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"Unknown device {device!r}: use 'cpu', 'cuda', 'cuda:1' or 'mps'.") from err
    if dtype is None:
        return dev, default_dtype(dev)
    if isinstance(dtype, torch.dtype):
        return dev, dtype
    try:
        return dev, _DTYPE_NAMES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ModelLoadError(
            f"Unknown dtype {dtype!r}: use one of {', '.join(sorted(_DTYPE_NAMES))}."
        ) from None


# ---------------------------------------------------------------------------------------------
# The cache


@dataclass(frozen=True)
class ModelKey:
    """What makes two loaded pipelines interchangeable."""

    sd_model: str
    clip_model: str
    device: str
    dtype: str
    safety_checker: bool | None
    allow_pickle: bool


class ModelCache:
    """Process-wide cache: the same key returns the same object; concurrent requests load once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[Hashable, Any] = {}
        self._loading: dict[Hashable, threading.Lock] = {}

    def get_or_create(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._entries:
                return self._entries[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # a second thread with the same key waits here, then finds the entry
            with self._lock:
                if key in self._entries:
                    return self._entries[key]
            value = factory()
            with self._lock:
                self._entries[key] = value
                self._loading.pop(key, None)
            return value

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            return self._entries.get(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


#: The one explicit global of the package.
MODEL_CACHE = ModelCache()


def clear_cache() -> None:
    """Forget every loaded pipeline so its memory can be freed (objects still referenced elsewhere stay alive)."""
    MODEL_CACHE.clear()


def model_key(
    sd_model: str,
    clip_model: str,
    device: torch.device,
    dtype: torch.dtype,
    safety_checker: bool | None,
    allow_pickle: bool,
) -> ModelKey:
    return ModelKey(
        sd_model=_cache_name(sd_model),
        clip_model=_cache_name(clip_model),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        safety_checker=safety_checker,
        allow_pickle=allow_pickle,
    )


def _cache_name(model: str) -> str:
    if model in OFFLINE_NAMES:
        return cache_key(model)  # the folder depends on $IMAGEPROMPT_CACHE_DIR
    return os.path.abspath(model) if os.path.isdir(model) else model


# ---------------------------------------------------------------------------------------------
# Loading


def check_encoder_fits(
    image_encoder: Any, unet: Any, preset: Preset, image_encoder_2: Any = None, text_encoder_2: Any = None
) -> None:
    """Fail at load, not at the first step, when the encoder cannot condition this UNet.

    With a second tower (SDXL) the image tokens are both towers' projected tokens side by side, so their widths
    together must be the UNet's cross-attention width (768 + 1,280 = 2,048), and the second's alone the pooled
    slot's (``text_encoder_2``'s projection: 1,280).
    """
    embed_dim = image_encoder.config.projection_dim
    cross_dim = unet.config.cross_attention_dim
    if image_encoder_2 is not None:
        second = image_encoder_2.config.projection_dim
        if embed_dim + second != cross_dim:
            raise EncoderMismatchError(
                f"The image encoders {preset.clip_model!r} and {preset.clip_model_2!r} give {embed_dim}-d and "
                f"{second}-d embeddings ({embed_dim + second} side by side) but the UNet of {preset.sd_model!r} "
                f"expects {cross_dim}-d prompt tokens: pick encoders whose widths add up to it (see "
                "imageprompt_widgets.PRESETS)."
            )
        pooled = getattr(getattr(text_encoder_2, "config", None), "projection_dim", None)
        if pooled is not None and second != pooled:
            raise EncoderMismatchError(
                f"The second image encoder {preset.clip_model_2!r} gives {second}-d embeddings but the pooled slot "
                f"of {preset.sd_model!r} is {pooled}-d (its second text encoder's projection): use the CLIP whose "
                "text tower that is (OpenCLIP ViT-bigG-14 for SDXL)."
            )
        return
    if embed_dim != cross_dim:
        raise EncoderMismatchError(
            f"The image encoder {preset.clip_model!r} gives {embed_dim}-d embeddings but the UNet of "
            f"{preset.sd_model!r} expects {cross_dim}-d prompt embeddings: pick a matching pair "
            "(see imageprompt_widgets.PRESETS)."
        )


def diffusers_dtype_kwarg() -> str:
    """diffusers 0.40 renamed ``torch_dtype`` to ``dtype``; Colab pins 0.39."""
    import diffusers

    major, minor = (int(part) for part in diffusers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (0, 40) else "torch_dtype"


def check_local_folder(path: str, name: str, marker: str, what: str) -> None:
    """A local folder must be a model of the kind asked for, and its configs must not ask for absurd sizes
    (configs.py) before any loader builds what they say."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, marker)):
        raise ModelLoadError(f"The folder {name!r} is not {what}: it has no {marker}.")
    if os.path.isdir(path):
        check_folder_configs(path, name)
    looks_like_path = path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_like_path and not os.path.isdir(path):
        raise ModelLoadError(f"The model folder {name!r} does not exist.")


@contextlib.contextmanager
def translate_load_errors(name: str, allow_pickle: bool, folder: str | None = None) -> Iterator[None]:
    """One sentence per failure instead of a page of Hub tracebacks (faults.py says which: a damaged or missing
    file, the Hub's typed errors, a missing library, and only then the message text). ``folder``, the local
    folder being loaded, is searched for the damaged file where the library does not name it."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as err:  # every loader failure becomes one readable sentence
        raise load_error(err, name, allow_pickle, folder) from err


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parameter_count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _size_text(module: Any) -> str:
    count = parameter_count(module)
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    if count >= 1e9:
        amount = f"{count / 1e9:.2f} B params"
    elif count >= 1e6:
        amount = f"{count / 1e6:.0f} M params"
    else:
        amount = f"{count / 1e3:.0f} k params"
    return f"{amount} ({nbytes / 2**20:,.0f} MiB)"
