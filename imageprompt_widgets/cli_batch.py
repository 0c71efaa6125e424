"""``imageprompt batch`` and ``imageprompt embed``: many images from a terminal, on one or several processes.

    imageprompt batch photos/ -o out/ --seeds 0,1,2 --steps 20
    imageprompt batch list.csv -o out/ --manifest parquet
    accelerate launch --multi_gpu --num_processes 4 -m imageprompt_widgets.cli batch photos/ -o out/
    imageprompt embed photos/ -o photos.safetensors --batch-size 32

INPUT, ``-o``, the flags and the rows' settings are checked before torch is imported. Exit codes: 0 every
item done (or already done), 1 some items failed (each logged on one line, listed in OUT/failed.jsonl; the
others were written), 2 nothing ran (bad INPUT, -o or flag; one line), 130 interrupted (rerun to continue).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .cli_common import (
    EXIT_INTERRUPTED,
    TerminalProgress,
    add_setting_flags,
    bad_input,
    check_output_file,
    check_output_folder,
    chosen_settings,
    is_main_process,
)
from .embed import DEFAULT_BATCH_SIZE, check_embedding_path
from .manifest import MANIFEST_FORMATS
from .presets import PRESETS, default_preset_name, resolve_preset
from .settings import GenerationSettings, SettingsError

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1

EXIT_CODES = (
    "exit codes: 0 every item done (or already done); 1 some items failed (one line each, listed in "
    "OUT/failed.jsonl), the others were written; 2 nothing ran (bad INPUT, -o or option); 130 interrupted "
    "(run the same command again to continue)."
)
INPUT_HELP = (
    "a folder of images; a .csv or .jsonl list with an 'image' column (paths relative to the list, or URLs){rows}; "
    "a saved Hugging Face datasets folder; or hf://datasets/OWNER/NAME"
)
ROW_SETTINGS_HELP = " and optional per-row settings in columns named like the flags (steps, mode, seed, ...)"


def add_commands(commands: Any) -> None:
    """Add ``batch`` and ``embed`` to the ``imageprompt`` parser's subcommands."""
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
    _add_common(batch)
    add_setting_flags(batch, skip=("seed",))
    batch.add_argument("--no-safety-checker", action="store_true", help="switch the model's safety checker off")

    embed = commands.add_parser(
        "embed",
        help="write the CLIP image embeddings of every image of a folder, list or dataset",
        description="Embed every image of INPUT with the model's CLIP vision tower, in batches; writes one row per "
        "image (image_embeds, optionally hidden_states) and the list of inputs to a .safetensors or .parquet file.",
        epilog="exit codes: 0 every image embedded; 1 some images could not be read (one line each; the others "
        "were written); 2 nothing ran (bad INPUT, -o or option).",
    )
    embed.add_argument("input", metavar="INPUT", help=INPUT_HELP.format(rows=""))
    embed.add_argument("-o", "--output", required=True, metavar="FILE",
                       help="the embeddings file: .safetensors, or .parquet (needs pyarrow)")
    embed.add_argument("--batch-size", type=int, default=None, metavar="N",
                       help=f"images per forward pass of the vision tower (default: {DEFAULT_BATCH_SIZE})")
    embed.add_argument("--hidden-states", action="store_true",
                       help="also write the vision tower's last hidden state of each image ([N, T, Dv])")
    _add_common(embed)
    add_setting_flags(embed, only=("crop",))


def _add_common(parser: argparse.ArgumentParser) -> None:
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


def run_batch_command(args: argparse.Namespace) -> int:
    try:
        check_output_folder(args.output)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        preset = resolve_preset(args.model)
        chosen = chosen_settings(args)
        base = GenerationSettings.from_kwargs(**{**dict(preset.defaults), **chosen})  # the flags alone must be valid
        if base.negative == "image":
            raise SettingsError("batch runs take no negative images: use --negative empty_prompt or zeros.")
        from .sources import open_source  # PIL and numpy (and datasets for a dataset): still no torch

        source = open_source(args.input, image_column=args.image_column, split=args.split, exclude=args.output)
    except ValueError as err:
        return bad_input(err)
    _note_ignored(source)

    from .batch import run_batch  # torch and the engine from here on

    loading = TerminalProgress(steps=False) if is_main_process() else None  # messages and download bytes
    try:
        report = run_batch(
            source, args.output, settings=chosen, seeds=seeds, model=preset, device=args.device,
            safety_checker=False if args.no_safety_checker else None, manifest_format=args.manifest,
            on_event=loading,
        )
    except ValueError as err:  # the model cannot load, the disk is full: nothing more can run
        return bad_input(err)
    except KeyboardInterrupt:
        print("imageprompt: stopped; run the same command again to continue where it stopped.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if loading is not None:
            loading.close()
    if is_main_process():
        print(f"imageprompt: {report.summary()}", file=sys.stderr)
        print(report.manifest)
    return EXIT_OK if report.ok else EXIT_ITEMS_FAILED


def run_embed_command(args: argparse.Namespace) -> int:
    try:
        check_output_file(args.output)
        check_embedding_path(args.output)
        batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
        if batch_size < 1:
            raise SettingsError(f"--batch-size must be at least 1, not {batch_size}.")
        crop = args.crop or GenerationSettings().crop
        preset = resolve_preset(args.model)
        from .sources import open_source

        source = open_source(args.input, image_column=args.image_column, split=args.split)
    except ValueError as err:
        return bad_input(err)
    _note_ignored(source, settings_used=False)

    from .embed import export_embeddings

    loading = TerminalProgress(steps=False) if is_main_process() else None
    try:
        report = export_embeddings(source, args.output, model=preset, device=args.device, batch_size=batch_size,
                                   hidden_states=args.hidden_states, crop=crop, on_event=loading)
    except ValueError as err:
        return bad_input(err)
    except KeyboardInterrupt:
        print("imageprompt: stopped; nothing was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if loading is not None:
            loading.close()
    if is_main_process():
        print(f"imageprompt: {report.summary()}", file=sys.stderr)
        print(report.path)
    return EXIT_OK if report.ok else EXIT_ITEMS_FAILED


def _note_ignored(source: Any, settings_used: bool = True) -> None:
    if source.ignored_columns and is_main_process():
        what = "not settings" if settings_used else "embed reads the images only"
        print(f"imageprompt: note: ignoring column(s) {', '.join(source.ignored_columns)} ({what}).", file=sys.stderr)


COMMANDS = {"batch": run_batch_command, "embed": run_embed_command}
