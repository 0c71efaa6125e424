"""Batch runs: every image of a folder, list or dataset, times a grid of seeds, to PNGs and a manifest.

``run_batch(INPUT, OUT, seeds=[0, 1, 2], settings={...})`` is what ``imageprompt batch`` runs. Each
(image, seed) is one job; its **item key** is a hash of what decides its pixels: the decoded image's
fingerprint, the full settings (seed included) and the model. A rerun decodes each image, computes the key
and skips jobs whose outputs the manifest already lists (and whose files exist): renaming an image does not
redo it, changing a pixel or a setting does. Each job is exactly ``pipe.generate(image, settings)``, so a
PNG equals what ``imageprompt generate`` (or the recipe in its metadata) gives for the same image and seed.

A bad item (an unreadable image, a row with an out-of-range setting, a method the model cannot run) is
one logged line and the batch goes on; the report lists the failures and ``OUT/failed.jsonl`` keeps them.
Under ``accelerate launch`` the jobs are shared between the processes (sharding.py); the seeds are the
jobs' own, so the PNGs and the manifest are byte-identical with any number of processes on the same
kind of device.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..encoding import fingerprint
from ..engine.results import SaveError, save_png
from ..loading.cache import ModelLoadError
from ..presets import Preset, resolve_preset
from ..settings import GenerationSettings, SettingsError
from .manifest import (
    PartWriter,
    Row,
    check_manifest_target,
    clear_parts,
    manifest_path,
    merged,
    read_manifest,
    read_parts,
    write_failures,
    write_manifest,
)
from .sharding import Processes, current_processes
from .sources import Source, SourceItem, open_source

#: The preset fields that decide which weights run (a different value: different pixels, a new key).
MODEL_FIELDS = ("name", "sd_model", "clip_model", "revision", "clip_subfolder", "ip_adapter", "captioner",
                "controlnet", "method")
#: Characters of the item key in output file names (64 bits: no collision in any real batch).
KEY_IN_NAME = 16

Log = Callable[[str], None]
#: The file in OUT a running batch holds a lock on (it names the process); a second run into OUT refuses.
LOCK_FILE = ".imageprompt-lock"


class OutputBusyError(ValueError):
    """OUT is being written by another batch run at this moment."""


class _OutputLock:
    """An advisory lock on ``OUT/.imageprompt-lock`` for as long as a batch writes OUT: two runs sharing part
    files and scratch folders would overwrite each other's rows. The kernel drops the lock when the process
    ends, however it ends, so a crashed run never blocks the next. Where ``fcntl`` is missing (Windows) no
    lock is taken, as before."""

    def __init__(self, out: Path) -> None:
        self._handle: Any = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        handle = (out / LOCK_FILE).open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = printable(" ".join(handle.read(200).split())) or "a process"
            handle.close()
            raise OutputBusyError(
                f"{str(out)!r} is being written by another batch run ({holder}): wait for it to finish, or "
                "choose another -o."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the lock; the file stays (removing it would race a newcomer)
            self._handle = None


@dataclass(frozen=True)
class BatchJob:
    """One image with one seed; ``error`` set when the row could not give valid settings."""

    position: int  # place in the grid: images in listed order, then seeds; the manifest's order
    item: SourceItem
    seed: int | None
    settings: GenerationSettings | None
    error: str | None = None


@dataclass
class BatchReport:
    """What a batch run did (the main process's report covers every process)."""

    out: Path
    manifest: Path
    jobs: int  # (image, seed) pairs in the grid, failed rows included
    generated: int = 0  # jobs generated in this run
    images: int = 0  # PNGs written in this run
    skipped: int = 0  # jobs whose outputs were already there
    failures: list[dict[str, Any]] = field(default_factory=list)  # {"input", "seed", "error"}
    seconds: float = 0.0  # time spent generating and writing (the slowest process), model loading excluded
    processes: int = 1

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        rate = f" ({self.images / self.seconds:.3g} images/s)" if self.seconds and self.images else ""
        spread = f" on {self.processes} processes" if self.processes > 1 else ""
        return (
            f"{self.generated} generated ({self.images} PNGs), {self.skipped} already done, "
            f"{len(self.failures)} failed{spread}; {self.seconds:.1f} s generating{rate}; manifest: {self.manifest}"
        )


def model_identity(preset: Preset) -> dict[str, Any]:
    """The model part of an item key: the preset's weight-deciding fields (local folders made absolute;
    several IP-Adapters a list)."""

    def plain(value: str) -> str:
        return os.path.abspath(value) if os.path.isdir(value) else value

    identity: dict[str, Any] = {}
    for name in MODEL_FIELDS:
        value = getattr(preset, name)
        if value:
            identity[name] = plain(value) if isinstance(value, str) else [plain(str(part)) for part in value]
    return identity


def item_key(image_fingerprint: str, settings: GenerationSettings, model: Mapping[str, Any]) -> str:
    """sha256 of the image's fingerprint, the settings (seed included) and the model: the job's identity."""
    payload = json.dumps({"input": image_fingerprint, "settings": settings.to_dict(), "model": dict(model)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def plan_jobs(
    items: Sequence[SourceItem], settings: Mapping[str, Any] | None = None, seeds: Sequence[int] | None = None,
    preset: Preset | None = None,
) -> list[BatchJob]:
    """The grid: each item with each seed, its settings the preset's defaults, then ``settings``, then the
    row's own. A row that sets ``seed`` runs with that seed only; a row whose settings are invalid is one
    failed job carrying the settings' own sentence."""
    base = {**dict(preset.defaults if preset else ()), **dict(settings or {})}
    grid = list(seeds) if seeds else [GenerationSettings.from_kwargs(**base).seed]
    jobs: list[BatchJob] = []
    for item in items:
        if item.error is not None:
            jobs.append(BatchJob(len(jobs), item, None, None, item.error))
            continue
        chosen = {**base, **item.settings}
        row_seeds = [chosen.pop("seed")] if "seed" in item.settings else grid
        chosen.pop("seed", None)
        try:
            planned = [GenerationSettings.from_kwargs(**chosen, seed=seed) for seed in row_seeds]
        except SettingsError as err:
            jobs.append(BatchJob(len(jobs), item, None, None, str(err)))
            continue
        first = len(jobs)
        jobs.extend(BatchJob(first + i, item, s.seed, s) for i, s in enumerate(planned))
    return jobs


def output_name(stem: str, key: str, seed: int, index: int) -> str:
    """The PNG's file name: readable (input stem, seed) and unique (the item key): what ``save_png`` writes
    for the prefix ``f"{stem}-{key[:16]}"``."""
    return f"{stem}-{key[:KEY_IN_NAME]}-seed{seed}-{index}.png"


def run_batch(
    source: Source | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    settings: Mapping[str, Any] | None = None,
    seeds: Sequence[int] | None = None,
    model: str | Preset | None = None,
    device: str | None = None,
    dtype: str | None = None,
    safety_checker: bool | None = None,
    manifest_format: str = "jsonl",
    progress: bool = True,
    log: Log | None = None,
    on_event: Callable[[Any], None] | None = None,
    processes: Processes | None = None,
) -> BatchReport:
    """Generate every (image, seed) of ``source`` into ``out`` with a manifest; skip what is already there.

    ``source`` is a folder, a ``.csv``/``.jsonl`` list, a saved dataset folder or ``hf://datasets/NAME``
    (see sources.py), or an already opened :class:`~imageprompt_widgets.batch.sources.Source`. ``settings`` are
    the batch's settings (rows override them), ``seeds`` the grid (default: the settings' seed). Bad items
    are logged (``log``, default: stderr) and listed in the report; they never stop the batch. Each job is
    submitted to a :class:`~imageprompt_widgets.engine.controller.Controller` (inline), which loads the model on first
    use; ``on_event`` gets its events (``Loading`` with download bytes, ``Started``, ...).
    """
    out = Path(out)
    manifest_path(out, manifest_format)  # an unknown format fails here, before any work
    log = _printable_lines(log or _stderr)
    preset = resolve_preset(model)
    if not isinstance(source, Source):
        source = open_source(source, exclude=out)
    jobs = plan_jobs(source.items, settings, seeds, preset)
    processes = processes or current_processes(device)
    out.mkdir(parents=True, exist_ok=True)
    check_manifest_target(out, manifest_format)  # a folder named manifest.jsonl: refused before any work
    positions = {(job.item.label, job.seed): job.position for job in jobs}

    def order(row: Row) -> int:
        return positions.get((row["input"], row["seed"]), len(jobs))

    lock = _OutputLock(out) if processes.is_main else None
    try:
        return _run_locked(out, jobs, order, preset, processes, log, on_event, manifest_format,
                           {"device": device or processes.device, "dtype": dtype, "safety_checker": safety_checker},
                           progress)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(
    out: Path, jobs: list[BatchJob], order: Callable[[Row], int], preset: Preset, processes: Processes, log: Log,
    on_event: Callable[[Any], None] | None, manifest_format: str, loading: dict[str, Any], progress: bool,
) -> BatchReport:
    """The batch once OUT is this run's: fold leftovers, run this process's share, write the manifest."""
    warn = log if processes.is_main else None
    with processes.main_first():  # the main process folds rows a stopped run left in part files
        if processes.is_main and read_parts(out):
            write_manifest(out, merged(read_manifest(out, warn) + read_parts(out, warn), order), manifest_format)
            clear_parts(out)
    known = read_manifest(out, warn)

    runner = _Runner(out, preset, processes, known, log, loading, on_event)
    mine = processes.split(jobs)
    try:
        runner.run(mine, progress=progress and processes.is_main)
    except KeyboardInterrupt:
        if processes.count == 1:  # keep what was finished in the manifest; a rerun does the rest
            write_manifest(out, merged(known + read_parts(out), order), manifest_format)
            clear_parts(out)
        raise
    finally:
        runner.close()

    reports = processes.gather(runner.stats())  # every process's rows, failures and times, on every process
    path = manifest_path(out, manifest_format)
    failures = sorted((failure for report in reports for failure in report["failures"]),
                      key=lambda failure: failure["position"])
    failures = [{name: failure[name] for name in ("input", "seed", "error")} for failure in failures]
    if processes.is_main:
        new_rows = [row for report in reports for row in report["rows"]]
        write_manifest(out, merged(known + new_rows, order), manifest_format)
        clear_parts(out)
        write_failures(out, failures)
    processes.wait()  # no process returns before the manifest is written
    return BatchReport(
        out=out, manifest=path, jobs=len(jobs),
        generated=sum(report["generated"] for report in reports),
        images=sum(report["images"] for report in reports),
        skipped=sum(report["skipped"] for report in reports),
        failures=failures,
        seconds=max(report["seconds"] for report in reports),
        processes=processes.count,
    )


class _Runner:
    """One process's share of a batch: decode, key, skip or generate, write PNGs and part rows."""

    def __init__(
        self, out: Path, preset: Preset, processes: Processes, known: list[Row], log: Log | None,
        loading: dict[str, Any], on_event: Callable[[Any], None] | None,
    ) -> None:
        self.out, self.preset, self.processes = out, preset, processes
        self.loading, self.on_event = loading, on_event
        self.model = model_identity(preset)
        self.log = log or _stderr
        self.rows: list[Row] = []
        self.failures: list[dict[str, Any]] = []
        self.generated = self.images = self.skipped = 0
        self.seconds = 0.0
        # key -> {index: file} of outputs on disk; identities of rows already in the manifest
        self.done: dict[str, dict[int, str]] = {}
        self.listed = set()
        for row in known:
            if (out / row["file"]).is_file():
                self.done.setdefault(row["key"], {})[int(row["index"])] = row["file"]
                self.listed.add((row["input"], row["key"], int(row["index"])))
        self._controller: Any = None
        self._current: tuple[SourceItem | None, Any] = (None, None)
        self._part: PartWriter | None = None
        self._scratch = out / f".imageprompt-tmp-{processes.index}"
        shutil.rmtree(self._scratch, ignore_errors=True)  # a stopped run's half-written PNGs

    def run(self, jobs: Sequence[BatchJob], progress: bool) -> None:
        from tqdm.auto import tqdm

        with tqdm(total=len(jobs), desc="batch", unit="item", file=sys.stderr, disable=not progress) as bar:
            for job in jobs:
                try:
                    self._one(job)
                except (ModelLoadError, SaveError):
                    raise  # no item can run (no model, a full disk): the batch stops with that sentence
                except (ValueError, MemoryError) as err:
                    self._fail(job, err)
                except Exception as err:
                    if not _out_of_memory(err):
                        raise
                    self._fail(job, err)
                bar.update(1)
                bar.set_postfix(done=self.generated, skipped=self.skipped, failed=len(self.failures), refresh=False)

    def _decoded(self, job: BatchJob) -> tuple[Any, str] | None:
        """The item's image and fingerprint, decoded once for all its seeds; ``None`` when it cannot be read
        (logged once, every seed recorded as failed)."""
        if self._current[0] is not job.item:
            try:
                image = job.item.load()
                self._current = (job.item, (image, fingerprint(image)))
            except ValueError as err:
                self._current = (job.item, err)
                self.log(f"imageprompt: skipped {job.item.label}: {_sentence(err)}")
        decoded = self._current[1]
        if isinstance(decoded, BaseException):
            self._failed(job, decoded)
            return None
        return decoded

    def _one(self, job: BatchJob) -> None:
        if job.error is not None:
            raise SettingsError(job.error)
        settings = job.settings
        assert settings is not None and job.seed is not None
        decoded = self._decoded(job)
        if decoded is None:
            return
        image, print_ = decoded
        key = item_key(print_, settings, self.model)
        files = self.done.get(key, {})
        if all(index in files for index in range(settings.num_images)):
            self.skipped += 1
            self._record([self._row(job, key, print_, index, files[index]) for index in range(settings.num_images)
                          if (job.item.label, key, index) not in self.listed])
            return
        start = time.perf_counter()
        result = self._generate(image, settings)
        written = {}
        for index, picture in enumerate(result.images):
            temporary = save_png(picture, self._scratch, result.recipe, index, f"{job.item.stem}-{key[:KEY_IN_NAME]}")
            os.replace(temporary, self.out / temporary.name)
            written[index] = temporary.name
        self.seconds += time.perf_counter() - start
        self.generated += 1
        self.images += len(written)
        self.done[key] = written
        self._record([self._row(job, key, print_, index, name) for index, name in written.items()])

    def _row(self, job: BatchJob, key: str, print_: str, index: int, file: str) -> Row:
        assert job.settings is not None
        return {
            "input": job.item.label, "seed": job.seed, "index": index, "file": file, "key": key,
            "fingerprint": print_[:16], "model": self.preset.name, "settings": job.settings.to_dict(),
        }

    def _record(self, rows: list[Row]) -> None:
        if not rows:
            return
        if self._part is None:
            self._part = PartWriter(self.out, self.processes.index)
        self._part.write(rows)
        self.rows.extend(rows)
        self.listed.update((row["input"], row["key"], row["index"]) for row in rows)

    def _fail(self, job: BatchJob, err: BaseException) -> None:
        seed = f" (seed {job.seed})" if job.seed is not None else ""
        self.log(f"imageprompt: skipped {job.item.label}{seed}: {_sentence(err)}")
        self._failed(job, err)

    def _failed(self, job: BatchJob, err: BaseException) -> None:
        self.failures.append({"input": job.item.label, "seed": job.seed, "error": _sentence(err),
                              "position": job.position})

    def _generate(self, image: Any, settings: GenerationSettings) -> Any:
        """One run through the controller (loaded on first use); its errors raise here, a stop is Ctrl-C."""
        if self._controller is None:
            from ..engine.controller import Controller
            from ..engine.runners import InlineRunner

            self._controller = Controller(self.preset, runner=InlineRunner(), previews=False, **self.loading)
            if self.on_event is not None:
                self._controller.subscribe(self.on_event)
        result = self._controller.submit(image, settings).future.result()
        if result is None or result.cancelled:  # the controller turns Ctrl-C inside a run into a cancelled job
            raise KeyboardInterrupt
        return result

    def stats(self) -> dict[str, Any]:
        return {"rows": self.rows, "failures": self.failures, "generated": self.generated, "images": self.images,
                "skipped": self.skipped, "seconds": self.seconds}

    def close(self) -> None:
        if self._part is not None:
            self._part.close()
        shutil.rmtree(self._scratch, ignore_errors=True)


def _out_of_memory(err: BaseException) -> bool:
    """CUDA's out-of-memory error: the item is too big for the card, the next may fit."""
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError)


def _sentence(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def printable(text: str) -> str:
    """``text`` with control characters (escape sequences, newlines, bidi overrides) written as escapes, so a
    hostile file name prints as one inert line."""
    return "".join(char if char.isprintable() or char == " " else char.encode("unicode_escape").decode("ascii")
                   for char in text)


def _printable_lines(log: Log) -> Log:
    return lambda text: log(printable(text))


def _stderr(text: str) -> None:
    """One line on stderr, above the progress bar when there is one."""
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)
