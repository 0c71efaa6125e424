"""Cache: a second ``from_preset`` / ``from_pretrained`` with the same arguments, and a second widget.

Loading SD takes seconds to minutes and gigabytes; every widget and script in a kernel must share
one loaded copy. Measures the time of the repeated call and the resident memory it adds.
Target (issue 7): under 10 ms, no added model memory.

    python -m benchmarks.cache
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks import common

TARGET_MS = 10.0


def measure(kind: str, quick: bool) -> dict[str, Any]:
    from imageprompt_widgets import ImagePromptPipeline
    from imageprompt_widgets.loading.cache import MODEL_CACHE, model_key, resolve_device_dtype

    models = common.model_folders(kind)
    device, dtype = resolve_device_dtype("cpu", "float32")
    already_loaded = MODEL_CACHE.get(model_key(models.sd, models.clip, device, dtype, None, False)) is not None
    rss_before = common.rss_bytes()
    start = time.perf_counter()
    first = ImagePromptPipeline.from_pretrained(models.sd, models.clip, device="cpu", dtype="float32")
    first_seconds = time.perf_counter() - start
    rss_loaded = common.rss_bytes()

    calls = 20 if quick else 500
    again: list[float] = []
    for _ in range(calls):
        start = time.perf_counter()
        second = ImagePromptPipeline.from_pretrained(models.sd, models.clip, device="cpu", dtype="float32")
        again.append(time.perf_counter() - start)
        assert second is first, "the cache returned a different object for the same arguments"
    rss_after = common.rss_bytes()
    row = {
        "kind": kind,
        "first_call_seconds": first_seconds,
        "first_call_was_cached": already_loaded,
        "first_call_added_mib": common.mib(rss_loaded - rss_before),
        "second_call_ms_median": 1000 * common.median(again),
        "second_call_ms_max": 1000 * max(again),
        "calls": calls,
        "added_mib_by_repeats": common.mib(rss_after - rss_loaded),
        "same_object": True,
    }
    row.update(_second_widget(first, quick))
    return row


def _second_widget(pipe: Any, quick: bool) -> dict[str, Any]:
    """A widget on the same arguments as another: it must reuse the loaded pipeline, not load again."""
    try:
        from imageprompt_widgets import ImagePromptWidget
    except (ImportError, AttributeError) as err:
        return {"widget": f"not available ({type(err).__name__}: {err})"}
    first = ImagePromptWidget(pipeline=pipe)
    rss_before = common.rss_bytes()
    start = time.perf_counter()
    second = ImagePromptWidget(pipeline=pipe)
    seconds = time.perf_counter() - start
    return {
        "widget": "measured",
        "second_widget_ms": 1000 * seconds,
        "second_widget_added_mib": common.mib(common.rss_bytes() - rss_before),
        "widgets_share_pipeline": first.pipeline is second.pipeline is pipe,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = common.parser(__doc__.splitlines()[0]).parse_args(argv)
    rows = [measure(kind, args.quick) for kind in common.selected_kinds(args)]
    table = common.print_table(
        "Cache: the same arguments again (target < 10 ms, no added model memory)",
        ["models", "first load s", "first load MiB", "again ms (median)", "again ms (max)",
         "MiB added by repeats", "second widget ms", "second widget MiB", "same pipeline"],
        [
            [row["kind"],
             "(already loaded)" if row["first_call_was_cached"] else row["first_call_seconds"],
             "-" if row["first_call_was_cached"] else row["first_call_added_mib"],
             row["second_call_ms_median"], row["second_call_ms_max"], row["added_mib_by_repeats"],
             row.get("second_widget_ms", "-"), row.get("second_widget_added_mib", "-"),
             row.get("widgets_share_pipeline", row["same_object"])]
            for row in rows
        ],
    )
    payload = {"rows": rows, "table": table}
    common.write_json("cache", payload, args.out, common.command_line("benchmarks.cache", argv))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
