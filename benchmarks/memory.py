"""Memory: resident memory after loading our pipeline against the guide's way.

The guide loads the full ``CLIPModel`` (vision *and* text tower) next to the SD pipeline; the
engine loads only the vision tower and its projection. Each way runs in a fresh process (peak RSS
is per process), after the same imports, and reports its RSS after loading, after one generation,
and its peak. Target (issue 7): ours lower by about the CLIP text tower (~0.5 GB in fp32).

    python -m benchmarks.memory                  # real-size (and tiny)
    python -m benchmarks.memory --models real
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks import common

WAYS = ("imports", "ours", "guide")


def child(way: str, kind: str, steps: int, size: int | None, dtype: str = "float32") -> dict[str, Any]:
    """Runs in a fresh process: load one way, generate once (unless ``steps`` is 0), report memory."""
    import torch
    from diffusers import StableDiffusionPipeline  # both ways pay for the same imports
    from transformers import CLIPImageProcessor, CLIPModel

    from imageprompt_widgets.loading.cache import diffusers_dtype_kwarg, parameter_count
    from imageprompt_widgets.loading.quiet import quiet_loaders

    models = common.model_folders(kind)
    image = common.bench_image()
    report: dict[str, Any] = {"way": way, "rss_imports": common.rss_bytes()}
    if way == "imports":
        report.update(rss_loaded=common.rss_bytes(), rss_generated=common.rss_bytes(), parameters=0,
                      rss_generated_parts=common.rss_parts())
    elif way == "ours":
        from imageprompt_widgets import ImagePromptPipeline

        pipe = ImagePromptPipeline.from_pretrained(models.sd, models.clip, device="cpu", dtype=dtype)
        report["rss_loaded"] = common.rss_bytes()
        if steps:
            pipe.generate(image, steps=steps, height=size, width=size)
        report["rss_generated"] = common.rss_bytes()
        report["rss_generated_parts"] = common.rss_parts()
        report["parameters"] = parameter_count(pipe.image_encoder) + sum(
            parameter_count(getattr(pipe.sd, name)) for name in ("unet", "vae", "text_encoder")
        )
    else:  # the guide: full CLIPModel + StableDiffusionPipeline, embeddings by hand
        with quiet_loaders():
            clip = CLIPModel.from_pretrained(models.clip, dtype=getattr(torch, dtype), use_safetensors=True)
            processor = CLIPImageProcessor.from_pretrained(models.clip)
            sd = StableDiffusionPipeline.from_pretrained(
                models.sd, use_safetensors=True, **{diffusers_dtype_kwarg(): getattr(torch, dtype)}
            )
        sd.set_progress_bar_config(disable=True)
        report["rss_loaded"] = common.rss_bytes()
        if steps:
            with torch.no_grad():
                features = clip.get_image_features(**processor(images=[image], return_tensors="pt"))
                embeds = getattr(features, "pooler_output", features)
                prompt = embeds[:, None, :].repeat(1, 77, 1)
                sd(prompt_embeds=prompt, num_inference_steps=steps, height=size, width=size,
                   generator=torch.Generator("cpu").manual_seed(0))
        report["rss_generated"] = common.rss_bytes()
        report["rss_generated_parts"] = common.rss_parts()
        report["parameters"] = parameter_count(clip) + sum(
            parameter_count(getattr(sd, name)) for name in ("unet", "vae", "text_encoder")
        )
    report["rss_peak"] = common.peak_rss_bytes()
    return report


def run_child(way: str, kind: str, steps: int, size: int | None, dtype: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.memory", "--child", way, "--kind", kind, "--steps", str(steps),
               "--dtype", dtype]
    if size:
        command += ["--size", str(size)]
    done = subprocess.run(command, cwd=common.ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child {way!r} on {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(kind: str, quick: bool, in_process: bool = False, dtype: str = "float32", load_only: bool = False
            ) -> dict[str, Any]:
    common.model_folders(kind)  # build once here, not three times in parallel children
    steps, size = (1, None) if quick else (2, 128 if kind == "real" else None)
    steps = 0 if load_only else steps
    if in_process:  # the test suite's smoke run: every code path, meaningless numbers
        reports = {way: child(way, kind, steps, size, dtype) for way in WAYS}
    elif quick:  # memory is per process, so parallel children measure the same; only time is saved
        with ThreadPoolExecutor(len(WAYS)) as pool:
            reports = dict(zip(WAYS, pool.map(lambda way: run_child(way, kind, steps, size, dtype), WAYS)))
    else:  # one at a time: real-size children need ~6 GB each on a shared machine
        reports = {way: run_child(way, kind, steps, size, dtype) for way in WAYS}
    base = reports["imports"]["rss_loaded"]
    ours, guide = reports["ours"], reports["guide"]
    return {
        "kind": kind,
        "dtype": dtype,
        "steps": steps,
        "size": size,
        "reports": reports,
        "ours_loaded_mib": common.mib(ours["rss_loaded"] - base),
        "guide_loaded_mib": common.mib(guide["rss_loaded"] - base),
        "saved_loaded_mib": common.mib(guide["rss_loaded"] - ours["rss_loaded"]),
        "saved_peak_mib": common.mib(guide["rss_peak"] - ours["rss_peak"]),
        "saved_generated_mib": common.mib(guide["rss_generated"] - ours["rss_generated"]),
        "ours_generated_anon_file_mib": [common.mib(ours["rss_generated_parts"][part]) for part in ("anon", "file")],
        "guide_generated_anon_file_mib": [common.mib(guide["rss_generated_parts"][part]) for part in ("anon", "file")],
        "saved_parameters_mib": common.mib(
            (4 if dtype == "float32" else 2) * (guide["parameters"] - ours["parameters"])
        ),
        "ours_peak_mib": common.mib(ours["rss_peak"]),
        "guide_peak_mib": common.mib(guide["rss_peak"]),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    options = common.parser(__doc__.splitlines()[0])
    options.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)  # internal: one way per process
    options.add_argument("--kind", default="tiny")
    options.add_argument("--steps", type=int, default=2)
    options.add_argument("--size", type=int, default=None)
    options.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    options.add_argument("--load-only", action="store_true", help="measure after loading, generate nothing")
    options.add_argument(
        "--in-process", action="store_true",
        help="measure every way in this process (for the test suite: runs every code path, numbers meaningless)",
    )
    args = options.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.kind, args.steps, args.size, args.dtype)))
        return {}
    rows = [measure(kind, args.quick, args.in_process, args.dtype, args.load_only) for kind in common.selected_kinds(args)]
    table = common.print_table(
        f"Memory: resident MiB above the same imports (fresh process per way, {args.dtype}, CPU)",
        ["models", "ours after load", "guide after load", "saved after load", "saved after generating",
         "saved at peak", "text tower + projection (params × bytes)", "ours peak", "guide peak",
         "ours anon / file after generating", "guide anon / file after generating"],
        [
            [row["kind"] + (" (load only)" if args.load_only else ""), row["ours_loaded_mib"], row["guide_loaded_mib"], row["saved_loaded_mib"],
             row["saved_generated_mib"], row["saved_peak_mib"], row["saved_parameters_mib"], row["ours_peak_mib"],
             row["guide_peak_mib"], "{:.0f} / {:.0f}".format(*row["ours_generated_anon_file_mib"]),
             "{:.0f} / {:.0f}".format(*row["guide_generated_anon_file_mib"])]
            for row in rows
        ],
    )
    payload = {"rows": rows, "table": table}
    name = "memory" if args.dtype == "float32" and not args.load_only else f"memory-{args.dtype}"
    common.write_json(name, payload, args.out, common.command_line("benchmarks.memory", argv))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
