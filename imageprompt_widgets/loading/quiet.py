"""Quiet the model libraries while they load, and let one thread at a time load or build models.

The engine reports loading itself (a status line, a progress bar); transformers and diffusers would
otherwise print that the unused CLIP text tower was skipped, or warn about optional torchvision.

Loading is not thread-safe in these libraries: their lazy imports race (two threads importing at once get
``cannot import name 'StableDiffusionPipeline' from 'diffusers'``), accelerate's ``init_empty_weights``
patches ``torch.nn.Module`` for every thread while one model loads (a model built meanwhile in another
thread lands on the meta device), and their log levels are process-wide. So every load and build of the
package holds one process-wide lock, and the library classes the package uses are imported once, under it,
before the first loader runs.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Iterator

#: Held (reentrantly) by every load and build of a model, see the module docstring.
_LOADING = threading.RLock()
#: Whether :func:`import_library_classes` finished once (it runs under ``_LOADING``).
_imported: list[bool] = []

#: Every class this package takes from the libraries (and the samplers it offers), imported once up front.
LIBRARY_CLASSES: dict[str, tuple[str, ...]] = {
    "diffusers": (
        "AutoencoderKL", "AutoencoderTiny", "ControlNetModel", "UNet2DConditionModel",
        "StableDiffusionPipeline", "StableDiffusionImageVariationPipeline", "StableDiffusionControlNetPipeline",
        "StableDiffusionImg2ImgPipeline",
        "PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler",
    ),
    "transformers": (
        "AutoConfig", "CLIPConfig", "CLIPTextConfig", "CLIPVisionConfig", "CLIPModel", "CLIPTextModel",
        "CLIPTextModelWithProjection", "CLIPVisionModelWithProjection", "CLIPTokenizer", "CLIPImageProcessor",
        "BertTokenizer", "BlipConfig", "BlipForConditionalGeneration", "BlipImageProcessor", "BlipProcessor",
        "AutoImageProcessor", "AutoModelForDepthEstimation", "DPTImageProcessor", "DepthAnythingConfig",
        "DepthAnythingForDepthEstimation", "Dinov2Config",
    ),
}


@contextlib.contextmanager
def one_loader_at_a_time() -> Iterator[None]:
    """Hold the process-wide loading lock (reentrant), the library classes imported first.

    Raises ``ImportError`` where a library class the package needs cannot be imported (a broken install).
    """
    with _LOADING:
        import_library_classes()
        yield


@contextlib.contextmanager
def quiet_loaders() -> Iterator[None]:
    """One loader at a time, and the loaders' reports (the unused CLIP text tower is expected) and progress
    bars hidden.

    Our own status line reports loading; the libraries' settings are restored afterwards.
    """
    with one_loader_at_a_time(), _quiet_libraries():
        yield


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    hf_saved = (hf_logging, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    hf_logging.set_verbosity_error()  # before diffusers' import, which warns about optional torchvision
    from diffusers.utils import logging as diffusers_logging

    saved = [hf_saved, (diffusers_logging, diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled())]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def import_library_classes() -> None:
    """Import :data:`LIBRARY_CLASSES` once per process, under the loading lock and with the libraries quiet.

    After this, ``from diffusers import ...`` anywhere in the package only reads finished modules, so a
    thread that generates while another loads cannot meet a half-imported one. transformers' note that an
    image processor "requires torchvision" (it falls back to the identical PIL implementation, once per
    class) is said here, quietly, instead of in the user's cell.
    """
    if _imported:
        return
    with _LOADING, _quiet_libraries():
        if _imported:
            return
        for library, names in LIBRARY_CLASSES.items():
            module = importlib.import_module(library)
            for name in names:
                try:
                    getattr(module, name)
                except (AttributeError, RuntimeError) as err:  # lazy modules wrap import failures in these
                    raise ImportError(f"cannot import name {name!r} from {library!r} ({err})") from err
        _imported.append(True)


# -- a prompt longer than the text encoder reads ------------------------------------------------------------

#: Where diffusers and transformers say that a prompt was cut (with the whole cut-off tail: 100 KB for a
#: 100,000-character prompt), and how those messages start.
_TRUNCATION_LOGGERS = ("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
                       "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
                       "transformers.tokenization_utils_base")
_TRUNCATION_MESSAGES = ("The following part of your input was truncated",
                        "Token indices sequence length is longer than the specified maximum")
_noting = threading.local()


class _PromptTruncationFilter(logging.Filter):
    """Drops the libraries' truncation warnings inside :func:`noting_prompt_truncation` (in that thread only)
    and records that they happened; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        notes = getattr(_noting, "notes", None)
        if notes is None or not str(record.msg).startswith(_TRUNCATION_MESSAGES):
            return True
        notes.append(record.name)
        return False


_TRUNCATION_FILTER = _PromptTruncationFilter()


@contextlib.contextmanager
def noting_prompt_truncation() -> Iterator[list[str]]:
    """Yield a list that fills when a prompt encoded inside is cut to the text encoder's length, instead of the
    libraries printing the cut-off text (the caller says it once, short). Nested uses share the outer list."""
    for name in _TRUNCATION_LOGGERS:
        logger = logging.getLogger(name)
        if _TRUNCATION_FILTER not in logger.filters:
            logger.addFilter(_TRUNCATION_FILTER)
    outer = getattr(_noting, "notes", None)
    if outer is not None:
        yield outer
        return
    _noting.notes = []
    try:
        yield _noting.notes
    finally:
        _noting.notes = None
