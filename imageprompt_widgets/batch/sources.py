"""Where a batch's images come from: a folder, a CSV or JSONL list, or a Hugging Face ``datasets`` dataset.

Listing reads names and per-row settings only. Each image is decoded later by ``load_image`` (the only
decoder) in the process that works on it, so a bad file is one failed item, not a failed listing. Nothing
here imports torch: the command line checks its input before the libraries load.

- a **folder**: every PNG, JPEG, WebP, GIF, BMP and TIFF below it (hidden files and folders skipped),
  sorted by path;
- a **CSV** or **JSONL** file: one row per image, the image in column ``image`` (a path relative to the
  file, or an ``http(s)://`` URL); other columns named like settings (``steps``, ``mode``, ``seed``, ...)
  are that row's settings, validated per row;
- a **saved dataset** (a folder written by ``Dataset.save_to_disk``) or ``hf://datasets/OWNER/NAME`` on the
  Hub: the image column (the one ``datasets.Image`` column, or ``image_column=``), setting-named columns as
  per-row settings. Images are read as bytes (``Image(decode=False)``) and decoded by ``load_image``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..extras import require
from ..images import load_image
from ..settings import SettingSpec, setting_specs

#: File endings a folder listing takes as images (load_image decides whether they really are).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
#: The column that names each row's image in a CSV or JSONL list (``image_column=`` picks another).
IMAGE_COLUMN = "image"
#: How a dataset on the Hugging Face Hub is named as INPUT.
HUB_PREFIX = "hf://datasets/"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


class SourceError(ValueError):
    """INPUT cannot be listed: missing, empty, unreadable, or without an image column."""


@dataclass(frozen=True)
class SourceItem:
    """One listed image: how outputs name it, its per-row settings, and how to open it.

    ``error`` is set for a row that could not even be listed (no image, not JSON): the batch logs it and
    carries on.
    """

    label: str  # the manifest's "input": the path as listed, or "train[12]" for a dataset row
    stem: str  # a short, file-name-safe name for output files
    settings: Mapping[str, Any] = field(default_factory=dict)  # as given; validated per row later
    opener: Callable[[], Any] | None = field(default=None, compare=False, repr=False)
    error: str | None = None

    def load(self) -> Any:
        """The decoded RGB image (``ImageInputError`` for anything that is not one)."""
        if self.opener is None:
            raise SourceError(f"{self.label} has no image: {self.error}")
        return load_image(self.opener())


@dataclass
class Source:
    """A listed INPUT: its items in order, and the columns it ignored (neither image nor a setting)."""

    description: str
    items: list[SourceItem]
    ignored_columns: tuple[str, ...] = ()
    location: str = ""  # INPUT as it was given

    def __len__(self) -> int:
        return len(self.items)


def open_source(
    location: str | os.PathLike[str], *, image_column: str | None = None, split: str | None = None,
    exclude: str | os.PathLike[str] | None = None,
) -> Source:
    """List INPUT: a folder, a ``.csv`` / ``.jsonl`` file, a saved dataset folder or ``hf://datasets/NAME``.

    ``exclude`` is a folder never listed (the output folder, when it lies inside INPUT).
    """
    text = os.fspath(location)
    source = _listed(text, image_column, split, exclude)
    source.location = text
    return source


def _listed(
    text: str, image_column: str | None, split: str | None, exclude: str | os.PathLike[str] | None
) -> Source:
    if text.startswith(HUB_PREFIX):
        return _hub_dataset(text.removeprefix(HUB_PREFIX), image_column, split)
    path = Path(text)
    if not path.exists():
        raise SourceError(
            f"INPUT {text!r} does not exist: name a folder of images, a .csv or .jsonl list, a saved dataset "
            f"folder, or {HUB_PREFIX}OWNER/NAME."
        )
    if path.is_dir():
        if _is_saved_dataset(path):
            return _saved_dataset(path, image_column, split)
        _refuse_split(split, text)
        return _folder(path, exclude)
    _refuse_split(split, text)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_list(path, image_column or IMAGE_COLUMN)
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_list(path, image_column or IMAGE_COLUMN)
    raise SourceError(
        f"INPUT {text!r} is a {suffix or 'suffix-less'} file: name a folder of images, a .csv or .jsonl list, "
        "or a saved dataset folder."
    )


# -- folders -----------------------------------------------------------------------------------


#: What a batch names its PNGs (batch.run.output_name): ``{stem}-{16 hex}-seed{N}-{index}.png``.
_OUTPUT_NAME = re.compile(r"-[0-9a-f]{16}-seed\d+-\d+(-\d+)?\.png$")


def _folder(folder: Path, exclude: str | os.PathLike[str] | None) -> Source:
    skip = Path(exclude).resolve() if exclude is not None else None
    own_outputs = False
    if skip is not None and folder.resolve().is_relative_to(skip):
        # OUT holds INPUT (or is it): excluding OUT would exclude everything; leave out only the batch's PNGs.
        skip, own_outputs = None, True
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        if own_outputs and _OUTPUT_NAME.search(path.name):
            continue
        if path.is_file():
            found.append(relative)
    if not found:
        raise SourceError(
            f"The folder {str(folder)!r} holds no images (PNG, JPEG, WebP, GIF, BMP, TIFF): name another INPUT."
        )
    items = [
        SourceItem(label=relative.as_posix(), stem=_stem(relative.stem), opener=_constant(folder / relative))
        for relative in sorted(found, key=lambda p: p.as_posix())
    ]
    return Source(f"folder {str(folder)!r} ({len(items)} images)", items)


# -- CSV and JSONL lists -----------------------------------------------------------------------


def _csv_list(path: Path, image_column: str) -> Source:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SourceError(f"Cannot read the CSV file {str(path)!r}: {err}.") from None
    if image_column not in columns:
        raise SourceError(
            f"The CSV file {str(path)!r} has no {image_column!r} column (its columns: {', '.join(columns) or 'none'}): "
            "add one naming each row's image."
        )
    specs = {spec.name: spec for spec in setting_specs()}
    items = []
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        where = f"{path.name} row {number}"
        image = (row.get(image_column) or "").strip()
        settings = {name: setting_from_text(specs[name], value) for name, value in row.items()
                    if name in specs and value is not None and value.strip() != ""}
        items.append(_listed_item(path.parent, image, settings, where, image_column))
    ignored = tuple(name for name in columns if name != image_column and name not in specs)
    return _list_source(path, items, ignored)


def _jsonl_list(path: Path, image_column: str) -> Source:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SourceError(f"Cannot read the JSONL file {str(path)!r}: {err}.") from None
    names = {spec.name for spec in setting_specs()}
    items, ignored = [], {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            items.append(SourceItem(label=where, stem=f"line{number}", error=f"not JSON ({err.msg})."))
            continue
        except (ValueError, RecursionError):  # nested thousands deep, or a number of thousands of digits
            items.append(SourceItem(label=where, stem=f"line{number}",
                                    error="JSON no row can be (nested too deeply, or a number too long to read)."))
            continue
        if not isinstance(row, dict):
            items.append(SourceItem(label=where, stem=f"line{number}",
                                    error=f"not a JSON object with an {image_column!r} key."))
            continue
        image = row.get(image_column)
        settings = {name: value for name, value in row.items() if name in names}
        ignored.update(dict.fromkeys(name for name in row if name != image_column and name not in names))
        items.append(_listed_item(path.parent, image if isinstance(image, str) else "", settings, where,
                                  image_column))
    return _list_source(path, items, tuple(ignored))


def _listed_item(base: Path, image: str, settings: dict[str, Any], where: str, column: str) -> SourceItem:
    image = image.strip()
    if not image:
        return SourceItem(label=where, stem=_stem(where), settings=settings,
                          error=f"no image: its {column!r} value is empty or missing.")
    if _URL.match(image):
        name = image.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        return SourceItem(label=image, stem=_stem(Path(name).stem), settings=settings, opener=_constant(image))
    return SourceItem(label=image, stem=_stem(Path(image).stem), settings=settings, opener=_constant(base / image))


def _list_source(path: Path, items: list[SourceItem], ignored: tuple[str, ...]) -> Source:
    if not items:
        raise SourceError(f"The list {str(path)!r} has no rows: add one row per image.")
    return Source(f"list {str(path)!r} ({len(items)} rows)", items, ignored)


def setting_from_text(spec: SettingSpec, text: str) -> Any:
    """A CSV cell as the setting's type; text that does not parse is passed on unchanged, so the settings'
    own check names it in the usual sentence (``steps must be a number, not 'many'.``)."""
    value = text.strip()
    if spec.kind in ("int", "size"):
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                pass
    elif spec.kind == "float":
        try:
            return float(value)
        except ValueError:
            pass
    elif spec.kind == "bool":
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
    return value


# -- datasets ------------------------------------------------------------------------------------


def _is_saved_dataset(folder: Path) -> bool:
    """What ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` leave behind."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def _saved_dataset(folder: Path, image_column: str | None, split: str | None) -> Source:
    datasets = require("datasets", "batch", "Reading a saved datasets folder")
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds; each becomes one sentence
        raise SourceError(f"Cannot read the saved dataset {str(folder)!r}: {_first_line(err)}") from None
    return _dataset_source(loaded, str(folder), image_column, split)


def _hub_dataset(name: str, image_column: str | None, split: str | None) -> Source:
    if not name.strip("/"):
        raise SourceError(f"{HUB_PREFIX} needs a dataset name: {HUB_PREFIX}OWNER/NAME.")
    datasets = require("datasets", "batch", "Reading a Hugging Face dataset")
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - offline, missing, gated: one sentence whichever it is
        raise SourceError(
            f"Cannot load the dataset {name!r} from the Hugging Face Hub: {_first_line(err)} "
            "(offline? download it once, or save it with save_to_disk and pass that folder)."
        ) from None
    return _dataset_source(loaded, HUB_PREFIX + name, image_column, split)


def _dataset_source(loaded: Any, where: str, image_column: str | None, split: str | None) -> Source:
    datasets = require("datasets", "batch", "Reading a datasets dataset")
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        chosen = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
        if chosen not in splits:
            raise SourceError(
                f"The dataset {where!r} has the splits {', '.join(splits)}: choose one with --split."
            )
        dataset, split = loaded[chosen], chosen
    else:
        own = str(loaded.split) if getattr(loaded, "split", None) is not None else None
        if split is not None and own is not None and split != own:
            raise SourceError(f"The dataset {where!r} holds the split {own!r} alone, not {split!r}.")
        dataset, split = loaded, split or own
    column = _image_column(dataset, where, image_column, datasets)
    if isinstance(dataset.features[column], datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))  # bytes: load_image decodes
    names = {spec.name for spec in setting_specs()}
    setting_columns = [name for name in dataset.column_names if name in names]
    rows = dataset.select_columns(setting_columns).to_list() if setting_columns else [{}] * len(dataset)
    prefix = split or ""
    items = [
        SourceItem(
            label=f"{prefix}[{index}]", stem=f"{prefix or 'row'}-{index}",
            settings={name: value for name, value in row.items() if value is not None},
            opener=_dataset_opener(dataset, column, index),
        )
        for index, row in enumerate(rows)
    ]
    if not items:
        raise SourceError(f"The dataset {where!r} has no rows.")
    ignored = tuple(name for name in dataset.column_names if name != column and name not in names)
    return Source(f"dataset {where!r}{f' split {split!r}' if split else ''} ({len(items)} rows)", items, ignored)


def _image_column(dataset: Any, where: str, chosen: str | None, datasets: Any) -> str:
    columns = list(dataset.column_names)
    if chosen is not None:
        if chosen not in columns:
            raise SourceError(f"The dataset {where!r} has no column {chosen!r} (its columns: {', '.join(columns)}).")
        return chosen
    images = [name for name in columns if isinstance(dataset.features[name], datasets.Image)]
    if len(images) == 1:
        return images[0]
    if not images and IMAGE_COLUMN in columns:
        return IMAGE_COLUMN
    found = f"several image columns ({', '.join(images)})" if images else f"no image column ({', '.join(columns)})"
    raise SourceError(f"The dataset {where!r} has {found}: name the one to use with --image-column.")


def _dataset_opener(dataset: Any, column: str, index: int) -> Callable[[], Any]:
    def opener() -> Any:
        value = dataset[index][column]
        if isinstance(value, Mapping):  # Image(decode=False): {"bytes": ..., "path": ...}
            return value.get("bytes") or value.get("path")
        return value  # a path, bytes, or an array

    return opener


# -- small helpers -----------------------------------------------------------------------------


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


def _stem(text: str) -> str:
    """A file-name-safe short name: letters, digits, ``._-`` (no ``..``, which save_png refuses in a prefix)."""
    return re.sub(r"\.{2,}", ".", _UNSAFE.sub("_", text)).strip("._")[:40] or "image"


def _refuse_split(split: str | None, where: str) -> None:
    if split is not None:
        raise SourceError(f"--split applies to datasets only; {where!r} is not one.")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if line.endswith((".", "!", "?")) else line + "."
