"""``imageprompt batch``: many images from a terminal, on one or several processes.

    imageprompt batch photos/ -o out/ --seeds 0,1,2 --steps 20
    imageprompt batch list.csv -o out/ --manifest parquet
    accelerate launch --multi_gpu --num_processes 4 -m imageprompt_widgets.cli batch photos/ -o out/

INPUT, ``-o``, the flags and the rows' settings are checked before torch is imported. Exit codes: 0 every
item done (or already done), 1 some items failed (each logged on one line, listed in OUT/failed.jsonl; the
others were written), 2 nothing ran (bad INPUT, -o or flag; one line), 130 interrupted (rerun to continue).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..batch.manifest import MANIFEST_FORMATS
from ..presets import resolve_preset
from ..settings import GenerationSettings, SettingsError
from .common import (
    INPUT_HELP,
    add_setting_flags,
    add_source_flags,
    bad_input,
    check_output_folder,
    chosen_settings,
    note_ignored,
    run_many,
)

EXIT_CODES = (
    "exit codes: 0 every item done (or already done); 1 some items failed (one line each, listed in "
    "OUT/failed.jsonl), the others were written; 2 nothing ran (bad INPUT, -o or option); 130 interrupted "
    "(run the same command again to continue)."
)
ROW_SETTINGS_HELP = " and optional per-row settings in columns named like the flags (steps, mode, seed, ...)"


def add_parser(commands: Any) -> None:
    """Add ``batch`` to the ``imageprompt`` parser's subcommands."""
    batch = commands.add_parser(
        "batch",
        help="generate from every image of a folder, list or dataset, for a grid of seeds; resumable",
        description="Generate from every image of INPUT for each seed; writes PNGs (recipe in their metadata) "
        "and OUT/manifest.jsonl (one row per PNG: input, seed, settings, file). A rerun skips items whose "
        "outputs are there (same image content, settings, seed and model). Under accelerate launch the items "
        "are shared between the processes, with the same outputs.",
        epilog=EXIT_CODES,
    )
    batch.add_argument("input", metavar="INPUT", help=INPUT_HELP.format(rows=ROW_SETTINGS_HELP))
    batch.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder for the PNGs and the manifest")
    batch.add_argument(
        "--seeds", default=None, metavar="SEEDS",
        help="seeds to run each image with: 0,1,2 or ranges such as 0-9 (default: the seed setting's default, "
        f"{GenerationSettings().seed}); a row's own seed column overrides it",
    )
    batch.add_argument("--manifest", choices=MANIFEST_FORMATS, default="jsonl",
                       help="manifest format: jsonl (default) or parquet (needs pyarrow)")
    add_source_flags(batch)
    add_setting_flags(batch, skip=("seed",))
    batch.add_argument("--no-safety-checker", action="store_true", help="switch the model's safety checker off")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4,10"`` → the seeds in order, each once; every seed within the seed setting's range."""
    seeds: list[int] = []
    for part in (piece.strip() for piece in text.split(",")):
        first, _, last = part.partition("-")
        try:
            low, high = int(first), int(last or first)
        except ValueError:
            raise SettingsError(f"--seeds takes whole numbers or ranges such as 0,1,2 or 0-9, not {text!r}.") from None
        if high < low:
            raise SettingsError(f"--seeds range {part!r} runs backwards: write it as {high}-{low}.")
        if high - low >= 100_000:
            raise SettingsError(f"--seeds range {part!r} has {high - low + 1} seeds: at most 100000 at once.")
        GenerationSettings(seed=low), GenerationSettings(seed=high)  # the seed setting's own range and sentence
        seeds.extend(range(low, high + 1))
    return list(dict.fromkeys(seeds))


def run(args: argparse.Namespace) -> int:
    try:
        check_output_folder(args.output)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        preset = resolve_preset(args.model)
        chosen = chosen_settings(args)
        base = GenerationSettings.from_kwargs(**{**dict(preset.defaults), **chosen})  # the flags alone must be valid
        if base.negative == "image":
            raise SettingsError("batch runs take no negative images: use --negative empty_prompt or zeros.")
        from ..batch.sources import open_source  # PIL and numpy (and datasets for a dataset): still no torch

        source = open_source(args.input, image_column=args.image_column, split=args.split, exclude=args.output)
    except ValueError as err:
        return bad_input(err)
    note_ignored(source)

    from ..batch.run import run_batch  # torch and the engine from here on

    return run_many(
        lambda loading: run_batch(
            source, args.output, settings=chosen, seeds=seeds, model=preset, device=args.device,
            safety_checker=False if args.no_safety_checker else None, manifest_format=args.manifest,
            on_event=loading,
        ),
        stopped="run the same command again to continue where it stopped.",
        written=lambda report: report.manifest,
    )


