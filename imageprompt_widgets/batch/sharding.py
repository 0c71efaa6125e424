"""Several processes (GPUs or machines) through Hugging Face ``accelerate``, or just this one.

Launched by ``accelerate launch`` (or ``torchrun``) with more than one process, a batch shares its items
with ``PartialState().split_between_processes`` and the processes meet at ``wait_for_everyone``; each
process works on its own slice, and only the main one writes the manifest. Started plainly, the batch is
one process and needs no ``accelerate``. Items are handed out in contiguous slices of a list every process
builds in the same order, and nothing an item produces depends on which process ran it, so the outputs are
the same with any number of processes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..extras import require

#: Set by ``accelerate launch`` (and ``torchrun``) for every process they start.
WORLD_SIZE_ENV = "WORLD_SIZE"


@dataclass
class Processes:
    """This process's place among the batch's processes, and the few collective steps a batch needs."""

    index: int = 0
    count: int = 1
    #: The device this process should run on when none is asked for (``cuda:<local rank>`` under accelerate
    #: on GPUs); ``None``: the engine's own choice.
    device: str | None = None
    _state: Any = None  # accelerate's PartialState when there are several processes

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def split(self, items: Sequence[Any]) -> list[Any]:
        """This process's contiguous slice of ``items`` (all of them when alone)."""
        if self._state is None:
            return list(items)
        with self._state.split_between_processes(list(items)) as mine:
            return list(mine)

    def wait(self) -> None:
        """Return once every process got here."""
        if self._state is not None:
            self._state.wait_for_everyone()

    def gather(self, value: Any) -> list[Any]:
        """``value`` from every process, in process order (on every process)."""
        if self._state is None:
            return [value]
        from accelerate.utils import gather_object

        return list(gather_object([value]))

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. reads leftovers), then the others."""
        if not self.is_main:
            self.wait()
        yield
        if self.is_main:
            self.wait()


def current_processes(device: str | None = None) -> Processes:
    """This process among those a launcher started; alone (no accelerate needed) when started plainly.

    On machines without CUDA, or with ``device="cpu"``, the processes talk over gloo
    (``PartialState(cpu=True)``): ``accelerate launch --multi_gpu --num_processes 2`` then runs two CPU
    processes.
    """
    if int(os.environ.get(WORLD_SIZE_ENV, "1") or 1) <= 1:
        return Processes()
    require("accelerate", "batch", "Running on several processes")
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    chosen = device if device is not None or cpu else str(state.device)
    return Processes(index=state.process_index, count=state.num_processes, device=chosen, _state=state)


def leave_process_group() -> None:
    """End this process's part in its launcher's process group, once a command's collective work is done (a no-op
    when it never joined one, torch not even imported).

    Every process must: left to the interpreter's exit, gloo's worker threads can still hold work while Python
    tears down, and a process that finished its items aborts ("terminate called without an active exception",
    SIGABRT), which fails the whole launch (pytorch/pytorch#190489; seen once in CI on the 2-process batch)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
