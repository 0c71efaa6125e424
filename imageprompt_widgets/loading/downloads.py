"""Download progress from the Hugging Face Hub while models load: bytes done, total, time left; and a way to stop.

The first real Generate downloads gigabytes, and the loaders hide the Hub's own progress bars (they are
not for our users: :mod:`imageprompt_widgets.loading.quiet`). Every byte the Hub downloads still passes through
an instance of its own ``huggingface_hub.utils.tqdm`` class — the per-file bar of ``hf_hub_download``
(plain HTTP and Xet) and the aggregate bar of ``snapshot_download`` that diffusers uses — whether the bar
is shown or not. :func:`watch_downloads` listens to those bars: while it is active, byte bars created in
its context (or anywhere, when it is the only watch) report to it, and its callback may raise
:class:`DownloadCancelled` to stop the download at the next chunk.

The hook is a wrapper around that class's ``__init__`` and ``update``, installed only while at least one
watch is active, so nothing of the Hub is changed outside a load that asked for progress.

Xet downloads (most large files on the Hub today) report from a thread of their own, started by the Rust
library, where an exception would stop nothing; there a cancel aborts the process's Xet session instead,
as the Hub itself does on Ctrl-C. Whatever error the interrupted download then ends with, the watch turns
it into :class:`DownloadCancelled`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


class DownloadCancelled(BaseException):
    """Raised from a download's progress to stop it.

    A ``BaseException`` like ``KeyboardInterrupt``, so the loaders' ``except Exception`` blocks (retries,
    error translation) let it through. Files already downloaded stay in the Hub's cache; the next load
    continues from them.
    """


@dataclass(frozen=True)
class DownloadProgress:
    """Where the downloads of one load stand: bytes done and expected, and the time so far."""

    done: int
    total: int | None  # grows while snapshot downloads announce more files; None when no size is known yet
    seconds: float  # since the first byte bar appeared
    resumed: int = 0  # bytes already on disk when the downloads started (not counted in the rate)

    @property
    def rate(self) -> float | None:
        """Bytes per second downloaded so far (None before a measurable time has passed)."""
        fresh = self.done - self.resumed
        return fresh / self.seconds if self.seconds > 0 and fresh > 0 else None

    @property
    def seconds_left(self) -> float | None:
        if self.total is None or self.rate is None:
            return None
        return max(self.total - self.done, 0) / self.rate

    @property
    def fraction(self) -> float | None:
        return None if not self.total else min(self.done / self.total, 1.0)

    def describe(self) -> str:
        """``"1.2 GB of 5.5 GB, 25 MB/s, about 3 min left"``: one phrase for a status line."""
        amount = _bytes_text(self.done) + (f" of {_bytes_text(self.total)}" if self.total else "")
        parts = [amount]
        if self.rate is not None:
            parts.append(f"{_bytes_text(self.rate)}/s")
        left = self.seconds_left
        if left is not None and self.total and self.done < self.total:
            parts.append(f"about {_duration_text(left)} left")
        return ", ".join(parts)


ProgressCallback = Callable[[DownloadProgress], None]


class _Watch:
    """The byte bars of one load and the callback they report to."""

    def __init__(self, on_progress: ProgressCallback, clock: Callable[[], float]) -> None:
        self.on_progress = on_progress
        self.clock = clock
        self._guard = threading.Lock()
        self._bars: dict[int, list[Any]] = {}  # id(bar) -> [bar, bytes done]
        self._resumed = 0
        self._start: float | None = None
        self.cancelled = False  # the callback asked to stop

    def add(self, bar: Any, initial: int) -> None:
        with self._guard:
            if self._start is None:
                self._start = self.clock()
            self._bars[id(bar)] = [bar, initial]
            self._resumed += initial
        self._report()

    def advance(self, bar: Any, n: float) -> None:
        with self._guard:
            entry = self._bars.get(id(bar))
            if entry is None:
                return
            entry[1] += int(n)
        self._report()

    def _report(self) -> None:
        with self._guard:
            done = sum(done for _, done in self._bars.values())
            totals = [getattr(bar, "total", None) for bar, _ in self._bars.values()]
            known = [int(total) for total in totals if total]
            total = sum(known) if known else None
            seconds = self.clock() - (self._start or 0.0)
            resumed = self._resumed
        try:
            self.on_progress(DownloadProgress(done, total, seconds, resumed))
        except DownloadCancelled:
            self.cancelled = True
            if not _on_a_foreign_thread():
                raise  # an HTTP download: it stops at this chunk
            _abort_xet_downloads()  # Xet's own progress thread: raising there would stop nothing


_current: contextvars.ContextVar[_Watch | None] = contextvars.ContextVar("imageprompt_download_watch", default=None)
_install_guard = threading.Lock()
_active: list[_Watch] = []
_originals: dict[str, Any] = {}


@contextlib.contextmanager
def watch_downloads(on_progress: ProgressCallback | None, *, clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """Report the Hub's downloads in this block to ``on_progress`` (``None``: do nothing).

    ``on_progress`` is called on every chunk (throttle it yourself); raising :class:`DownloadCancelled`
    from it stops the download. Byte bars created in other threads (a library's download pool) report
    here too when this is the only active watch.
    """
    if on_progress is None:
        yield
        return
    watch = _Watch(on_progress, clock)
    token = _current.set(watch)
    _activate(watch)
    try:
        yield
    except DownloadCancelled:
        raise
    except BaseException as err:
        if watch.cancelled:  # how an aborted download fails is the library's business: it was a cancel
            raise DownloadCancelled from err
        raise
    finally:
        _deactivate(watch)
        _current.reset(token)


def _hub_tqdm() -> Any:
    try:  # the module: ``from huggingface_hub.utils import tqdm`` would give the class it re-exports
        module = importlib.import_module("huggingface_hub.utils.tqdm")
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of diffusers
        return None
    return module.tqdm


def _activate(watch: _Watch) -> None:
    with _install_guard:
        _active.append(watch)
        if len(_active) == 1:
            _install()


def _deactivate(watch: _Watch) -> None:
    with _install_guard:
        _active.remove(watch)
        if not _active:
            _uninstall()


def _watch_for_new_bar() -> _Watch | None:
    watch = _current.get()
    if watch is not None:
        return watch
    with _install_guard:
        return _active[0] if len(_active) == 1 else None


def _counts_bytes(kwargs: dict[str, Any]) -> bool:
    """A bar of downloaded bytes. Xet's second bar (``….transfer``, network bytes before
    decompression and deduplication) would count the same file twice, so only the written bytes count."""
    name = kwargs.get("name") or ""
    return kwargs.get("unit") == "B" and not name.endswith(".transfer")


def _install() -> None:
    cls = _hub_tqdm()
    if cls is None or _originals:
        return
    original_init, original_update = cls.__init__, cls.update

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        watch = _watch_for_new_bar() if _counts_bytes(kwargs) else None
        original_init(self, *args, **kwargs)
        if watch is not None:
            self._imageprompt_watch = watch
            watch.add(self, int(kwargs.get("initial") or 0))

    def update(self: Any, n: float | None = 1) -> Any:
        watch = self.__dict__.get("_imageprompt_watch")
        if watch is not None and n:
            watch.advance(self, n)  # may raise DownloadCancelled: the download stops at this chunk
        return original_update(self, n)

    _originals.update(cls=cls, __init__=original_init, update=original_update)
    cls.__init__, cls.update = __init__, update


def _uninstall() -> None:
    if not _originals:
        return
    cls = _originals["cls"]
    cls.__init__, cls.update = _originals["__init__"], _originals["update"]
    _originals.clear()


def _on_a_foreign_thread() -> bool:
    """A thread Python did not start (the Rust library's progress thread): threading sees a dummy."""
    return isinstance(threading.current_thread(), getattr(threading, "_DummyThread", ()))


def _abort_xet_downloads() -> None:
    """Stop in-flight Xet transfers the way huggingface_hub does on KeyboardInterrupt."""
    try:
        from huggingface_hub.utils._xet import abort_xet_session
    except ImportError:  # pragma: no cover - an older huggingface_hub without Xet
        return
    abort_xet_session()


def _bytes_text(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def _duration_text(seconds: float) -> str:
    if seconds < 60:
        return f"{max(round(seconds), 1)} s"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
