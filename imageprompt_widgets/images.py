"""Turn whatever a notebook user hands us into one plain RGB ``PIL.Image``.

This is the only module in the package that decodes images. Uploads are
untrusted and files from phones, scanners and screenshots are awkward, so every
input goes through one gate that:

* accepts paths, ``http(s)://`` URLs, bytes, binary file objects, PIL images,
  numpy arrays and ipywidgets ``FileUpload`` entries (ipywidgets 7.7 and 8);
* downloads URLs with the standard library only, within a time limit and a
  byte cap enforced while streaming, and then checks the bytes like a file's;
* only lets Pillow try the formats in :data:`ALLOWED_FORMATS`;
* refuses images larger than ``max_pixels`` from the header, before any pixel
  memory is allocated;
* returns an RGB image that is fully loaded (no open file handles), upright
  (EXIF orientation applied), composited on white, and scaled correctly from
  16 bits;
* raises :class:`ImageInputError` (a ``ValueError``) with a sentence a user can
  act on for every bad input, never a bare Pillow/OSError/struct error.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_URL_BYTES",
    "DEFAULT_URL_TIMEOUT",
    "MAX_REDIRECTS",
    "ImageInputError",
    "describe_source",
    "load_image",
    "load_images",
]

#: Default pixel limit: a 100 megapixel photo decodes to 300 MB of RGB, which
#: is already more than a diffusion pipeline will ever use.
DEFAULT_MAX_PIXELS = 100_000_000

#: Pillow format names we let Pillow decode. Deliberately short: these cover
#: what browsers, phones and screenshot tools produce, and every extra plugin is
#: extra parser attack surface. MPO is how Pillow names phone JPEGs that carry a
#: second (depth/preview) image.
ALLOWED_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"})

# Order in which Pillow tries the plugins (most common first). No "MPO": Pillow's
# JPEG plugin is the one that opens MPO files (and then reports format "MPO").
_OPEN_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_ALLOWED_TEXT = "PNG, JPEG, WebP, GIF, BMP, TIFF"
_CONVERT_HINT = "convert it to PNG or JPEG"

#: URLs: seconds a download may take in all (and the longest silence while connecting or reading).
DEFAULT_URL_TIMEOUT = 30.0
#: URLs: the most bytes read from a server (a 100-megapixel JPEG is rarely over 40 MB). Checked while
#: streaming, so a server that sends more costs this much memory at most.
DEFAULT_MAX_URL_BYTES = 64 * 2**20
#: URLs: how many redirects are followed before giving up.
MAX_REDIRECTS = 5
_URL_CHUNK = 64 * 1024
# A scheme of two letters or more and "://" (a Windows path "C:\photo.png" stays a path), or "data:".
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+)://|(data):", re.IGNORECASE)

_WHITE = (255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_HEAD_BYTES = 512


class ImageInputError(ValueError):
    """An input could not be turned into an image; the message says which input and why."""


# --------------------------------------------------------------------------- descriptions


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _path_label(path: str) -> str:
    base = os.path.basename(path.rstrip("/\\")) or path
    return repr(_short(base))


def _nbytes(n: int) -> str:
    return f"{n} byte" if n == 1 else f"{n} bytes"


def _entry_name(entry: Mapping[Any, Any]) -> str | None:
    """The file name of an ipywidgets 8 (``name``) or 7.7 (``metadata.name``) upload entry."""
    name = entry.get("name")
    if not isinstance(name, str):
        meta = entry.get("metadata")
        name = meta.get("name") if isinstance(meta, Mapping) else None
    return name if isinstance(name, str) and name else None


def _url_scheme(text: str) -> str | None:
    """The lower-case scheme if ``text`` is written as a URL (``https://…``, ``data:…``), else None."""
    match = _URL_SCHEME.match(text)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).lower()


def _url_label(url: str) -> str:
    """A URL as errors show it: without user name, password or query string, long paths shortened."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced "[" in the host
        return repr(_short(url, 80))
    if parts.scheme.lower() == "data":
        return repr(_short(url, 40))
    host = parts.netloc.rpartition("@")[2]  # never repeat credentials written into the URL
    text = f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query or parts.fragment else "")
    if len(text) > 80:  # keep the host and the file name, which say the most
        tail = text[-35:]
        text = text[:44] + "…" + (tail[tail.index("/") :] if "/" in tail else tail)
    return repr(text)


def describe_source(src: object) -> str:
    """Name an image source in a few words for error messages.

    Returns the quoted file name where the source has one (``'cat.heic'``), the URL
    for a URL (``'https://example.com/cat.png'``), otherwise a short description
    (``bytes (12 bytes)``).
    """
    if isinstance(src, str) and _url_scheme(src) is not None:
        return _url_label(src)
    if isinstance(src, (str, os.PathLike)):
        try:
            return _path_label(os.fsdecode(src))
        except (TypeError, ValueError):
            return f"path object of type {type(src).__name__}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        size = src.nbytes if isinstance(src, memoryview) else len(src)
        return f"{type(src).__name__} ({_nbytes(size)})"
    if isinstance(src, np.ndarray):
        return f"numpy array of shape {tuple(src.shape)}"
    if isinstance(src, Image.Image):
        filename = getattr(src, "filename", None)
        if isinstance(filename, str) and filename:
            return _path_label(filename)
        return f"PIL image ({src.mode}, {src.width}x{src.height})"
    if isinstance(src, Mapping):
        name = _entry_name(src)
        if name is not None:
            return repr(_short(name))
        if "content" in src:
            return "upload entry without a file name"
        return f"{type(src).__name__} with keys {_short(str(sorted(map(str, src.keys()))))}"
    if isinstance(src, (list, tuple)):
        return f"{type(src).__name__} of {len(src)} items"
    if hasattr(src, "read"):
        name = getattr(src, "name", None)
        if isinstance(name, (str, bytes, os.PathLike)):
            try:
                return _path_label(os.fsdecode(name))
            except (TypeError, ValueError):
                pass
        return f"file object ({type(src).__name__})"
    if src is None:
        return "None"
    return f"object of type {type(src).__name__}"


# --------------------------------------------------------------------------- public API


def load_image(
    src: object,
    *,
    max_pixels: int | None = None,
    name: str | None = None,
    timeout: float = DEFAULT_URL_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_URL_BYTES,
) -> Image.Image:
    """Load one image from any supported source as a fully loaded RGB ``PIL.Image``.

    ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`) bounds width*height and
    is checked before pixels are decoded. ``name`` replaces the source's own
    name in error messages. Pillow's own ``Image.MAX_IMAGE_PIXELS`` safety net
    still applies at twice its value, whatever ``max_pixels`` says.

    An ``http://`` or ``https://`` string is downloaded (at most ``max_bytes``
    bytes, within ``timeout`` seconds, :data:`MAX_REDIRECTS` redirects) and
    its bytes are then checked exactly like a file's; other URL schemes are refused.
    """
    limit = _check_limit(max_pixels)
    label = repr(_short(name)) if name else describe_source(src)

    if isinstance(src, str) and _url_scheme(src) is not None:
        return _from_url(src, label, limit, _check_timeout(timeout), _check_max_bytes(max_bytes))

    if isinstance(src, Image.Image):
        return _from_pil(src, label, limit)
    if isinstance(src, np.ndarray):
        return _from_array(src, label, limit)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _from_bytes(src, label, limit)
    if isinstance(src, (str, os.PathLike)):
        return _from_path(src, label, limit)
    if isinstance(src, Mapping):
        return _from_mapping(src, label, limit, name)
    if isinstance(src, (list, tuple)):
        if len(src) == 1:  # ipywidgets 8 FileUpload(multiple=False).value is a 1-tuple.
            return load_image(src[0], max_pixels=limit, name=name, timeout=timeout, max_bytes=max_bytes)
        if not src:
            raise ImageInputError(
                f"no image given (empty {type(src).__name__}); upload or choose a file first"
            )
        raise ImageInputError(
            f"got a {type(src).__name__} of {len(src)} sources where one image was expected; "
            "use load_images() to load several"
        )
    if hasattr(src, "read"):
        return _from_file_object(src, label, limit)
    raise ImageInputError(
        f"cannot load an image from {describe_source(src)}: expected a file path, an http(s) URL, bytes, "
        "a binary file object, a PIL image, a numpy array or an ipywidgets FileUpload entry"
    )


def load_images(srcs: object, **kw: Any) -> list[Image.Image]:
    """Load one or several images; returns one RGB image per source.

    Accepts a single source, a list/tuple of sources (ipywidgets 8
    ``FileUpload.value``) or an ipywidgets 7 ``FileUpload.value`` dict
    ``{filename: {"metadata": ..., "content": ...}}``. Keyword arguments go to
    :func:`load_image`.
    """
    if isinstance(srcs, (list, tuple)):
        items: list[object] = list(srcs)
    elif isinstance(srcs, Mapping) and not _is_entry(srcs) and srcs:
        if not all(isinstance(v, Mapping) for v in srcs.values()):
            raise ImageInputError(
                f"cannot load images from {describe_source(srcs)}: expected an ipywidgets FileUpload "
                "value, a list of sources or a single source"
            )
        items = [_named_entry(key, value) for key, value in srcs.items()]
    elif isinstance(srcs, Mapping) and not srcs:
        items = []
    else:
        items = [srcs]
    if not items:
        raise ImageInputError("no images given")
    return [load_image(item, **kw) for item in items]


# --------------------------------------------------------------------------- sources


def _check_limit(max_pixels: int | None) -> int:
    if max_pixels is None:
        return DEFAULT_MAX_PIXELS
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    return max_pixels


def _check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _check_max_bytes(max_bytes: int) -> int:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    return max_bytes


def _is_entry(obj: Mapping[Any, Any]) -> bool:
    return "content" in obj


def _named_entry(key: object, value: Mapping[Any, Any]) -> Mapping[Any, Any]:
    """Give an ipywidgets 7 value-dict entry its key as name if its metadata lacks one."""
    if _entry_name(value) is None and isinstance(key, str):
        return {**value, "name": key}
    return value


def _from_mapping(src: Mapping[Any, Any], label: str, limit: int, name: str | None) -> Image.Image:
    if _is_entry(src):
        content = src["content"]
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise ImageInputError(
                f"{label} has upload content of type {type(content).__name__}, expected bytes"
            )
        return _from_bytes(content, label, limit)
    # An ipywidgets 7 FileUpload.value with exactly one file is unambiguous.
    values = list(src.values())
    if len(values) == 1 and isinstance(values[0], Mapping) and _is_entry(values[0]):
        key = next(iter(src))
        return load_image(_named_entry(key, values[0]), max_pixels=limit, name=name)
    if values and all(isinstance(v, Mapping) and _is_entry(v) for v in values):
        raise ImageInputError(
            f"got an upload value with {len(values)} files where one image was expected; "
            "use load_images() to load several"
        )
    if not values:
        raise ImageInputError("no image given (empty dict); upload or choose a file first")
    raise ImageInputError(
        f"cannot load an image from {label}: a dict must be an ipywidgets FileUpload entry "
        "with a 'content' key"
    )


def _from_bytes(data: bytes | bytearray | memoryview, label: str, limit: int) -> Image.Image:
    if isinstance(data, memoryview):
        data = data.tobytes()  # ipywidgets 8 hands over memoryviews, possibly non-contiguous.
    if not data:
        raise ImageInputError(f"{label} is empty; the file or upload contains no data")
    return _decode(io.BytesIO(data), label, limit)


def _from_path(src: str | os.PathLike[Any], label: str, limit: int) -> Image.Image:
    try:
        path = os.fsdecode(src)
    except (TypeError, ValueError) as e:
        raise ImageInputError(f"{label} is not a usable file path ({e})") from e
    if not path:
        raise ImageInputError("an empty string is not a file path; pass the path of an image file")
    if "\x00" in path:
        raise ImageInputError(f"{label} is not a valid file path (it contains a NUL character)")
    if not os.path.exists(path):
        raise ImageInputError(f"{label} does not exist (no file at {_short(path, 200)}); check the path")
    if os.path.isdir(path):
        raise ImageInputError(f"{label} is a directory, not an image file; pass the path of an image file")
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever. It changes
        # nothing for a regular file, and anything else is refused below before a byte is read.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise ImageInputError(f"{label} cannot be opened ({e.strerror or e}); check its permissions") from e
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise ImageInputError(
            f"{label} is not a regular file (a pipe, socket or device); pass the path of an image file"
        )
    _blocking(descriptor)
    fp = os.fdopen(descriptor, "rb")
    try:
        return _decode(fp, label, limit)
    finally:
        fp.close()


def _blocking(descriptor: int) -> None:
    """Clear O_NONBLOCK again (where the platform has it) so reads of a slow disk wait as usual."""
    if hasattr(os, "set_blocking"):
        os.set_blocking(descriptor, True)


def _from_file_object(fp: Any, label: str, limit: int) -> Image.Image:
    if isinstance(fp, io.TextIOBase):
        raise ImageInputError(f"{label} is opened in text mode; open the file with mode 'rb'")
    try:
        seekable = bool(fp.seekable()) if hasattr(fp, "seekable") else hasattr(fp, "seek")
        if not seekable:
            data = fp.read()
            if isinstance(data, str):
                raise ImageInputError(f"{label} returned text, not bytes; open the file with mode 'rb'")
            return _from_bytes(bytes(data), label, limit)
    except ImageInputError:
        raise
    except Exception as e:
        raise ImageInputError(f"{label} could not be read ({type(e).__name__}: {e})") from e
    return _decode(fp, label, limit)


# --------------------------------------------------------------------------- URLs


def _from_url(url: str, label: str, limit: int, timeout: float, max_bytes: int) -> Image.Image:
    """Download ``url`` (http or https only), then decode its bytes exactly as a file's."""
    scheme = _url_scheme(url)
    if scheme == "file":
        raise ImageInputError(
            f"{label} is a file:// URL, which is not opened; pass the file's path instead"
        )
    if scheme == "data":
        raise ImageInputError(
            f"{label} is a data: URL, which is not accepted; decode its base64 payload and pass the bytes"
        )
    if scheme not in ("http", "https"):
        raise ImageInputError(
            f"{label} uses {scheme}://, but only http:// and https:// URLs are downloaded; "
            "download it yourself and pass the file"
        )
    if _has_credentials(url):
        raise ImageInputError(
            f"{label} carries a user name or password, which are never sent; "
            "download the image yourself and pass the file"
        )
    data = _download(url, label, timeout, max_bytes)
    if not data:
        raise ImageInputError(f"{label} sent no data (an empty response); check the address")
    return _decode(io.BytesIO(data), label, limit)


class _RedirectRefused(Exception):
    """A redirect to something other than http(s), raised out of urllib's redirect handler."""


class _RedirectWithCredentials(Exception):
    """A redirect to a URL carrying a user name or password, which would be sent: refused like the first URL."""


class _OutOfTime(Exception):
    """The whole request's deadline passed (connecting, headers, redirects or body). Not an OSError, so
    urllib lets it through untouched."""


class _TooMuchSent(Exception):
    """The server sent more bytes in all (status lines, headers, ``100 Continue``, redirects, trailers, body)
    than the request's budget."""


#: Bytes a server may send besides the body (status lines, headers, redirect bodies, chunk framing,
#: trailers): generous for any real server, small beside the body's own limit.
_HEADER_ALLOWANCE = 1 * 2**20


class _Budget:
    """One request's deadline and byte budget, shared by every connection it opens (redirects included)."""

    def __init__(self, timeout: float, max_bytes: int) -> None:
        self.deadline = time.monotonic() + timeout
        self.limit = max_bytes + _HEADER_ALLOWANCE
        self.received = 0
        self.answered = False  # the final response's headers are in: the body is being read

    def seconds_left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _OutOfTime
        return left

    def bytes_left(self) -> int:
        return self.limit - self.received

    def spend(self, count: int) -> None:
        self.received += count
        if self.received > self.limit:
            raise _TooMuchSent


class _MeteredReader(io.RawIOBase):
    """The socket's reading side, where every read waits at most until the deadline and counts its bytes."""

    def __init__(self, raw: Any, sock: Any, budget: _Budget) -> None:
        super().__init__()
        self._raw, self._sock, self._budget = raw, sock, budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(self._budget.seconds_left())
        view = memoryview(buffer)[: max(1, min(len(buffer), self._budget.bytes_left() + 1))]
        count = self._raw.readinto(view) or 0
        self._budget.spend(count)
        return count

    def close(self) -> None:
        self._raw.close()
        super().close()


class _MeteredSocket:
    """A connected socket whose responses are read through :class:`_MeteredReader` (http.client reads the
    status line, headers, ``100 Continue`` replies, chunks and trailers all through ``makefile``)."""

    def __init__(self, sock: Any, budget: _Budget) -> None:
        self._sock, self._budget = sock, budget

    def makefile(self, mode: str = "r", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_MeteredReader(self._sock.makefile("rb", buffering=0), self._sock, self._budget))

    def sendall(self, data: Any, *args: Any) -> None:
        self._sock.settimeout(self._budget.seconds_left())
        self._sock.sendall(data, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _metered(connection_class: Any, budget: _Budget) -> Any:
    """``connection_class`` (http.client's HTTP or HTTPS connection) connecting within the budget's deadline
    and reading through the metered socket."""

    class Metered(connection_class):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            self.timeout = budget.seconds_left()  # TCP connect and TLS handshake: within the deadline too
            super().connect()
            self.sock = _MeteredSocket(self.sock, budget)

    return Metered


def _opener(budget: _Budget) -> Any:
    """An opener that follows at most MAX_REDIRECTS redirects, only to http(s) URLs without credentials,
    and reads every connection within ``budget``."""
    import http.client
    import urllib.request
    from urllib.parse import urljoin

    class LimitedRedirects(urllib.request.HTTPRedirectHandler):
        max_redirections = MAX_REDIRECTS
        max_repeats = 2

        def http_error_302(self, req, fp, code, msg, headers):
            # urllib itself would follow a redirect to ftp:// and refuse file:// with a misleading message.
            target = urljoin(req.full_url, headers.get("location") or headers.get("uri") or "")
            if _url_scheme(target) not in ("http", "https"):
                fp.close()  # the redirect response's socket: nothing more is read from it
                raise _RedirectRefused(target)
            if _has_credentials(target):
                fp.close()
                raise _RedirectWithCredentials(target)
            return super().http_error_302(req, fp, code, msg, headers)

        http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    class MeteredHTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(_metered(http.client.HTTPConnection, budget), req)

    class MeteredHTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(_metered(http.client.HTTPSConnection, budget), req, context=self._context)

    return urllib.request.build_opener(LimitedRedirects, MeteredHTTP, MeteredHTTPS)


def _has_credentials(url: str) -> bool:
    """Whether ``url`` writes a user name or password before its host (``http://user:pw@host/``)."""
    return "@" in url.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]


def _download(url: str, label: str, timeout: float, max_bytes: int) -> bytes:
    """The body of ``url``; refused once it passes ``max_bytes`` (checked while reading) or once the whole
    request (connecting, every redirect, headers and body) passes ``timeout`` seconds."""
    import http.client
    import urllib.error
    import urllib.request

    from ._version import __version__

    too_large = (
        f"{label} is larger than the download limit of {max_bytes:,} bytes; "
        "download it yourself and pass the file, or pass a larger max_bytes"
    )
    too_slow = (
        f"{label} did not answer within {timeout:g} seconds; check the address or try again later "
        "(or pass a larger timeout)"
    )
    unfinished = (
        f"{label} did not finish downloading within {timeout:g} seconds (too slow); "
        "try again later, download it yourself, or pass a larger timeout"
    )
    budget = _Budget(timeout, max_bytes)
    try:
        request = urllib.request.Request(
            url, headers={"User-Agent": f"imageprompt_widgets/{__version__}", "Accept": "image/*"}
        )
        with _opener(budget).open(request, timeout=timeout) as response:
            budget.answered = True
            declared = response.headers.get("Content-Length", "")
            if declared.strip().isdigit() and int(declared) > max_bytes:
                raise ImageInputError(
                    f"{label} is {int(declared):,} bytes, more than the download limit of {max_bytes:,} bytes; "
                    "download it yourself and pass the file, or pass a larger max_bytes"
                )
            body = bytearray()
            while True:
                # read1: at most one read from the socket, so the deadline is checked between small pieces
                # and nothing beyond max_bytes + 1 is ever read.
                chunk = response.read1(min(_URL_CHUNK, max_bytes + 1 - len(body)))
                if not chunk:
                    return bytes(body)
                body += chunk
                if len(body) > max_bytes:
                    raise ImageInputError(too_large)
                budget.seconds_left()
    except ImageInputError:
        raise
    except _OutOfTime as e:
        raise ImageInputError(unfinished if budget.answered else too_slow) from e
    except _TooMuchSent as e:
        raise ImageInputError(
            f"{label} sent more than {budget.limit:,} bytes in all (headers, redirects and body), more than "
            "the download limit allows; download it yourself and pass the file, or pass a larger max_bytes"
        ) from e
    except _RedirectRefused as e:
        raise ImageInputError(
            f"{label} redirects to {_url_label(str(e))}, which is not an http(s) URL; "
            "download the image yourself and pass the file"
        ) from e
    except _RedirectWithCredentials as e:
        raise ImageInputError(
            f"{label} redirects to {_url_label(str(e))} with a user name or password, which are never sent; "
            "download the image yourself and pass the file"
        ) from e
    except urllib.error.HTTPError as e:
        e.close()  # an HTTPError holds the open response; nothing more is read from it
        if 300 <= e.code < 400 and "infinite loop" in str(e.msg):  # urllib's words for too many redirects
            raise ImageInputError(
                f"{label} redirects too often (more than {MAX_REDIRECTS} times, or in a loop); "
                "open it in a browser and copy the final address"
            ) from e
        reason = f" {' '.join(e.reason.split())[:80]}" if isinstance(e.reason, str) and e.reason else ""
        raise ImageInputError(
            f"{label} could not be downloaded: the server answered {e.code}{reason}; check the address"
        ) from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise ImageInputError(unfinished if budget.answered else too_slow) from e
        raise ImageInputError(
            f"{label} could not be reached ({e.reason}); check the address and the network connection"
        ) from e
    except TimeoutError as e:
        raise ImageInputError(unfinished if budget.answered else too_slow) from e
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise ImageInputError(
            f"{label} could not be downloaded ({type(e).__name__}: {e}); check the address and try again"
        ) from e


# --------------------------------------------------------------------------- decoding


def _read_head(fp: Any, label: str) -> bytes:
    """Read the first bytes (for sniffing) and rewind, as Pillow itself rewinds to 0."""
    try:
        fp.seek(0)
        head = fp.read(_HEAD_BYTES)
        fp.seek(0)
    except Exception as e:
        raise ImageInputError(f"{label} could not be read ({type(e).__name__}: {e})") from e
    if isinstance(head, str):
        raise ImageInputError(f"{label} returned text, not bytes; open the file with mode 'rb'")
    return bytes(head)


def _too_large(label: str, size: tuple[int, int], limit: int) -> ImageInputError:
    w, h = size
    return ImageInputError(
        f"{label} is {w}x{h} = {w * h:,} pixels, more than the limit of {limit:,} pixels; "
        "downscale it first or pass a larger max_pixels"
    )


def _check_size(label: str, size: tuple[int, int], limit: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageInputError(f"{label} has no pixels ({w}x{h}); it cannot be used as an image")
    if w * h > limit:
        raise _too_large(label, size, limit)


def _decode(fp: Any, label: str, limit: int) -> Image.Image:
    """Open ``fp`` with the allowed plugins only, check the header size, then decode."""
    head = _read_head(fp, label)
    if not head:
        raise ImageInputError(f"{label} is empty; the file or upload contains no data")
    with warnings.catch_warnings():
        # Our own max_pixels check below is the limit that matters; Pillow's
        # warning (between MAX_IMAGE_PIXELS and twice that) is only noise here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp, formats=_OPEN_FORMATS)
        except Image.DecompressionBombError as e:
            raise ImageInputError(f"{label} is too large to decode safely ({e}); downscale it first") from e
        except UnidentifiedImageError as e:
            raise _unidentified(fp, head, label) from e
        except Exception as e:
            raise ImageInputError(
                f"{label} is a corrupt image that Pillow cannot open ({type(e).__name__}: {e}); "
                f"re-export it or {_CONVERT_HINT}"
            ) from e
        with im:
            fmt = im.format or "image"
            _check_size(label, im.size, limit)  # From the header: nothing is allocated yet.
            try:
                im.load()
            except Image.DecompressionBombError as e:
                raise ImageInputError(
                    f"{label} is too large to decode safely ({e}); downscale it first"
                ) from e
            except Exception as e:
                raise ImageInputError(
                    f"{label} is a truncated or corrupt {fmt} file ({type(e).__name__}: {e}); "
                    "re-export or re-upload it"
                ) from e
            _check_size(label, im.size, limit)  # Some formats only know the final size after decoding.
            return _normalise(im, label)


def _sniff(head: bytes) -> str | None:
    """Recognise common non-image or not-allowed files Pillow cannot name, for a better message."""
    lower = head[:_HEAD_BYTES].lstrip().lower()
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "a HEIC/HEIF image (the iPhone photo format)"
        if brand in (b"avif", b"avis"):
            return "an AVIF image"
        return "a video (MP4/MOV) file"
    if lower.startswith(b"\xef\xbb\xbf"):
        lower = lower[3:]
    if lower.startswith(b"<svg") or (lower.startswith(b"<?xml") and b"<svg" in lower):
        return "an SVG drawing"
    if lower.startswith((b"<!doctype html", b"<html")):
        return "an HTML page (did a download fail?)"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    return None


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # A multi-byte character cut at the end is still text.
            return False
        text = head[: e.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\t\r\n" for ch in text)
    return bool(text) and printable >= 0.95 * len(text)


def _identify_any(fp: Any) -> str | None:
    """Name the format with all of Pillow's plugins (header only, never decoded)."""
    try:
        fp.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(fp) as other:
                return other.format
    except Exception:  # noqa: BLE001 - only improves a message; failure means unknown
        return None


def _allowed_signature(head: bytes) -> str | None:
    """The allowed format whose magic bytes ``head`` starts with, if any."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    return None


def _unidentified(fp: Any, head: bytes, label: str) -> ImageInputError:
    allowed = f"allowed formats: {_ALLOWED_TEXT}"
    signature = _allowed_signature(head)
    if signature is not None:
        return ImageInputError(
            f"{label} starts like a {signature} file but its header is corrupt; re-export or re-upload it"
        )
    kind = _sniff(head)
    if kind is None:
        fmt = _identify_any(fp)
        if fmt is not None and fmt not in ALLOWED_FORMATS:
            kind = f"an image in {fmt} format"
    if kind is not None:
        return ImageInputError(
            f"{label} is {kind}, which is not an allowed image format ({allowed}); {_CONVERT_HINT}"
        )
    if _looks_like_text(head):
        return ImageInputError(f"{label} is a text file, not an image ({allowed}); choose an image file")
    return ImageInputError(f"{label} is not an image Pillow can decode ({allowed}); {_CONVERT_HINT}")


# --------------------------------------------------------------------------- normalisation


def _from_pil(im: Image.Image, label: str, limit: int) -> Image.Image:
    """Normalise a caller's PIL image without closing or mutating it (beyond loading it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        _check_size(label, im.size, limit)
        try:
            im.load()
        except Exception as e:
            raise ImageInputError(
                f"{label} could not be decoded ({type(e).__name__}: {e}); re-export or re-upload it"
            ) from e
        return _normalise(im, label)


def _normalise(im: Image.Image, label: str) -> Image.Image:
    """Upright, 8-bit, composited-on-white RGB copy of a loaded image, with no metadata."""
    try:
        upright = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the user the photo
        upright = im.copy()  # Unreadable EXIF: keep the pixels as stored rather than refuse the photo.
    if upright is None:  # pragma: no cover - only with in_place=True
        upright = im.copy()
    try:
        out = _to_rgb(upright, label)
    except ImageInputError:
        raise
    except Exception as e:
        raise ImageInputError(
            f"{label} uses colour mode {im.mode}, which could not be converted to RGB "
            f"({type(e).__name__}: {e}); {_CONVERT_HINT}"
        ) from e
    out.info = {}  # Stale ICC profiles (e.g. CMYK) or transparency keys would lie about the RGB pixels.
    return out


def _has_alpha(im: Image.Image) -> bool:
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return True
    return im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA"


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(im: Image.Image, label: str) -> Image.Image:
    if im.mode in _SIXTEEN_BIT_MODES or im.mode in ("I", "F"):
        return _wide_to_rgb(im, label)
    if _has_alpha(im):
        if im.mode == "La":
            im = im.convert("LA")
        return _on_white(im.convert("RGBA"))
    if im.mode == "RGB":
        return im.copy()
    return im.convert("RGB")


def _wide_to_rgb(im: Image.Image, label: str) -> Image.Image:
    """Scale 16-bit/32-bit grey to 8 bits; Pillow's own ``convert("L")`` clamps at 255 instead."""
    arr = np.asarray(im)
    transparency = im.info.get("transparency")
    alpha = None
    if isinstance(transparency, int) and not isinstance(transparency, bool):
        alpha = np.where(arr == transparency, 0, 255).astype(np.uint8)
    if im.mode == "F":
        if not np.isfinite(arr).all():
            raise ImageInputError(f"{label} contains NaN or infinite values; it cannot be shown as an image")
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)  # Pillow's convention for F: 0..255.
    elif im.mode == "I" and arr.size and int(arr.min()) >= 0 and int(arr.max()) <= 255:
        grey = arr.astype(np.uint8)  # Mode I holding 8-bit values (e.g. from an int array).
    else:
        grey = _scale_16_to_8(np.clip(arr, 0, 65535))
    l_image = Image.fromarray(grey)
    if alpha is not None:
        la = Image.merge("LA", (l_image, Image.fromarray(alpha)))
        return _on_white(la.convert("RGBA"))
    return l_image.convert("RGB")


def _scale_16_to_8(arr: np.ndarray) -> np.ndarray:
    """Round(value / 257): maps 0..65535 onto 0..255 exactly (65535 -> 255, 32896 -> 128)."""
    return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)


# --------------------------------------------------------------------------- numpy


def _from_array(arr: np.ndarray, label: str, limit: int) -> Image.Image:
    if arr.size == 0:
        raise ImageInputError(f"{label} is empty (it has no pixels)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        channels = 1
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        channels = arr.shape[2]
    else:
        hint = "expected HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA)"
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4):
            hint += "; it looks channels-first, use arr.transpose(1, 2, 0)"
        elif arr.ndim == 4 and arr.shape[0] == 1:
            hint += "; drop the batch dimension with arr[0]"
        raise ImageInputError(f"{label} does not have an image shape: {hint}")
    h, w = arr.shape[:2]
    _check_size(label, (w, h), limit)
    data = _array_to_uint8(arr, label)
    if channels == 1:
        return Image.fromarray(np.ascontiguousarray(data)).convert("RGB")
    if channels == 3:
        return Image.fromarray(np.ascontiguousarray(data))
    return _on_white(Image.fromarray(np.ascontiguousarray(data)))


def _array_to_uint8(arr: np.ndarray, label: str) -> np.ndarray:
    kind = arr.dtype.kind
    if kind == "u" and arr.dtype.itemsize == 1:
        return arr
    if kind == "b":
        return arr.astype(np.uint8) * 255
    if kind == "u" and arr.dtype.itemsize == 2:  # Either byte order.
        return _scale_16_to_8(arr)
    if kind == "f":
        if not np.isfinite(arr).all():
            raise ImageInputError(
                f"{label} (dtype {arr.dtype}) contains NaN or infinite values; "
                "replace them first, e.g. with np.nan_to_num"
            )
        return np.rint(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    if kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 255:
            return arr.astype(np.uint8)
        raise ImageInputError(
            f"{label} has dtype {arr.dtype} with values from {lo} to {hi}; cast it to uint8 (0-255) "
            "or uint16 (0-65535), or use floats in [0, 1]"
        )
    raise ImageInputError(
        f"{label} has dtype {arr.dtype}, which is not an image type; use uint8, uint16, bool or floats in [0, 1]"
    )
