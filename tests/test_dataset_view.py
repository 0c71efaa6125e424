"""The dataset view (embeddings projected to 2-D, nearest image to a click) and its picker in the notebook."""

from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from imageprompt_widgets.batch.embed import embed_images
from imageprompt_widgets.extras import MissingExtraError
from imageprompt_widgets.loading.offline import sample_image
from imageprompt_widgets.settings import SettingsError
from imageprompt_widgets.views import dataset as view_module
from imageprompt_widgets.views.dataset import dataset_map, nearest_point, pca_2d, project


def numpy_pca(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent PCA: eigenvectors of the covariance matrix, signs fixed the scikit-learn way."""
    centred = data - data.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred)
    top = np.argsort(values)[::-1][:2]
    directions = vectors[:, top].T
    signs = np.sign(directions[np.arange(2), np.abs(directions).argmax(axis=1)])
    return centred @ (directions * signs[:, None]).T, values[top] / values.sum()


def test_pca_matches_the_covariance_eigenvectors():
    data = torch.randn(30, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data[:, 0] *= 5  # a clear first axis
    projection = pca_2d(data)
    expected, shares = numpy_pca(data.numpy())
    np.testing.assert_allclose(projection.points.numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(projection.explained, shares, rtol=1e-10)
    assert projection.method == "pca" and projection.axis_labels()[0].startswith("PC 1 (")


def test_pca_is_the_same_for_the_same_embeddings_and_survives_tiny_inputs():
    data = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(pca_2d(data).points, pca_2d(data.clone()).points)
    one = pca_2d(torch.ones(1, 4))
    assert one.points.tolist() == [[0.0, 0.0]] and one.explained == (0.0, 0.0)
    two = pca_2d(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    assert two.points[:, 1].abs().max() < 1e-12 and abs(two.points[1, 0] - two.points[0, 0]) == pytest.approx(5.0)


def test_auto_uses_umap_when_installed(monkeypatch):
    calls = []

    class FakeUMAP:
        def __init__(self, **kwargs):
            calls.append(kwargs)

        def fit_transform(self, data):
            return data[:, :2] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    data = torch.randn(12, 5, dtype=torch.float64)
    projection = project(data)
    assert projection.method == "umap" and torch.equal(projection.points, data[:, :2] * 2)
    assert calls == [{"n_components": 2, "n_neighbors": 11, "metric": "cosine", "random_state": 0}]
    assert project(data[:5]).method == "pca"  # too few points for UMAP to mean anything
    assert project(data, "pca").method == "pca"


def test_umap_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # an import of it now fails
    data = torch.randn(12, 5)
    assert project(data).method == "pca"
    with pytest.raises(MissingExtraError, match=r"pip install 'imageprompt_widgets\[umap\]'"):
        project(data, "umap")
    with pytest.raises(SettingsError, match="method='tsne' is not one of auto, pca, umap"):
        project(data, "tsne")


def test_a_click_picks_the_nearest_image():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    assert nearest_point(points, 0.1, 0.1) == 0
    assert nearest_point(points, 0.9, 0.6) == 1
    assert nearest_point(points, -5, 3) == 2
    assert nearest_point(points, 0.5, 0.0) == 0  # a tie: the first
    view = dataset_map(torch.randn(4, 3), labels=list("abcd"), method="pca")
    x, y = view.points[2].tolist()
    assert view.pick(x + 1e-6, y) == 2 and view.pick(index=3) == 3
    for bad in (4, -1, True):
        with pytest.raises(SettingsError, match="is not a point: pass 0 to 3"):
            view.pick(index=bad)
    with pytest.raises(SettingsError, match="needs x and y"):
        view.pick(1.0)


def test_the_view_of_embeddings_labels_and_picture(tiny_pipe):
    images = [sample_image(i) for i in range(5)]
    table = embed_images(tiny_pipe, images, labels=[f"img{i}" for i in range(5)])
    view = dataset_map(table, images=images)
    normalised = torch.nn.functional.normalize(table.image_embeds.double(), dim=1)
    assert torch.allclose(view.points, pca_2d(normalised).points)
    assert view.labels == table.inputs and len(view.thumbnails) == 5
    assert max(view.thumbnails[0].size) == view_module.THUMBNAIL_SIZE
    plain = Image.open(io.BytesIO(view.to_png())).convert("RGB")
    picked = Image.open(io.BytesIO(view.select(3).to_png())).convert("RGB")
    assert plain.size == picked.size == (640, 600)
    red = np.all(np.asarray(picked) == (214, 39, 40), axis=-1).sum()  # the picked point's frame
    assert red > 100 and np.all(np.asarray(plain) == (214, 39, 40), axis=-1).sum() == 0
    assert view.select(3).describe() == "5 images placed by a PCA of their CLIP image embeddings; picked 3: img3."
    with pytest.raises(SettingsError, match="2 labels for 5 embeddings"):
        dataset_map(table, labels=["a", "b"])


def test_the_picker_makes_the_picked_image_the_panels_input(tmp_path):
    from imageprompt_widgets.widget.dataset import DatasetPicker

    paths = []
    for index in range(4):
        paths.append(tmp_path / f"p{index}.png")
        sample_image(index).save(paths[-1])

    class Panel:
        def __init__(self):
            self.inputs = []

        def set_images(self, images):
            self.inputs.append(images)

    panel = Panel()
    view = dataset_map(torch.randn(4, 6, generator=torch.Generator().manual_seed(2)), labels=[p.name for p in paths],
                       images=paths)
    picker = DatasetPicker(view, paths, panel=panel)
    first_picture = picker.picture.value
    assert picker.points.value is None and picker.preview.layout.display == "none"
    assert [label for label, _ in picker.points.options] == ["0: p0.png", "1: p1.png", "2: p2.png", "3: p3.png"]

    picker.points.value = 2  # what choosing "2: p2.png" in the browser sends
    assert panel.inputs == [[paths[2]]]
    assert picker.view.selected == 2 and picker.picture.value != first_picture
    assert picker.preview.layout.display is None and picker.preview.value
    assert picker.status.value == "p2.png is the panel's input."

    x, y = view.points[1].tolist()
    assert picker.pick_at(x, y) == 1 and panel.inputs[-1] == [paths[1]]

    paths[0].write_text("gone bad")
    picker.pick(0)
    assert "p0.png" in picker.status.value and "not an image" in picker.status.value
    assert panel.inputs[-1] == [paths[1]] and picker.preview.layout.display == "none"


def test_the_picker_drives_the_real_panel(tmp_path):
    from imageprompt_widgets import ImagePromptWidget
    from imageprompt_widgets.widget.dataset import DatasetPicker

    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for index, path in enumerate(paths):
        sample_image(index + 7).save(path)
    panel = ImagePromptWidget(model="tiny")
    try:
        picker = DatasetPicker(dataset_map(torch.eye(2), labels=["a", "b"]), paths, panel=panel)
        picker.pick(1)
        (image,) = panel.inputs.images
        assert image.tobytes() == sample_image(8).tobytes()
        assert "1 input image ready" in panel.status
    finally:
        panel.close()
