"""Scaling: cost against steps, number of images (batched vs looped), resolution, and encoding.

Also checks that re-generating with a new seed does not re-encode the image (embeddings are
cached by content), by counting the vision tower's forward calls.

    python -m benchmarks.scaling
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import common


def plan(kind: str, quick: bool) -> dict[str, Any]:
    if quick:
        return {"base": {"steps": 1}, "steps": [1, 2], "images": [1, 2], "sizes": [64], "encode_batch": 2, "rounds": 1}
    if kind == "tiny":
        return {"base": {"steps": 10}, "steps": [10, 20, 40], "images": [1, 2, 4], "sizes": [64, 128, 256],
                "encode_batch": 4, "rounds": 3}
    return {"base": {"steps": 1, "height": 128, "width": 128}, "steps": [1, 3], "images": [2],
            "sizes": [128, 256], "encode_batch": 4, "rounds": 1}


def _timed(function: Any) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _median_seconds(pipe: Any, image: Any, settings: dict[str, Any], rounds: int) -> float:
    return common.median([_timed(lambda: pipe.generate(image, **settings)) for _ in range(rounds)])


def measure(kind: str, quick: bool) -> dict[str, Any]:
    pipe = common.load_pipeline(kind)
    config = plan(kind, quick)
    base, rounds = config["base"], config["rounds"]
    image = common.bench_image()
    pipe.generate(image, **base)  # warm-up, and the image's embedding is cached from here on

    steps = {}
    for count in config["steps"]:
        steps[count] = _median_seconds(pipe, image, {**base, "steps": count}, rounds)
    images = {}
    for count in config["images"]:
        contenders = {
            "batched": lambda count=count: pipe.generate(image, **base, num_images=count),
            "looped": lambda count=count: [pipe.generate(image, **base, seed=seed) for seed in range(count)],
        }
        times = common.alternate(contenders, rounds, warmup=0)
        images[count] = {name: common.median(values) for name, values in times.items()}
    sizes = {}
    for size in config["sizes"]:
        sizes[size] = _median_seconds(pipe, image, {**base, "height": size, "width": size}, rounds)
    return {
        "kind": kind,
        "base": base,
        "seconds_by_steps": steps,
        "seconds_by_images": images,
        "seconds_by_size": sizes,
        "encoding": _encoding(pipe, config["encode_batch"], rounds),
        "new_seed": _new_seed_reencodes(pipe, {**base, "steps": 1}),
    }


def _encoding(pipe: Any, count: int, rounds: int) -> dict[str, Any]:
    """N images in one batch against one at a time; fresh pictures each time so the cache never answers."""
    fresh = iter(range(1000, 100000))

    def batch() -> None:
        pipe.encode_image([common.bench_image(next(fresh)) for _ in range(count)])

    def singles() -> None:
        for _ in range(count):
            pipe.encode_image(common.bench_image(next(fresh)))

    times = common.alternate({"batch": batch, "one at a time": singles}, rounds, warmup=0)
    return {
        "images": count,
        "batch_seconds": common.median(times["batch"]),
        "singles_seconds": common.median(times["one at a time"]),
        "speedup": common.median_ratio(times["one at a time"], times["batch"]),
    }


def _new_seed_reencodes(pipe: Any, base: dict[str, Any]) -> dict[str, Any]:
    """Count vision-tower forward calls over two runs of a never-seen image with different seeds."""
    calls: list[int] = []
    handle = pipe.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    image = common.bench_image(99991)
    try:
        first = _timed(lambda: pipe.generate(image, **base, seed=1))
        second = _timed(lambda: pipe.generate(image, **base, seed=2))
        start = time.perf_counter()
        pipe.encode_image(image)
        cached_lookup = time.perf_counter() - start
    finally:
        handle.remove()
    return {
        "encoder_calls": len(calls),
        "first_run_seconds": first,
        "second_run_seconds": second,
        "cached_encode_ms": 1000 * cached_lookup,
        "reencodes": len(calls) != 1,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    rows = [measure(kind, args.quick) for kind in common.selected_kinds(args)]
    tables = []
    for row in rows:
        size_text = f"{row['base'].get('height') or 'native'} px"
        tables.append(common.print_table(
            f"Scaling ({row['kind']}): seconds per generate() against steps ({size_text})",
            ["steps", "seconds", "seconds / step"],
            [[n, s, s / n] for n, s in row["seconds_by_steps"].items()],
        ))
        tables.append(common.print_table(
            f"Scaling ({row['kind']}): N images, batched (num_images=N) vs looped, {row['base']['steps']} steps",
            ["N", "batched s", "looped s", "looped / batched"],
            [[n, t["batched"], t["looped"], t["looped"] / t["batched"]] for n, t in row["seconds_by_images"].items()],
        ))
        tables.append(common.print_table(
            f"Scaling ({row['kind']}): resolution, {row['base']['steps']} steps",
            ["px", "seconds"], list(row["seconds_by_size"].items()),
        ))
        enc, seed = row["encoding"], row["new_seed"]
        tables.append(common.print_table(
            f"Scaling ({row['kind']}): encoding and the embedding cache",
            ["images", "one batch s", "one at a time s", "speedup", "encoder calls for 2 seeds",
             "cached encode_image ms"],
            [[enc["images"], enc["batch_seconds"], enc["singles_seconds"], enc["speedup"],
              seed["encoder_calls"], seed["cached_encode_ms"]]],
        ))
    payload = {"rows": rows, "table": "\n".join(tables)}
    common.write_json("scaling", payload, args.out, common.command_line("benchmarks.scaling", argv))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
