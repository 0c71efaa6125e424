"""``imageprompt``: the engine from a terminal.

    imageprompt generate cat.jpg -o out/ --model tiny --steps 20 --seed 1
    imageprompt generate cat.jpg -o out/ --structure edges --structure-image sketch.png

Bad input is one line on stderr naming the file, and exit code 2. Input images, ``--negative-image``,
``--structure-image``, ``-o`` and the settings are all checked before torch is imported, so a typo costs
a fraction of a second, not the ten of loading the libraries. The run itself is driven by the same
:class:`~imageprompt_widgets.controller.Controller` as the notebook panel: its events feed the progress
bars (download bytes, then denoising steps with the total known from the start).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .presets import PRESETS, default_preset_name, resolve_preset
from .settings import GenerationSettings, SettingSpec, setting_specs

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # what a shell reports for Ctrl-C


class OutputFolderError(ValueError):
    """``-o`` names something that cannot become the output folder."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imageprompt",
        description="Use images as the prompt of Stable Diffusion (CLIP image embeddings instead of text).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate",
        help="generate images from one or more input images and write PNGs",
        description="Generate images from input images; writes PNGs (recipe in their metadata) and prints their paths.",
    )
    gen.add_argument("images", nargs="+", metavar="IMAGE", help="input image files (PNG, JPEG, WebP, ...)")
    gen.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the PNGs")
    gen.add_argument(
        "--model",
        default=None,
        help=f"preset ({', '.join(PRESETS)}) or a local model folder; default: {default_preset_name()} "
        "(set IMAGEPROMPT_MODEL to change it)",
    )
    for spec in setting_specs():
        flag = "--" + spec.name.replace("_", "-")
        kwargs: dict = {"default": None, "help": setting_help(spec)}
        if spec.kind == "choice":
            kwargs["choices"] = spec.choices
        elif spec.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif spec.kind == "float":
            kwargs["type"] = float
        elif spec.kind in ("int", "size"):
            kwargs["type"] = int
        gen.add_argument(flag, dest=spec.name, **kwargs)
    gen.add_argument(
        "--negative-image", nargs="+", default=None, metavar="IMAGE",
        help="images that guidance pushes away from (implies --negative image)",
    )
    gen.add_argument(
        "--structure-image", default=None, metavar="PATH",
        help="the picture whose layout --structure edges/img2img keeps (default: the first input image)",
    )
    gen.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    gen.add_argument("--no-safety-checker", action="store_true", help="switch the model's safety checker off")
    gen.add_argument("--save-trace", action="store_true", help="also write every intermediate tensor (safetensors)")
    return parser


def setting_help(spec: SettingSpec) -> str:
    """``denoising steps; 1 to 150 (default: 30)``: what a setting does, its range and default (settings.py)."""

    def number(value: float) -> str:
        return str(int(value)) if spec.kind in ("int", "size") else f"{value:g}"

    text = spec.help
    if spec.min is not None and spec.max is not None:
        each = "each " if spec.kind == "floats" else ""
        text += f"; {each}{number(spec.min)} to {number(spec.max)}"
    default = spec.default
    shown = "none" if default is None or default == () else '""' if default == "" else default
    return f"{text} (default: {shown})".replace("%", "%%")  # argparse %-formats help strings


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    from .images import load_images  # PIL and numpy only: every check below runs before torch is imported

    chosen = {spec.name: getattr(args, spec.name) for spec in setting_specs() if getattr(args, spec.name) is not None}
    try:
        check_output_folder(args.output)
        preset = resolve_preset(args.model)
        # The preset's own starting settings (variations: single/zeros), as the API and the panel apply them.
        settings = GenerationSettings.from_kwargs(**{**dict(preset.defaults), **chosen})
        images = load_images(args.images)  # every file is checked before any weights load
        negative_images = load_images(args.negative_image) if args.negative_image else None
        structure_image = load_images(args.structure_image)[0] if args.structure_image else None
    except ValueError as err:  # our input errors are all ValueError subclasses with readable messages
        return _bad_input(err)

    from .controller import Controller
    from .runners import InlineRunner

    controller = Controller(
        preset, runner=InlineRunner(), previews=False, device=args.device,
        safety_checker=False if args.no_safety_checker else None,
    )
    bars = TerminalProgress()
    controller.subscribe(bars)
    try:
        job = controller.submit(images, settings, negative_image=negative_images, structure_image=structure_image)
        result = job.future.result()
    except ValueError as err:
        return _bad_input(err)
    finally:
        bars.close()
    if result is None or result.cancelled:
        print("imageprompt: stopped; nothing was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:  # a full disk or a folder gone read-only meanwhile: one line, not a traceback (SaveError)
        paths = result.save(args.output)
        for path in paths:
            print(path)
        if args.save_trace:
            print(result.trace.save(paths[0].with_suffix(".trace.safetensors"), recipe=result.recipe))
    except ValueError as err:
        return _bad_input(err)
    print(f"wrote {len(paths)} image(s) to {args.output}", file=sys.stderr)
    return 0


def _bad_input(err: ValueError) -> int:
    print(f"imageprompt: error: {err}", file=sys.stderr)
    return EXIT_BAD_INPUT


def check_output_folder(output: str | os.PathLike) -> None:
    """``-o`` must be a folder, or a path where one can be created: checked before minutes of work."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"-o {str(output)!r} is an existing file, not a folder: name a folder for the PNGs.")
    existing = next(folder for folder in (path, *path.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise OutputFolderError(f"-o {str(output)!r} cannot be created: {str(existing)!r} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(
            f"-o {str(output)!r} is not writable: {str(existing)!r} does not let you create files; choose another folder."
        )


class TerminalProgress:
    """A controller subscriber for a terminal: loading messages on stderr, tqdm bars for bytes and steps."""

    def __init__(self, file: Any = None) -> None:
        self.file = file or sys.stderr
        self.download: Any = None
        self.steps: Any = None

    def __call__(self, event: Any) -> None:
        from tqdm.auto import tqdm

        from .controller import Loading, Started, Step, Waiting

        if isinstance(event, Loading) and event.download is not None:
            progress = event.download
            if self.download is None:
                self.download = tqdm(total=progress.total, desc="downloading", unit="B", unit_scale=True,
                                     file=self.file)
            self.download.total = progress.total  # snapshots announce their files' sizes as they start
            self.download.update(progress.done - self.download.n)
        elif isinstance(event, Loading):
            self._close_download()
            print(event.message, file=self.file)
        elif isinstance(event, Waiting):
            print("Waiting for another run on the same model to finish…", file=self.file)
        elif isinstance(event, Started):
            self._close_download()
            if event.reason:
                print(f"{event.total_steps} denoising steps: {event.reason}", file=self.file)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
