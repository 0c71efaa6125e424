"""SDXL's memory plan: its real architectures with random float16 weights, counted and measured on the CPU.

Why ``sdxl`` fits a 16 GB Colab T4 (issue 28): in float16 with model CPU offload only one model is on the GPU
at a time, so the GPU holds the largest one (the 2.6 B-parameter UNet) plus its activations, while the host
holds all of them. This benchmark builds every model the ``sdxl`` preset loads (SDXL base's UNet, both text
encoders and VAE from stabilityai/stable-diffusion-xl-base-1.0's published configs; the OpenCLIP ViT-bigG-14
vision tower that Revision and the SDXL IP-Adapter read; the ViT-L/14 vision tower of the 768-wide half of
SDXL's tokens) directly in float16 (no float32 copy ever exists: the machine is shared), then reports:

- parameters and bytes per model, and the host's resident memory as each is added (everything resident:
  what the host needs with or without offloading);
- the activations' peak per model at 1,024 px, estimated by running each model on PyTorch's meta device
  (shapes, no data) and counting the bytes of the tensors alive after each operation: what PyTorch's
  allocator must hold at least (no fragmentation, no cuDNN/cuBLAS workspace, no CUDA context), with the
  ``memory="low"`` configuration (attention slicing on, VAE decoding in float32 as diffusers upcasts SDXL's VAE);
- the GPU peak under model CPU offload: the largest (weights + activations) of any one model;
- a calibration of that count: SDXL's VAE really decoding 512 px in float32 on the CPU, its peak resident memory
  growth against the meta count of the same decode (here a real run allocated about 1.3 times the count).

Nothing here runs on a GPU; numbers are printed, never asserted.

    python -m benchmarks.sdxl_memory               # real size (about 11 GiB of RAM at its peak)
    python -m benchmarks.sdxl_memory --quick       # the tiny shapes: checks that it runs, measures nothing
"""

from __future__ import annotations

import contextlib
import gc
import json
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks import common
from benchmarks.realsize import REALSIZE_SEED, TEXT_CONFIG, VAE_CONFIG, VISION_CONFIG, fill_random

#: stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2,567,463,684 parameters).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
#: SDXL's VAE: SD's architecture at 1,024 px, with its own scaling factor; ``force_upcast`` makes diffusers decode
#: in float32 (SDXL's VAE overflows in float16).
SDXL_VAE_CONFIG: dict[str, Any] = {**VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
#: text_encoder: CLIP ViT-L/14's text tower, as in SD 1.x.
SDXL_TEXT_CONFIG: dict[str, Any] = dict(TEXT_CONFIG)
#: text_encoder_2: OpenCLIP ViT-bigG-14's text tower with its projection (CLIPTextModelWithProjection).
SDXL_TEXT_2_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
#: OpenCLIP ViT-bigG-14's vision tower with its projection (h94/IP-Adapter's sdxl_models/image_encoder).
BIGG_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}

#: The tiny shapes ``--quick`` uses (same code paths, nothing measured).
_QUICK_UNET = {
    **SDXL_UNET_CONFIG, "block_out_channels": (32, 64), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4), "cross_attention_dim": 64, "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80, "norm_num_groups": 32, "sample_size": 32,
}
_QUICK_VAE = {**SDXL_VAE_CONFIG, "block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
              "up_block_types": ("UpDecoderBlock2D",) * 2, "sample_size": 64}
_QUICK_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
               "projection_dim": 32}
_QUICK_VISION = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "projection_dim": 32, "patch_size": 14, "image_size": 28}


@dataclass(frozen=True)
class Component:
    """One model the ``sdxl`` preset loads: how to build it, and the run whose activations count."""

    name: str
    role: str
    build: Callable[[], Any]
    #: Runs the model once on inputs made on the model's device (meta for the estimate); returns nothing.
    run: Callable[[Any], None]
    #: The dtype it computes in on the GPU (the VAE is upcast to float32 by diffusers for decoding).
    compute_dtype: str = "float16"


def components(quick: bool = False, size: int = 1024) -> list[Component]:
    """The ``sdxl`` preset's models, largest first (the order they are built and measured in)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    unet_config = _QUICK_UNET if quick else SDXL_UNET_CONFIG
    vae_config = _QUICK_VAE if quick else SDXL_VAE_CONFIG
    text = {**SDXL_TEXT_CONFIG, **(_QUICK_TEXT if quick else {})}
    text_2 = {**SDXL_TEXT_2_CONFIG, **(_QUICK_TEXT if quick else {})}
    big_g = {**BIGG_VISION_CONFIG, **(_QUICK_VISION if quick else {})}
    vit_l = {**VISION_CONFIG, **(_QUICK_VISION if quick else {})}
    if quick:
        size = 64
    latent = size // 8
    context = unet_config["cross_attention_dim"]
    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]

    def unet_run(model: Any) -> None:
        device, dtype = _where(model)
        batch = 2  # classifier-free guidance: the unconditional and conditional halves in one call
        model(
            torch.zeros(batch, 4, latent, latent, device=device, dtype=dtype),
            torch.tensor([999] * batch, device=device),
            encoder_hidden_states=torch.zeros(batch, 77, context, device=device, dtype=dtype),
            added_cond_kwargs={
                "text_embeds": torch.zeros(batch, pooled, device=device, dtype=dtype),
                "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype),
            },
        )

    def vae_run(model: Any) -> None:
        device, dtype = _where(model)
        model.decode(torch.zeros(1, 4, latent, latent, device=device, dtype=dtype))

    def text_run(model: Any) -> None:
        device, _ = _where(model)
        model(torch.zeros(1, 77, dtype=torch.long, device=device), output_hidden_states=True)

    def vision_run(model: Any) -> None:
        device, dtype = _where(model)
        side = model.config.image_size
        model(torch.zeros(1, 3, side, side, device=device, dtype=dtype), output_hidden_states=True)

    return [
        Component("unet", "SDXL base UNet", lambda: UNet2DConditionModel(**unet_config), unet_run),
        Component("image_encoder (bigG)", "OpenCLIP ViT-bigG-14 vision + projection (Revision, IP-Adapter SDXL)",
                  lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**big_g)), vision_run),
        Component("text_encoder_2", "OpenCLIP ViT-bigG-14 text + projection",
                  lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text_2)), text_run),
        Component("image_encoder (ViT-L)", "CLIP ViT-L/14 vision + projection (the 768-wide token half)",
                  lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**vit_l)), vision_run),
        Component("text_encoder", "CLIP ViT-L/14 text", lambda: CLIPTextModel(CLIPTextConfig(**text)), text_run),
        Component("vae", "SDXL VAE (decoding at 1,024 px)", lambda: AutoencoderKL(**vae_config), vae_run,
                  compute_dtype="float32"),
    ]


def _where(model: Any) -> tuple[Any, Any]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


@contextlib.contextmanager
def float16_construction() -> Iterator[None]:
    """Models built inside are float16 from their first byte, uninitialised (``fill_random`` follows).

    The default dtype makes every parameter float16 when it is allocated, so no float32 copy ever exists;
    the libraries' initialisation is skipped (it would cost minutes and write values we overwrite).
    """
    import torch
    from transformers.initialization import no_init_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)


def tensor_bytes(model: Any) -> tuple[int, int]:
    """``(parameters, bytes)`` of a model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(p.numel() for p in model.parameters()), sum(t.numel() * t.element_size() for t in tensors)


class LiveBytes:
    """A dispatch mode that counts the bytes of tensors alive after each operation, and their peak.

    Storages are counted once however many views share them (in-place ops and views add nothing); a storage
    leaves the count when its last tensor is freed. On the meta device this is the allocation a run needs.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                before = counter.current
                counter._add(out)
                grown = counter.current - before
                name = str(func.overloadpacket.__name__)
                counter.largest[name] = max(counter.largest.get(name, 0), grown)
                return out

        self.mode = _Mode()
        self.live: dict[int, list[int]] = {}  # storage id -> [bytes, tensors alive]
        self.current = 0
        self.peak = 0
        self.largest: dict[str, int] = {}  # op -> the most bytes one call of it allocated
        self.weights: set[int] = set()  # the model's own storages: views of them (``t`` of a weight) are no activation

    def ignore(self, model: Any) -> None:
        """Leave ``model``'s parameters and buffers out of the count (they are the weights, counted apart)."""
        self.weights.update(t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers()))

    def track(self, tensor: Any) -> None:
        """Count a tensor made outside the mode (the inputs)."""
        self._add(tensor)

    def _add(self, out: Any) -> None:
        import torch

        if isinstance(out, (tuple, list)):
            for item in out:
                self._add(item)
            return
        if not isinstance(out, torch.Tensor):
            return
        storage = out.untyped_storage()
        key = storage._cdata
        if key in self.weights:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(out, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


def activation_peak(component: Component, attention_slicing: bool = True) -> tuple[int, dict[str, int]]:
    """Bytes of activations at the peak of one run of ``component``, counted on the meta device, and the three
    operations that allocated the most in one call (to see which kernel an estimate rests on)."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the cast to float16 below warns about modules kept in float32: none
    try:
        with torch.device("meta"):
            model = component.build()
        model = model.to(getattr(torch, component.compute_dtype)).eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)  # the caller's (a test process's) logging stays as it was
    if attention_slicing and hasattr(model, "set_attention_slice"):
        model.set_attention_slice("auto")  # what memory="low" switches on
    counter = LiveBytes()
    counter.ignore(model)
    with torch.no_grad(), counter.mode:
        component.run(model)
    del model
    top = dict(sorted(counter.largest.items(), key=lambda item: -item[1])[:3])
    return counter.peak, top


def measure(quick: bool) -> dict[str, Any]:
    """Build every model resident in float16, one after the other, then estimate each one's activations."""
    import torch

    parts = components(quick)  # imports the libraries before the baseline is read
    gc.collect()
    start_rss = common.rss_bytes()
    rows: list[dict[str, Any]] = []
    resident: list[Any] = []
    for offset, component in enumerate(parts):
        with float16_construction():
            model = component.build()
        fill_random(model, REALSIZE_SEED + offset)
        model.eval().requires_grad_(False)
        assert next(model.parameters()).dtype == torch.float16, "built in float16, never float32"
        parameters, nbytes = tensor_bytes(model)
        resident.append(model)
        gc.collect()
        rows.append({
            "component": component.name, "role": component.role, "parameters": parameters, "bytes": nbytes,
            "rss_total_bytes": common.rss_bytes() - start_rss,
        })
    peak_resident = common.peak_rss_bytes()
    all_rss = common.rss_bytes() - start_rss
    del resident, model
    gc.collect()
    for row, component in zip(rows, parts):
        activations, row["largest_ops_bytes"] = activation_peak(component)
        weights_on_gpu = row["bytes"] * (2 if component.compute_dtype == "float32" else 1)
        row.update(activations_bytes=activations, gpu_weights_bytes=weights_on_gpu,
                   gpu_peak_bytes=weights_on_gpu + activations)
    total = sum(row["bytes"] for row in rows)
    largest = max(rows, key=lambda row: row["gpu_peak_bytes"])
    return {
        "rows": rows, "total_bytes": total, "rss_all_resident_bytes": all_rss, "rss_start_bytes": start_rss,
        "peak_rss_bytes": peak_resident, "offload_gpu_peak_component": largest["component"],
        "offload_gpu_peak_bytes": largest["gpu_peak_bytes"],
        "everything_on_gpu_bytes": total + max(row["activations_bytes"] for row in rows)
        + rows[-1]["bytes"],  # + the VAE's float32 copy
    }


def calibrate(quick: bool, size: int = 512) -> dict[str, Any]:
    """The meta count against a real run: SDXL's VAE decoding ``size`` px in float32 on the CPU, where PyTorch
    allocates large tensors straight from the system, so the growth of the process's peak resident memory is
    the run's real allocation peak. Runs in a fresh process (a peak cannot be reset)."""
    import subprocess
    import sys

    code = (
        "import json, gc, torch\n"
        "from benchmarks import common, sdxl_memory as m\n"
        f"quick, size = {quick!r}, {64 if quick else size}\n"
        "vae = m.components(quick)[-1]\n"
        "from diffusers import AutoencoderKL\n"
        "model = vae.build().eval().requires_grad_(False)\n"
        "m.fill_random(model, m.REALSIZE_SEED)\n"
        "latents = torch.zeros(1, 4, size // 8, size // 8)\n"
        "gc.collect(); before = common.peak_rss_bytes(); rss = common.rss_bytes()\n"
        "with torch.no_grad(): model.decode(latents)\n"
        "measured = common.peak_rss_bytes() - max(before, rss)\n"
        "part = m.Component(vae.name, vae.role, vae.build, lambda model: model.decode(torch.zeros(1, 4, size // 8, "
        "size // 8, device='meta')), 'float32')\n"
        "counted, _ = m.activation_peak(part, attention_slicing=False)\n"
        "print(json.dumps({'size': size, 'measured_bytes': measured, 'counted_bytes': counted}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=str(common.ROOT))
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(nbytes: float) -> float:
    return nbytes / 2**30


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    options = common.parser(__doc__.splitlines()[0])
    args = options.parse_args(argv)
    result = measure(args.quick)
    rows = result["rows"]
    table = common.print_table(
        "SDXL in float16: parameters, bytes and host RAM per model (random weights, CPU)"
        + (" [--quick: tiny shapes, nothing measured]" if args.quick else ""),
        ["model", "parameters (M)", "weights GiB", "host RSS with it and those above, GiB",
         "activations at 1,024 px GiB (meta estimate)", "GPU peak with it alone, GiB"],
        [[row["component"], row["parameters"] / 1e6, gib(row["bytes"]), gib(row["rss_total_bytes"]),
          gib(row["activations_bytes"]), gib(row["gpu_peak_bytes"])] for row in rows],
    )
    summary = common.print_table(
        "SDXL's memory plan (float16)",
        ["measure", "GiB"],
        [
            ["all weights (sum of the models)", gib(result["total_bytes"])],
            ["host RSS with everything resident (measured, above the imports)", gib(result["rss_all_resident_bytes"])],
            ["process peak RSS (measured, imports included)", gib(result["peak_rss_bytes"])],
            [f"GPU peak, model CPU offload (largest: {result['offload_gpu_peak_component']}, weights + activations)",
             gib(result["offload_gpu_peak_bytes"])],
            ["GPU peak, everything on the GPU (all weights + the largest activations + the VAE's float32 copy)",
             gib(result["everything_on_gpu_bytes"])],
        ],
    )
    check = calibrate(args.quick)
    calibration = common.print_table(
        "Calibration: the meta count against a real run (SDXL's VAE decoding in float32 on the CPU)",
        ["size px", "counted on the meta device, GiB", "measured (peak RSS growth), GiB", "measured / counted"],
        [[check["size"], gib(check["counted_bytes"]), gib(check["measured_bytes"]),
          check["measured_bytes"] / max(check["counted_bytes"], 1)]],
    )
    payload = {**result, "calibration": check, "table": table + "\n" + summary + "\n" + calibration,
               "quick": args.quick}
    common.write_json("sdxl_memory", payload, args.out,
                      common.command_line("benchmarks.sdxl_memory", argv))
    return payload


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
