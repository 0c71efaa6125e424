"""Train the toy world's models and write them where the ``toy`` presets load them from.

    nice python scripts/train_toy.py                  # imageprompt_widgets/toy/weights, every stage
    python scripts/train_toy.py --out /tmp/toy --smoke  # a few steps of every stage: checks the code runs
    nice python scripts/train_toy.py --stages ip_adapter,ip_adapter_plus,variations,projector
                                                      # only the image-prompt stages, on the shipped base
    nice python scripts/train_toy.py --stages vae,unet,ip_adapter,ip_adapter_plus,variations,projector
                                                      # all but the CLIP (it trains first and alone; each stage
                                                      # seeds itself, so this writes what the full run writes)
    nice python scripts/train_toy.py --stages fine    # only the 16 x 16 base (fine/), beside the shipped one

Seeded and single-threaded (``torch.set_num_threads(1)``): with the same torch on the same kind of
CPU it writes the same bytes. The training code itself is ``imageprompt_widgets/toy/train.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from imageprompt_widgets.toy import WEIGHTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS, help=f"weights folder (default: {WEIGHTS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps of every stage, to check the code runs")
    parser.add_argument("--stages", default=None,
                        help="train only these stages (comma-separated: vae, unet, ip_adapter, ip_adapter_plus, "
                             "variations, projector, fine) on the models already in --out; keeps the others' records")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change one field of the training budget (experiments; the shipped weights use none)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from imageprompt_widgets.toy import train

    budget = train.Budget.smoke() if args.smoke else train.Budget()
    for change in args.set:
        name, _, value = change.partition("=")
        budget = dataclasses.replace(budget, **{name: type(getattr(budget, name))(value)})
    stages = None
    if args.stages:
        stages = tuple(stage.strip() for stage in args.stages.split(",") if stage.strip())
        trainable = train.STAGES[1:]
        unknown = sorted(set(stages) - set(trainable))
        if unknown:
            parser.error(f"unknown stages {unknown}: choose from {', '.join(trainable)}")
        stale_paths = [train.STAGE_OUTPUTS[stage] for stage in stages if stage in train.STAGE_OUTPUTS]
        left = [stage for stage in train.IMAGE_PROMPT_STAGES if stage not in stages]
        if {"vae", "unet"} & set(stages) and left:
            print(f"note: {', '.join(left)} stay trained on the previous base; train them again with it")
    else:
        stale_paths = ["clip", "sd", train.ADAPTER_SUBFOLDER, train.VARIATIONS_SUBFOLDER, train.PROJECTOR_SUBFOLDER,
                       train.FINE_SUBFOLDER, "training.json"]
    for stale in stale_paths:
        path = args.out / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    reports = train.train_all(args.out, budget, args.seed, stages=stages)
    size = sum(path.stat().st_size for path in args.out.rglob("*.safetensors"))
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB of safetensors")
    for report in reports:
        print(f"  {report.name}: {report.seconds:.0f} s, peak memory {report.peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
