"""Schedulers (samplers) by name, each built from the loaded model's own scheduler config.

``settings.scheduler`` names one; :func:`scheduler_for` builds a fresh object for one run with diffusers'
``from_config`` on the model's scheduler config, the way diffusers' documentation swaps samplers
(``DDIMScheduler.from_config(pipe.scheduler.config)``). A fresh object per run matters: schedulers are
stateful (PNDM keeps its last noise predictions, multistep solvers theirs), so a run never shares one with
another run or leaves the pipeline's own changed.

The only change to the model's config: ``clip_sample=False`` where the config does not say (SD never clips
its x0 estimate; SD 1.x's own config says so, a config written without the key would let DDIM and LCM
default to clipping).
"""

from __future__ import annotations

from typing import Any

from ..loading.quiet import quiet_loaders
from ..settings import SCHEDULERS

#: Name -> (diffusers class name, extra config). ``settings.SCHEDULERS`` is exactly these keys (a test checks).
SCHEDULER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    # Hyper-SD's few-step LoRAs sample with DDIM on "trailing" timesteps (their README: the last step starts at 999).
    "ddim_trailing": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
}
assert tuple(SCHEDULER_CLASSES) == SCHEDULERS

#: Config keys SD's schedulers need where the model's config is silent about them.
SD_DEFAULTS = {"clip_sample": False}


def scheduler_class(name: str) -> Any:
    """The diffusers class behind ``name`` (``"euler_a"`` -> ``EulerAncestralDiscreteScheduler``)."""
    import diffusers

    return getattr(diffusers, SCHEDULER_CLASSES[name][0])


def scheduler_config(name: str, base_config: Any) -> dict[str, Any]:
    """The keyword changes ``from_config`` gets for ``name`` on top of the model's ``base_config``."""
    extra = SCHEDULER_CLASSES[name][1]
    defaults = {key: value for key, value in SD_DEFAULTS.items() if key not in base_config}
    return {**defaults, **extra}


def scheduler_for(name: str, base: Any) -> Any:
    """A fresh scheduler ``name`` built from ``base``'s config (``base`` is left untouched).

    Quiet: configs carry keys other classes do not use (PNDM's ``skip_prk_steps``), which diffusers
    reports on every build.
    """
    cls = scheduler_class(name)
    with quiet_loaders():
        return cls.from_config(base.config, **scheduler_config(name, base.config))


def uses_sigmas(scheduler: Any) -> bool:
    """Whether the scheduler steps in sigma space (Euler, DPM-Solver, UniPC): its noise level per step is
    ``scheduler.sigmas[step]``, not necessarily ``alphas_cumprod`` at the (rounded) timestep."""
    return getattr(scheduler, "sigmas", None) is not None and hasattr(scheduler, "index_for_timestep")


def current_sigma(scheduler: Any, timestep: Any) -> float | None:
    """The noise level ``sigma`` of the step the scheduler is about to take at ``timestep`` (``None`` for
    schedulers that work with ``alphas_cumprod`` at whole timesteps: PNDM, DDIM, LCM).

    Read while the UNet runs: Euler-type schedulers have their step index from ``scale_model_input``;
    multistep solvers set it in their first ``step``, so before it the begin index (img2img) or the
    timestep's place in the schedule is used, as the scheduler itself will.
    """
    if not uses_sigmas(scheduler):
        return None
    index = scheduler.step_index
    if index is None:
        begin = getattr(scheduler, "begin_index", None)
        index = begin if begin is not None else scheduler.index_for_timestep(timestep)
    return float(scheduler.sigmas[index])
