"""Samplers and the live mode: how much faster LCM-LoRA's 4 steps are than the default 30, and what each
scheduler costs per UNet step against PNDM.

Live mode (issue 17): a live pipeline as the ``-live`` presets load it, LCM-LoRA fused into its own copy of
the model (on real-size weights a random LoRA of LCM-LoRA's shape: rank 64 on its layers), the ``lcm``
scheduler, 4 steps, guidance 1 (no unconditional pass), against the default run (PNDM, 30 steps, guidance
7.5) on the plain pipeline, both at 256 px on the CPU, alternating within each round. Target: the live run
in at most 0.15 of the default's time. Reported: UNet calls and rows per call, seconds, the ratio.

Schedulers: every ``settings.SCHEDULERS`` entry at the same steps, size and guidance, in rotating order;
seconds per UNet call (PNDM makes one call more than asked), as a ratio to PNDM's within each round.

    python -m benchmarks.samplers                  # tiny and real-size (builds ~6 GB + 270 MB once)
    python -m benchmarks.samplers --models real --rounds 1 --parts live
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import common

LIVE_TARGET = 0.15


def configuration(kind: str, quick: bool, rounds: int | None) -> dict[str, Any]:
    if quick:  # checks that it runs and counts right; measures nothing
        return {"size": 64, "default_steps": 4, "sweep_steps": 2, "rounds": 1}
    if kind == "tiny":
        return {"size": 64, "default_steps": 30, "sweep_steps": 10, "rounds": rounds or 5}
    return {"size": 256, "default_steps": 30, "sweep_steps": 4, "rounds": rounds or 1}


def lcm_lora_source(kind: str) -> str:
    """The LCM-LoRA twin for ``kind``'s models: the tiny one, or a real-size random one (built once)."""
    if kind == "tiny":
        return "tiny-lcm-lora"
    from benchmarks.realsize import ensure_realsize_lcm_lora

    return ensure_realsize_lcm_lora()


class UnetCalls:
    """Counts the UNet's calls and the rows of each (2 per image with guidance, 1 without)."""

    def __init__(self, unet: Any) -> None:
        self.rows: list[int] = []
        self._handle = unet.register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: tuple) -> None:
        self.rows.append(int(args[0].shape[0]))

    def take(self) -> list[int]:
        rows, self.rows = self.rows, []
        return rows

    def close(self) -> None:
        self._handle.remove()


def live_pipeline(kind: str) -> Any:
    """A pipeline loaded as the ``-live`` presets load: ``kind``'s models with the LCM-LoRA twin fused in (a
    second copy of the model, not cached, as the live preset is a model of its own)."""
    import torch

    from imageprompt_widgets import ImagePromptPipeline
    from imageprompt_widgets.loading.components import load_components
    from imageprompt_widgets.presets import LIVE_DEFAULTS, Preset

    models = common.model_folders(kind)
    preset = Preset(name=f"{kind}-live", sd_model=models.sd, clip_model=models.clip,
                    loras=((lcm_lora_source(kind), 1.0),), defaults=LIVE_DEFAULTS)
    return ImagePromptPipeline.from_components(load_components(preset, torch.device("cpu"), torch.float32))


def live_against_default(pipe: Any, live_pipe: Any, image: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The two runs alternate within each round, each on its own pipeline."""
    size = {"height": config["size"], "width": config["size"], "seed": 0}
    default = pipe.default_settings().replace(steps=config["default_steps"], **size)
    live = live_pipe.default_settings().replace(**size)
    counter = UnetCalls(pipe.sd.unet)
    live_counter = UnetCalls(live_pipe.sd.unet)

    def run_default() -> float:
        return _timed(lambda: pipe.generate(image, default))

    def run_live() -> float:
        return _timed(lambda: live_pipe.generate(image, live))

    try:
        pipe.generate(image, default.replace(steps=1))  # warm-up: the embedding is cached from here on
        live_pipe.generate(image, live.replace(steps=1))
        counter.take()
        live_counter.take()
        seconds: dict[str, list[float]] = {"default": [], "live": []}
        rows: dict[str, list[int]] = {}
        contenders: dict[str, Callable[[], float]] = {"default": run_default, "live": run_live}
        for round_index in range(config["rounds"]):
            names = list(contenders)[round_index % 2:] + list(contenders)[: round_index % 2]
            for name in names:
                seconds[name].append(contenders[name]())
                rows[name] = (counter if name == "default" else live_counter).take()
    finally:
        counter.close()
        live_counter.close()
    return {
        "default": _row(default, rows["default"], seconds["default"]),
        "live": _row(live, rows["live"], seconds["live"]),
        "ratio": common.median_ratio(seconds["live"], seconds["default"]),
        "target": LIVE_TARGET,
    }


def scheduler_sweep(pipe: Any, image: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Every scheduler at the same settings; per round, each one's seconds per UNet call over PNDM's."""
    from imageprompt_widgets.settings import SCHEDULERS

    base = pipe.default_settings().replace(steps=config["sweep_steps"], height=config["size"],
                                           width=config["size"], seed=0)
    counter = UnetCalls(pipe.sd.unet)
    per_step: dict[str, list[float]] = {name: [] for name in SCHEDULERS}
    calls: dict[str, int] = {}
    try:
        pipe.generate(image, base.replace(steps=1))
        counter.take()
        for round_index in range(config["rounds"]):
            shift = round_index % len(SCHEDULERS)
            for name in SCHEDULERS[shift:] + SCHEDULERS[:shift]:
                seconds = _timed(lambda name=name: pipe.generate(image, base.replace(scheduler=name)))
                calls[name] = len(counter.take())
                per_step[name].append(seconds / calls[name])
    finally:
        counter.close()
    return {
        name: {
            "unet_calls": calls[name],
            "seconds_per_step": statistics.median(values),
            "ratio_to_pndm": common.median_ratio(values, per_step["pndm"]),
        }
        for name, values in per_step.items()
    } | {"settings": {"steps": base.steps, "size": config["size"], "guidance_scale": base.guidance_scale}}


def measure(kind: str, quick: bool, rounds: int | None, parts: str) -> dict[str, Any]:
    config = configuration(kind, quick, rounds)
    pipe = common.load_pipeline(kind)
    image = common.bench_image()
    row: dict[str, Any] = {"kind": kind, "config": config}
    if parts in ("all", "live"):
        row["live"] = live_against_default(pipe, live_pipeline(kind), image, config)
    if parts in ("all", "schedulers"):
        row["schedulers"] = scheduler_sweep(pipe, image, config)
    return row


def _timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _row(settings: Any, rows: list[int], seconds: list[float]) -> dict[str, Any]:
    return {
        "scheduler": settings.scheduler, "steps": settings.steps, "guidance_scale": settings.guidance_scale,
        "unet_calls": len(rows), "rows_per_call": sorted(set(rows)), "seconds": statistics.median(seconds),
        "rounds": len(seconds),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: 5 tiny, 1 real-size)")
    parser.add_argument("--parts", choices=("all", "live", "schedulers"), default="all", help="what to measure")
    args = parser.parse_args(argv)
    rows = [measure(kind, args.quick, args.rounds, args.parts) for kind in common.selected_kinds(args)]
    live = common.print_table(
        f"Live mode (LCM-LoRA, lcm, 4 steps, guidance 1) against the default run (target: ratio <= {LIVE_TARGET})",
        ["models", "size", "run", "scheduler", "steps", "guidance", "UNet calls", "rows per call", "seconds",
         "live / default"],
        [
            [row["kind"], f"{row['config']['size']} px", name, run["scheduler"], run["steps"],
             run["guidance_scale"], run["unet_calls"], "/".join(map(str, run["rows_per_call"])), run["seconds"],
             row["live"]["ratio"] if name == "live" else ""]
            for row in rows if "live" in row
            for name, run in (("default", row["live"]["default"]), ("live", row["live"]["live"]))
        ],
    )
    sweep = common.print_table(
        "Schedulers: seconds per UNet step, and its ratio to PNDM's (median of per-round ratios)",
        ["models", "settings", "scheduler", "UNet calls", "seconds per step", "/ pndm"],
        [
            [row["kind"], _sweep_text(row["schedulers"]["settings"]), name, values["unet_calls"],
             values["seconds_per_step"], values["ratio_to_pndm"]]
            for row in rows if "schedulers" in row
            for name, values in row["schedulers"].items() if name != "settings"
        ],
    )
    payload = {"rows": rows, "table": live + "\n" + sweep}
    common.write_json("samplers", payload, args.out, common.command_line("benchmarks.samplers", argv))
    return payload


def _sweep_text(settings: dict[str, Any]) -> str:
    return f"{settings['steps']} steps, {settings['size']} px, guidance {settings['guidance_scale']:g}"


if __name__ == "__main__":
    main(sys.argv[1:])
