"""CLIP image embeddings of many images, batched, to safetensors or Parquet: one row per image.

``imageprompt embed INPUT -o FILE.safetensors`` runs :func:`export_embeddings`; in a notebook,
:func:`embed_images` does the same for a list of images. Each batch goes through the same function as
``pipe.encode_image`` (encoding.encode_images), so a row equals ``pipe.encode_image`` of the images of its
batch exactly, and of the image alone up to float rounding (a batched matrix product adds in another
order; ``--batch-size 1`` gives the single-image values exactly).

The file holds ``image_embeds`` ``[N, D]`` (and ``hidden_states`` ``[N, T, Dv]`` when asked for) with the
list of inputs, their fingerprints, the model and the crop: in the safetensors metadata (key
``imageprompt``, JSON), or as Parquet columns (``input``, ``fingerprint``, ``image_embeds``,
``hidden_states``) with the rest in the schema metadata. :func:`load_embeddings` reads either.
Under ``accelerate launch`` whole batches are shared between the processes, so the rows are the same with
any number of processes; the main process writes the file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..extras import require
from ..images import load_images
from ..presets import Preset, resolve_preset
from ..settings import CROPS, SettingsError
from .manifest import utf8_text
from .sharding import Processes, current_processes
from .sources import Source, open_source

EMBEDDING_SUFFIXES = (".safetensors", ".parquet")
DEFAULT_BATCH_SIZE = 16
_METADATA_KEY = "imageprompt"

if TYPE_CHECKING:  # torch loads with the first embedding, so the command line checks its input before it
    import torch

Log = Callable[[str], None]


class EmbeddingFileError(ValueError):
    """An embeddings file that cannot be written or read (wrong suffix, not ours, damaged)."""


@dataclass
class EmbeddingTable:
    """Embeddings of a list of images, one row per image, with what they came from."""

    inputs: list[str]  # how each image was named (path as listed, "train[12]", ...)
    fingerprints: list[str]  # sha256 of each decoded image (encoding.fingerprint)
    image_embeds: torch.Tensor  # [N, D] projected CLIP image embeddings
    hidden_states: torch.Tensor | None = None  # [N, T, Dv] the vision tower's last hidden state
    model: dict[str, str] = field(default_factory=dict)
    crop: str = "center_crop"
    source: str = ""  # the INPUT the rows were listed from

    def __len__(self) -> int:
        return len(self.inputs)

    def metadata(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "fingerprints": self.fingerprints, "model": self.model, "crop": self.crop,
                "source": self.source, "version": __version__}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (``.safetensors`` or ``.parquet``, by its suffix) atomically."""
        path = Path(path)
        check_embedding_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import save_file

                tensors = {"image_embeds": self.image_embeds.detach().cpu().contiguous()}
                if self.hidden_states is not None:
                    tensors["hidden_states"] = self.hidden_states.detach().cpu().contiguous()
                save_file(tensors, str(temporary), metadata={_METADATA_KEY: json.dumps(self.metadata())})
            else:
                _write_parquet(self, temporary)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)  # nothing half-written stays behind
        return path


def check_embedding_path(path: str | os.PathLike[str]) -> None:
    """``-o`` of ``embed``: a ``.safetensors`` or ``.parquet`` file name, not a folder."""
    path = Path(path)
    if path.suffix not in EMBEDDING_SUFFIXES:
        raise EmbeddingFileError(
            f"{str(path)!r} should end in .safetensors or .parquet (the format of the embeddings file)."
        )
    if path.is_dir():
        raise EmbeddingFileError(f"{str(path)!r} is a folder: name the embeddings file, e.g. {path / 'embeddings.safetensors'}.")


def load_embeddings(path: str | os.PathLike[str]) -> EmbeddingTable:
    """Read a file written by ``imageprompt embed`` or :meth:`EmbeddingTable.save`."""
    path = Path(path)
    check_embedding_path(path)
    if not path.is_file():
        raise EmbeddingFileError(f"{str(path)!r} does not exist.")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = _embedding_meta((handle.metadata() or {}).get(_METADATA_KEY), path)
            names = set(handle.keys())
            if "image_embeds" not in names:
                raise EmbeddingFileError(f"{str(path)!r} was not written by imageprompt embed (no image_embeds).")
            embeds = handle.get_tensor("image_embeds")
            hidden = handle.get_tensor("hidden_states") if "hidden_states" in names else None
    except EmbeddingFileError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise EmbeddingFileError(
            f"{str(path)!r} is not an embeddings file imageprompt embed wrote (not safetensors, or damaged: {first})."
        ) from None
    return _checked_table(path, meta, embeds, hidden)


def _embedding_meta(text: Any, path: Path) -> dict[str, Any]:
    """The metadata of an embeddings file: a JSON object listing one input and one fingerprint per row."""
    not_ours = f"{str(path)!r} was not written by imageprompt embed"
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not isinstance(text, str) or not text.strip():
        raise EmbeddingFileError(f"{not_ours} (no inputs in its metadata).")
    try:
        meta = json.loads(text)
    except RecursionError:
        raise EmbeddingFileError(f"{not_ours} (its metadata is nested too deeply).") from None
    except ValueError:
        raise EmbeddingFileError(f"{not_ours} (its metadata is not JSON).") from None
    if not isinstance(meta, dict):
        raise EmbeddingFileError(f"{not_ours} (no inputs in its metadata).")
    for key in ("inputs", "fingerprints"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(v, str) for v in meta[key])):
            raise EmbeddingFileError(f"{not_ours} (its {key} are not a list of names).")
    if not isinstance(meta.get("model", {}), dict) or not isinstance(meta.get("crop", ""), str):
        raise EmbeddingFileError(f"{not_ours} (its model or crop is of the wrong type).")
    return meta


def _checked_table(path: Path, meta: dict[str, Any], embeds: Any, hidden: Any) -> EmbeddingTable:
    """One row per listed input, in every tensor: a file that disagrees is refused, never misaligned."""
    if "inputs" not in meta or "fingerprints" not in meta:
        raise EmbeddingFileError(f"{str(path)!r} was not written by imageprompt embed (no inputs in its metadata).")
    inputs, prints = meta["inputs"], meta["fingerprints"]
    if embeds.ndim != 2 or not embeds.is_floating_point():
        raise EmbeddingFileError(f"In {str(path)!r}, image_embeds is not a [rows, dimensions] table of numbers.")
    if hidden is not None and (hidden.ndim != 3 or not hidden.is_floating_point()):
        raise EmbeddingFileError(f"In {str(path)!r}, hidden_states is not a [rows, tokens, width] tensor of numbers.")
    rows = {len(inputs), len(prints), embeds.shape[0], *(() if hidden is None else (hidden.shape[0],))}
    if len(rows) != 1:
        extra = "" if hidden is None else f", {hidden.shape[0]} hidden_states rows"
        raise EmbeddingFileError(
            f"{str(path)!r} lists {len(inputs)} inputs and {len(prints)} fingerprints for {embeds.shape[0]} "
            f"embedding rows{extra}: the file is damaged; write it again with imageprompt embed."
        )
    return EmbeddingTable(inputs, prints, embeds, hidden, meta.get("model", {}), meta.get("crop", "center_crop"),
                          meta.get("source", "") if isinstance(meta.get("source", ""), str) else "")


def embed_images(
    pipe: Any, images: Sequence[Any], *, labels: Sequence[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
    hidden_states: bool = False, crop: str = "center_crop",
) -> EmbeddingTable:
    """Embeddings of ``images`` (anything ``load_image`` takes; a bad one raises) in batches of ``batch_size``."""
    import torch

    from ..encoding import fingerprint

    _check_batch_size(batch_size)
    loaded = load_images(list(images))
    names = list(labels) if labels is not None else [_label(image, i) for i, image in enumerate(images)]
    if len(names) != len(loaded):
        raise SettingsError(f"labels has {len(names)} entries for {len(loaded)} images: give one per image.")
    parts = [_encode(pipe, loaded[start:start + batch_size], crop, hidden_states)
             for start in range(0, len(loaded), batch_size)]
    return EmbeddingTable(
        names, [fingerprint(image) for image in loaded], torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]) if hidden_states else None, _model_of(pipe.preset), crop,
    )


@dataclass
class EmbedReport:
    path: Path
    rows: int
    failures: list[dict[str, Any]] = field(default_factory=list)  # {"input", "error"}
    seconds: float = 0.0  # encoding time of the slowest process, model loading excluded
    processes: int = 1

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        rate = f" ({self.rows / self.seconds:.3g} images/s)" if self.seconds and self.rows else ""
        spread = f" on {self.processes} processes" if self.processes > 1 else ""
        return (f"{self.rows} embeddings, {len(self.failures)} failed{spread}; {self.seconds:.1f} s encoding{rate}; "
                f"written to {self.path}")


def export_embeddings(
    source: Source | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    model: str | Preset | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    hidden_states: bool = False,
    crop: str = "center_crop",
    progress: bool = True,
    log: Log | None = None,
    on_event: Callable[[Any], None] | None = None,
    processes: Processes | None = None,
) -> EmbedReport:
    """Embed every image of ``source`` (as ``run_batch`` lists it) into ``path``; unreadable images are logged
    and left out (the report lists them).

    The work runs as a task of a :class:`~imageprompt_widgets.engine.controller.Controller` (inline): it loads the
    model (``on_event`` gets its ``Loading`` events, download bytes included) and holds the pipeline's lock.
    """
    path = Path(path)
    check_embedding_path(path)
    _check_batch_size(batch_size)
    if crop not in CROPS:
        raise SettingsError(f"crop={crop!r} is not one of {', '.join(CROPS)}.")
    preset = resolve_preset(model)
    if not isinstance(source, Source):
        source = open_source(source)
    processes = processes or current_processes(device)
    chunks = [source.items[start:start + batch_size] for start in range(0, len(source.items), batch_size)]
    mine = processes.split(chunks)
    share = _Share(crop, hidden_states, log or _stderr, progress and processes.is_main)
    if mine:
        from ..engine.controller import Controller
        from ..engine.runners import InlineRunner

        controller = Controller(preset, runner=InlineRunner(), previews=False, device=device or processes.device,
                                dtype=dtype)
        if on_event is not None:
            controller.subscribe(on_event)
        if controller.submit_task(lambda context: share.run(context, mine), label="embed").future.result() is None:
            raise KeyboardInterrupt  # the controller reports a stop as a cancelled task without a result
    table = share.table(_model_of(preset), source.location)
    reports = processes.gather({"failures": share.failures, "seconds": share.seconds, "rows": len(table)})
    if processes.count > 1:
        _save_part(table, _part_path(path, processes.index))
        processes.wait()
        if processes.is_main:
            table = _merge_parts(path, processes.count, table)
    if processes.is_main:
        if not len(table):
            raise EmbeddingFileError(f"No image of {source.description} could be read: nothing to write to {str(path)!r}.")
        table.save(path)
    processes.wait()
    return EmbedReport(path, sum(report["rows"] for report in reports),
                       [failure for report in reports for failure in report["failures"]],
                       max(report["seconds"] for report in reports), processes.count)


class _Share:
    """One process's chunks of images: decoded (failures logged), encoded batch by batch, kept in order."""

    def __init__(self, crop: str, hidden_states: bool, log: Log, progress: bool) -> None:
        self.crop, self.hidden_states, self.log, self.progress = crop, hidden_states, log, progress
        self.inputs: list[str] = []
        self.prints: list[str] = []
        self.embeds: list[Any] = []
        self.hidden: list[Any] = []
        self.failures: list[dict[str, Any]] = []
        self.seconds = 0.0

    def run(self, context: Any, chunks: Sequence[Sequence[Any]]) -> _Share:
        """The controller task: ``context.pipeline`` is loaded and locked; ``context.check()`` stops it."""
        from tqdm.auto import tqdm

        from ..encoding import fingerprint

        total = sum(len(chunk) for chunk in chunks)
        context.start(total)
        with tqdm(total=total, desc="embed", unit="image", file=sys.stderr, disable=not self.progress) as bar:
            for chunk in chunks:
                context.check()
                images = []
                for item in chunk:
                    try:
                        images.append((item.label, item.load()))
                    except ValueError as err:
                        text = " ".join(str(err).split())
                        self.log(f"imageprompt: skipped {item.label}: {text}")
                        self.failures.append({"input": item.label, "error": text})
                if images:
                    start = time.perf_counter()
                    rows, states = _encode(context.pipeline, [image for _, image in images], self.crop,
                                           self.hidden_states)
                    self.seconds += time.perf_counter() - start
                    self.inputs += [label for label, _ in images]
                    self.prints += [fingerprint(image) for _, image in images]
                    self.embeds.append(rows)
                    self.hidden.extend([states] if self.hidden_states else [])
                bar.update(len(chunk))
                context.advance(bar.n)
        return self

    def table(self, model: dict[str, str], source: str) -> EmbeddingTable:
        import torch

        return EmbeddingTable(self.inputs, self.prints, torch.cat(self.embeds) if self.embeds else torch.empty(0),
                              torch.cat(self.hidden) if self.hidden else None, model, self.crop, source)


# -- helpers -----------------------------------------------------------------------------------


def _encode(pipe: Any, images: list[Any], crop: str, hidden_states: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    from ..encoding import encode_images

    embedding = encode_images(images, pipe.image_encoder, pipe.image_processor, crop)
    states = embedding.hidden_states.detach().cpu() if hidden_states and embedding.hidden_states is not None else None
    return embedding.image_embeds.detach().cpu(), states


def _model_of(preset: Preset) -> dict[str, str]:
    return {"preset": preset.name, "clip_model": preset.clip_model,
            **({"clip_subfolder": preset.clip_subfolder} if preset.clip_subfolder else {})}


def _label(image: Any, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"image {index}"


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SettingsError(f"batch_size must be a whole number of at least 1, not {batch_size!r}.")


def _part_path(path: Path, index: int) -> Path:
    return path.with_name(f".{path.name}.part-{index}.safetensors")


def _save_part(table: EmbeddingTable, part: Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    if len(table):
        tensors["image_embeds"] = table.image_embeds.contiguous()
        if table.hidden_states is not None:
            tensors["hidden_states"] = table.hidden_states.contiguous()
    save_file(tensors, str(part), metadata={_METADATA_KEY: json.dumps(table.metadata())})


def _merge_parts(path: Path, count: int, mine: EmbeddingTable) -> EmbeddingTable:
    """The main process's concatenation of every process's part, in process order (= listing order)."""
    import torch
    from safetensors import safe_open

    inputs, prints, embeds, hidden = [], [], [], []
    for index in range(count):
        part = _part_path(path, index)
        with safe_open(str(part), framework="pt") as handle:
            meta = json.loads(handle.metadata()[_METADATA_KEY])
            if meta["inputs"]:
                inputs += meta["inputs"]
                prints += meta["fingerprints"]
                embeds.append(handle.get_tensor("image_embeds"))
                if "hidden_states" in set(handle.keys()):
                    hidden.append(handle.get_tensor("hidden_states"))
        part.unlink()
    return EmbeddingTable(inputs, prints, torch.cat(embeds) if embeds else torch.empty(0),
                          torch.cat(hidden) if hidden else None, mine.model, mine.crop, mine.source)


def _write_parquet(table: EmbeddingTable, path: Path) -> None:
    pa = require("pyarrow", "batch", "Writing embeddings as Parquet")
    pq = require("pyarrow.parquet", "batch", "Writing embeddings as Parquet")
    embeds = table.image_embeds.detach().cpu().float().numpy()
    columns = {
        "input": pa.array([utf8_text(name) for name in table.inputs], pa.string()),  # Parquet strings are UTF-8
        "fingerprint": pa.array(table.fingerprints, pa.string()),
        "image_embeds": pa.FixedSizeListArray.from_arrays(pa.array(embeds.reshape(-1)), embeds.shape[1]),
    }
    if table.hidden_states is not None:
        states = table.hidden_states.detach().cpu().float().numpy()
        tokens = pa.FixedSizeListArray.from_arrays(pa.array(states.reshape(-1)), states.shape[2])
        columns["hidden_states"] = pa.FixedSizeListArray.from_arrays(tokens, states.shape[1])
    meta = {key: value for key, value in table.metadata().items() if key not in ("inputs", "fingerprints")}
    arrow = pa.table(columns).replace_schema_metadata({_METADATA_KEY: json.dumps(meta)})
    pq.write_table(arrow, path)


def _read_parquet(path: Path) -> EmbeddingTable:
    import numpy as np
    import torch

    pa = require("pyarrow", "batch", "Reading embeddings from Parquet")
    pq = require("pyarrow.parquet", "batch", "Reading embeddings from Parquet")
    try:
        arrow = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many kinds for a damaged file: one sentence
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise EmbeddingFileError(f"{str(path)!r} is not a Parquet file imageprompt embed wrote ({first}).") from None
    meta = _embedding_meta((arrow.schema.metadata or {}).get(_METADATA_KEY.encode()), path)
    if not {"image_embeds", "input", "fingerprint"} <= set(arrow.column_names):
        raise EmbeddingFileError(f"{str(path)!r} was not written by imageprompt embed.")

    def values(name: str) -> torch.Tensor:
        column = arrow.column(name).combine_chunks()
        shape = [arrow.num_rows]
        while pa.types.is_fixed_size_list(column.type):
            shape.append(column.type.list_size)
            column = column.flatten()
        return torch.from_numpy(np.asarray(column, dtype=np.float32).reshape(shape).copy())

    try:
        embeds = values("image_embeds")
        hidden = values("hidden_states") if "hidden_states" in arrow.column_names else None
        listed = {"inputs": arrow.column("input").to_pylist(), "fingerprints": arrow.column("fingerprint").to_pylist()}
    except (ValueError, TypeError, pa.ArrowException) as err:
        raise EmbeddingFileError(f"{str(path)!r} holds columns imageprompt embed does not write ({err}).") from None
    return _checked_table(path, _embedding_meta(json.dumps({**meta, **listed}), path), embeds, hidden)


def _stderr(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)

