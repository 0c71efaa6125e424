"""The denoising filmstrip: decoded frames of a run (noisy latents or the model's x0 estimates) and
statistics of the latents per traced step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import FigureView, InspectError, new_figure, number, show_image

#: Most frames a filmstrip shows (evenly spaced over the traced steps, the last one always included).
MAX_FILMSTRIP_FRAMES = 8
LATENT_STAT_NAMES = ("mean", "std", "min", "max", "norm")


def latent_statistics(latents: torch.Tensor) -> torch.Tensor:
    """Per traced step ``[S, ...] -> [S, 5]``: mean, std, min, max and L2 norm of all its latents."""
    flat = latents.detach().cpu().double().flatten(1)
    return torch.stack([flat.mean(1), flat.std(1), flat.amin(1), flat.amax(1), flat.norm(dim=1)], dim=1)


def frame_indices(count: int, limit: int = MAX_FILMSTRIP_FRAMES) -> list[int]:
    """At most ``limit`` evenly spaced indices of ``count``, always ending with the last."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


@dataclass
class FilmstripView(FigureView):
    """Decoded frames of a run (x0 estimates or the noisy latents) and latent statistics per step."""

    steps: list[int]  # 1-based step after which each latent was taken
    statistics: torch.Tensor  # [S, 5], columns LATENT_STAT_NAMES, of the noisy latents
    frames: list[Any]  # decoded frames (output image ``index`` of the batch), PIL images
    frame_steps: list[int]
    decoder: str = "vae"  # what decoded the frames: the exact VAE or a preview decoder's name
    x0: bool = False  # frames show the model's clean estimate (True) or the noisy latents (False)
    frame_latents: torch.Tensor | None = None  # [F, C, h, w] what was decoded

    def table(self) -> str:
        """Per-step statistics as aligned text lines."""
        header = "step  " + "  ".join(f"{name:>9}" for name in LATENT_STAT_NAMES)
        rows = [
            f"{step:>4}  " + "  ".join(f"{number(float(v)):>9}" for v in row)
            for step, row in zip(self.steps, self.statistics)
        ]
        return "\n".join([header, *rows])

    def describe(self) -> str:
        what = "The model's clean estimate (x0) at" if self.x0 else "The noisy latents after"
        return f"{what} {len(self.frames)} of {len(self.steps)} traced steps, decoded with the {self.decoder} decoder."

    def figure(self) -> Any:
        count = max(len(self.frames), 1)
        figure = new_figure(max(1.55 * count, 6.4), 4.6)
        grid = figure.add_gridspec(2, count, height_ratios=[1, 1.15])
        what = "x0 after step" if self.x0 else "after step"
        for column, (frame, step) in enumerate(zip(self.frames, self.frame_steps)):
            show_image(figure.add_subplot(grid[0, column]), frame, f"{what} {step}", fontsize=8)
        ax = figure.add_subplot(grid[1, :])
        mean, std = self.statistics[:, 0].numpy(), self.statistics[:, 1].numpy()
        ax.plot(self.steps, std, marker="o", markersize=4, label="std of the latents")
        ax.plot(self.steps, abs(mean), marker="s", markersize=4, linestyle="--", label="|mean| of the latents")
        ax.set_xlabel("denoising step")
        ax.set_xticks(self.steps if len(self.steps) <= 16 else self.frame_steps)
        ax.set_ylabel("value (latent units)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        source = "the model's x0 estimates" if self.x0 else "the noisy latents"
        ax.set_title(f"Frames: {source}, decoded with the {self.decoder} decoder; below: the noisy latents per step",
                     fontsize=9)
        return figure


def filmstrip(result: Any, pipeline: Any, index: int = 0, decoder: str = "vae", *, x0: bool = False) -> FilmstripView:
    """Frames and statistics of a run's traced latents (run ``generate(..., trace_latents=True)`` to get them).

    ``x0=True`` shows the model's clean estimate at each frame (``pipeline.replay_x0``: one extra UNet call
    per frame), ``x0=False`` the noisy latents themselves. ``decoder="vae"`` decodes exactly (the last frame
    is the output image); ``"auto"``, ``"linear"`` or ``"taesd"`` use the cheap preview decoders of
    :mod:`imageprompt_widgets.engine.preview`.
    """
    trace = result.trace
    if trace.latents is None:
        raise InspectError("This run traced no latents: generate with trace_latents=True to see the filmstrip.")
    latents = trace.latents
    if not 0 <= index < latents.shape[1]:
        raise InspectError(f"This run made {latents.shape[1]} images; there is no image {index}.")
    chosen = frame_indices(latents.shape[0])
    steps = list(trace.latent_steps) or list(range(1, latents.shape[0] + 1))
    picked = pipeline.replay_x0(result, chosen, index=index) if x0 else latents[chosen, index]
    if decoder == "vae":
        frames, name = pipeline.decode_latents(picked), "vae"
    else:
        from ..engine import preview

        decode = preview.decoder_for(pipeline, decoder)
        frames, name = preview.to_pil(decode(picked.to(pipeline.device)).cpu()), decode.name
    return FilmstripView(
        steps, latent_statistics(latents), frames, [steps[i] for i in chosen], name, x0, picked.cpu()
    )
