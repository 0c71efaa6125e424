"""What happens around each denoising step: progress, x0 previews, cancel, traced latents, and the hooks
a run installs on the UNet and VAE for its duration.

diffusers hands intermediate tensors out through ``callback_on_step_end``; :class:`StepTracker` is that
callback. The model's clean-image estimate (x0) is computed by one function, :func:`predicted_x0`, for
the live previews and for the inspector's replays alike.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .samplers import current_sigma

#: At most this many latent snapshots are kept per run (a stride is used beyond it).
MAX_TRACED_STEPS = 64


class Cancelled(Exception):
    """Raised inside the denoising loop to stop it; ``generate`` turns it into ``cancelled=True``."""


class NonFiniteImageError(ValueError):
    """The VAE decoded NaN or infinite values (typically a float16 VAE overflowing): the images would be black."""


@dataclass
class StepInfo:
    """Handed to ``on_step`` after every denoising step. Tensors live on the device; do not modify them."""

    step: int  # steps finished so far, 1-based
    total: int  # UNet steps in this run (PNDM runs one more than asked)
    timestep: float
    latents: torch.Tensor  # [B, C, h, w] after this step
    seconds: float  # since the first step started
    _x0: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def steps_per_second(self) -> float:
        return self.step / self.seconds if self.seconds > 0 else 0.0

    def x0(self) -> torch.Tensor:
        """The model's current estimate of the clean latents (what previews should show, not the noise)."""
        if self._x0 is None:
            raise RuntimeError("x0 is only available to on_step callbacks during generation")
        return self._x0()


StepCallback = Callable[[StepInfo], None]


def predicted_x0(
    sample: torch.Tensor, timestep: Any, noise_prediction: torch.Tensor, scheduler: Any,
    sigma: float | None = None,
) -> torch.Tensor:
    """The clean latents the model predicts from a noisy ``sample`` at ``timestep`` (float32).

    ``x0 = (x - sqrt(1 - a) eps) / sqrt(a)`` with ``a = alphas_cumprod[t]`` (``v``-prediction:
    ``sqrt(a) x - sqrt(1 - a) v``). ``sample`` is the UNet's input: the variance-preserving latent for
    every SD scheduler (Euler-type schedulers scale their latents, but hand the UNet this one). Schedulers
    that step in sigma space (Euler, DPM-Solver, UniPC) may run at fractional timesteps or Karras sigmas:
    pass their step's ``sigma`` and ``a = 1 / (1 + sigma^2)`` is used, exactly their own noise level
    (:func:`~imageprompt_widgets.engine.samplers.current_sigma`). Not every scheduler returns
    ``pred_original_sample`` (PNDM does not), so this is computed here for all.
    """
    if sigma is not None:
        alpha = torch.tensor(1.0 / (1.0 + sigma**2), dtype=torch.float32, device=sample.device)
    else:
        alphas = scheduler.alphas_cumprod
        index = round(float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep))
        alpha = alphas[min(max(index, 0), len(alphas) - 1)].to(sample.device, torch.float32)
    sample, noise_prediction = sample.float(), noise_prediction.float()
    if scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
        return alpha.sqrt() * sample - (1 - alpha).sqrt() * noise_prediction
    return (sample - (1 - alpha).sqrt() * noise_prediction) / alpha.sqrt()


def guided_prediction(prediction: torch.Tensor, guidance_scale: float | None) -> torch.Tensor:
    """Classifier-free guidance on a ``[uncond; cond]`` batch (``None``: the batch is unguided as it is)."""
    if guidance_scale is None:
        return prediction
    uncond, cond = prediction.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


class StepTracker:
    """diffusers' ``callback_on_step_end``: records the trace, reports steps, cancels between steps.

    ``guidance_scale`` is the run's guidance when its UNet batch is ``[uncond; cond]``, else ``None``.
    ``step_hooks`` are called with ``(steps finished, total)`` after each step, before the next one
    (the IP-Adapter's step window uses one).
    """

    def __init__(
        self,
        unet: Any,
        scheduler: Any,
        guidance_scale: float | None,
        *,
        on_step: StepCallback | None = None,
        cancel: threading.Event | None = None,
        trace_latents: bool = False,
    ) -> None:
        self.unet = unet
        self.scheduler = scheduler
        self.guidance_scale = guidance_scale
        self.on_step = on_step
        self.cancel = cancel
        self.trace_latents = trace_latents
        self.snapshots: list[torch.Tensor] = []
        self.latent_steps: list[int] = []
        self._timesteps: list[Any] = []
        self.started = time.perf_counter()
        #: When the last step (and its previews and hooks) finished: what follows in diffusers' call is decoding.
        self.ended: float | None = None
        self._unet_call: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.step_hooks: list[Callable[[int, int], None]] = []

    def __call__(self, sd: Any, index: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        latents = kwargs["latents"]
        total = sd.num_timesteps
        step = index + 1
        self._timesteps.append(timestep)  # a device tensor: float() here would wait for the GPU every step
        if self.trace_latents:
            stride = max(1, math.ceil(total / MAX_TRACED_STEPS))
            if index % stride == 0 or step == total:
                self.snapshots.append(latents.detach().to("cpu", copy=True))
                self.latent_steps.append(step)
        if self.on_step is not None:
            seconds = time.perf_counter() - self.started
            self.on_step(StepInfo(step, total, float(timestep), latents, seconds, self._x0))
        for hook in self.step_hooks:
            hook(step, total)
        self.ended = time.perf_counter()
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled
        return kwargs

    @contextlib.contextmanager
    def tapping_noise_predictions(self) -> Iterator[None]:
        """Capture the UNet's input and output each step (references only) so ``x0`` can be computed."""
        handle = None
        if self.on_step is not None:
            handle = self.unet.register_forward_hook(self._remember_unet_call, with_kwargs=True)
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    def _remember_unet_call(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        prediction = output[0] if isinstance(output, tuple) else output.sample
        # The step's noise level is read now: the scheduler moves on to the next step before on_step runs.
        self._unet_call = (sample, timestep, prediction, current_sigma(self.scheduler, timestep))

    def _x0(self) -> torch.Tensor:
        if self._unet_call is None:
            raise RuntimeError("no UNet call seen yet")
        sample, timestep, prediction, sigma = self._unet_call
        if self.guidance_scale is not None:
            sample = sample.chunk(2)[1]
        return predicted_x0(sample, timestep, guided_prediction(prediction, self.guidance_scale), self.scheduler,
                            sigma)

    @property
    def timesteps(self) -> list[float]:
        """The timesteps that ran (read once, after the run: no host sync per step)."""
        return [float(timestep) for timestep in self._timesteps]

    @property
    def latents(self) -> torch.Tensor | None:
        """``[S, B, C, h, w]`` snapshots after the steps in :attr:`latent_steps`, or ``None``."""
        return torch.stack(self.snapshots) if self.snapshots else None


# ---------------------------------------------------------------------------------------------
# Hooks installed for the duration of one run


@contextlib.contextmanager
def watching_decoded_values(vae: Any) -> Iterator[list[torch.dtype]]:
    """Notice NaN/Inf in what the VAE's decoder returns (a float16 VAE overflows to NaN, and diffusers then
    hands back black images without a word). One ``isfinite`` per decode; the pixels are not touched. Yields
    a list that gets the decoder's dtype once per decode that had non-finite values."""
    found: list[torch.dtype] = []
    decoder = getattr(vae, "decoder", None)
    if not isinstance(decoder, torch.nn.Module):
        yield found
        return

    def check(module: Any, args: tuple, output: Any) -> None:
        sample = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if torch.is_tensor(sample) and not bool(torch.isfinite(sample).all()):
            found.append(sample.dtype)

    handle = decoder.register_forward_hook(check)
    try:
        with warnings.catch_warnings():
            # numpy's cast of NaN pixels to uint8 warns before non_finite_error says it in a sentence of its own.
            warnings.filterwarnings("ignore", message="invalid value encountered in cast", category=RuntimeWarning)
            yield found
    finally:
        handle.remove()


def non_finite_error(dtype: torch.dtype) -> NonFiniteImageError:
    """The sentence for a decode that gave NaN, with what to do about it."""
    half = dtype in (torch.float16, torch.bfloat16)
    advice = ("load the model with dtype='float32' (a float32 VAE does not overflow) or try a smaller size"
              if half else "lower scale or guidance_scale, or try a smaller size")
    return NonFiniteImageError(
        f"The VAE ({str(dtype).removeprefix('torch.')}) decoded NaN values, so the images would come out "
        f"black: {advice}."
    )


@contextlib.contextmanager
def masked_prompt(unet: Any, mask: torch.Tensor) -> Iterator[None]:
    """Hand ``encoder_attention_mask`` to every UNet call (diffusers' pipeline has no argument for it)."""

    def add_mask(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sample = args[0] if args else kwargs["sample"]
        if sample.shape[0] == mask.shape[0]:
            kwargs["encoder_attention_mask"] = mask.to(sample.device)
        return args, kwargs

    handle = unet.register_forward_pre_hook(add_mask, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
