"""``imageprompt``: the engine from a terminal, one module per command.

    imageprompt generate cat.jpg -o out/ --model toy --steps 20 --seed 1
    imageprompt batch photos/ -o out/ --seeds 0,1,2
    imageprompt embed photos/ -o photos.safetensors
    imageprompt --version

A command is a module with ``add_parser(commands)`` and ``run(args) -> exit code``, named once in
:data:`COMMANDS`. Every module here imports only argparse-level code at import time, so bad input is refused
before torch loads. ``python -m imageprompt_widgets.cli`` and the ``imageprompt`` entry point both call
:func:`main`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from types import ModuleType

from .._version import __version__
from . import batch, embed, generate

#: Every ``imageprompt`` command: its name and the module that parses and runs it.
COMMANDS: dict[str, ModuleType] = {"generate": generate, "batch": batch, "embed": embed}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imageprompt",
        description="Use images as the prompt of Stable Diffusion (CLIP image embeddings instead of text).",
    )
    # What a bug report or a class's set-up sheet needs first; also a check that the install worked.
    parser.add_argument("--version", action="version", version=f"imageprompt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command].run(args)
