"""What the command line's subcommands share: setting flags built from settings.py, checks of -o made
before torch is imported, the one-line error, and the terminal's view of a controller's events.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ..presets import PRESETS, default_preset_name
from ..settings import SettingSpec, setting_specs

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # what a shell reports for Ctrl-C


class OutputPathError(ValueError):
    """``-o`` names something that cannot become the output folder (or file)."""


def setting_help(spec: SettingSpec) -> str:
    """``denoising steps; 1 to 150 (default: 30)``: what a setting does, its range and default (settings.py)."""

    def number(value: float) -> str:
        return str(int(value)) if spec.kind in ("int", "size") else f"{value:g}"

    text = spec.help
    if spec.min is not None and spec.max is not None:
        each = "each " if spec.kind == "floats" else ""
        text += f"; {each}{number(spec.min)} to {number(spec.max)}"
    return f"{text} (default: {shown(spec.default)}{preset_defaults(spec.name)})".replace("%", "%%")  # argparse %-formats


def shown(value: Any) -> str:
    return "none" if value is None or value == () else '""' if value == "" else str(value)


def preset_defaults(name: str) -> str:
    """``"; 20 on toy; 4 on sd15-live, tiny-live"``: the presets that start ``name`` elsewhere (their own
    ``defaults``), so ``--help`` says what a run on each preset really uses when the flag is left out."""
    by_value: dict[str, list[str]] = {}
    if name == "mode":
        return ""  # a preset's method is in its name and note (ip-adapter, caption, variations)
    for preset in PRESETS.values():
        for setting, value in preset.defaults:
            if setting == name:
                by_value.setdefault(shown(value), []).append(preset.name)
    return "".join(f"; {value} on {', '.join(names)}" for value, names in by_value.items())


def add_setting_flags(
    parser: argparse.ArgumentParser, *, only: Collection[str] | None = None, skip: Collection[str] = ()
) -> None:
    """One ``--flag`` per setting (``--guidance-scale``), typed and ranged from its spec; default ``None``
    (= not given), so what a user did not type never overrides a preset's or a row's own value."""
    for spec in setting_specs():
        if spec.name in skip or (only is not None and spec.name not in only):
            continue
        kwargs: dict[str, Any] = {"default": None, "help": setting_help(spec)}
        if spec.kind == "choice":
            kwargs["choices"] = spec.choices
        elif spec.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif spec.kind == "float":
            kwargs["type"] = float
        elif spec.kind in ("int", "size"):
            kwargs["type"] = int
        parser.add_argument("--" + spec.name.replace("_", "-"), dest=spec.name, **kwargs)


def chosen_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings typed on the command line (flags left out are not in the dict)."""
    return {spec.name: getattr(args, spec.name) for spec in setting_specs()
            if getattr(args, spec.name, None) is not None}


def check_output_folder(output: str | os.PathLike[str]) -> None:
    """``-o`` must be a folder, or a path where one can be created: checked before minutes of work."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"-o {str(output)!r} is an existing file, not a folder: name a folder for the PNGs.")
    _check_creatable(path, output)


def check_output_file(output: str | os.PathLike[str]) -> None:
    """``-o`` must name a file that can be written: not a folder, in a folder that exists or can be made."""
    path = Path(output)
    if path.is_dir():
        raise OutputPathError(f"-o {str(output)!r} is a folder: name the file to write.")
    _check_creatable(path.parent if str(path.parent) else Path("."), output)


def _check_creatable(path: Path, output: str | os.PathLike[str]) -> None:
    existing = next(folder for folder in (path, *path.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise OutputPathError(f"-o {str(output)!r} cannot be created: {str(existing)!r} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"-o {str(output)!r} is not writable: {str(existing)!r} does not let you create files; choose another folder."
        )


def bad_input(err: BaseException) -> int:
    """One line on stderr, exit code 2."""
    text = " ".join(str(err).split())
    text = "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)
    print(f"imageprompt: error: {text}", file=sys.stderr)  # control characters in a name print inert
    return EXIT_BAD_INPUT


def is_main_process() -> bool:
    """Whether this is the first (or only) process a launcher started: the one that talks to the terminal."""
    return os.environ.get("RANK", "0") in ("", "0")


class TerminalProgress:
    """A controller subscriber for a terminal: loading messages on stderr, tqdm bars for bytes and (unless
    ``steps=False``, as in a batch that shows a bar of items) denoising steps."""

    def __init__(self, file: Any = None, *, steps: bool = True) -> None:
        self.file = file or sys.stderr
        self.show_steps = steps
        self.download: Any = None
        self.steps: Any = None

    def __call__(self, event: Any) -> None:
        from tqdm.auto import tqdm

        from ..engine.controller import Loading, Started, Step, Waiting

        if isinstance(event, Loading) and event.download is not None:
            progress = event.download
            if self.download is None:
                self.download = tqdm(total=progress.total, desc="downloading", unit="B", unit_scale=True,
                                     file=self.file)
            self.download.total = progress.total  # snapshots announce their files' sizes as they start
            self.download.update(progress.done - self.download.n)
        elif isinstance(event, Loading):
            self._close_download()
            tqdm.write(event.message, file=self.file)  # above a batch's bar of items, when there is one
        elif isinstance(event, Waiting):
            tqdm.write("Waiting for another run on the same model to finish…", file=self.file)
        elif isinstance(event, Started):
            self._close_download()
            if not self.show_steps:
                return
            if event.reason:
                tqdm.write(f"{event.total_steps} denoising steps: {event.reason}", file=self.file)
            self.steps = tqdm(total=event.total_steps, desc="denoising", unit="step", file=self.file)
        elif isinstance(event, Step) and self.steps is not None:
            self.steps.update(event.step - self.steps.n)

    def _close_download(self) -> None:
        if self.download is not None:
            self.download.close()
            self.download = None

    def close(self) -> None:
        self._close_download()
        if self.steps is not None:
            self.steps.close()
            self.steps = None


INPUT_HELP = (
    "a folder of images; a .csv or .jsonl list with an 'image' column (paths relative to the list, or URLs){rows}; "
    "a saved Hugging Face datasets folder; or hf://datasets/OWNER/NAME"
)


def add_source_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None,
        help=f"preset ({', '.join(PRESETS)}) or a local model folder; default: {default_preset_name()} "
        "(set IMAGEPROMPT_MODEL to change it)",
    )
    parser.add_argument("--image-column", default=None, metavar="NAME",
                        help="the column naming each image (lists: default 'image'; datasets: the Image column)")
    parser.add_argument("--split", default=None, help="the split of a dataset (default: train, or its only split)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, mps (default: the best available; under accelerate, each process's GPU)")


def note_ignored(source: Any, settings_used: bool = True) -> None:
    if source.ignored_columns and is_main_process():
        what = "not settings" if settings_used else "embed reads the images only"
        print(f"imageprompt: note: ignoring column(s) {', '.join(source.ignored_columns)} ({what}).", file=sys.stderr)


def run_many(work: Any, *, stopped: str, written: Any) -> int:
    """Run a many-item command (batch, embed) with loading progress on the main process: ``work(on_event)`` returns
    a report with ``summary()`` and ``ok``; ``written(report)`` is the file printed on stdout. A ValueError (the
    model cannot load, the disk is full) is one line and exit 2; Ctrl-C says ``stopped`` and exits 130."""
    loading = TerminalProgress(steps=False) if is_main_process() else None  # messages and download bytes
    try:
        report = work(loading)
    except ValueError as err:
        return bad_input(err)
    except KeyboardInterrupt:
        print(f"imageprompt: stopped; {stopped}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if loading is not None:
            loading.close()
        from ..batch.sharding import leave_process_group

        leave_process_group()  # every process, before the interpreter's exit (gloo aborts at exit otherwise)
    if is_main_process():
        print(f"imageprompt: {report.summary()}", file=sys.stderr)
        print(written(report))
    return EXIT_OK if report.ok else EXIT_ITEMS_FAILED
