"""Why a model could not be loaded, or a file not written, said in one sentence that names the thing and what
to do: the loading error types, the Hub's typed errors, damaged weights, and filesystem faults.

The libraries wrap the Hub's typed errors (``GatedRepoError``, ``LocalEntryNotFoundError``, ...) in their
own ``OSError``; the chain (``__cause__``, ``__context__``) still holds them, so they are looked up there
first, and message text is matched only as a last resort. This module sits below the loader (loading/cache.py,
loading/components.py) and the offline builders (loading/offline.py), which all raise these types.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Weights in pickle formats (they can run code when loaded, so they are refused unless allowed).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: How to log in to the Hugging Face Hub (for gated and private models).
LOGIN_HINT = "log in with `hf auth login` (or set HF_TOKEN)"


class ModelLoadError(ValueError):
    """A model that cannot be loaded: unknown, not downloaded while offline, not a model folder."""


class EncoderMismatchError(ModelLoadError):
    """An image encoder whose widths do not fit what reads it: the UNet's cross-attention (image tokens as the
    prompt) or an IP-Adapter's projection."""


class TextTowerUnavailable(ModelLoadError):
    """The preset's CLIP checkpoint has no text tower with projection, so text cannot be compared with images."""


class DamagedModelError(ModelLoadError):
    """A weights file that is corrupt (truncated, garbled) or missing from a model folder; ``path`` names it
    where it is known."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def exception_chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from or during (``__cause__``, else ``__context__``)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen and len(seen) < 32:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0].strip() if lines else type(err).__name__


def _named(err: BaseException, *names: str) -> bool:
    """Whether ``err`` is an instance of a class with one of these names (no import of the defining library)."""
    return any(cls.__name__ in names for cls in type(err).__mro__)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_error(err: Exception, name: str, allow_pickle: bool, folder: str | None = None) -> ModelLoadError:
    """The one-sentence :class:`ModelLoadError` for a loader's failure, in order: a library that cannot be
    imported, a damaged or missing file (:class:`DamagedModelError`, naming it; ``folder`` is searched where the
    library does not say which file), the Hub's typed errors in the chain, and only then the message text."""
    if isinstance(err, ImportError):
        return ModelLoadError(import_error_sentence(name, err))
    damaged = damaged_weights(err, name, allow_pickle, folder)
    if damaged is not None:
        return damaged
    return ModelLoadError(hub_error_sentence(err, name, allow_pickle) or _sentence_from_text(err, name, allow_pickle))


def import_error_sentence(name: str, err: ImportError) -> str:
    """A library (or a part of one) that cannot be imported: a broken or too old install, said in one sentence."""
    return (f"Model {name!r} could not be loaded because a library it needs could not be imported "
            f"({_first_line(err)}): install or upgrade it (pip install -U diffusers transformers) and restart "
            "the kernel.")


def _sentence_from_text(err: Exception, name: str, allow_pickle: bool) -> str:
    """The last resort: classify by the message text (for failures that carry no typed error)."""
    text = f"{type(err).__name__}: {err}"
    if "safetensors" in text.lower() and not allow_pickle:
        return _pickle_only_sentence(name)
    if hub_offline() and _looks_missing(text):
        return _missing_locally_sentence(name)
    if "RepositoryNotFound" in text or "is not a valid model identifier" in text or "404" in text:
        return (f"Model {name!r} was not found on the Hugging Face Hub: check the name; if it is private or gated, "
                f"{LOGIN_HINT}.")
    if any(word in text for word in ("Connection", "resolve", "Max retries", "Network", "offline")):
        return _no_network_sentence(name)
    return f"Model {name!r} could not be loaded: {_first_line(err)}"


def _looks_missing(text: str) -> bool:
    """Whether a loader error means "these files are not here" (rather than, say, a shape mismatch)."""
    markers = ("not fully cached", "not cached", "Cannot find", "LocalEntryNotFound", "local_files_only",
               "outgoing traffic has been disabled", "OfflineModeIsEnabled", "does not appear to have")
    return any(marker in text for marker in markers)


# -- the Hub's typed errors -------------------------------------------------------------------------


def hub_error_sentence(err: BaseException, name: str, allow_pickle: bool) -> str | None:
    """The sentence for the first typed Hub or network error in ``err``'s chain; ``None`` where there is none."""
    chain = list(exception_chain(err))
    page = f"https://huggingface.co/{name}"
    for cause in chain:
        if _named(cause, "GatedRepoError"):
            return (f"Model {name!r} is gated: accept its licence on {page} while logged in to the Hub, then "
                    f"{LOGIN_HINT} here and try again.")
        if _named(cause, "DisabledRepoError"):
            return f"Model {name!r} has been disabled on the Hugging Face Hub: pick another model."
        if _named(cause, "RepositoryNotFoundError"):
            return (f"Model {name!r} was not found on the Hugging Face Hub: check the name; if it is private, "
                    f"{LOGIN_HINT} with an account that can see it.")
        if _named(cause, "RevisionNotFoundError"):
            return f"Model {name!r} has no such revision (branch, tag or commit) on the Hub: check the revision."
        if _named(cause, "LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            return _missing_locally_sentence(name)
        if _named(cause, "EntryNotFoundError"):
            filename = _missing_file_name(chain)
            if filename.endswith(".safetensors") and not allow_pickle:
                return _pickle_only_sentence(name)
            return (f"Model {name!r} on the Hub has no file {filename or 'that the loader needs'}: check that it is "
                    "a diffusers (Stable Diffusion) or transformers (CLIP) model.")
        if _named(cause, "HfHubHTTPError"):
            status = getattr(getattr(cause, "response", None), "status_code", None)
            return _http_sentence(name, status, cause)
    for cause in chain:
        if isinstance(cause, (ConnectionError, TimeoutError)) or _named(cause, "TransportError", "TimeoutException"):
            return _no_network_sentence(name)
    return None


def _http_sentence(name: str, status: int | None, err: BaseException) -> str:
    if status in (401, 403):
        return (f"The Hugging Face Hub refused access to model {name!r} (HTTP {status}): {LOGIN_HINT}, and accept "
                f"the model's licence on https://huggingface.co/{name} if it has one.")
    if status == 429:
        return (f"The Hugging Face Hub is limiting downloads of model {name!r} (HTTP 429, too many requests): wait a "
                f"few minutes, or {LOGIN_HINT} for a higher limit, and try again.")
    if status is not None and status >= 500:
        return f"The Hugging Face Hub failed while serving model {name!r} (HTTP {status}): try again in a few minutes."
    code = f"HTTP {status}" if status else _first_line(err)
    return f"Model {name!r} could not be downloaded from the Hugging Face Hub ({code}): check the name and try again."


def _missing_locally_sentence(name: str) -> str:
    if hub_offline():
        return (f"Model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading "
                f"it: run once with network access (or `hf download {name}`) and try again.")
    return _no_network_sentence(name)


def _no_network_sentence(name: str) -> str:
    return (f"Model {name!r} could not be downloaded (no network?): connect once to fetch it, or use "
            "model='toy' (the toy world, trained, shipped with the package) to try the tool offline.")


def _pickle_only_sentence(name: str) -> str:
    return (f"Model {name!r} has no safetensors weights; pickle (.bin) weights can run code when loaded, so they are "
            "refused unless you pass allow_pickle=True for a model you trust.")


def _missing_file_name(chain: list[BaseException]) -> str:
    """The file an ``EntryNotFoundError`` is about, from its URL or message (``""`` where it says none)."""
    for cause in chain:
        found = re.search(r"/resolve/[^/\s]+/(\S+?)\.?(?:\s|$)", str(cause)) or re.search(
            r"have a file named (\S+?)\.?(?:\s|$)", str(cause))
        if found:
            return found.group(1)
    return ""


# -- damaged or incomplete weights ---------------------------------------------------------------------

_CORRUPT_MARKERS = ("Error while deserializing header", "incomplete metadata", "invalid header",
                    "HeaderTooLarge", "HeaderTooSmall", "MetadataIncompleteBuffer", "InvalidHeader")
_MISSING_IN_FOLDER = (re.compile(r"no file named (\S+) found in directory (.+?)\.?$", re.MULTILINE),
                      re.compile(r"^(\S+) does not appear to have a file named (\S+?)\.?(?:\s|$)", re.MULTILINE))


_BAD_JSON = re.compile(r"config file at ['\"]([^'\"]+)['\"] is not a valid JSON file")


def damaged_weights(err: BaseException, name: str, allow_pickle: bool, folder: str | None) -> ModelLoadError | None:
    """A :class:`DamagedModelError` naming the corrupt or missing weights file behind ``err``, the sentence for
    pickle-only weights where that is the truth, or ``None`` where ``err`` is about neither."""
    chain = list(exception_chain(err))
    if any(_named(cause, "SafetensorError") or any(m in str(cause) for m in _CORRUPT_MARKERS) for cause in chain):
        path = _quoted_weights_path(chain) or (
            first_corrupt_safetensors(folder) if folder and os.path.isdir(folder) else None)
        if path:
            return DamagedModelError(
                f"The weights file {path} of model {name!r} is corrupt (cut short or damaged, e.g. by an interrupted "
                "download or a full disk): delete that file, or the whole model folder, and download it again.", path)
        return DamagedModelError(
            f"A weights file of model {name!r} is corrupt ({_first_line(chain[-1])}): delete the model's folder "
            "(for a Hub model, its folder in the Hugging Face cache) and download it again.")
    for cause in chain:
        found = _BAD_JSON.search(str(cause))
        if found and os.path.isfile(found.group(1)):
            return DamagedModelError(
                f"The config file {found.group(1)} of model {name!r} is corrupt (not valid JSON): restore it, or "
                "delete the model folder and download it again.", found.group(1))
    for cause in chain:
        for pattern in _MISSING_IN_FOLDER:
            found = pattern.search(str(cause))
            if not found:
                continue
            filename, directory = (found.group(1), found.group(2)) if pattern is _MISSING_IN_FOLDER[0] else (
                found.group(2), found.group(1))
            if not os.path.isdir(directory):
                continue  # a Hub id, not a folder on this machine
            if not allow_pickle and _has_pickle_weights(directory):
                return ModelLoadError(_pickle_only_sentence(name))
            path = os.path.join(directory, filename)
            kind = "weights file" if filename.endswith((".safetensors", *PICKLE_SUFFIXES)) else "file"
            return DamagedModelError(
                f"Model {name!r} is incomplete: its {kind} {path} is missing (an interrupted download or "
                "copy?): restore that file, or delete the model folder and download it again.", path)
    return None


def _quoted_weights_path(chain: list[BaseException]) -> str | None:
    for cause in chain:
        found = re.search(r"""['"]([^'"]+\.safetensors)['"]""", str(cause))
        if found and os.path.isfile(found.group(1)):
            return found.group(1)
    return None


def _has_pickle_weights(directory: str) -> bool:
    return any(entry.name.endswith(PICKLE_SUFFIXES) for entry in os.scandir(directory) if entry.is_file())


def first_corrupt_safetensors(folder: str | os.PathLike) -> str | None:
    """The first ``.safetensors`` file under ``folder`` (two levels: a pipeline's component folders) whose header
    does not describe exactly the bytes the file holds; ``None`` where all are whole. Reads headers only."""
    root = Path(folder)
    candidates = sorted([*root.glob("*.safetensors"), *root.glob("*/*.safetensors")])
    for path in candidates:
        if not safetensors_file_is_whole(path):
            return str(path)
    return None


def safetensors_file_is_whole(path: str | os.PathLike) -> bool:
    """Whether the file opens as safetensors (its header parses and covers the file exactly)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return True
    except (SafetensorError, OSError):
        return False


# -- filesystem faults -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilesystemFault:
    """A filesystem fault a user can fix: what went wrong, and the first thing to try (may be empty)."""

    what: str  # "the disk holding /x is full", "/x/notes.txt is a file, not a folder"
    remedy: str  # "free some space", "remove it", ""
    disk_full: bool = False

    def sentence(self, doing: str, alternative: str) -> str:
        """``"{doing}: {what}; {remedy}, or {alternative}."`` (the remedy left out where there is none)."""
        first = f"{self.remedy}, or " if self.remedy else ""
        return f"{doing}: {self.what}; {first}{alternative}."


def filesystem_fault(err: BaseException, path: str | os.PathLike) -> FilesystemFault | None:
    """The fault behind ``err`` while writing under ``path``, for the ones a user can fix (a full disk, no
    permission, a read-only file system, a file where a folder should be); ``None`` for anything else."""
    code = _errno(err)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return FilesystemFault(f"the disk holding {path} is full", "free some space", disk_full=True)
    if code in (errno.EACCES, errno.EPERM):
        return FilesystemFault(f"{path} cannot be written (permission denied)", "")
    if code == errno.EROFS:
        return FilesystemFault(f"{path} is on a read-only file system", "")
    if code in (errno.EEXIST, errno.ENOTDIR) or isinstance(err, (FileExistsError, NotADirectoryError)):
        blocker = _file_in_the_way(Path(path))
        if blocker is not None:
            return FilesystemFault(f"{blocker} is a file, not a folder", "remove it")
    if code == errno.ENAMETOOLONG:
        return FilesystemFault(f"a file name under {path} is too long", "")
    return None


def _errno(err: BaseException) -> int | None:
    for cause in exception_chain(err):
        if isinstance(cause, OSError) and cause.errno is not None:
            return cause.errno
        found = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(cause))  # safetensors' Rust I/O errors
        if found:
            return int(found.group(1) or found.group(2))
    return None


def _file_in_the_way(path: Path) -> Path | None:
    """The first existing part of ``path`` (or ``path`` itself) that is a file where a folder must be."""
    for part in [*reversed(path.parents), path]:
        if part.exists() and not part.is_dir():
            return part
    return None
