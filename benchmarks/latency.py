"""Latency: from Generate to the first preview and to the final image, and the kernel's responsiveness.

Engine side: time from calling ``generate()`` to the first ``on_step`` call, to the first preview
JPEG (x0 + linear map, what the widget sends) and to the returned images. Widget side (the public
``ImagePromptWidget(pipeline=...)`` on a worker thread): time for ``w.generate()`` to return, to the
first preview tile (``w.previews_shown``), to the finished future; and, while the run goes on, how
late the main thread (the kernel, which handles the browser's messages) wakes from a 10 ms sleep,
compared with idle.

    python -m benchmarks.latency
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import common

TICK = 0.01  # the probe's sleep: a stand-in for the kernel waiting for the next browser message


def settings_for(kind: str, quick: bool) -> tuple[dict[str, Any], int]:
    if quick:
        return {"steps": 2}, 1
    if kind == "tiny":
        return {"steps": 30}, 5
    return {"steps": 2, "height": 128, "width": 128}, 1


def engine_latency(pipe: Any, settings: dict[str, Any], rounds: int) -> dict[str, Any]:
    from imageprompt_widgets.engine import preview

    decoder = preview.decoder_for(pipe, "linear")
    image = common.bench_image()
    pipe.generate(image, **settings)  # warm-up; the embedding is cached from here on, as after a first run
    firsts: dict[str, list[float]] = {"first step": [], "first preview": [], "final image": []}
    for _ in range(rounds):
        marks: dict[str, float] = {}

        def on_step(info: Any, marks: dict[str, float] = marks) -> None:
            if "first step" not in marks:
                marks["first step"] = time.perf_counter()
                preview.preview_jpegs(info.x0(), decoder)
                marks["first preview"] = time.perf_counter()

        start = time.perf_counter()
        pipe.generate(image, on_step=on_step, **settings)
        marks["final image"] = time.perf_counter()
        for name, values in firsts.items():
            values.append(marks[name] - start)
    return {name: common.median(values) for name, values in firsts.items()}


def _tick_lateness(stop: Any, seconds: float | None = None) -> list[float]:
    """How much later than asked the main thread wakes from ``TICK`` sleeps, until ``stop()``."""
    lateness = []
    end = None if seconds is None else time.perf_counter() + seconds
    while not stop() and (end is None or time.perf_counter() < end):
        start = time.perf_counter()
        time.sleep(TICK)
        lateness.append(time.perf_counter() - start - TICK)
    return lateness


def widget_latency(pipe: Any, settings: dict[str, Any], rounds: int) -> dict[str, Any]:
    try:
        from imageprompt_widgets import ImagePromptWidget
        from imageprompt_widgets.widget import ThreadRunner
    except (ImportError, AttributeError) as err:
        return {"available": False, "reason": f"{type(err).__name__}: {err}"}
    widget = ImagePromptWidget(pipeline=pipe, runner=ThreadRunner(), preview="linear", **settings)
    widget.set_images([common.bench_image()])
    widget.generate().result()  # warm-up (first preview decoder, embedding cache)
    idle = _tick_lateness(lambda: False, seconds=0.5)
    marks: dict[str, list[float]] = {"generate() returns": [], "first preview tile": [], "final image": []}
    busy: list[float] = []
    try:
        for _ in range(rounds):
            widget.previews_shown = 0  # counts this run's preview frames only
            start = time.perf_counter()
            future = widget.generate()
            marks["generate() returns"].append(time.perf_counter() - start)
            first_tile = threading.Event()

            def stop(future: Any = future, first_tile: threading.Event = first_tile, start: float = start) -> bool:
                if not first_tile.is_set() and widget.previews_shown > 0:
                    first_tile.set()
                    marks["first preview tile"].append(time.perf_counter() - start)
                return future.done()

            busy += _tick_lateness(stop)
            future.result()
            marks["final image"].append(time.perf_counter() - start)
            if not first_tile.is_set():
                marks["first preview tile"].append(float("nan"))
    finally:
        widget.close()
    return {
        "available": True,
        **{name: common.median(values) for name, values in marks.items()},
        "idle_lateness_ms_median": 1000 * common.median(idle),
        "idle_lateness_ms_max": 1000 * max(idle),
        "busy_lateness_ms_median": 1000 * common.median(busy) if busy else float("nan"),
        "busy_lateness_ms_max": 1000 * max(busy) if busy else float("nan"),
        "status": widget.status,
    }


def measure(kind: str, quick: bool) -> dict[str, Any]:
    pipe = common.load_pipeline(kind)
    settings, rounds = settings_for(kind, quick)
    return {
        "kind": kind,
        "settings": settings,
        "rounds": rounds,
        "engine": engine_latency(pipe, settings, rounds),
        "widget": widget_latency(pipe, settings, rounds),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    rows = [measure(kind, args.quick) for kind in common.selected_kinds(args)]
    engine = common.print_table(
        "Latency, engine: seconds from generate() (median)",
        ["models", "settings", "first step", "first preview", "final image"],
        [[row["kind"], _settings_text(row["settings"]), row["engine"]["first step"],
          row["engine"]["first preview"], row["engine"]["final image"]] for row in rows],
    )
    widget = common.print_table(
        "Latency, widget (worker thread): seconds from w.generate(); main-thread wake-up lateness in ms",
        ["models", "generate() returns", "first preview tile", "final image",
         "lateness idle (median / max)", "lateness while generating (median / max)"],
        [
            [row["kind"], row["widget"]["generate() returns"], row["widget"]["first preview tile"],
             row["widget"]["final image"],
             f"{row['widget']['idle_lateness_ms_median']:.2f} / {row['widget']['idle_lateness_ms_max']:.1f}",
             f"{row['widget']['busy_lateness_ms_median']:.2f} / {row['widget']['busy_lateness_ms_max']:.1f}"]
            if row["widget"]["available"] else [row["kind"], row["widget"]["reason"], "-", "-", "-", "-"]
            for row in rows
        ],
    )
    payload = {"rows": rows, "table": engine + "\n" + widget}
    common.write_json("latency", payload, args.out, common.command_line("benchmarks.latency", argv))
    return payload


def _settings_text(settings: dict[str, Any]) -> str:
    size = f", {settings['height']} px" if settings.get("height") else ""
    return f"{settings['steps']} steps{size}"


if __name__ == "__main__":
    main(sys.argv[1:])
