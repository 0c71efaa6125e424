"""Tensor one-liners, lovely-tensors style: what ``Trace.summary()`` prints, one exact string per tensor."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


class InspectError(ValueError):
    """An inspector view asked of data that cannot give it (missing tensor, wrong shape).

    Defined with the summaries, which views build on, so results can summarise without importing views."""


def number(value: float) -> str:
    """Four significant digits, no trailing noise: the same string on every machine."""
    if math.isnan(value):
        return "nan"
    text = f"{value:.4g}"
    return "0" if text == "-0" else text

def summarize(tensor: torch.Tensor) -> str:
    """One line: shape, dtype, device, min/max, mean, std, norm, NaN/Inf count.

    Statistics are computed in float64 over the finite values only (so one NaN does not hide the
    rest); ``std`` is the sample standard deviation (``torch.std``'s default), 0 for a single value.
    """
    if not isinstance(tensor, torch.Tensor):
        raise InspectError(f"summarize takes a torch.Tensor, not {type(tensor).__name__}.")
    shape = ", ".join(str(size) for size in tensor.shape)
    head = f"tensor[{shape}] {str(tensor.dtype).removeprefix('torch.')} {tensor.device}"
    if tensor.numel() == 0:
        return f"{head} empty"
    values = tensor.detach().cpu().to(torch.float64).flatten()  # MPS has no float64: move first
    nan = int(torch.isnan(values).sum())
    inf = int(torch.isinf(values).sum())
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return f"{head} no finite values nan={nan} inf={inf}"
    std = float(finite.std()) if finite.numel() > 1 else 0.0
    return (
        f"{head} min={number(float(finite.amin()))} max={number(float(finite.amax()))} "
        f"mean={number(float(finite.mean()))} std={number(std)} norm={number(float(finite.norm()))} "
        f"nan={nan} inf={inf}"
    )


class Summary(str):
    """Multi-line text that shows as plain lines (not a quoted string) as a notebook cell's result."""

    def __repr__(self) -> str:
        return str(self)


def summarize_all(tensors: Mapping[str, torch.Tensor]) -> Summary:
    """``name  one-liner`` for every tensor, names aligned (what ``Trace.summary()`` shows)."""
    width = max((len(name) for name in tensors), default=0)
    return Summary("\n".join(f"{name:<{width}}  {summarize(t)}" for name, t in tensors.items()))
