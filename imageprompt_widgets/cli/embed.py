"""``imageprompt embed``: the CLIP image embeddings of a folder, list or dataset, in one file.

    imageprompt embed photos/ -o photos.safetensors --batch-size 32

INPUT, ``-o`` and the flags are checked before torch is imported. Exit codes: 0 every image embedded, 1 some
images could not be read (one line each; the others were written), 2 nothing ran (one line).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..batch.embed import DEFAULT_BATCH_SIZE, check_embedding_path
from ..presets import resolve_preset
from ..settings import GenerationSettings, SettingsError
from .common import (
    INPUT_HELP,
    add_setting_flags,
    add_source_flags,
    bad_input,
    check_output_file,
    note_ignored,
    run_many,
)


def add_parser(commands: Any) -> None:
    """Add ``embed`` to the ``imageprompt`` parser's subcommands."""
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
    add_source_flags(embed)
    add_setting_flags(embed, only=("crop",))



def run(args: argparse.Namespace) -> int:
    try:
        check_output_file(args.output)
        check_embedding_path(args.output)
        batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
        if batch_size < 1:
            raise SettingsError(f"--batch-size must be at least 1, not {batch_size}.")
        crop = args.crop or GenerationSettings().crop
        preset = resolve_preset(args.model)
        from ..batch.sources import open_source

        source = open_source(args.input, image_column=args.image_column, split=args.split)
    except ValueError as err:
        return bad_input(err)
    note_ignored(source, settings_used=False)

    from ..batch.embed import export_embeddings

    return run_many(
        lambda loading: export_embeddings(source, args.output, model=preset, device=args.device,
                                          batch_size=batch_size, hidden_states=args.hidden_states, crop=crop,
                                          on_event=loading),
        stopped="nothing was written.",
        written=lambda report: report.path,
    )
