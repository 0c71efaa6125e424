"""Where a controller's jobs run: on a worker thread (Jupyter, scripts), or in the caller itself (Colab, tests).

Jupyter front ends render trait updates made from a background thread, so the kernel stays free for
Cancel, sliders and other cells. Colab renders none of them, so there the work runs inline and the
kernel's stop button cancels it. The controller takes either through the same two-method interface, and
tests pass :class:`InlineRunner` to run everything deterministically in the test's thread.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Runner(Protocol):
    """Runs jobs one after another; ``background`` says whether ``submit`` returns before the job ends."""

    background: bool

    def submit(self, job: Callable[[], T]) -> Future[T]: ...

    def shutdown(self) -> None: ...


class ThreadRunner:
    """One worker thread: jobs run in submission order, never two at once; pending ones can be cancelled."""

    background = True

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imageprompt")

    def submit(self, job: Callable[[], T]) -> Future[T]:
        return self._executor.submit(job)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class InlineRunner:
    """Runs the job in the caller's thread and returns its already finished future."""

    background = False

    def submit(self, job: Callable[[], T]) -> Future[T]:
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(job())
        except Exception as err:  # noqa: BLE001 - handed to the future, as an executor would
            future.set_exception(err)
        return future

    def shutdown(self) -> None:
        pass


def in_colab() -> bool:
    """True inside a Google Colab kernel (it imports ``google.colab`` at start-up)."""
    return "google.colab" in sys.modules


def default_runner() -> Runner:
    """Inline on Colab (no background rendering there), a worker thread everywhere else."""
    return InlineRunner() if in_colab() else ThreadRunner()
