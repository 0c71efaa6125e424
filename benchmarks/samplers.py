"""Samplers and the live mode: how much faster LCM-LoRA's 4 steps are than the default 30, and what each
scheduler costs per UNet step against PNDM.

Live mode (issues 17, 26): a live pipeline as the ``-live`` presets load it, LCM-LoRA fused into its own copy of
the model (on real-size weights a random LoRA of LCM-LoRA's shape: rank 64 on its layers), the ``lcm`` scheduler,
4 steps, guidance 1 (no unconditional pass), with the full decoder and with the tiny one (TAESD's size, random),
against the default run (PNDM, 30 steps, guidance 7.5) on the plain pipeline, at 256 and 512 px on the CPU,
alternating within each round. Each run's stage timings (``res.timings``) give every stage's share; then one
live re-run after a slider move (encodings from the caches) against a first live run. Target: live at most 0.10
of the default's time at 512 px. ``--default-steps N`` measures the default at N steps and adds the missing UNet
calls' time (its denoising scaled by the calls' ratio): a 30-step 512 px run takes most of an hour on a loaded
2-core CPU.

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

LIVE_TARGET = 0.10
#: The stages of a result's timings (engine/pipeline.py STAGES), in order.
STAGES = ("loading", "inputs", "waiting", "encoding", "conditioning", "denoising", "decoding")


def configuration(kind: str, quick: bool, rounds: int | None) -> dict[str, Any]:
    if quick:  # checks that it runs and counts right; measures nothing
        return {"size": 64, "sizes": (64,), "default_steps": 4, "sweep_steps": 2, "rounds": 1}
    if kind == "tiny":
        return {"size": 64, "sizes": (64,), "default_steps": 30, "sweep_steps": 10, "rounds": rounds or 5}
    return {"size": 256, "sizes": (256, 512), "default_steps": 30, "sweep_steps": 4, "rounds": rounds or 3}


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
    """At each size: the default run, live with the full decoder and live with the tiny one, alternating (the order
    rotates each round), each run's stage timings kept; then one live re-run after a slider move (the encodings
    come from the caches) against a first live run (caches emptied)."""
    from imageprompt_widgets.engine.pipeline import unet_step_count

    sizes: dict[int, dict[str, Any]] = {}
    for size in config["sizes"]:
        shape = {"height": size, "width": size, "seed": 0}
        full_steps = pipe.default_settings().replace(**shape)
        # Measured at fewer steps where asked, in the precision the full run would use (auto: float32 at 30 steps).
        precision = str(pipe.compute_dtype(full_steps)).removeprefix("torch.")
        default = full_steps.replace(steps=config["default_steps"], precision=precision)
        live = live_pipe.default_settings().replace(**shape)
        contenders = {"default": (pipe, default), "live, full decoder": (live_pipe, live.replace(decoder="full")),
                      "live, tiny decoder": (live_pipe, live.replace(decoder="tiny"))}
        pipe.generate(image, default.replace(steps=1))  # warm-up: the embedding is cached from here on
        live_pipe.generate(image, live.replace(steps=1))
        runs: dict[str, list[Any]] = {name: [] for name in contenders}
        for round_index in range(config["rounds"]):
            names = list(contenders)
            names = names[round_index % len(names):] + names[: round_index % len(names)]
            for name in names:
                runner, settings = contenders[name]
                result = runner.generate(image, settings)
                runs[name].append(result)
                stages = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in result.timings.items())
                print(f"  {size} px, round {round_index + 1}, {name}: {stages} s "
                      f"({result.unet_calls} UNet calls, {result.recipe['compute_dtype']})", flush=True)
        # The default is measured at config["default_steps"]; its 30-step time adds the missing UNet calls.
        scale = unet_step_count(pipe.sd.scheduler, full_steps) / unet_step_count(pipe.sd.scheduler, default)
        rows = {name: _stage_row(results, scale if name == "default" else 1.0) for name, results in runs.items()}
        rows["default"]["steps"] = full_steps.steps
        first, moved = _slider_move(live_pipe, image, live)
        sizes[size] = {"runs": rows, "first_live": first, "slider_move": moved,
                       "ratio_full": rows["live, full decoder"]["total"] / rows["default"]["total"],
                       "ratio_tiny": rows["live, tiny decoder"]["total"] / rows["default"]["total"]}
    return {"sizes": sizes, "target": LIVE_TARGET}


def _slider_move(live_pipe: Any, image: Any, live: Any) -> tuple[dict[str, float], dict[str, float]]:
    """A first live run with empty encoding caches, then the same inputs with the scale moved."""
    live_pipe._embeddings.clear()  # the caches a fresh panel starts with
    live_pipe._texts.clear()
    first = live_pipe.generate(image, live)
    moved = live_pipe.generate(image, live.replace(scale=live.scale + 0.25))
    return dict(first.timings), dict(moved.timings)


def _stage_row(results: list[Any], denoising_scale: float) -> dict[str, Any]:
    """The median seconds of each stage over the rounds (denoising times ``denoising_scale``), and the total."""
    stages = [stage for stage in results[0].timings if stage != "total"]
    row = {stage: statistics.median(r.timings.get(stage, 0.0) for r in results) for stage in stages}
    row["denoising"] *= denoising_scale
    row["total"] = sum(row.values())
    first = results[0]
    row.update(unet_calls=round(first.unet_calls * denoising_scale), dtype=first.recipe["compute_dtype"],
               scheduler=first.settings.scheduler,
               decoder=first.settings.decoder, steps=first.settings.steps, rounds=len(results))
    return row


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


def measure(kind: str, quick: bool, rounds: int | None, parts: str, sizes: Sequence[int] = (),
            default_steps: int | None = None) -> dict[str, Any]:
    config = configuration(kind, quick, rounds)
    if sizes:
        config["sizes"] = tuple(sizes)
    if default_steps:
        config["default_steps"] = default_steps
    pipe = common.load_pipeline(kind)
    image = common.bench_image()
    row: dict[str, Any] = {"kind": kind, "config": config}
    if parts in ("all", "live"):
        live_pipe = live_pipeline(kind)
        if kind == "real":  # TAESD's size, random: decoder="tiny" without the download
            from benchmarks.realsize import realsize_taesd

            live_pipe.use_tiny_decoder(realsize_taesd())
        else:
            from diffusers import AutoencoderTiny

            from imageprompt_widgets.loading.offline import ensure_tiny_taesd

            live_pipe.use_tiny_decoder(AutoencoderTiny.from_pretrained(ensure_tiny_taesd(), use_safetensors=True))
        row["live"] = live_against_default(pipe, live_pipe, image, config)
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
    parser.add_argument("--sizes", default="", help="live: comma-separated sides in px (default 256,512 real-size)")
    parser.add_argument("--default-steps", type=int, default=None,
                        help="live: measure the default run at these steps and add the missing UNet calls' time "
                             "(a 30-step run at 512 px takes most of an hour on a loaded 2-core CPU)")
    args = parser.parse_args(argv)
    sizes = [int(side) for side in args.sizes.split(",") if side.strip()]
    rows = [measure(kind, args.quick, args.rounds, args.parts, sizes, args.default_steps)
            for kind in common.selected_kinds(args)]
    live = _live_tables(rows)
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


def _live_tables(rows: list[dict[str, Any]]) -> str:
    """Each run's stages (median seconds and share of the total), and the slider move against a first live run."""
    stages = STAGES
    table_rows, moves = [], []
    for row in rows:
        for size, measured in row.get("live", {}).get("sizes", {}).items():
            default_total = measured["runs"]["default"]["total"]
            for name, run in measured["runs"].items():
                shares = " · ".join(f"{stage} {run[stage] / run['total']:.0%}" for stage in stages
                                    if run.get(stage, 0) / run["total"] >= 0.005)
                table_rows.append([row["kind"], f"{size} px", name, run["steps"], run["unet_calls"], run["decoder"],
                                   run["dtype"], run["rounds"], run["total"], run["denoising"], run["decoding"],
                                   shares, run["total"] / default_total])
            first, moved = measured["first_live"], measured["slider_move"]
            moves.append([row["kind"], f"{size} px", first["total"], first["encoding"], moved["total"],
                          moved["encoding"], moved["total"] / first["total"]])
    live = common.print_table(
        f"Live against the default run, per stage (median seconds; target: live / default <= {LIVE_TARGET})",
        ["models", "size", "run", "steps", "UNet calls", "decoder", "dtype", "rounds", "seconds", "denoising",
         "decoding", "shares", "/ default"], table_rows)
    return live + "\n" + common.print_table(
        "A live re-run after a slider move (encodings from the caches) against a first live run",
        ["models", "size", "first run s", "its encoding s", "re-run s", "its encoding s", "re-run / first"], moves)


def _sweep_text(settings: dict[str, Any]) -> str:
    return f"{settings['steps']} steps, {settings['size']} px, guidance {settings['guidance_scale']:g}"


if __name__ == "__main__":
    main(sys.argv[1:])
