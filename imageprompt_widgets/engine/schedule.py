"""How many UNet steps a run will take, known before the first one: the total a progress bar needs.

It is not always ``steps``: PNDM (SD 1.x's default, with ``skip_prk_steps``) runs one warm-up step more,
and img2img runs only the last ``int(steps * strength)`` of the schedule. The count comes from the
scheduler itself (``set_timesteps`` on a fresh copy, so the pipeline's own scheduler is not touched) and
the same slicing diffusers' img2img pipeline does, so it equals what the run reports step by step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepPlan:
    """The UNet steps of one run: ``total`` of them for ``requested`` asked, and why they differ."""

    total: int
    requested: int
    reason: str = ""  # one sentence when total != requested; "" otherwise


def planned_steps(scheduler: Any, steps: int, *, structure: str = "none", strength: float = 1.0) -> StepPlan:
    """The number of denoising steps diffusers will run with ``scheduler`` for these settings."""
    fresh = copy.deepcopy(scheduler)  # not from_config: it warns again about keys the model's config carries
    fresh.set_timesteps(steps, device="cpu")
    scheduled = len(fresh.timesteps)
    order = int(getattr(fresh, "order", 1))
    name = type(scheduler).__name__.removesuffix("Scheduler")
    warm_up = scheduled - steps * order  # PNDM: 1 (its PLMS warm-up); most schedulers: 0
    if structure == "img2img":  # StableDiffusionImg2ImgPipeline.get_timesteps
        kept = min(int(steps * strength), steps)
        start = max(steps - kept, 0)
        total = len(fresh.timesteps[start * order:])
        reason = f"img2img with strength {strength:g} runs the last {kept} of {steps} steps"
        if warm_up > 0:
            reason += f", plus {_count(warm_up, 'warm-up step')} of the {name} scheduler"
        return StepPlan(total, steps, reason + "." if total != steps else "")
    if scheduled == steps:
        return StepPlan(scheduled, steps)
    if warm_up > 0 and order == 1:
        reason = f"the {name} scheduler adds {_count(warm_up, 'warm-up step')} to the {steps} asked for."
    else:
        reason = f"the {name} scheduler runs {scheduled} model steps for {steps} asked for."
    return StepPlan(scheduled, steps, reason)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
