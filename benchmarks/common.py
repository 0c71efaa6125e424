"""What every benchmark shares: model loading, alternating timers, RSS, tables and JSON.

The machines these run on are shared and drift, so a comparison is always measured by
alternating its contenders within one run (order rotated each round) and summarised as the
median of per-round ratios, never as absolute times from separate runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
MODEL_KINDS = ("tiny", "real")


@dataclass(frozen=True)
class Models:
    """Where a benchmark's models live: ``sd`` and ``clip`` folders, and how to name them in tables."""

    kind: str  # "tiny" or "real"
    sd: str
    clip: str


def model_folders(kind: str) -> Models:
    """The tiny preset's folders, or the real-size random architectures (built on first use, ~6 GB)."""
    if kind == "tiny":
        from imageprompt_widgets.loading.offline import ensure_tiny_models

        return Models(kind, *ensure_tiny_models())
    if kind == "real":
        from benchmarks.realsize import ensure_realsize_models

        return Models(kind, *ensure_realsize_models())
    raise ValueError(f"Unknown model kind {kind!r}: use one of {', '.join(MODEL_KINDS)}.")


def load_pipeline(kind: str, device: str = "cpu", dtype: str = "float32") -> Any:
    """Our pipeline on ``kind``'s models, through the public, cached ``from_pretrained``."""
    from imageprompt_widgets import ImagePromptPipeline

    models = model_folders(kind)
    return ImagePromptPipeline.from_pretrained(sd_model=models.sd, clip_model=models.clip, device=device, dtype=dtype)


def bench_image(seed: int = 0, size: tuple[int, int] = (256, 192)) -> Any:
    """A deterministic textured RGB picture (the input image of every benchmark)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, ((x + y) % 23) / 23], axis=-1) * 200
    noise = rng.integers(0, 55, size=(height, width, 3))
    return Image.fromarray((base + noise).astype(np.uint8), "RGB")


def bare_generate(pipe: Any, result: Any, **extra: Any) -> Any:
    """Bare diffusers on our pipeline's own components, fed the embeddings our run traced.

    This is what a user writes by hand: ``StableDiffusionPipeline(prompt_embeds=...)`` with a seeded
    generator; the contract says its pixels equal ours.
    """
    import torch

    trace, settings = result.trace, result.settings
    negative = trace.negative_prompt_embeds
    return pipe.sd(
        prompt_embeds=trace.prompt_embeds.to(pipe.device, pipe.dtype),
        negative_prompt_embeds=None if negative is None else negative.to(pipe.device, pipe.dtype),
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        height=settings.height,
        width=settings.width,
        generator=torch.Generator(pipe.device).manual_seed(settings.seed),
        output_type="pil",
        **extra,
    )


def same_pixels(first: Sequence[Any], second: Sequence[Any]) -> bool:
    import numpy as np

    return len(first) == len(second) and all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second)
    )


def alternate(contenders: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every contender once per round, rotating the order; seconds per run, warm-up rounds dropped.

    Rotation means no contender always runs first (cold caches) or last (after the others heated the CPU).
    """
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[name]()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of per-round ratios: robust to the machine speeding up or slowing down between rounds."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return _proc_status_kb("VmRSS") * 1024


def rss_parts() -> dict[str, int]:
    """Resident memory split into anonymous (copied into RAM) and file-backed (mmapped weights) bytes."""
    return {"anon": _proc_status_kb("RssAnon") * 1024, "file": _proc_status_kb("RssFile") * 1024}


def peak_rss_bytes() -> int:
    """The highest resident memory this process has had."""
    peak = _proc_status_kb("VmHWM")
    if peak:
        return peak * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def _proc_status_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_info() -> dict[str, Any]:
    """The machine and library versions a table was measured with."""
    import diffusers
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes."""
    result = argparse.ArgumentParser(description=description)
    result.add_argument(
        "--models", default="tiny,real",
        help="comma-separated: 'tiny' (the tiny preset) and/or 'real' (real-size random architectures)",
    )
    result.add_argument(
        "--quick", action="store_true",
        help="tiny models, one round, fewest steps: checks that the benchmark runs, measures nothing",
    )
    result.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON results")
    return result


def selected_kinds(args: argparse.Namespace) -> list[str]:
    if args.quick:
        return ["tiny"]
    kinds = [kind.strip() for kind in args.models.split(",") if kind.strip()]
    for kind in kinds:
        if kind not in MODEL_KINDS:
            raise SystemExit(f"--models: unknown kind {kind!r}; use tiny, real or tiny,real.")
    return kinds


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (printed, and pasted as is into docs/benchmarks.md)."""
    cells = [[_cell(value) for value in row] for row in rows]
    lines = [f"### {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def write_json(name: str, payload: dict[str, Any], out_dir: str | os.PathLike, command: str) -> Path:
    """``out_dir/name.json`` with the machine, the command and the numbers."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    document = {"benchmark": name, "command": command, "machine": machine_info(), **payload}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}", flush=True)
    return path


def command_line(module: str, argv: Sequence[str] | None) -> str:
    return " ".join(["python -m", module, *(argv or [])])


def mib(nbytes: float) -> float:
    return nbytes / 2**20
