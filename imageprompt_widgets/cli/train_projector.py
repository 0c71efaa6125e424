"""``imageprompt train-projector``: train a projector (``mode="projector"``) for a model on a folder of pictures.

    imageprompt train-projector --model sd15 --images photos/ -o my_projector/ --steps 2000   # on a GPU

then ``ImagePromptPipeline.from_preset("sd15", projector="my_projector").generate(image, mode="projector")``.

Captions are optional: ``photo.txt`` beside ``photo.png`` is its caption, else the text side is ``""``. Only the
projector learns (methods/projector.py); SD and the vision tower stay frozen. Exit codes: 0 trained and saved,
2 nothing ran (one line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..presets import resolve_preset
from ..settings import SettingsError
from .common import EXIT_OK, bad_input


def add_parser(commands: Any) -> None:
    """Add ``train-projector`` to the ``imageprompt`` parser's subcommands."""
    command = commands.add_parser(
        "train-projector",
        help="train a projector (vision tokens → SD's text-token space) for mode='projector'",
        description="Train a small network (LayerNorm, Linear, SiLU, Linear) from the model's vision tokens into "
        "SD's text-token space with the frozen UNet's diffusion loss, on the pictures of a folder (captions "
        "optional: name.txt beside name.png). Writes projector.safetensors and projector.json.",
        epilog="exit codes: 0 trained and saved; 2 nothing ran (bad folder or option).",
    )
    command.add_argument("--model", default=None, help="preset or local model folder (default: the usual default)")
    command.add_argument("--images", required=True, metavar="FOLDER", help="pictures to train on")
    command.add_argument("-o", "--output", default="projector", metavar="FOLDER",
                         help="where to write the projector (default: ./projector)")
    command.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    command.add_argument("--batch-size", type=int, default=4, metavar="N", help="pictures per step (default: 4)")
    command.add_argument("--lr", type=float, default=1e-4, help="AdamW's learning rate (default: 1e-4)")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.steps < 1 or args.batch_size < 1:
            raise SettingsError("--steps and --batch-size must be at least 1.")
        if not Path(args.images).is_dir():
            raise SettingsError(f"--images {args.images!r} is not a folder.")
        preset = resolve_preset(args.model)
        from ..methods.projector import image_files

        image_files(args.images)
    except ValueError as err:
        return bad_input(err)

    from ..engine.pipeline import ImagePromptPipeline
    from ..methods.projector import train

    pipe = ImagePromptPipeline.from_preset(preset, device=args.device)
    train(pipe, args.images, args.output, steps=args.steps, batch=args.batch_size, lr=args.lr, seed=args.seed,
          log=lambda line: print(line, file=sys.stderr))
    print(f"imageprompt: wrote the projector to {args.output} (load it with projector={str(args.output)!r})")
    return EXIT_OK
