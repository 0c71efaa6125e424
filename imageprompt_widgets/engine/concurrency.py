"""One run at a time per pipeline, and waiting for it that a cancel ends at once, without polling.

Schedulers are stateful, so a pipeline runs one generation at a time; other callers (a second panel on the
same cached model, a script thread) wait their turn. A :class:`CancelEvent` is a ``threading.Event`` whose
``set()`` also wakes every :class:`RunLock` waiter it is registered with, so a run cancelled while it waits
leaves the queue immediately instead of on the next poll.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class CancelEvent(threading.Event):
    """A ``threading.Event`` that wakes the lock waits it is watched by when it is set."""

    def __init__(self) -> None:
        super().__init__()
        self._guard = threading.Lock()
        self._watchers: set[threading.Condition] = set()

    def set(self) -> None:
        super().set()
        with self._guard:
            watchers = list(self._watchers)
        for condition in watchers:
            with condition:
                condition.notify_all()

    def _watch(self, condition: threading.Condition) -> None:
        with self._guard:
            self._watchers.add(condition)

    def _unwatch(self, condition: threading.Condition) -> None:
        with self._guard:
            self._watchers.discard(condition)


class RunLock:
    """A re-entrant lock whose ``acquire`` gives up when ``cancel`` is set.

    With a :class:`CancelEvent` the wait ends as soon as it is set; with a plain ``threading.Event`` the
    waiter notices the cancel when the lock is next released (it never runs a step either way).
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._owner: int | None = None
        self._depth = 0

    def acquire(
        self,
        cancel: threading.Event | None = None,
        on_wait: Callable[[], None] | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Take the lock; ``False`` (not taken) if it is held and ``cancel`` is or becomes set, or ``timeout``
        passes, before it is free. A free lock is always taken (the caller checks its own cancel).

        ``on_wait`` is called once, before waiting, when another thread holds the lock.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.get_ident()
        watched = isinstance(cancel, CancelEvent)
        with self._condition:
            if self._owner == me:
                self._depth += 1
                return True
            if watched:
                cancel._watch(self._condition)
            try:
                if self._owner is not None and on_wait is not None:
                    on_wait()
                waited = False
                while self._owner is not None:
                    if cancel is not None and cancel.is_set():
                        return False
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._condition.wait(left)
                    waited = True
                if waited and cancel is not None and cancel.is_set():
                    return False  # cancelled while it waited: the turn goes to the next one
                self._owner, self._depth = me, 1
                return True
            finally:
                if watched:
                    cancel._unwatch(self._condition)

    def release(self) -> None:
        with self._condition:
            if self._owner != threading.get_ident():
                raise RuntimeError("RunLock released by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._condition.notify_all()

    def locked(self) -> bool:
        """Whether some thread holds it now (a hint for status lines; it may change right after)."""
        with self._condition:
            return self._owner is not None

    def __enter__(self) -> RunLock:  # noqa: PYI034 - final class
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
