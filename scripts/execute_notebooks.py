"""Run the example notebooks on the toy world and keep their outputs, so GitHub and the site show pictures.

    python scripts/execute_notebooks.py                 # execute examples/*.ipynb and write their outputs
    python scripts/execute_notebooks.py quickstart      # only the notebooks whose names contain a word
    python scripts/execute_notebooks.py --check         # execute copies; exit 1 if a committed output is stale
    python scripts/execute_notebooks.py --compare A B   # the same comparison between two files, no kernel

Every run uses the same conditions as CI's (tests/test_notebooks.py imports :func:`execute`): the ``toy``
preset (trained, shipped in the package) and its tiny twins, offline, one torch thread, the examples folder
as the working directory. Pictures are shrunk to at most :data:`MAX_IMAGE_WIDTH` pixels wide and to a
256-colour palette, widget state is not stored, and cells carry no timing metadata, so the files stay small and a
rerun on the same machine rewrites them byte for byte.

Stale means (:func:`stale_outputs`): a cell's outputs differ in number, kind or MIME types; a text differs
after :func:`normalise_text` (memory addresses, durations, rates, temporary paths and the package's folder
are the only parts allowed to move) beyond :func:`texts_agree`'s rounding of printed decimals; or a picture
differs in size or beyond :class:`ImageTolerance` (torch's float arithmetic differs slightly between CPUs, and
matplotlib's text rendering between versions: a pixel-exact check would fail on a machine that is merely
different, while a changed picture, even one tile of a grid, moves far more).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nbformat
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
#: What every execution sees: the toy world, offline, one thread (a shared 2-core machine spins otherwise).
ENVIRONMENT = {"IMAGEPROMPT_MODEL": "toy", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
#: Seconds one cell may take (the first one may build the tiny twins).
CELL_TIMEOUT = 300
#: Pictures wider than this are shrunk (a notebook column on GitHub and on the site is about this wide).
MAX_IMAGE_WIDTH = 720
#: Pictures under this many bytes (and narrow enough) are kept exactly as the notebook made them.
SMALL_IMAGE_BYTES = 16 * 1024
IMAGE_TYPES = ("image/png", "image/jpeg")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@dataclass(frozen=True)
class ImageTolerance:
    """How far a fresh picture may stray from the committed one and still count as the same picture.

    ``mean_difference``: the mean absolute difference over all pixels and channels, in 0..255 levels.
    ``changed_share``: the share of pixels where some channel moved by more than ``changed_level``.
    A different CPU moves a toy picture by a level or two here and there; a caption's timing ("0.4 s" to
    "0.5 s") changes well under 0.5 % of a grid; a changed picture or one changed tile of a 15-tile grid
    changes several per cent.
    """

    mean_difference: float = 2.0
    changed_level: int = 48
    changed_share: float = 0.005


TOLERANCE = ImageTolerance()

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")
_DURATION = re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|s|sec|seconds?|min)\b")
_RATE = re.compile(r"\b\d+(?:\.\d+)?\s?(?:[A-Za-z]+/s|s/[A-Za-z]+)\b")  # 8.8 it/s, 171 images/s
_TEMPORARY = re.compile(re.escape(tempfile.gettempdir()) + r"/[^\s'\",)\]]*")
_PACKAGE_FOLDER = re.compile(r"(?:[A-Za-z]:)?[^\s'\"]*[/\\]imageprompt_widgets(?=[/\\])")  # wherever it is installed


def normalise_text(text: str) -> str:
    """The text with what legitimately changes between runs or machines masked: memory addresses, durations
    and rates, temporary paths, and the folder the package is installed in."""
    text = _TEMPORARY.sub("<tmp>", text)
    text = _PACKAGE_FOLDER.sub("<package>", text)
    text = _ADDRESS.sub("0x…", text)
    return _DURATION.sub("<duration>", _RATE.sub("<rate>", text))


#: A printed decimal number (``0.8294``, ``-8.9776e-04``) or an integer; texts are compared piece by piece.
_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
#: How far a printed decimal may move between CPUs (float rounding in its last printed digits): absolute plus
#: relative. Integers (counts, shapes, pixel levels) must stay equal.
DECIMAL_ABSOLUTE = 1e-3
DECIMAL_RELATIVE = 1e-3


def texts_agree(committed: str, fresh: str) -> bool:
    """Whether two normalised texts say the same: equal words and integers, and decimals within the rounding a
    different CPU gives (another machine prints ``-8.9813e-04`` where this one printed ``-8.9776e-04``)."""
    if committed == fresh:
        return True
    old_words, new_words = _NUMBER.split(committed), _NUMBER.split(fresh)
    if old_words != new_words:
        return False
    for old, new in zip(_NUMBER.findall(committed), _NUMBER.findall(fresh), strict=True):
        if old == new:
            continue
        if not (_is_decimal(old) and _is_decimal(new)):
            return False
        a, b = float(old), float(new)
        if abs(a - b) > DECIMAL_ABSOLUTE + DECIMAL_RELATIVE * max(abs(a), abs(b)):
            return False
    return True


def _is_decimal(token: str) -> bool:
    return "." in token or "e" in token.lower()


def _text(value: str | list[str]) -> str:
    return "".join(value) if isinstance(value, list) else value


def _pixels(data: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data))) as picture:
        return np.asarray(picture.convert("RGB"), dtype=np.int16)


def image_difference(committed: str, fresh: str, tolerance: ImageTolerance = TOLERANCE) -> str | None:
    """Why two base64 pictures are not near-equal, or None when they are."""
    old, new = _pixels(committed), _pixels(fresh)
    if old.shape != new.shape:
        return f"size {old.shape[1]}x{old.shape[0]} became {new.shape[1]}x{new.shape[0]}"
    difference = np.abs(old - new)
    mean = float(difference.mean())
    share = float((difference.max(axis=2) > tolerance.changed_level).mean())
    if mean > tolerance.mean_difference or share > tolerance.changed_share:
        return f"pixels moved (mean {mean:.2f} levels, {share:.2%} changed)"
    return None


def _output_difference(committed: dict, fresh: dict) -> str | None:
    kind = committed.get("output_type")
    if kind != fresh.get("output_type") or committed.get("name") != fresh.get("name"):
        return f"a {kind} output became {fresh.get('output_type')}"
    if kind == "stream":
        old, new = normalise_text(_text(committed["text"])), normalise_text(_text(fresh["text"]))
        return None if texts_agree(old, new) else f"{committed['name']} changed:\n  was: {old[:300]!r}\n  now: {new[:300]!r}"
    if kind == "error":
        return f"an error output ({fresh.get('ename')})"
    old_data, new_data = committed.get("data", {}), fresh.get("data", {})
    if set(old_data) != set(new_data):
        return f"types {sorted(old_data)} became {sorted(new_data)}"
    for mime, value in old_data.items():
        if mime in IMAGE_TYPES:
            why = image_difference(value, new_data[mime])
        elif mime == WIDGET_VIEW:  # a new model id each run; the rest must stay
            why = None if {**value, "model_id": ""} == {**new_data[mime], "model_id": ""} else "the widget changed"
        elif isinstance(value, str | list):
            old, new = normalise_text(_text(value)), normalise_text(_text(new_data[mime]))
            why = None if texts_agree(old, new) else f"{mime} changed:\n  was: {old[:300]!r}\n  now: {new[:300]!r}"
        else:
            why = None if value == new_data[mime] else f"{mime} changed"
        if why:
            return why
    return None


def stale_outputs(committed: nbformat.NotebookNode, fresh: nbformat.NotebookNode) -> list[str]:
    """One line per code cell whose committed outputs differ from a fresh run's (empty: up to date)."""
    old_cells = [cell for cell in committed.cells if cell.cell_type == "code"]
    new_cells = [cell for cell in fresh.cells if cell.cell_type == "code"]
    if [c.source for c in old_cells] != [c.source for c in new_cells]:
        return ["the code cells differ: compare a run of the same notebook"]
    problems = []
    for number, (old, new) in enumerate(zip(old_cells, new_cells, strict=True), start=1):
        where = f"code cell {number} ({old.source.strip().splitlines()[0][:60] if old.source.strip() else ''})"
        if old.get("execution_count") is None or len(old.outputs) != len(new.outputs):
            problems.append(f"{where}: {len(old.outputs)} committed outputs, {len(new.outputs)} now")
            continue
        for old_output, new_output in zip(old.outputs, new.outputs, strict=True):
            why = _output_difference(old_output, new_output)
            if why:
                problems.append(f"{where}: {why}")
                break
    return problems


def _shrink(data: str, mime: str) -> str:
    """At most MAX_IMAGE_WIDTH wide; a PNG of any size quantised to a 256-colour palette (plots and toy
    pictures have few colours: a third of the bytes, no visible change). Small pictures stay as they are."""
    raw = base64.b64decode(data)
    with Image.open(io.BytesIO(raw)) as picture:
        if picture.width <= MAX_IMAGE_WIDTH and len(raw) < SMALL_IMAGE_BYTES:
            return data
        picture = picture.convert("RGB")
        if picture.width > MAX_IMAGE_WIDTH:
            height = round(picture.height * MAX_IMAGE_WIDTH / picture.width)
            picture = picture.resize((MAX_IMAGE_WIDTH, height), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        if mime == "image/jpeg":
            picture.save(buffer, format="JPEG", quality=85)
        else:
            picture.quantize(256, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def tidy(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Shrink pictures and drop what only bloats a committed notebook (widget state, metadata of a run)."""
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        for output in cell.outputs:
            for mime in IMAGE_TYPES:
                if mime in output.get("data", {}):
                    output["data"][mime] = _shrink(output["data"][mime], mime)
    return notebook


def execute(path: Path, *, extra_arguments: Sequence[str] = (), extra_cells: Sequence[str] = ()) -> nbformat.NotebookNode:
    """``path`` executed top to bottom on the toy world (ENVIRONMENT), from the examples folder; not saved.

    The kernel inherits this process's environment: ENVIRONMENT is set here for the kernel's start, and put
    back afterwards. ``extra_cells`` run after the notebook's own (CI's Colab check).
    """
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    for source in extra_cells:
        notebook.cells.append(nbformat.v4.new_code_cell(source))
    saved = {name: os.environ.get(name) for name in ENVIRONMENT}
    os.environ.update({name: os.environ.get(name, value) if name == "OMP_NUM_THREADS" else value
                       for name, value in ENVIRONMENT.items()})
    try:
        NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3", extra_arguments=list(extra_arguments),
                       record_timing=False, store_widget_state=False,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return notebook


def write(notebook: nbformat.NotebookNode, path: Path) -> None:
    """Written as Jupyter writes it (nbformat's layout), so an unchanged rerun leaves the diff empty."""
    nbformat.validate(notebook)
    nbformat.write(notebook, path)


def _chosen(words: Sequence[str]) -> list[Path]:
    notebooks = sorted(EXAMPLES.glob("*.ipynb"))
    return [path for path in notebooks if not words or any(word in path.name for word in words)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="only notebooks whose file names contain one of these words")
    parser.add_argument("--check", action="store_true", help="execute copies and report stale committed outputs")
    parser.add_argument("--keep", type=Path, help="with --check: write the fresh runs into this folder")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("COMMITTED", "FRESH"),
                        help="compare two notebook files without executing anything")
    args = parser.parse_args(argv)
    if args.compare:
        problems = stale_outputs(*(nbformat.read(path, as_version=4) for path in args.compare))
        print("\n".join(problems) or "up to date")
        return 1 if problems else 0
    stale = 0
    for path in _chosen(args.names):
        fresh = tidy(execute(path))
        if not args.check:
            write(fresh, path)
            print(f"{path.relative_to(ROOT)}: {path.stat().st_size / 1024:.0f} KiB")
            continue
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            write(fresh, args.keep / path.name)
        problems = stale_outputs(nbformat.read(path, as_version=4), fresh)
        stale += bool(problems)
        print(f"{path.relative_to(ROOT)}: " + ("up to date" if not problems else "STALE\n  " + "\n  ".join(problems)))
    if args.check and stale:
        print("run python scripts/execute_notebooks.py and commit the notebooks", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
