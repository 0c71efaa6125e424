"""Overhead: ``pipe.generate()`` against bare ``StableDiffusionPipeline(prompt_embeds=...)``.

Both run on the very same components (``pipe.sd``) with the same embeddings and seed, alternating
within one run. Our run adds loading the image, the embedding-cache lookup, the trace copies and
the step tracker; with previews on it also computes x0 and a JPEG tile every step (what the
widget shows). Targets (issue 7): ≤ 1.02 real-size and ≤ 1.10 tiny with previews off, ≤ 1.05
real-size with previews on.

    python -m benchmarks.overhead                 # tiny (30 steps) and real-size (128 px, 4 steps)
    python -m benchmarks.overhead --models tiny
    python -m benchmarks.overhead --models tiny --input-size 4000x3000   # a 12 MP photo as input
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from benchmarks import common

TARGETS = {("tiny", "off"): 1.10, ("real", "off"): 1.02, ("real", "on"): 1.05}


def configuration(kind: str, quick: bool) -> dict[str, Any]:
    if quick:
        return {"settings": {"steps": 2, "seed": 0}, "rounds": 1, "warmup": 0}
    if kind == "tiny":
        return {"settings": {"steps": 30, "seed": 0}, "rounds": 9, "warmup": 1}
    return {"settings": {"steps": 4, "seed": 0, "height": 128, "width": 128}, "rounds": 3, "warmup": 1}


def preview_callback(pipe: Any) -> Any:
    """What the widget does each step: x0, the linear latent→RGB map, a small JPEG per image."""
    from imageprompt_widgets.engine import preview

    decoder = preview.decoder_for(pipe, "linear")
    tiles: list[bytes] = []

    def on_step(info: Any) -> None:
        tiles.extend(preview.preview_jpegs(info.x0(), decoder, max_side=128))

    return on_step


@contextlib.contextmanager
def timed_diffusers_calls(pipeline_class: type) -> Iterator[dict[str, float]]:
    """Time diffusers' pipeline call, and our step callback inside it, during the ``with`` block.

    What ``generate()`` spends outside diffusers' call, plus what our step callback spends inside it,
    is the engine's own work; measured directly it is far less noisy than the difference of two noisy
    totals on a shared machine. The class's ``__call__`` is wrapped for the block's duration (the
    engine may call ``pipe.sd`` or a twin built from its components).
    """
    timer = {"call": 0.0, "callback": 0.0}
    own = pipeline_class.__dict__.get("__call__")
    original = pipeline_class.__call__

    def timed_call(pipeline: Any, *args: Any, **kwargs: Any) -> Any:
        callback = kwargs.get("callback_on_step_end")
        if callback is not None:
            def timed_callback(*inner: Any) -> Any:
                start = time.perf_counter()
                try:
                    return callback(*inner)
                finally:
                    timer["callback"] += time.perf_counter() - start

            kwargs["callback_on_step_end"] = timed_callback
        start = time.perf_counter()
        try:
            return original(pipeline, *args, **kwargs)
        finally:
            timer["call"] += time.perf_counter() - start

    pipeline_class.__call__ = timed_call
    try:
        yield timer
    finally:
        if own is not None:
            pipeline_class.__call__ = own
        else:
            del pipeline_class.__call__


def engine_share(pipe: Any, run: Any, repeats: int) -> dict[str, float]:
    """Seconds of our own work per run (outside diffusers + in our step callback) and the implied ratio."""
    with timed_diffusers_calls(type(pipe.sd)) as timed:
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        total = (time.perf_counter() - start) / repeats
    if timed["call"] == 0:
        raise RuntimeError("generate() never called diffusers' pipeline class: the measurement needs updating")
    outside = total - timed["call"] / repeats
    callback = timed["callback"] / repeats
    return {
        "total_seconds": total,
        "outside_diffusers_seconds": outside,
        "callback_seconds": callback,
        "implied_ratio": total / (total - outside - callback),
    }


def measure(
    kind: str, quick: bool, input_size: tuple[int, int], rounds: int | None = None, direct_only: bool = False
) -> dict[str, Any]:
    pipe = common.load_pipeline(kind)
    config = configuration(kind, quick)
    if rounds:
        config["rounds"] = rounds
    settings = config["settings"]
    image = common.bench_image(size=input_size)
    reference = pipe.generate(image, **settings)
    on_step = preview_callback(pipe)
    outputs: dict[str, Any] = {}

    def ours() -> None:
        outputs["ours"] = pipe.generate(image, **settings).images

    def ours_previews() -> None:
        outputs["ours+previews"] = pipe.generate(image, on_step=on_step, **settings).images

    def bare() -> None:
        outputs["bare"] = common.bare_generate(pipe, reference).images

    contenders = {"bare": bare, "ours": ours, "ours+previews": ours_previews}
    if direct_only:  # one run each: the direct measurement needs no alternation
        contenders = {name: contenders[name] for name in ("bare", "ours")}
        config.update(rounds=1, warmup=0)
    times = common.alternate(contenders, config["rounds"], config["warmup"])
    times.setdefault("ours+previews", [float("nan")])
    direct = {
        "ours": engine_share(pipe, ours, config["rounds"]),
        "ours+previews": engine_share(pipe, ours_previews, config["rounds"]),
    }
    previews_off = common.median_ratio(times["ours"], times["bare"])
    previews_on = common.median_ratio(times["ours+previews"], times["bare"])
    return {
        "kind": kind,
        "input_size": f"{input_size[0]}x{input_size[1]}",
        "size": reference.images[0].size[0],
        "steps": settings["steps"],
        "rounds": config["rounds"],
        "seconds": times,
        "median_seconds": {name: common.median(values) for name, values in times.items()},
        "ratio_previews_off": previews_off,
        "ratio_previews_on": previews_on,
        "target_previews_off": TARGETS.get((kind, "off")),
        "target_previews_on": TARGETS.get((kind, "on")),
        "engine_share": direct,
        "direct_only": direct_only,
        "identical_pixels": common.same_pixels(outputs["ours"], outputs["bare"])
        and common.same_pixels(outputs["ours+previews"], outputs["bare"]),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    options = common.parser(__doc__.splitlines()[0])
    options.add_argument("--rounds", type=int, default=None, help="rounds per contender (default: per model kind)")
    options.add_argument(
        "--direct-only", action="store_true",
        help="one run per contender plus the direct measurement (for slow machines); ratios are then single runs",
    )
    options.add_argument("--input-size", default="256x192", help="the input picture's WIDTHxHEIGHT (e.g. 4000x3000)")
    args = options.parse_args(argv)
    input_size = tuple(int(part) for part in args.input_size.lower().split("x"))
    rows = [measure(kind, args.quick, input_size, args.rounds, args.direct_only) for kind in common.selected_kinds(args)]
    table = common.print_table(
        "Overhead: ours / bare diffusers (median of per-round ratios)",
        ["models", "input", "px", "steps", "rounds", "bare s", "ours s", "ratio", "target",
         "ours+previews s", "ratio", "target", "same pixels"],
        [
            [
                row["kind"], row["input_size"], row["size"], row["steps"], row["rounds"],
                row["median_seconds"]["bare"], row["median_seconds"]["ours"], row["ratio_previews_off"],
                _target(row["target_previews_off"]), row["median_seconds"]["ours+previews"],
                row["ratio_previews_on"], _target(row["target_previews_on"]), row["identical_pixels"],
            ]
            for row in rows
        ],
    )
    table += common.print_table(
        "Overhead measured directly: our own work per run (outside diffusers' call + our step callback)",
        ["models", "input", "previews", "run s", "outside diffusers ms", "step callback ms", "implied ratio"],
        [
            [row["kind"], row["input_size"], name.removeprefix("ours").strip("+") or "off",
             share["total_seconds"], 1000 * share["outside_diffusers_seconds"], 1000 * share["callback_seconds"],
             share["implied_ratio"]]
            for row in rows for name, share in row["engine_share"].items()
        ],
    )
    payload = {"rows": rows, "table": table}
    name = "overhead" if args.input_size == "256x192" else f"overhead-{args.input_size}"
    common.write_json(name, payload, args.out, common.command_line("benchmarks.overhead", argv))
    return payload


def _target(value: float | None) -> str:
    return "-" if value is None else f"≤ {value:.2f}"


if __name__ == "__main__":
    main(sys.argv[1:])
