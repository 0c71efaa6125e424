"""One run at a time per pipeline: the run lock, and cancelling a run that waits for it (no polling)."""

from __future__ import annotations

import threading

import pytest
from helpers import WAIT

from imageprompt_widgets.engine.concurrency import CancelEvent, RunLock
from imageprompt_widgets.loading.offline import sample_image


def waiter(lock: RunLock, cancel: threading.Event | None, results: list, waits: list) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(lock.acquire(cancel, on_wait=lambda: waits.append(1))))
    thread.start()
    return thread


def test_the_lock_is_reentrant_for_its_owner_and_only_the_owner_releases_it():
    lock = RunLock()
    assert lock.acquire() and lock.acquire()
    lock.release()
    assert lock.locked()
    errors = []
    thread = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, lock.release)))
    thread.start()
    thread.join(WAIT)
    assert errors and lock.locked()
    lock.release()
    assert not lock.locked()


def test_a_cancel_event_ends_the_wait_while_the_lock_is_still_held():
    lock, cancel, results, waits = RunLock(), CancelEvent(), [], []
    lock.acquire()
    thread = waiter(lock, cancel, results, waits)
    while not waits:  # the waiter has announced that it waits (on_wait runs before the wait)
        thread.join(0.01)
    cancel.set()
    thread.join(WAIT)
    assert not thread.is_alive() and results == [False] and waits == [1]
    assert lock.locked()  # still ours: the waiter left without the lock being released
    lock.release()


def test_a_plain_event_is_noticed_when_the_lock_is_released_and_the_cancelled_waiter_never_takes_it():
    lock, cancel, results, waits = RunLock(), threading.Event(), [], []
    lock.acquire()
    thread = waiter(lock, cancel, results, waits)
    while not waits:
        thread.join(0.01)
    cancel.set()
    lock.release()
    thread.join(WAIT)
    assert results == [False] and not lock.locked()


def test_waiters_take_turns_and_a_free_lock_calls_no_on_wait():
    lock, results, waits = RunLock(), [], []
    assert lock.acquire(on_wait=lambda: waits.append("first"))
    thread = waiter(lock, None, results, waits)
    while not waits:
        thread.join(0.01)
    lock.release()
    thread.join(WAIT)
    assert results == [True] and waits == [1]


def test_a_timeout_gives_up_and_a_set_cancel_gives_up_only_a_wait():
    lock = RunLock()
    holder = threading.Thread(target=lock.acquire)
    holder.start()
    holder.join(WAIT)
    assert lock.acquire(timeout=0.05) is False
    cancelled = CancelEvent()
    cancelled.set()
    assert lock.acquire(cancelled) is False  # held by another thread: no wait at all
    free = RunLock()
    assert free.acquire(cancelled) is True  # free: taken; the caller decides what its cancel means


def test_generate_cancelled_while_another_run_holds_the_pipeline_never_steps(tiny_pipe):
    cancel, steps, results = CancelEvent(), [], []
    tiny_pipe.lock.acquire()  # another run holds the pipeline
    try:
        thread = threading.Thread(target=lambda: results.append(
            tiny_pipe.generate(sample_image(0), steps=2, on_step=steps.append, cancel=cancel)))
        thread.start()
        thread.join(0.2)
        cancel.set()
        thread.join(WAIT)
    finally:
        tiny_pipe.lock.release()
    (result,) = results
    assert result.cancelled and result.images == [] and result.trace is None and steps == []
    assert not tiny_pipe.lock.locked()
