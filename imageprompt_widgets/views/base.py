"""What every view shares: its error type, one number format, and drawing with matplotlib.

A view is a dataclass of numbers (computed without matplotlib, tested against independent computations)
that draws itself on demand: ``figure()`` builds a new matplotlib ``Figure`` with the object-oriented API
(never pyplot, so nothing is registered globally and nothing leaks), ``to_png()`` renders it with Agg for
the panel's ``ipywidgets.Image``, and ``_repr_png_`` shows it inline as a notebook cell's result.

matplotlib is the ``plot`` extra. Without it the numbers still work, ``to_png()`` raises
:class:`PlotUnavailableError` (one sentence saying what to install) and a notebook shows the view's
``describe()`` text instead of a picture.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from ..engine.summary import InspectError, number  # noqa: F401 - every view's error and number format

#: The one sentence a view says when matplotlib is missing.
PLOT_MISSING = (
    "Drawing this view needs matplotlib: pip install 'imageprompt_widgets[plot]' "
    "(its numbers are on the view without it)."
)
#: Pixels per inch of every figure (figure sizes below are in inches).
DPI = 100
#: Images at most this many pixels on their longer side are shown with visible pixels (nearest neighbour).
SMALL_IMAGE = 256


class PlotUnavailableError(ImportError):
    """matplotlib, which draws the views, is not installed."""


def patch_grid_side(token_count: int) -> int:
    """The side ``g`` of the patch grid behind a vision tower's ``CLS + g²`` tokens (an error where they are
    not square)."""
    patches = token_count - 1
    side = math.isqrt(max(patches, 0))
    if side * side != patches:
        raise InspectError(f"{patches} patch tokens do not form a square grid (expected CLS + g² tokens).")
    return side


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` (inches, constrained layout) that pyplot never sees."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise PlotUnavailableError(PLOT_MISSING) from err
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


#: The widest a figure is drawn, in inches at ``DPI``: the panel's right-hand column at a 1280 px window is about
#: 700 px wide, so a figure no wider is shown at (nearly) its own size and its text keeps its size on screen.
MAX_WIDTH_INCHES = 7.2
#: The smallest text a figure draws (points): 9 pt at 100 dpi is 12.5 px, 10 px or more on a 1280 px screen.
MIN_FONT_POINTS = 9.0


def readable(figure: Any) -> Any:
    """Make ``figure`` readable where it is shown: no wider than :data:`MAX_WIDTH_INCHES` (its height scaled
    along), no text under :data:`MIN_FONT_POINTS`, and titles that wrap instead of running off the edges."""
    from matplotlib.text import Text

    width, height = figure.get_size_inches()
    if width > MAX_WIDTH_INCHES:
        figure.set_size_inches(MAX_WIDTH_INCHES, height * max(MAX_WIDTH_INCHES / width, 0.8))
    for text in figure.findobj(Text):
        if text.get_fontsize() < MIN_FONT_POINTS:
            text.set_fontsize(MIN_FONT_POINTS)
    titles = [figure._suptitle] + [ax.title for ax in figure.axes]
    for title in titles:
        if title is not None and title.get_text():
            title.set_wrap(True)
    return figure


def png_bytes(figure: Any) -> bytes:
    """Render ``figure`` with Agg to PNG bytes (made :func:`readable` first), then drop what it drew (the figure
    is not kept anywhere)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    readable(figure)
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    figure.clear()
    return buffer.getvalue()


def show_image(ax: Any, image: Any, title: str | None = None, *, fontsize: float = 9) -> Any:
    """An RGB image on ``ax`` without axes; small images with visible pixels rather than blurred."""
    array = np.asarray(image)
    small = max(array.shape[:2]) <= SMALL_IMAGE
    grey = {"cmap": "gray", "vmin": 0, "vmax": 255} if array.ndim == 2 else {}  # an "L" image: grey, not viridis
    shown = ax.imshow(array, interpolation="nearest" if small else "antialiased", **grey)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)
    return shown


class FigureView:
    """Mixin of every view: ``figure()`` draws it; PNG bytes and notebook display follow from that."""

    def figure(self) -> Any:  # pragma: no cover - every view overrides it
        raise NotImplementedError

    def describe(self) -> str:
        """One or two sentences on what the view shows (the text beside its picture)."""
        return type(self).__name__

    def to_png(self) -> bytes:
        """The picture as PNG bytes (for ``ipywidgets.Image(value=...)`` or a file)."""
        return png_bytes(self.figure())

    def _repr_png_(self) -> bytes | None:
        try:
            return self.to_png()
        except PlotUnavailableError:
            return None  # the notebook falls back to the text below

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.describe() if plot_available() else f"{self.describe()}\n{PLOT_MISSING}")


def plot_available() -> bool:
    """Whether matplotlib can be imported (the views draw with it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
