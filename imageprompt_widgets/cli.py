"""``imageprompt``: the engine from a terminal.

    imageprompt generate cat.jpg -o out/ --model tiny --steps 20 --seed 1
    imageprompt generate cat.jpg -o out/ --structure edges --structure-image sketch.png

Bad input is one line on stderr naming the file, and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import cli_batch
from .presets import PRESETS, default_preset_name
from .settings import GenerationSettings, SettingSpec, setting_specs

EXIT_BAD_INPUT = 2


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
    cli_batch.add_commands(commands)  # batch, embed
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
    if args.command in cli_batch.COMMANDS:
        return cli_batch.COMMANDS[args.command](args)
    return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .images import load_images
    from .pipeline import ImagePromptPipeline

    chosen = {spec.name: getattr(args, spec.name) for spec in setting_specs() if getattr(args, spec.name) is not None}
    try:
        settings = GenerationSettings.from_kwargs(**chosen)
        images = load_images(args.images)  # every file is checked before any weights load
        negative_images = load_images(args.negative_image) if args.negative_image else None
        structure_image = load_images(args.structure_image)[0] if args.structure_image else None
        pipe = ImagePromptPipeline.from_preset(
            args.model,
            device=args.device,
            safety_checker=False if args.no_safety_checker else None,
            on_status=lambda message: print(message, file=sys.stderr),
        )
        with tqdm(total=settings.steps, desc="denoising", unit="step", file=sys.stderr) as bar:

            def on_step(info) -> None:
                bar.total = info.total
                bar.update(info.step - bar.n)

            result = pipe.generate(
                images, settings, negative_image=negative_images, structure_image=structure_image, on_step=on_step
            )
    except ValueError as err:  # our input errors are all ValueError subclasses with readable messages
        print(f"imageprompt: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    paths = result.save(args.output)
    for path in paths:
        print(path)
    if args.save_trace:
        trace_path = result.trace.save(paths[0].with_suffix(".trace.safetensors"), recipe=result.recipe)
        print(trace_path)
    print(f"wrote {len(paths)} image(s) to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
