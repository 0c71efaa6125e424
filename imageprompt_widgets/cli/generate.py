"""``imageprompt generate``: the engine from a terminal.

    imageprompt generate cat.jpg -o out/ --model tiny --steps 20 --seed 1
    imageprompt generate cat.jpg -o out/ --structure edges --structure-image sketch.png
    imageprompt generate --prompt "a red circle on a blue background" -o out/ --model toy   (words only)

Bad input is one line on stderr naming the file, and exit code 2. Input images, ``--negative-image``,
``--structure-image``, ``-o`` and the settings are all checked before torch is imported, so a typo costs
a fraction of a second, not the ten of loading the libraries. The run itself is driven by the same
:class:`~imageprompt_widgets.engine.controller.Controller` as the notebook panel: its events feed the progress
bars (download bytes, then denoising steps with the total known from the start).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..loading.memory import MEMORY_LEVELS
from ..presets import PRESETS, default_preset_name, resolve_preset
from ..settings import GenerationSettings, SettingsError
from .common import (
    EXIT_INTERRUPTED,
    TerminalProgress,
    add_setting_flags,
    bad_input,
    check_output_folder,
    chosen_settings,
)


def parse_lora(text: str) -> tuple[str, float]:
    """``SOURCE`` or ``SOURCE=WEIGHT`` → ``(source, weight)``; a sentence for a weight that is not a number."""
    named = "=" in text and not os.path.exists(os.path.expanduser(text))  # a file may have '=' in its name
    source, _, weight = text.rpartition("=") if named else (text, "", "1")
    try:
        value = float(weight)
    except ValueError:
        raise SettingsError(f"--lora {text!r}: the weight after '=' must be a number, e.g. --lora style.safetensors=0.8.") from None
    if not source:
        raise SettingsError(f"--lora {text!r} names no LoRA: give a .safetensors file, a folder or a Hub id.")
    from ..loading.lora import check_weight, split_source  # imports torch: only when a LoRA is asked for

    split_source(source)  # a missing file or a pickle is refused before the model loads
    return source, check_weight(value, source)


def check_words_only(settings: GenerationSettings) -> None:
    """No IMAGE: the run must be able to draw from the prompt alone, and have one."""
    if not settings.text_only:
        raise SettingsError(f"--mode {settings.mode} needs an IMAGE: give one, or leave --mode out (words only, "
                            "with --prompt).")
    if not settings.prompt.strip():
        raise SettingsError('Give an IMAGE or a --prompt (e.g. --prompt "a red circle on a blue background").')


def add_parser(commands: Any) -> None:
    """Add ``generate`` to the ``imageprompt`` parser's subcommands."""
    gen = commands.add_parser(
        "generate",
        help="generate images from input images (or from a prompt alone) and write PNGs",
        description="Generate images from input images, or from words alone (--prompt without IMAGE: mode text); "
        "writes PNGs (recipe in their metadata) and prints their paths.",
    )
    gen.add_argument("images", nargs="*", metavar="IMAGE",
                     help="input image files (PNG, JPEG, WebP, ...); none: draw from --prompt alone")
    gen.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the PNGs")
    gen.add_argument(
        "--model",
        default=None,
        help=f"preset ({', '.join(PRESETS)}) or a local model folder; default: {default_preset_name()} "
        "(set IMAGEPROMPT_MODEL to change it)",
    )
    add_setting_flags(gen)
    gen.add_argument(
        "--negative-image", nargs="+", default=None, metavar="IMAGE",
        help="images that guidance pushes away from (implies --negative image)",
    )
    gen.add_argument(
        "--structure-image", default=None, metavar="PATH",
        help="the picture whose layout --structure edges/img2img keeps (default: the first input image)",
    )
    gen.add_argument(
        "--lora", action="append", default=[], metavar="SOURCE[=WEIGHT]",
        help="a LoRA (.safetensors file, folder or Hub id; tiny-lora offline) at a weight (default 1); repeatable",
    )
    gen.add_argument(
        "--memory", default=None, choices=MEMORY_LEVELS,
        help="for small GPUs: balanced = attention slicing and VAE tiling, low = CPU offload of whole models, "
        "lowest = sequential offload (slowest); default: default, but low for SDXL on a CUDA GPU under 20 GB",
    )
    gen.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    gen.add_argument("--no-safety-checker", action="store_true", help="switch the model's safety checker off")
    gen.add_argument("--save-trace", action="store_true", help="also write every intermediate tensor (safetensors)")
    gen.add_argument("--verbose", action="store_true", help="also say where the run's time went, stage by stage")


def run(args: argparse.Namespace) -> int:
    from ..images import load_images  # PIL and numpy only: every check below runs before torch is imported

    chosen = chosen_settings(args)
    try:
        loras = [parse_lora(text) for text in args.lora]
        check_output_folder(args.output)
        preset = resolve_preset(args.model)
        if not args.images:  # words only: the text mode unless a mode that can run without an image was chosen
            chosen.setdefault("mode", "text")
        # The preset's own starting settings (variations: single/zeros), as the API and the panel apply them.
        settings = GenerationSettings.from_kwargs(**{**dict(preset.defaults), **chosen})
        if not args.images:
            check_words_only(settings)
        images = load_images(args.images) if args.images else None  # every file is checked before weights load
        negative_images = load_images(args.negative_image) if args.negative_image else None
        structure_image = load_images(args.structure_image)[0] if args.structure_image else None
    except ValueError as err:  # our input errors are all ValueError subclasses with readable messages
        return bad_input(err)

    from ..engine.controller import Controller
    from ..engine.runners import InlineRunner

    controller = Controller(
        preset, runner=InlineRunner(), previews=False, device=args.device,
        safety_checker=False if args.no_safety_checker else None, memory=args.memory, loras=loras,
    )
    bars = TerminalProgress()
    controller.subscribe(bars)
    try:
        job = controller.submit(images, settings, negative_image=negative_images, structure_image=structure_image)
        result = job.future.result()
    except ValueError as err:
        return bad_input(err)
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
        return bad_input(err)
    print(f"wrote {len(paths)} image(s) to {args.output}", file=sys.stderr)
    if args.verbose:
        print(f"time: {result.describe_timings()}", file=sys.stderr)
    return 0

