"""What a generation returns: the images, every intermediate tensor, and the recipe to redo it."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..faults import filesystem_fault
from ..settings import GenerationSettings

TRACE_TENSORS = (
    "pixel_values",
    "image_embeds",
    "hidden_states",
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "latents",
    "attention_maps",
)
#: The dimensions of each traced tensor (``Trace.load`` checks files against them).
TRACE_RANKS = {"pixel_values": 4, "image_embeds": 2, "hidden_states": 3, "prompt_embeds": 3,
               "negative_prompt_embeds": 3, "pooled_prompt_embeds": 2, "negative_pooled_prompt_embeds": 2,
               "latents": 5, "attention_maps": 4}
#: What a trace file must hold to be one: the image's embedding and what the UNet was fed.
REQUIRED_TRACE_TENSORS = ("image_embeds", "prompt_embeds")
#: The most metadata text a trace or PNG recipe may carry (real ones: a few KB).
MAX_METADATA_CHARS = 2**20


class SaveError(ValueError):
    """Results could not be written where asked: a prefix that would leave the folder, a full disk, a folder
    that cannot be written or that is a file."""


class ResultFileError(ValueError):
    """A saved trace or PNG that cannot be read back: missing, not written by this package, damaged or hostile.

    ``reason`` names the kind of problem for a face that words it its own way: ``missing``, ``not_png``,
    ``no_recipe`` or ``bad_recipe`` (``""`` when not given)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Trace:
    """Every tensor between the input image and the output, on the CPU.

    - ``pixel_values`` ``[N, 3, H, W]``: the picture CLIP actually saw (after crop and normalisation).
    - ``image_embeds`` ``[N, D]``: the vision tower's projected embedding of each input image.
    - ``hidden_states`` ``[N, T, Dv]``: the vision tower's last hidden state (257 tokens for ViT-L/14).
    - ``prompt_embeds`` ``[B, L, D]``: the conditional embeddings fed to the UNet, one row per output image.
    - ``negative_prompt_embeds`` ``[B, L, D]`` or ``None`` (no guidance): the unconditional branch.
    - ``pooled_prompt_embeds`` ``[B, P]`` (SDXL; ``None`` on SD 1.x): what SDXL's pooled slot got, one row per
      output image (the prompt's pooled text embedding, or OpenCLIP bigG's image embedding: ``P`` = 1,280).
    - ``negative_pooled_prompt_embeds`` ``[B, P]`` or ``None`` (SD 1.x, or no guidance): the unconditional
      branch's pooled slot (zeros for SDXL base without a negative prompt, as diffusers feeds).
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
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every traced tensor by name (``extras`` prefixed with ``extras.``), missing ones left out."""
        named = {name: getattr(self, name) for name in TRACE_TENSORS if getattr(self, name) is not None}
        named.update({f"extras.{name}": value for name, value in self.extras.items()})
        return named

    def summary(self) -> Any:
        """One line per traced tensor (shape, dtype, device, min/max, mean, std, norm, NaN/Inf).

        Returns text that shows as plain lines as a cell's result; ``print(trace.summary())`` also works.
        """
        from .summary import summarize_all

        return summarize_all(self.tensors())

    def to_dict(self) -> dict[str, Any]:
        """Tensors plus the non-tensor fields, as plain Python containers."""
        return {**self.tensors(), "latent_steps": list(self.latent_steps), "timesteps": list(self.timesteps)}

    def save(self, path: str | os.PathLike, recipe: dict[str, Any] | None = None) -> Path:
        """Write one safetensors file at ``path``: the tensors, and in its header's metadata (key ``imageprompt``)
        the recipe and the step lists, so that file alone gives back everything :meth:`load` returns.

        A full disk or a folder that cannot be written is a :class:`SaveError`; no partial file is left, and a
        file already at ``path`` stays as it was.
        """
        import safetensors.torch

        path = Path(path)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors().items()}
        meta = {"latent_steps": self.latent_steps, "timesteps": self.timesteps, "recipe": recipe or {}}
        with _saving("the trace", path, path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # renamed into place when whole
            try:
                safetensors.torch.save_file(tensors, str(partial), metadata={"imageprompt": json.dumps(meta)})
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[Trace, dict[str, Any]]:
        """Read a trace written by :meth:`save`; returns ``(trace, recipe)``.

        Anything that is not such a trace (another file, a damaged one, one without ``image_embeds`` and
        ``prompt_embeds``, metadata of the wrong shape) is a :class:`ResultFileError` naming the file.
        """
        from safetensors import SafetensorError, safe_open

        if not os.path.isfile(path):
            raise ResultFileError(f"The trace file {path} does not exist.")
        try:
            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get("imageprompt", "{}")
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is no dict
        except (SafetensorError, OSError, ValueError, TypeError) as err:
            raise ResultFileError(
                f"{path} is not a trace file this package can read (not safetensors, or damaged: "
                f"{_first_line(err)})."
            ) from None
        meta = _metadata(text, path, "metadata")
        for name in REQUIRED_TRACE_TENSORS:
            if name not in tensors:
                raise ResultFileError(f"The trace file {path} has no {name}: it was not written by Trace.save.")
        for name, tensor in tensors.items():
            rank = TRACE_RANKS.get(name)
            if rank is not None and tensor.ndim != rank:
                raise ResultFileError(f"In the trace file {path}, {name} has {tensor.ndim} dimension"
                                      f"{'s' if tensor.ndim != 1 else ''}, not {rank}.")
            if rank is not None and not tensor.is_floating_point():
                raise ResultFileError(f"In the trace file {path}, {name} holds {str(tensor.dtype).removeprefix('torch.')}"
                                      ", not floating-point numbers.")
        latent_steps = _listed(meta, "latent_steps", int, path)
        timesteps = _listed(meta, "timesteps", (int, float), path)
        recipe = meta.get("recipe", {})
        if not isinstance(recipe, dict):
            raise ResultFileError(f"The recipe in the trace file {path} is {_a(recipe)}, not a mapping.")
        extras = {name.removeprefix("extras."): t for name, t in tensors.items() if name.startswith("extras.")}
        fields = {name: tensors.get(name) for name in TRACE_TENSORS}
        trace = cls(**fields, latent_steps=latent_steps, timesteps=timesteps, extras=extras)
        return trace, recipe


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
    #: Seconds per stage, in the order the run passed them: ``loading`` (only where a model or the tiny decoder
    #: loaded for this run), ``inputs`` (pictures decoded and checked), ``waiting`` (for another run on the
    #: pipeline), ``encoding`` (CLIP's vision tower and SD's text encoder; 0 when every input came from the
    #: caches), ``conditioning`` (the method, the structure maps), ``denoising`` (``unet_calls`` UNet calls, the
    #: previews made between steps), ``decoding`` (the VAE, or the tiny decoder, and post-processing); ``total``
    #: is their sum, give or take bookkeeping.
    timings: dict[str, float] = field(default_factory=dict)
    #: How many times the UNet ran (each call a batch: two rows per image with guidance, one without).
    unet_calls: int = 0

    def describe_timings(self) -> str:
        """Where the run's time went, in one line: ``"1.2 s: encoding 0.05 s · denoising 0.9 s · ... (4 UNet calls)"``
        (stages under 5 ms left out); empty for a result without timings."""
        timings = dict(self.timings)
        total = timings.pop("total", None)
        if total is None:
            return ""
        stages = " · ".join(f"{stage} {seconds:.2f} s" for stage, seconds in timings.items() if seconds >= 0.005)
        calls = f" ({self.unet_calls} UNet calls)" if self.unet_calls else ""
        return f"{total:.1f} s: {stages}{calls}"

    @property
    def recipe(self) -> dict[str, Any]:
        """Everything needed to redo the run, as plain JSON types: settings, models, input fingerprints."""
        return recipe_of(self.settings, self.provenance)

    def save(self, folder: str | os.PathLike, prefix: str = "imageprompt") -> list[Path]:
        """Write each image as PNG with the recipe in its metadata (key ``imageprompt``); returns the paths.

        ``prefix`` starts each file name (``{prefix}-seed{seed}-{index}.png``) and may not leave ``folder``
        (no path separators, no ``..``). A full disk or a folder that cannot be written is a :class:`SaveError`.
        """
        check_prefix(prefix)
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

    check_prefix(prefix)
    folder = Path(folder)
    text = json.dumps({**recipe, "index": index})
    if len(text) > MAX_METADATA_CHARS:  # never write a PNG whose recipe recipe_from_png would refuse
        raise SaveError(f"The recipe is {len(text):,} characters long, more than the {MAX_METADATA_CHARS:,} a saved "
                        "PNG can carry: shorten the prompts.")
    info = PngInfo()
    info.add_text("imageprompt", text)
    seed = recipe.get("settings", {}).get("seed", 0)
    with _saving("the images", folder, folder):
        folder.mkdir(parents=True, exist_ok=True)
        path = _free_path(folder / f"{prefix}-seed{seed}-{index}.png")
        try:
            image.save(path, pnginfo=info)
        except BaseException:
            path.unlink(missing_ok=True)  # a half-written picture is no picture
            raise
    return path


def check_prefix(prefix: str) -> None:
    """A file-name prefix must stay a name: no path separators, no ``..``, not empty."""
    separators = {"/", "\\", os.sep, os.altsep or "/", "\0"}
    if not isinstance(prefix, str) or not prefix or any(s in prefix for s in separators) or ".." in prefix:
        raise SaveError(
            f"prefix={prefix!r} is not a plain file-name start: use letters, digits, spaces, '-', '_' or '.', "
            "without path separators or '..' (the folder argument says where files go)."
        )


@contextlib.contextmanager
def _saving(what: str, target: Path, folder: Path) -> Iterator[None]:
    """Filesystem faults while writing ``what`` become one :class:`SaveError` sentence saying what to do."""
    try:
        yield
    except Exception as err:  # OSError, and safetensors' own error type for I/O failures
        fault = filesystem_fault(err, folder)
        if fault is None:
            raise
        raise SaveError(fault.sentence(f"Could not save {what} to {target}", "save to another folder")) from err


def _free_path(path: Path) -> Path:
    """``path``, or ``path`` with a counter, so a second run never overwrites the first run's pictures."""
    candidate, counter = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
        counter += 1
    return candidate


#: The PNG text chunks a recipe may be stored in (``save_png`` writes ``tEXt``; the others are read too).
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Chunks read before the image data at most (a saved PNG has a handful).
_MAX_PNG_CHUNKS = 10_000


def recipe_from_png(source: str | os.PathLike | bytes | Any, name: str | None = None) -> dict[str, Any]:
    """The recipe stored in a PNG written by :meth:`GenerationResult.save`: a path, bytes or a binary file object.

    The one reader of recipes (the panel's "Load recipe" uses it too): it walks the PNG's chunks up to the image
    data and reads the ``imageprompt`` text there, so the pixels are never decoded, a header claiming any size
    costs nothing and a file cut short after its recipe still gives it. A file that is not such a PNG is a
    :class:`ResultFileError` naming it (``name``, else the path); its ``reason`` says which kind of problem.
    """
    label = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the PNG")
    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise ResultFileError(f"The picture {label} does not exist.", reason="missing")
        if not os.path.isfile(source):  # a folder, a FIFO, a device: nothing to read a recipe from
            raise ResultFileError(f"{label} is not a PNG this package saved (it is not a file).", reason="not_png")
        try:
            with open(source, "rb") as handle:
                text = _png_text(handle, label)
        except OSError as err:
            raise ResultFileError(f"{label} cannot be read ({err.strerror or err}).", reason="not_png") from None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        text = _png_text(io.BytesIO(bytes(source)), label)
    elif hasattr(source, "read"):
        try:
            text = _png_text(source, label)
        except (OSError, ValueError) as err:
            if isinstance(err, ResultFileError):
                raise
            raise ResultFileError(f"{label} cannot be read ({_first_line(err)}).", reason="not_png") from None
    else:
        raise ResultFileError(f"Cannot read a recipe from {type(source).__name__}: pass a path, bytes or a file.",
                              reason="not_png")
    if text is None:
        raise ResultFileError(f"The picture {label} has no recipe: it was not saved by imageprompt_widgets.",
                              reason="no_recipe")
    return _metadata(text, label, "recipe")


def _png_text(handle: Any, label: str, key: str = "imageprompt") -> str | None:
    """The text stored under ``key`` in the chunks before the image data, or ``None``; never reads pixels."""
    if handle.read(len(_PNG_SIGNATURE)) != _PNG_SIGNATURE:
        raise ResultFileError(f"{label} is not a PNG this package saved (it is not a PNG file).", reason="not_png")
    wanted = key.encode("latin-1") + b"\0"
    for _ in range(_MAX_PNG_CHUNKS):
        header = handle.read(8)
        if len(header) < 8:
            return None  # cut short before any image data: whatever was there had no recipe
        length, kind = int.from_bytes(header[:4], "big"), header[4:]
        if kind in (b"IDAT", b"IEND"):
            return None
        if kind not in _TEXT_CHUNKS:
            handle.seek(length + 4, os.SEEK_CUR)  # the chunk and its CRC, unread
            continue
        head = handle.read(min(length, len(wanted)))
        if head != wanted:
            handle.seek(length - len(head) + 4, os.SEEK_CUR)
            continue
        if length > MAX_METADATA_CHARS + 64:
            raise ResultFileError(f"The recipe in {label} is {length:,} bytes long, far more than any saved run.",
                                  reason="bad_recipe")
        return _chunk_text(kind, handle.read(length - len(head)), label)
    raise ResultFileError(f"{label} has more than {_MAX_PNG_CHUNKS:,} chunks before its pixels: not a PNG this "
                          "package saved.", reason="not_png")


def _chunk_text(kind: bytes, data: bytes, label: str) -> str:
    """A text chunk's value after its keyword: tEXt is Latin-1; zTXt compressed Latin-1; iTXt UTF-8 (maybe
    compressed). Decompression stops past the metadata limit."""
    import zlib

    damaged = ResultFileError(f"The recipe in {label} is damaged (its PNG text chunk cannot be read).",
                              reason="bad_recipe")
    try:
        if kind == b"tEXt":
            return data.decode("latin-1")
        if kind == b"zTXt":
            return _inflate(data[1:], label).decode("latin-1")
        compressed = data[:1] == b"\1"
        _, _, rest = data[2:].partition(b"\0")  # language tag
        _, _, text = rest.partition(b"\0")  # translated keyword
        return (_inflate(text, label) if compressed else text).decode("utf-8")
    except (zlib.error, UnicodeDecodeError):
        raise damaged from None


def _inflate(data: bytes, label: str) -> bytes:
    import zlib

    inflater = zlib.decompressobj()
    text = inflater.decompress(data, MAX_METADATA_CHARS + 1)
    if len(text) > MAX_METADATA_CHARS:
        raise ResultFileError(f"The recipe in {label} is more than {MAX_METADATA_CHARS:,} characters long, "
                              "far more than any saved run.", reason="bad_recipe")
    return text


def _metadata(text: str, path: Any, what: str) -> dict[str, Any]:
    """JSON text from a file's metadata as a mapping, or a :class:`ResultFileError` naming the file."""
    if len(text) > MAX_METADATA_CHARS:
        raise ResultFileError(f"The {what} in {path} is {len(text):,} characters long, far more than any saved run.",
                              reason="bad_recipe")
    try:
        value = json.loads(text)
    except RecursionError:
        raise ResultFileError(f"The {what} in {path} is nested too deeply to read.", reason="bad_recipe") from None
    except ValueError as err:  # JSONDecodeError
        raise ResultFileError(f"The {what} in {path} is not valid JSON ({err}).", reason="bad_recipe") from None
    if not isinstance(value, dict):
        raise ResultFileError(f"The {what} in {path} is {_a(value)}, not a mapping.", reason="bad_recipe")
    return value


def _listed(meta: dict[str, Any], key: str, kinds: Any, path: Any) -> list[Any]:
    value = meta.get(key, [])
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, kinds) for v in value):
        raise ResultFileError(f"The {key} in the trace file {path} are not a list of numbers.")
    return list(value)


def _a(value: Any) -> str:
    """``"an int"``, ``"a list"``: the JSON value's Python type with its article."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__
