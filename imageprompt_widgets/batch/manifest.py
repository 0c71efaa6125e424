"""A batch's manifest: one row per output image (input, seed, settings, file, item key), as JSONL or Parquet.

Rows are facts: "input X, with the settings and model whose item key is K, gave image ``index`` in
``file``"; a row is identified by ``(input, key, index)``. While a batch runs, each process appends its
rows to its own part file (``.imageprompt-parts/``, one line per row, flushed as it goes), so a run that
is stopped keeps what it finished; the main process merges the parts into ``manifest.jsonl`` (or
``manifest.parquet``) and removes them. Parquet needs ``pyarrow`` (the ``batch`` extra).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..extras import require
from ..settings import setting_specs

MANIFEST_FORMATS = ("jsonl", "parquet")
PARTS_FOLDER = ".imageprompt-parts"
FAILURES_FILE = "failed.jsonl"
#: The columns of every row, in order (``settings`` is a JSON object / a Parquet struct).
ROW_FIELDS = ("input", "seed", "index", "file", "key", "fingerprint", "model", "settings")

Row = dict[str, Any]
#: Where a bad manifest line is reported: one sentence naming the file and line.
Warn = Callable[[str], None]


class ManifestError(ValueError):
    """OUT's manifest cannot be written where it must go (``manifest.jsonl`` is a folder, say)."""


def manifest_path(out: str | os.PathLike[str], fmt: str = "jsonl") -> Path:
    if fmt not in MANIFEST_FORMATS:
        raise ValueError(f"manifest format {fmt!r} is not one of {', '.join(MANIFEST_FORMATS)}.")
    return Path(out) / f"manifest.{fmt}"


def row_identity(row: Mapping[str, Any]) -> tuple[str, str, int]:
    return (utf8_text(str(row["input"])), str(row["key"]), int(row["index"]))  # as Parquet keeps it


def read_manifest(out: str | os.PathLike[str], warn: Warn | None = None) -> list[Row]:
    """Every row of ``manifest.jsonl`` and ``manifest.parquet`` in ``out`` (either or both may exist).

    A line that is not a row this package wrote (not UTF-8, not JSON, a field of the wrong type, a file
    outside OUT) is left out and reported to ``warn``: its item simply runs again."""
    rows = _read_jsonl(manifest_path(out, "jsonl"), warn)
    parquet = manifest_path(out, "parquet")
    if parquet.is_file():
        pq = require("pyarrow.parquet", "batch", "Reading manifest.parquet")
        rows += [row for row in pq.read_table(parquet).to_pylist() if _row_problem(row) is None]
    return rows


def check_manifest_target(out: str | os.PathLike[str], fmt: str) -> None:
    """Refuse, before any work, a manifest path that is a folder (or anything but a file)."""
    path = manifest_path(out, fmt)
    if path.exists() and not path.is_file():
        raise ManifestError(f"{str(path)!r} is not a file (a folder?), so the manifest cannot be written there: "
                            "move it away or choose another -o.")


def read_parts(out: str | os.PathLike[str], warn: Warn | None = None) -> list[Row]:
    """Rows left in part files (by a run still going, or one that was stopped)."""
    folder = Path(out) / PARTS_FOLDER
    if not folder.is_dir():
        return []
    return [row for path in sorted(folder.glob("rows-*.jsonl")) for row in _read_jsonl(path, warn)]


def clear_parts(out: str | os.PathLike[str]) -> None:
    folder = Path(out) / PARTS_FOLDER
    if folder.is_dir():
        for path in folder.glob("rows-*.jsonl"):
            path.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:
            pass  # something else in there: not ours to remove


class PartWriter:
    """This process's part file: each row is on disk (flushed) before the next item starts."""

    def __init__(self, out: str | os.PathLike[str], process_index: int) -> None:
        folder = Path(out) / PARTS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rows-{process_index}.jsonl"
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, rows: Iterable[Row]) -> None:
        for row in rows:
            self._handle.write(json.dumps(row) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def merged(rows: Iterable[Row], order: Callable[[Row], Any]) -> list[Row]:
    """One row per ``(input, key, index)`` (a later row replaces an earlier one), sorted by ``order``, then by
    input, seed and index (rows of inputs no longer listed share one ``order``)."""
    unique: dict[tuple[str, str, int], Row] = {}
    for row in rows:
        unique[row_identity(row)] = {name: row.get(name) for name in ROW_FIELDS}
    return sorted(unique.values(),
                  key=lambda row: (order(row), str(row["input"]), int(row["seed"]), int(row["index"]), str(row["key"])))


def write_manifest(out: str | os.PathLike[str], rows: list[Row], fmt: str = "jsonl") -> Path:
    """Write the manifest atomically (a temporary file renamed over the old one)."""
    path = manifest_path(out, fmt)
    check_manifest_target(out, fmt)
    temporary = path.with_name(path.name + ".tmp")
    try:
        if fmt == "jsonl":
            temporary.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        else:
            pa = require("pyarrow", "batch", "Writing manifest.parquet")
            pq = require("pyarrow.parquet", "batch", "Writing manifest.parquet")
            pq.write_table(pa.Table.from_pylist([_parquet_safe(row) for row in rows], schema=row_schema(pa)),
                           temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # nothing half-written stays behind
    return path


def _parquet_safe(row: Row) -> Row:
    """Parquet strings are UTF-8: a name with undecodable bytes (kept by Python as surrogates) is written with
    its bytes escaped, as ``os.fsencode(name).decode("utf-8", "backslashreplace")`` spells them."""
    return {name: utf8_text(value) if isinstance(value, str) else value for name, value in row.items()}


def utf8_text(text: str) -> str:
    """``text`` as UTF-8 can hold it: undecodable file-name bytes (Python's surrogates) written as ``\\xNN``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_failures(out: str | os.PathLike[str], failures: list[Row]) -> Path | None:
    """``failed.jsonl``: the last run's failed items (input, seed, error); removed when none failed."""
    path = Path(out) / FAILURES_FILE
    if not failures:
        path.unlink(missing_ok=True)
        return None
    path.write_text("".join(json.dumps(failure) + "\n" for failure in failures), encoding="utf-8")
    return path


def row_schema(pa: Any) -> Any:
    """The Parquet schema: the settings struct typed from the settings' specs (settings.py)."""
    kinds = {
        "float": pa.float64(), "int": pa.int64(), "size": pa.int64(), "bool": pa.bool_(),
        "choice": pa.string(), "text": pa.string(), "floats": pa.list_(pa.float64()),
        "units": pa.string(),  # control_units: its JSON text, as the recipe holds it
    }
    settings = pa.struct([pa.field(spec.name, kinds[spec.kind]) for spec in setting_specs()])
    return pa.schema([
        pa.field("input", pa.string()), pa.field("seed", pa.int64()), pa.field("index", pa.int64()),
        pa.field("file", pa.string()), pa.field("key", pa.string()), pa.field("fingerprint", pa.string()),
        pa.field("model", pa.string()), pa.field("settings", settings),
    ])


def _read_jsonl(path: Path, warn: Warn | None = None) -> list[Row]:
    if not path.is_file():
        return []
    rows = []
    lines = path.read_bytes().splitlines()
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problem: str | None = "is not UTF-8 text"
        except (ValueError, RecursionError):
            if number == len(lines) and path.parent.name == PARTS_FOLDER:
                continue  # the last line of a part file cut short by a crash: that item runs again
            problem = "is not JSON"
        else:
            problem = _row_problem(row)
        if problem is None:
            rows.append(row)
        elif warn is not None:
            warn(f"{path.name} line {number} {problem}; ignored (its item runs again if it is still listed).")
    return rows


def _row_problem(row: Any) -> str | None:
    """Why ``row`` is not a manifest row this package wrote, or ``None``."""
    if not isinstance(row, dict):
        return "is not a JSON object"
    missing = [name for name in ("input", "key", "index", "file", "seed") if name not in row]
    if missing:
        return f"has no {', '.join(missing)}"
    for name in ("input", "key", "file"):
        if not isinstance(row[name], str):
            return f"has a {name} that is not text"
    for name in ("index", "seed"):
        if isinstance(row[name], bool) or not isinstance(row[name], int):
            return f"has a {name} that is not a whole number"
    file = row["file"]
    if not file or file != os.path.basename(file) or "\\" in file or file in (".", ".."):
        return "names a file outside the output folder"
    return None
