"""What a generation returns: the images, every intermediate tensor, and the recipe to redo it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .settings import GenerationSettings

TRACE_TENSORS = (
    "pixel_values",
    "image_embeds",
    "hidden_states",
    "prompt_embeds",
    "negative_prompt_embeds",
    "latents",
    "attention_maps",
)


@dataclass
class Trace:
    """Every tensor between the input image and the output, on the CPU.

    - ``pixel_values`` ``[N, 3, H, W]``: the picture CLIP actually saw (after crop and normalisation).
    - ``image_embeds`` ``[N, D]``: the vision tower's projected embedding of each input image.
    - ``hidden_states`` ``[N, T, Dv]``: the vision tower's last hidden state (257 tokens for ViT-L/14).
    - ``prompt_embeds`` ``[B, L, D]``: the conditional embeddings fed to the UNet, one row per output image.
    - ``negative_prompt_embeds`` ``[B, L, D]`` or ``None`` (no guidance): the unconditional branch.
    - ``latents`` ``[S, B, C, h, w]`` or ``None``: latents after the steps listed in ``latent_steps``
      (only when asked for with ``trace_latents=True``; at most ``MAX_TRACED_STEPS`` snapshots).
    - ``attention_maps`` ``[B, L, h, w]`` or ``None``: how much each latent position attends to each of the
      ``L`` prompt tokens (conditional branch; averaged over heads, cross-attention layers and steps; sums
      to 1 over the tokens), only when asked for with ``trace_attention=True``. With an IP-Adapter, its image
      tokens have maps of their own in ``extras["adapter_attention_maps"]``.
    - ``timesteps``: the scheduler timesteps that ran.
    - ``extras``: method-specific numbers (for example norm-matching factors).
    """

    pixel_values: torch.Tensor
    image_embeds: torch.Tensor
    hidden_states: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    attention_maps: torch.Tensor | None = None
    latent_steps: list[int] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every traced tensor by name (``extras`` prefixed with ``extras.``), missing ones left out."""
        named = {name: getattr(self, name) for name in TRACE_TENSORS if getattr(self, name) is not None}
        named.update({f"extras.{name}": value for name, value in self.extras.items()})
        return named

    def summary(self) -> Any:
        """One line per traced tensor (shape, dtype, device, min/max, mean, std, norm, NaN/Inf).

        Returns text that shows as plain lines as a cell's result; ``print(trace.summary())`` also works.
        """
        from .views import summarize_all

        return summarize_all(self.tensors())

    def to_dict(self) -> dict[str, Any]:
        """Tensors plus the non-tensor fields, as plain Python containers."""
        return {**self.tensors(), "latent_steps": list(self.latent_steps), "timesteps": list(self.timesteps)}

    def save(self, path: str | os.PathLike, recipe: dict[str, Any] | None = None) -> Path:
        """Write ``path`` (safetensors, tensors) and ``path`` with ``.json`` (recipe and step lists)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors().items()}
        meta = {"latent_steps": self.latent_steps, "timesteps": self.timesteps, "recipe": recipe or {}}
        save_file(tensors, str(path), metadata={"imageprompt": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[Trace, dict[str, Any]]:
        """Read a trace written by :meth:`save`; returns ``(trace, recipe)``."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("imageprompt", "{}"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is no dict
        extras = {name.removeprefix("extras."): t for name, t in tensors.items() if name.startswith("extras.")}
        fields = {name: tensors.get(name) for name in TRACE_TENSORS}
        trace = cls(
            **fields,
            latent_steps=list(meta.get("latent_steps", [])),
            timesteps=list(meta.get("timesteps", [])),
            extras=extras,
        )
        return trace, meta.get("recipe", {})


@dataclass(frozen=True)
class Provenance:
    """Where a run's images came from besides its settings: the models, the inputs' fingerprints, notes."""

    method: str  # the mode, or the preset's method ("variations")
    model: dict[str, Any]  # preset name, model ids or folders, extra parts (adapter, captioner, ControlNet)
    inputs: tuple[str, ...] = ()  # sha256 prefixes of the decoded input images
    negative_inputs: tuple[str, ...] = ()
    notes: dict[str, Any] = field(default_factory=dict)  # e.g. BLIP's caption, the structure image's fingerprint
    device: str = "cpu"
    dtype: str = "float32"
    version: str = ""


@dataclass
class GenerationResult:
    """Images, trace and settings of one run. ``cancelled`` runs have no images (nothing half-done is decoded).

    ``settings`` is the validated :class:`~imageprompt_widgets.GenerationSettings` the run used; the
    JSON ``recipe`` (what saved PNGs carry) is derived from it and the ``provenance``.
    """

    images: list[Any]  # PIL images
    trace: Trace | None  # None only for a run cancelled before it started (while it waited for the pipeline)
    settings: GenerationSettings
    provenance: Provenance
    cancelled: bool = False
    nsfw_content_detected: list[bool] | None = None
    seconds: float = 0.0

    @property
    def recipe(self) -> dict[str, Any]:
        """Everything needed to redo the run, as plain JSON types: settings, models, input fingerprints."""
        return recipe_of(self.settings, self.provenance)

    def save(self, folder: str | os.PathLike, prefix: str = "imageprompt") -> list[Path]:
        """Write each image as PNG with the recipe in its metadata (key ``imageprompt``); returns the paths."""
        recipe = self.recipe
        return [save_png(image, folder, recipe, index, prefix) for index, image in enumerate(self.images)]


@dataclass
class Interpolation:
    """Images generated along a slerp between two CLIP embeddings, one seed for all (``pipe.interpolate``)."""

    weights: list[float]  # t of each point, 0 (start) to 1 (end)
    embeds: torch.Tensor  # [N, D] the interpolated image embeddings used
    results: list[GenerationResult]  # one finished run per point (fewer when cancelled)
    labels: tuple[str, str] = ("start", "end")

    @property
    def images(self) -> list[Any]:
        return [result.images[0] for result in self.results]

    @property
    def cancelled(self) -> bool:
        return len(self.results) < len(self.weights)

    def _repr_png_(self) -> bytes | None:
        from .views import interpolation_view

        return interpolation_view(self)._repr_png_()


def recipe_of(settings: GenerationSettings, provenance: Provenance) -> dict[str, Any]:
    """The recipe of a run (a JSON-able dict; ``settings`` under its own key)."""
    return {
        "method": provenance.method,
        "settings": settings.to_dict(),
        "model": dict(provenance.model),
        "inputs": list(provenance.inputs),
        "negative_inputs": list(provenance.negative_inputs),
        **provenance.notes,
        "device": provenance.device,
        "dtype": provenance.dtype,
        "version": provenance.version,
    }


def save_png(image: Any, folder: str | os.PathLike, recipe: dict[str, Any], index: int = 0,
             prefix: str = "imageprompt") -> Path:
    """Write one image of a run as PNG with the recipe (and its ``index`` in the batch) in its metadata."""
    from PIL.PngImagePlugin import PngInfo

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text("imageprompt", json.dumps({**recipe, "index": index}))
    seed = recipe.get("settings", {}).get("seed", 0)
    path = _free_path(folder / f"{prefix}-seed{seed}-{index}.png")
    image.save(path, pnginfo=info)
    return path


def _free_path(path: Path) -> Path:
    """``path``, or ``path`` with a counter, so a second run never overwrites the first run's pictures."""
    candidate, counter = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
        counter += 1
    return candidate


def recipe_from_png(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe stored in a PNG written by :meth:`GenerationResult.save`."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text["imageprompt"])
