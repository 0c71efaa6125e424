"""The dataset view: a folder's CLIP image embeddings projected to 2-D, as a scatter of thumbnails.

Pure like every view (views/base.py: numbers, then a matplotlib figure): it takes embeddings already computed (``embed.embed_images``, or a file written by
``imageprompt embed`` read with ``embed.load_embeddings``) and returns numbers and a picture; it loads no
model. The projection is PCA (torch's SVD, signs fixed so the picture is the same on every machine) or,
when ``umap-learn`` is installed, UMAP. :meth:`DatasetMap.pick` maps a click in the plot's data
coordinates to the nearest image, which the notebook's picker (``widget/dataset.py``) makes the panel's input.

```python
from imageprompt_widgets.batch.embed import embed_images
from imageprompt_widgets.views.dataset import dataset_map
table = embed_images(pipe, paths, labels=[p.name for p in paths])
view = dataset_map(table, images=paths)        # shown inline; view.points holds the 2-D coordinates
view.pick(x=0.3, y=-1.2)                       # the index of the nearest image
```
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..extras import available, require
from ..images import load_images
from ..settings import SettingsError
from .base import FigureView, new_figure

#: The projections: "auto" is UMAP when installed and there are enough points for it, else PCA.
PROJECTIONS = ("auto", "pca", "umap")
#: Fewer points than this and "auto" uses PCA: UMAP's neighbourhood graph means little on a handful.
UMAP_MIN_POINTS = 10
#: Longest side of a thumbnail in the scatter, in pixels.
THUMBNAIL_SIZE = 36
_HIGHLIGHT = "#d62728"


@dataclass(frozen=True)
class Projection:
    """2-D coordinates of each embedding and how they were made."""

    points: torch.Tensor  # [N, 2] float64
    method: str  # "pca" or "umap"
    #: PCA: the fraction of the (centred) variance along each axis; UMAP: None (its axes have no such meaning)
    explained: tuple[float, float] | None = None

    def axis_labels(self) -> tuple[str, str]:
        if self.method == "pca" and self.explained is not None:
            return tuple(f"PC {i + 1} ({share:.0%} of the variance)" for i, share in enumerate(self.explained))
        return (f"{self.method.upper()} 1", f"{self.method.upper()} 2")


def pca_2d(embeds: torch.Tensor) -> Projection:
    """The embeddings centred and projected on their two main axes (SVD in float64).

    Each axis's sign is fixed the way scikit-learn fixes it (the largest-magnitude entry of each principal
    direction is positive), so the same embeddings give the same picture everywhere.
    """
    data = _matrix(embeds)
    centred = data - data.mean(dim=0, keepdim=True)
    _, singular, directions = torch.linalg.svd(centred, full_matrices=False)
    count = min(2, directions.shape[0])
    directions = directions[:count]
    largest = directions.abs().argmax(dim=1)
    signs = torch.sign(directions[torch.arange(count), largest])
    directions = directions * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    points = torch.zeros(data.shape[0], 2, dtype=torch.float64)
    points[:, :count] = centred @ directions.T
    variance = singular.square()
    total = float(variance.sum())
    shares = [float(variance[i]) / total if total > 0 and i < count else 0.0 for i in range(2)]
    return Projection(points, "pca", (shares[0], shares[1]))


def umap_2d(embeds: torch.Tensor, seed: int = 0) -> Projection:
    """UMAP (cosine distance, seeded) to 2-D; needs ``umap-learn`` (the ``umap`` extra)."""
    umap = require("umap", "umap", "A UMAP projection")
    data = _matrix(embeds)
    if data.shape[0] < 3:
        raise SettingsError(f"UMAP needs at least 3 images, not {data.shape[0]}: use method='pca'.")
    reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(15, data.shape[0] - 1)), metric="cosine",
                        random_state=seed)
    points = torch.as_tensor(reducer.fit_transform(data.numpy()), dtype=torch.float64)
    return Projection(points, "umap")


def project(embeds: torch.Tensor, method: str = "auto", seed: int = 0) -> Projection:
    """``[N, D]`` embeddings to 2-D: ``"pca"``, ``"umap"``, or ``"auto"`` (UMAP when installed and N is
    at least :data:`UMAP_MIN_POINTS`, else PCA)."""
    if method not in PROJECTIONS:
        raise SettingsError(f"method={method!r} is not one of {', '.join(PROJECTIONS)}.")
    if method == "auto":
        enough = _matrix(embeds).shape[0] >= UMAP_MIN_POINTS
        method = "umap" if enough and available("umap") else "pca"
    return umap_2d(embeds, seed) if method == "umap" else pca_2d(embeds)


def nearest_point(points: torch.Tensor, x: float, y: float) -> int:
    """The index of the point closest to ``(x, y)`` (data coordinates); the first one on a tie."""
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] == 0:
        raise SettingsError(f"points must be [N, 2] with N at least 1, got shape {tuple(points.shape)}.")
    distances = (points.double() - torch.tensor([float(x), float(y)], dtype=torch.float64)).square().sum(dim=1)
    return int(torch.argmin(distances))


@dataclass(frozen=True)
class DatasetMap(FigureView):
    """A dataset's images placed by their embeddings: numbers (``points``) and a picture (``figure``)."""

    labels: list[str]
    projection: Projection
    thumbnails: list[Any] | None = None  # small RGB PIL images, one per point
    selected: int | None = None

    @property
    def points(self) -> torch.Tensor:
        return self.projection.points

    def __len__(self) -> int:
        return len(self.labels)

    def pick(self, x: float | None = None, y: float | None = None, *, index: int | None = None) -> int:
        """The image a click at ``(x, y)`` in the plot's data coordinates means (the nearest point), or
        ``index`` checked against the number of points."""
        if index is not None:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self):
                raise SettingsError(f"index={index!r} is not a point: pass 0 to {len(self) - 1}.")
            return index
        if x is None or y is None:
            raise SettingsError("pick needs x and y (data coordinates of the plot) or index=.")
        return nearest_point(self.points, x, y)

    def select(self, index: int | None) -> DatasetMap:
        """The same map with ``index`` highlighted (``None``: nothing)."""
        return dataclasses.replace(self, selected=None if index is None else self.pick(index=index))

    def describe(self) -> str:
        picked = f"; picked {self.selected}: {self.labels[self.selected]}" if self.selected is not None else ""
        return f"{len(self)} images placed by a {self.projection.method.upper()} of their CLIP image embeddings{picked}."

    def figure(self) -> Any:
        """The scatter: thumbnails (or dots) at their points, each numbered, the selected one framed in red."""
        import numpy as np
        from matplotlib.offsetbox import AnnotationBbox, OffsetImage

        figure = new_figure(6.4, 6.0)
        axes = figure.add_subplot()
        xs, ys = self.points[:, 0].tolist(), self.points[:, 1].tolist()
        axes.scatter(xs, ys, s=12, color="#777777", zorder=1)
        for index, (x, y) in enumerate(zip(xs, ys)):
            chosen = index == self.selected
            if self.thumbnails is not None:
                box = AnnotationBbox(
                    OffsetImage(np.asarray(self.thumbnails[index]), zoom=1.0), (x, y), frameon=True, pad=0.15,
                    bboxprops={"edgecolor": _HIGHLIGHT if chosen else "#bbbbbb", "linewidth": 3 if chosen else 0.5},
                    zorder=3 if chosen else 2,
                )
                axes.add_artist(box)
            elif chosen:
                axes.scatter([x], [y], s=120, facecolors="none", edgecolors=_HIGHLIGHT, linewidths=2, zorder=3)
            offset = THUMBNAIL_SIZE * 0.5 + 3 if self.thumbnails is not None else 4
            axes.annotate(str(index), (x, y), xytext=(offset, offset), textcoords="offset pixels", fontsize=8,
                          color=_HIGHLIGHT if chosen else "#333333", zorder=5 if chosen else 4,
                          bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
        axes.margins(0.18)
        x_label, y_label = self.projection.axis_labels()
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        title = f"{len(self)} images, {self.projection.method.upper()} of their CLIP image embeddings"
        if self.selected is not None:
            title += f"\npicked {self.selected}: {self.labels[self.selected]}"
        axes.set_title(title, fontsize=10)
        return figure


def thumbnails(images: Sequence[Any], size: int = THUMBNAIL_SIZE) -> list[Any]:
    """Small copies (longest side ``size``) of anything ``load_image`` takes."""
    small = []
    for image in load_images(list(images)):
        image = image.copy()
        image.thumbnail((size, size))
        small.append(image)
    return small


def dataset_map(
    embeddings: Any, *, labels: Sequence[str] | None = None, images: Sequence[Any] | None = None,
    method: str = "auto", normalize: bool = True, seed: int = 0,
) -> DatasetMap:
    """The dataset view of ``embeddings``: an ``EmbeddingTable`` (its inputs become the labels) or an
    ``[N, D]`` tensor. ``images`` (one per row, as ``load_image`` takes) become the thumbnails.
    ``normalize`` projects unit vectors: CLIP compares embeddings by angle, not length."""
    embeds = getattr(embeddings, "image_embeds", embeddings)
    names = list(labels) if labels is not None else list(getattr(embeddings, "inputs", []))
    data = _matrix(embeds)
    if not names:
        names = [str(i) for i in range(data.shape[0])]
    if len(names) != data.shape[0]:
        raise SettingsError(f"{len(names)} labels for {data.shape[0]} embeddings: give one per row.")
    if images is not None and len(images) != data.shape[0]:
        raise SettingsError(f"{len(images)} images for {data.shape[0]} embeddings: give one per row.")
    if normalize:
        data = torch.nn.functional.normalize(data, dim=1)
    return DatasetMap(names, project(data, method, seed), thumbnails(images) if images is not None else None)


def _matrix(embeds: Any) -> torch.Tensor:
    data = torch.as_tensor(embeds).detach().to("cpu", torch.float64)
    if data.ndim != 2 or data.shape[0] == 0:
        raise SettingsError(f"embeddings must be [N, D] with N at least 1, got shape {tuple(data.shape)}.")
    return data
