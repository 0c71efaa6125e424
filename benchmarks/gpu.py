"""GPU: steps/s of ours against bare diffusers at 512 px, 30 steps, fp16, SDPA, channels_last.

Run it on a CUDA machine whenever one is available (the test suite never needs one):

    python -m benchmarks.gpu                      # real-size random weights (built on first use)
    python -m benchmarks.gpu --compile            # also torch.compile the UNet
    python -m benchmarks.gpu --sd CompVis/stable-diffusion-v1-4 --clip openai/clip-vit-large-patch14

Both contenders share the same components, alternate within one run, and synchronise the device
around every timed call. Record only numbers from real runs, with the card's name (printed).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import common


def prepare(args: Any) -> Any:
    """Load our pipeline, then apply the usual GPU settings to the shared components."""
    import torch

    from imageprompt_widgets import ImagePromptPipeline
    from imageprompt_widgets.loading.cache import resolve_device_dtype
    from imageprompt_widgets.loading.components import load_components
    from imageprompt_widgets.presets import Preset

    if args.sd and args.clip:
        sd, clip = args.sd, args.clip
    else:
        models = common.model_folders("tiny" if args.quick else "real")
        sd, clip = models.sd, models.clip
    device, dtype = resolve_device_dtype(args.device, "float32" if args.device == "cpu" else args.dtype)
    # A private copy, not the process-wide cached one: the settings below must not leak to other users.
    parts = load_components(Preset(name="benchmark", sd_model=sd, clip_model=clip), device, dtype)
    pipe = ImagePromptPipeline.from_components(parts)
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.sd.unet.set_attn_processor(AttnProcessor2_0())  # scaled_dot_product_attention
    pipe.sd.vae.set_attn_processor(AttnProcessor2_0())
    pipe.sd.unet.to(memory_format=torch.channels_last)
    pipe.sd.vae.to(memory_format=torch.channels_last)
    if args.compile:
        pipe.sd.unet = torch.compile(pipe.sd.unet, mode="max-autotune-no-cudagraphs")
    return pipe


def _synchronised(device: str, function: Any) -> Any:
    import torch

    def run() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return run


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch

    options = common.parser(__doc__.splitlines()[0])
    options.add_argument("--device", default="cuda")
    options.add_argument("--dtype", default="float16")
    options.add_argument("--steps", type=int, default=30)
    options.add_argument("--size", type=int, default=512)
    options.add_argument("--rounds", type=int, default=3)
    options.add_argument("--compile", action="store_true", help="torch.compile the UNet (first run compiles)")
    options.add_argument("--sd", default=None, help="an SD 1.x model id or folder instead of the random one")
    options.add_argument("--clip", default=None, help="its CLIP image encoder (id or folder)")
    args = options.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("No CUDA device here: run this on a GPU machine (or --device cpu --quick to smoke-test).")
    if args.quick:
        args.steps, args.size, args.rounds = 2, 64, 1

    pipe = prepare(args)
    settings = {"steps": args.steps, "height": args.size, "width": args.size, "seed": 0}
    image = common.bench_image()
    reference = pipe.generate(image, **settings)  # warm-up (and compilation, with --compile)
    from imageprompt_widgets.engine import preview

    decoder = preview.decoder_for(pipe, "linear")

    def on_step(info: Any) -> None:
        preview.preview_jpegs(info.x0(), decoder, max_side=128)

    contenders = {
        "bare": _synchronised(args.device, lambda: common.bare_generate(pipe, reference)),
        "ours": _synchronised(args.device, lambda: pipe.generate(image, **settings)),
        "ours+previews": _synchronised(args.device, lambda: pipe.generate(image, on_step=on_step, **settings)),
    }
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = common.alternate(contenders, args.rounds, warmup=0 if args.quick else 1)
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else 0
    row = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "compile": args.compile,
        "settings": settings,
        "seconds": times,
        "steps_per_second": {name: args.steps / common.median(values) for name, values in times.items()},
        "ratio": common.median_ratio(times["ours"], times["bare"]),
        "ratio_previews": common.median_ratio(times["ours+previews"], times["bare"]),
        "peak_allocated_mib": common.mib(peak),
    }
    table = common.print_table(
        f"GPU: {row['device']}, {row['dtype']}, SDPA, channels_last{', torch.compile' if args.compile else ''}, "
        f"{args.size} px, {args.steps} steps (steps/s counts the whole call, decode included)",
        ["bare steps/s", "ours steps/s", "ours / bare time", "ours+previews steps/s", "ratio", "peak MiB"],
        [[row["steps_per_second"]["bare"], row["steps_per_second"]["ours"], row["ratio"],
          row["steps_per_second"]["ours+previews"], row["ratio_previews"], row["peak_allocated_mib"]]],
    )
    payload = {"rows": [row], "table": table}
    common.write_json("gpu", payload, args.out, common.command_line("benchmarks.gpu", argv))
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
