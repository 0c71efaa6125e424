"""The embedding inspector, headless: every view is a pure function returning numbers and a picture.

Each view is a small dataclass holding the numbers it shows (tested against independent
computations) and renders itself to PNG bytes with Pillow alone, so the core stays free of
matplotlib: ``view.to_png()`` feeds the widget's ``ipywidgets.Image``, and ``_repr_png_`` shows the
view inline when it is the last expression of a notebook cell. This module never imports ipywidgets.

Views compute nothing heavy of their own and load no model: what needs the models (CLIP's text tower, an
exact VAE decode, x0 replays, interpolation runs) is the pipeline's (``pipe.clip_text_tower()``,
``pipe.decode_latents``, ``pipe.replay_x0``, ``pipe.interpolate``); views turn the numbers into pictures.

```python
from imageprompt_widgets import ImagePromptPipeline, views
pipe = ImagePromptPipeline.from_preset("tiny")
result = pipe.generate(images, trace_latents=True)
print(result.trace.summary())                      # one line per tensor
views.scale_gap(result.trace, pipe)                # a plot, shown inline; .image_norms etc. hold the numbers
views.similarity(result.trace.image_embeds, pipe, ["a cat", "a dog"]).matrix
views.filmstrip(result, pipe, x0=True)
pipe.interpolate(image_a, image_b, count=5)        # a strip of images, shown inline
```
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..loading import TextTowerUnavailable

#: Prompts whose SD text-encoder token norms are shown beside the image prompt's (computed live).
DEFAULT_PROMPTS = ("a photograph of a cat", "an oil painting of a harbour at sunset", "a simple line diagram")
#: Most frames a filmstrip shows (evenly spaced over the traced steps, the last one always included).
MAX_FILMSTRIP_FRAMES = 8


class InspectError(ValueError):
    """An inspector view asked of data that cannot give it (missing tensor, wrong shape)."""


# ---------------------------------------------------------------------------------------------
# Tensor one-liners


def _number(value: float) -> str:
    """Four significant digits, no trailing noise: the same string on every machine."""
    if math.isnan(value):
        return "nan"
    text = f"{value:.4g}"
    return "0" if text == "-0" else text


def summarize(tensor: torch.Tensor) -> str:
    """One line, lovely-tensors style: shape, dtype, device, min/max, mean, std, norm, NaN/Inf count.

    Statistics are computed in float64 over the finite values only (so one NaN does not hide the
    rest); ``std`` is the sample standard deviation (``torch.std``'s default), 0 for a single value.
    """
    if not isinstance(tensor, torch.Tensor):
        raise InspectError(f"summarize takes a torch.Tensor, not {type(tensor).__name__}.")
    shape = ", ".join(str(size) for size in tensor.shape)
    head = f"tensor[{shape}] {str(tensor.dtype).removeprefix('torch.')} {tensor.device}"
    if tensor.numel() == 0:
        return f"{head} empty"
    values = tensor.detach().cpu().to(torch.float64).flatten()  # MPS has no float64: move first
    nan = int(torch.isnan(values).sum())
    inf = int(torch.isinf(values).sum())
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return f"{head} no finite values nan={nan} inf={inf}"
    std = float(finite.std()) if finite.numel() > 1 else 0.0
    return (
        f"{head} min={_number(float(finite.amin()))} max={_number(float(finite.amax()))} "
        f"mean={_number(float(finite.mean()))} std={_number(std)} norm={_number(float(finite.norm()))} "
        f"nan={nan} inf={inf}"
    )


class Summary(str):
    """Multi-line text that shows as plain lines (not a quoted string) as a notebook cell's result."""

    def __repr__(self) -> str:
        return str(self)


def summarize_all(tensors: Mapping[str, torch.Tensor]) -> Summary:
    """``name  one-liner`` for every tensor, names aligned (what ``Trace.summary()`` shows)."""
    width = max((len(name) for name in tensors), default=0)
    return Summary("\n".join(f"{name:<{width}}  {summarize(t)}" for name, t in tensors.items()))


# ---------------------------------------------------------------------------------------------
# Rendering helpers (Pillow only)

_BACKGROUND = (255, 255, 255)
_INK = (40, 40, 40)
_GRID = (225, 225, 225)
_SERIES_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                   (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def _font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:  # pragma: no cover - older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _lerp_colour(stops: Sequence[tuple[int, int, int]], t: torch.Tensor) -> torch.Tensor:
    """Map values in [0, 1] to RGB by linear interpolation between evenly spaced colour stops."""
    stops_t = torch.tensor(stops, dtype=torch.float64)
    position = t.clamp(0, 1).double() * (len(stops) - 1)
    low = position.floor().long().clamp(max=len(stops) - 2)
    frac = (position - low).unsqueeze(-1)
    return (stops_t[low] * (1 - frac) + stops_t[low + 1] * frac).round().to(torch.uint8)


_DIVERGING = [(33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43)]
_SEQUENTIAL = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def _heat(matrix: torch.Tensor, *, symmetric: bool, limits: tuple[float, float] | None = None) -> Image.Image:
    """A 2-D tensor as an RGB image, one pixel per value (diverging around 0 when ``symmetric``)."""
    values = matrix.detach().cpu().double()
    if limits is None:
        if symmetric:
            bound = float(values.abs().max()) or 1.0
            limits = (-bound, bound)
        else:
            limits = (float(values.min()), float(values.max()))
    low, high = limits
    scaled = (values - low) / ((high - low) or 1.0)
    rgb = _lerp_colour(_DIVERGING if symmetric else _SEQUENTIAL, scaled)
    return Image.fromarray(rgb.numpy())


def _titled(image: Image.Image, title: str) -> Image.Image:
    font = _font(12)
    canvas = Image.new("RGB", (max(image.width, int(font.getlength(title)) + 8), image.height + 20), _BACKGROUND)
    ImageDraw.Draw(canvas).text((4, 3), title, fill=_INK, font=font)
    canvas.paste(image, (0, 20))
    return canvas


def _side_by_side(images: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    width = sum(image.width for image in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (max(width, 1), max((image.height for image in images), default=1)), _BACKGROUND)
    x = 0
    for image in images:
        canvas.paste(image, (x, 0))
        x += image.width + gap
    return canvas


def _stacked(images: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    height = sum(image.height for image in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (max((image.width for image in images), default=1), max(height, 1)), _BACKGROUND)
    y = 0
    for image in images:
        canvas.paste(image, (0, y))
        y += image.height + gap
    return canvas


def _line_plot(
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] = (560, 300),
    x_labels: Sequence[Any] | None = None,
) -> Image.Image:
    """Lines with a y axis from 0, labelled ticks and a legend below: enough to compare magnitudes."""
    font = _font(11)
    width, height = size
    legend_rows = len(series)
    canvas = Image.new("RGB", (width, height + 16 * legend_rows + 8), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    left, right, top, bottom = 52, width - 12, 24, height - 32
    draw.text((left, 4), title, fill=_INK, font=_font(12))
    top_value = max((max(values) for values in series.values() if len(values)), default=1.0)
    top_value = _nice_ceiling(top_value if top_value > 0 else 1.0)
    longest = max((len(values) for values in series.values()), default=1)
    for tick in range(5):
        value = top_value * tick / 4
        y = bottom - (bottom - top) * tick / 4
        draw.line([(left, y), (right, y)], fill=_GRID)
        label = _number(value)
        draw.text((left - 6 - font.getlength(label), y - 6), label, fill=_INK, font=font)
    draw.rectangle([left, top, right, bottom], outline=_INK)
    for tick in sorted({0, longest // 2, max(longest - 1, 0)}):
        x = left + (right - left) * tick / max(longest - 1, 1)
        label = str(x_labels[tick]) if x_labels is not None and tick < len(x_labels) else str(tick)
        draw.text((x - font.getlength(label) / 2, bottom + 4), label, fill=_INK, font=font)
    draw.text(((left + right) / 2 - font.getlength(xlabel) / 2, bottom + 16), xlabel, fill=_INK, font=font)
    draw.text((4, top - 16), ylabel, fill=_INK, font=font)
    for index, (name, values) in enumerate(series.items()):
        colour = _SERIES_COLOURS[index % len(_SERIES_COLOURS)]
        points = [
            (left + (right - left) * i / max(longest - 1, 1), bottom - (bottom - top) * v / top_value)
            for i, v in enumerate(values)
        ]
        if len(points) > 1:
            # Earlier series drawn wider, so a later line lying exactly on top leaves both visible.
            draw.line(points, fill=colour, width=min(7, max(1, 2 * (len(series) - index) - 1)))
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        y = height + 4 + 16 * index
        draw.line([(left, y + 7), (left + 20, y + 7)], fill=colour, width=3)
        draw.text((left + 26, y), name, fill=_INK, font=font)
    return canvas


def _nice_ceiling(value: float) -> float:
    """The next of 1, 2, 2.5, 5 × 10^k at or above ``value``, so axis ticks read as round numbers."""
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        candidate = step * 10**exponent
        if candidate >= value * (1 - 1e-9):
            return candidate
    return 10 ** (exponent + 1)  # pragma: no cover


def _labelled_heatmap(
    matrix: torch.Tensor, row_labels: Sequence[str], col_labels: Sequence[str], *, title: str, cell: int = 56
) -> Image.Image:
    """Cosine similarities as coloured cells with their value written in, labelled rows and columns."""
    font = _font(11)
    rows, cols = matrix.shape
    label_width = int(max((font.getlength(label) for label in row_labels), default=0)) + 12
    header = 40
    canvas = Image.new("RGB", (label_width + cols * cell + 8, header + rows * cell + 8), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=_INK, font=_font(12))
    colours = _lerp_colour(_DIVERGING, (matrix.detach().cpu().double() + 1) / 2)
    for c, label in enumerate(col_labels):
        text = _clip_text(label, font, cell - 4)
        draw.text((label_width + c * cell + (cell - font.getlength(text)) / 2, header - 16), text, fill=_INK, font=font)
    for r, label in enumerate(row_labels):
        y = header + r * cell
        draw.text((4, y + cell / 2 - 6), label, fill=_INK, font=font)
        for c in range(cols):
            x = label_width + c * cell
            colour = tuple(int(v) for v in colours[r, c])
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=colour)
            text = f"{float(matrix[r, c]):.2f}"
            ink = (255, 255, 255) if abs(float(matrix[r, c])) > 0.6 else _INK
            draw.text((x + (cell - font.getlength(text)) / 2, y + cell / 2 - 7), text, fill=ink, font=font)
    return canvas


def _clip_text(text: str, font: ImageFont.ImageFont, width: float) -> str:
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


class _PngView:
    """Mixin: a view renders itself with ``render()``; PNG bytes and notebook display follow."""

    def render(self) -> Image.Image:  # pragma: no cover - every view overrides it
        raise NotImplementedError

    def to_png(self) -> bytes:
        """The picture as PNG bytes (for ``ipywidgets.Image(value=...)`` or a file)."""
        return _png(self.render())

    def _repr_png_(self) -> bytes:
        return self.to_png()


# ---------------------------------------------------------------------------------------------
# What CLIP saw


def clip_input_images(pixel_values: torch.Tensor, image_processor: Any) -> list[Image.Image]:
    """Undo the processor's normalisation: the exact crop CLIP encoded, as RGB images."""
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise InspectError(f"pixel_values must be [N, 3, H, W], got shape {tuple(pixel_values.shape)}.")
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float64).reshape(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float64).reshape(1, 3, 1, 1)
    rescale = float(getattr(image_processor, "rescale_factor", 1 / 255))
    pixels = (pixel_values.detach().cpu().double() * std + mean) / rescale
    array = pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(frame) for frame in array]


@dataclass
class ClipInputView(_PngView):
    """The picture(s) CLIP actually encoded, beside the originals where given."""

    seen: list[Image.Image]
    originals: list[Image.Image] = field(default_factory=list)
    display_size: int = 224

    def render(self) -> Image.Image:
        tiles = []
        for index, seen in enumerate(self.seen):
            pair = []
            if index < len(self.originals):
                original = ImageOps.contain(self.originals[index].convert("RGB"), (self.display_size,) * 2)
                pair.append(_titled(original, f"original {self.originals[index].width}x{self.originals[index].height}"))
            # Nearest-neighbour upscaling keeps CLIP's real pixels visible on small encoders.
            shown = seen.resize((self.display_size, self.display_size), Image.Resampling.NEAREST)
            pair.append(_titled(shown, f"what CLIP saw {seen.width}x{seen.height}"))
            tiles.append(_side_by_side(pair))
        return _stacked(tiles)


def what_clip_saw(
    pixel_values: torch.Tensor, image_processor: Any, originals: Sequence[Any] | None = None
) -> ClipInputView:
    """Beside each original, the square crop/squash/pad the vision tower really received."""
    from ..images import load_images

    return ClipInputView(
        seen=clip_input_images(pixel_values, image_processor),
        originals=load_images(list(originals)) if originals else [],
    )


# ---------------------------------------------------------------------------------------------
# The scale gap


def token_norms(embeds: torch.Tensor) -> torch.Tensor:
    """L2 norm of every token: ``[..., L, D] -> [..., L]`` (float32)."""
    return embeds.detach().float().cpu().norm(dim=-1)


def text_prompt_embeds(pipeline: Any, prompts: Sequence[str]) -> torch.Tensor:
    """SD's own text encoder on ``prompts`` (what the UNet was trained on): ``[P, 77, D]``, on the CPU."""
    return torch.cat([pipeline.encode_text(prompt) for prompt in prompts]).detach().float().cpu()


@dataclass
class ScaleGapView(_PngView):
    """Per-token norms of what the UNet was fed, against SD's text encoder on real prompts."""

    image_norms: torch.Tensor  # [L] tokens of the first prompt-embedding row fed to the UNet
    text_norms: dict[str, torch.Tensor]  # prompt -> [77]
    other_norms: torch.Tensor | None  # [L] the other side of norm matching (see other_label)
    other_label: str = ""
    norm_matched_run: bool = False  # True when the run itself used norm matching
    target_norm: float = float("nan")  # the engine's typical text-token norm

    @property
    def image_mean_norm(self) -> float:
        return float(self.image_norms.mean())

    @property
    def text_mean_norm(self) -> float:
        """Mean over all 77 tokens of every prompt (the start token included, as the plot shows it)."""
        return float(torch.cat(list(self.text_norms.values())).mean()) if self.text_norms else float("nan")

    @property
    def ratio(self) -> float:
        """How many times longer SD's text tokens are than the tokens fed to the UNet, on average."""
        return self.text_mean_norm / self.image_mean_norm if self.image_mean_norm else float("inf")

    def describe(self) -> str:
        matched = "with" if self.norm_matched_run else "without"
        text = (
            f"Fed to the UNet ({matched} norm matching): mean token norm {_number(self.image_mean_norm)}; "
            f"SD's text encoder: mean token norm {_number(self.text_mean_norm)} "
            f"({_number(self.ratio)} times the image's); typical text-token norm {_number(self.target_norm)}"
        )
        if self.other_norms is not None:
            text += f"; {self.other_label}: mean {_number(float(self.other_norms.mean()))}"
        return text + "."

    def render(self) -> Image.Image:
        matched = "norm-matched" if self.norm_matched_run else "not norm-matched"
        series: dict[str, list[float]] = {f"image prompt fed to the UNet ({matched})": self.image_norms.tolist()}
        if self.other_norms is not None:
            series[self.other_label] = self.other_norms.tolist()
        series.update({f"SD text encoder: {prompt!r}": norms.tolist() for prompt, norms in self.text_norms.items()})
        return _line_plot(series, title="The scale gap: per-token norm", xlabel="token", ylabel="norm")


def scale_gap(
    trace: Any, pipeline: Any, prompts: Sequence[str] = DEFAULT_PROMPTS, *, scale: float = 1.0
) -> ScaleGapView:
    """Norms of ``trace.prompt_embeds[0]`` beside SD's text encoder on ``prompts``, computed live.

    The other curve shows the other side of norm matching: for a run without it, the same tokens
    as the engine's norm matching would make them (every token at ``scale`` × the pipeline's
    typical text-token norm); for a run with it, the image tokens' norms before matching (traced
    by the engine, before ``scale``).
    """
    from .. import conditioning

    image_norms = token_norms(trace.prompt_embeds[0])
    text = text_prompt_embeds(pipeline, prompts) if prompts else torch.empty(0, 0, 0)
    text_norms = {prompt: token_norms(text[i]) for i, prompt in enumerate(prompts)}
    target = float(pipeline.text_token_norm())
    before = trace.extras.get("image_token_norm_before")
    if before is not None:
        other, label, matched_run = before.detach().float().cpu(), "before norm matching (before scale)", True
    else:
        fed = trace.prompt_embeds[0].detach().float().cpu()
        other = token_norms(scale * conditioning.match_norm(fed, target))
        label, matched_run = "the same tokens norm-matched", False
    return ScaleGapView(image_norms, text_norms, other, label, matched_run, target)


# ---------------------------------------------------------------------------------------------
# Similarity


def cosine_similarity(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, D] x [M, D] -> [N, M]`` cosine similarities (``b`` defaults to ``a``), in float32."""
    a = a.detach().float().cpu()
    b = a if b is None else b.detach().float().cpu()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InspectError(f"cosine_similarity takes [N, D] and [M, D], got {tuple(a.shape)} and {tuple(b.shape)}.")
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


@dataclass
class SimilarityView(_PngView):
    """Cosine similarities: rows are the images, columns the images then the texts."""

    matrix: torch.Tensor
    row_labels: list[str]
    col_labels: list[str]
    note: str = ""

    def render(self) -> Image.Image:
        return _labelled_heatmap(self.matrix, self.row_labels, self.col_labels, title="Cosine similarity (CLIP space)")


def similarity(
    image_embeds: torch.Tensor,
    pipeline: Any = None,
    texts: Sequence[str] = (),
    labels: Sequence[str] | None = None,
) -> SimilarityView:
    """Image-vs-image cosine similarities, plus image-vs-text where ``texts`` are given.

    Texts go through CLIP's text tower *with projection* (the space ``image_embeds`` live in, not SD's
    text encoder). Where the preset has none, the view keeps the image columns and says so in ``note``.
    """
    image_embeds = image_embeds.detach().float().cpu()
    labels = list(labels) if labels is not None else [f"image {i + 1}" for i in range(len(image_embeds))]
    columns = [image_embeds]
    col_labels = list(labels)
    note = "Images compared in CLIP's projected image space."
    texts = [text for text in texts if text.strip()]
    if texts:
        if pipeline is None:
            raise InspectError("Comparing with text needs the pipeline (its preset names the CLIP text tower).")
        try:
            tower = pipeline.clip_text_tower()
        except TextTowerUnavailable as err:
            note = str(err)
        else:
            columns.append(tower.embed(texts))
            col_labels += [repr(text) for text in texts]
            note = f"Texts embedded with the {tower.source}."
    matrix = cosine_similarity(image_embeds, torch.cat(columns))
    return SimilarityView(matrix, labels, col_labels, note)


# ---------------------------------------------------------------------------------------------
# Token view


def patch_norms(hidden_states: torch.Tensor) -> torch.Tensor:
    """Norms of the vision tower's patch tokens on their grid: ``[T, Dv] -> [g, g]`` (CLS token dropped)."""
    if hidden_states.ndim != 2:
        raise InspectError(f"hidden_states must be [T, Dv] for one image, got {tuple(hidden_states.shape)}.")
    patches = hidden_states.shape[0] - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise InspectError(f"{patches} patch tokens do not form a square grid (expected CLS + g² tokens).")
    return token_norms(hidden_states[1:]).reshape(side, side)


@dataclass
class TokenView(_PngView):
    """The ``[tokens × dims]`` prompt embeddings as a heatmap, and per-patch norms over CLIP's picture."""

    prompt_embeds: torch.Tensor  # [L, D]
    patch_norms: torch.Tensor | None  # [g, g]
    seen: Image.Image | None = None  # what CLIP saw, under the patch norms

    @property
    def distinct_tokens(self) -> int:
        """How many different rows: 1 for ``repeat`` (77 copies of one vector)."""
        return int(torch.unique(self.prompt_embeds, dim=0).shape[0])

    def render(self) -> Image.Image:
        tokens, dims = self.prompt_embeds.shape
        heat = _heat(self.prompt_embeds, symmetric=True)
        # Whole-pixel stretch so small embeddings stay visible and every cell stays one value.
        heat = heat.resize((dims * math.ceil(256 / dims), tokens * math.ceil(154 / tokens)), Image.Resampling.NEAREST)
        parts = [_titled(heat, f"prompt embeddings: {tokens} tokens x {dims} dims, {self.distinct_tokens} distinct")]
        if self.patch_norms is not None:
            side = self.patch_norms.shape[0]
            overlay = _heat(self.patch_norms, symmetric=False).resize((224, 224), Image.Resampling.NEAREST)
            if self.seen is not None:
                overlay = Image.blend(self.seen.resize((224, 224), Image.Resampling.BICUBIC), overlay, 0.6)
            parts.append(_titled(overlay, f"patch-token norms ({side}x{side} grid)"))
        return _side_by_side(parts, gap=16)


def token_view(trace: Any, index: int = 0, image_processor: Any = None) -> TokenView:
    """Prompt-embedding heatmap of output ``index``, patch norms of the first input image."""
    seen = clip_input_images(trace.pixel_values[:1], image_processor)[0] if image_processor is not None else None
    try:
        norms = patch_norms(trace.hidden_states[0])
    except InspectError:
        norms = None
    return TokenView(trace.prompt_embeds[index].detach().float().cpu(), norms, seen)


# ---------------------------------------------------------------------------------------------
# Denoising filmstrip

LATENT_STAT_NAMES = ("mean", "std", "min", "max", "norm")


def latent_statistics(latents: torch.Tensor) -> torch.Tensor:
    """Per traced step ``[S, ...] -> [S, 5]``: mean, std, min, max and L2 norm of all its latents."""
    flat = latents.detach().cpu().double().flatten(1)
    return torch.stack(
        [flat.mean(1), flat.std(1), flat.amin(1), flat.amax(1), flat.norm(dim=1)], dim=1
    )


def frame_indices(count: int, limit: int = MAX_FILMSTRIP_FRAMES) -> list[int]:
    """At most ``limit`` evenly spaced indices of ``count``, always ending with the last."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


@dataclass
class FilmstripView(_PngView):
    """Decoded frames of a run (x0 estimates or the noisy latents) and latent statistics per step."""

    steps: list[int]  # 1-based step after which each latent was taken
    statistics: torch.Tensor  # [S, 5], columns LATENT_STAT_NAMES, of the noisy latents
    frames: list[Image.Image]  # decoded frames (output image ``index`` of the batch)
    frame_steps: list[int]
    decoder: str = "vae"  # what decoded the frames: the exact VAE or a preview decoder's name
    x0: bool = False  # frames show the model's clean estimate (True) or the noisy latents (False)
    frame_latents: torch.Tensor | None = None  # [F, C, h, w] what was decoded

    def table(self) -> str:
        """Per-step statistics as aligned text lines."""
        header = "step  " + "  ".join(f"{name:>9}" for name in LATENT_STAT_NAMES)
        rows = [
            f"{step:>4}  " + "  ".join(f"{_number(float(v)):>9}" for v in row)
            for step, row in zip(self.steps, self.statistics)
        ]
        return "\n".join([header, *rows])

    def render(self) -> Image.Image:
        what = "x0 after step" if self.x0 else "after step"
        tiles = [
            _titled(frame.resize((128, 128), Image.Resampling.BICUBIC), f"{what} {step}")
            for frame, step in zip(self.frames, self.frame_steps)
        ]
        std = {"latent std": self.statistics[:, 1].tolist(), "latent |mean|": self.statistics[:, 0].abs().tolist()}
        plot = _line_plot(std, title="Noisy latents per traced step", xlabel="step", ylabel="value",
                          size=(max(560, 136 * len(tiles)), 220), x_labels=self.steps)
        return _stacked([_side_by_side(tiles), plot])


def filmstrip(result: Any, pipeline: Any, index: int = 0, decoder: str = "vae", *, x0: bool = False) -> FilmstripView:
    """Frames and statistics of a run's traced latents (run ``generate(..., trace_latents=True)`` to get them).

    ``x0=True`` shows the model's clean estimate at each frame (``pipeline.replay_x0``: one extra UNet call
    per frame), ``x0=False`` the noisy latents themselves. ``decoder="vae"`` decodes exactly (the last frame
    is the output image); ``"auto"``, ``"linear"`` or ``"taesd"`` use the cheap preview decoders of
    :mod:`imageprompt_widgets.preview`.
    """
    trace = result.trace
    if trace.latents is None:
        raise InspectError("This run traced no latents: generate with trace_latents=True to see the filmstrip.")
    latents = trace.latents
    if not 0 <= index < latents.shape[1]:
        raise InspectError(f"This run made {latents.shape[1]} images; there is no image {index}.")
    chosen = frame_indices(latents.shape[0])
    steps = list(trace.latent_steps) or list(range(1, latents.shape[0] + 1))
    if x0:
        picked = pipeline.replay_x0(result, chosen, index=index)
    else:
        picked = latents[chosen, index]
    if decoder == "vae":
        frames, name = pipeline.decode_latents(picked), "vae"
    else:
        from .. import preview

        decode = preview.decoder_for(pipeline, decoder)
        frames, name = preview.to_pil(decode(picked.to(pipeline.device)).cpu()), decode.name
    return FilmstripView(
        steps, latent_statistics(latents), frames, [steps[i] for i in chosen], name, x0, picked.cpu()
    )


# ---------------------------------------------------------------------------------------------
# Interpolation strip


@dataclass
class InterpolationView(_PngView):
    """Images generated along a slerp between two CLIP embeddings, one seed for all."""

    weights: list[float]
    embeds: torch.Tensor  # [N, D], the interpolated image embeddings used
    images: list[Image.Image]
    labels: tuple[str, str] = ("start", "end")

    def render(self) -> Image.Image:
        tiles = [
            _titled(image.resize((128, 128), Image.Resampling.BICUBIC), f"t={weight:.2f}")
            for image, weight in zip(self.images, self.weights)
        ]
        return _titled(_side_by_side(tiles), f"slerp from {self.labels[0]} to {self.labels[1]}")


def interpolation_view(walk: Any) -> InterpolationView:
    """The strip of an :class:`~imageprompt_widgets.results.Interpolation` (``pipe.interpolate(...)``)."""
    return InterpolationView(list(walk.weights[: len(walk.images)]), walk.embeds, walk.images, walk.labels)
