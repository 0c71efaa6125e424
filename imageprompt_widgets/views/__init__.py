"""The embedding inspector, headless: every view is a pure function returning numbers and a picture.

Each view is a small dataclass holding the numbers it shows (tested against independent computations)
that draws itself with matplotlib on demand (the ``plot`` extra): ``view.figure()`` is a matplotlib
``Figure``, ``view.to_png()`` feeds the widget's ``ipywidgets.Image``, ``_repr_png_`` shows the view
inline when it is the last expression of a notebook cell, and ``view.describe()`` says in words what it
shows. Without matplotlib the numbers still work and ``to_png()`` says what to install. This package
never imports ipywidgets.

Views compute nothing heavy of their own and load no model: what needs the models (CLIP's text tower, an
exact VAE decode, x0 replays, interpolation runs, the attention maps) is the pipeline's
(``pipe.clip_text_tower()``, ``pipe.decode_latents``, ``pipe.replay_x0``, ``pipe.interpolate``,
``generate(..., trace_attention=True)``); views turn the numbers into pictures.

One module per concept: :mod:`.tensors` (one-line summaries), :mod:`.clip` (what CLIP saw, similarity),
:mod:`.norms` (the scale gap and the direction gap), :mod:`.pooled` (SDXL's pooled slot), :mod:`.tokens` (the prompt token by token),
:mod:`.denoising` (the filmstrip), :mod:`.interpolation`, :mod:`.attention` (where each token acts),
:mod:`.gallery` (captioned pictures side by side), :mod:`.dataset` (a dataset's embeddings on a 2-D map).

```python
from imageprompt_widgets import ImagePromptPipeline, views
pipe = ImagePromptPipeline.from_preset("tiny")
result = pipe.generate(images, trace_latents=True, trace_attention=True)
print(result.trace.summary())                      # one line per tensor
views.scale_gap(result.trace, pipe)                # a plot, shown inline; .image_norms etc. hold the numbers
views.direction_gap(result.trace, pipe)            # cosines: norm matching fixes length, not direction
views.pooled_slot(result, pipe, images)            # SDXL: the pooled slot against the prompt's and the image's
views.similarity(result.trace.image_embeds, pipe, ["a cat", "a dog"]).matrix
views.filmstrip(result, pipe, x0=True)
views.attention_view(result, pipe)                 # where each token group acts, over the output
pipe.interpolate(image_a, image_b, count=5)        # a strip of images, shown inline
```
"""

from __future__ import annotations

from ..engine.summary import Summary, summarize, summarize_all
from ..faults import TextTowerUnavailable
from . import adapter_tokens  # the IP-Adapter's tokens (views.adapter_tokens.adapter_tokens_view)
from .attention import AttentionView, attention_summary, attention_view
from .base import PLOT_MISSING, FigureView, InspectError, PlotUnavailableError, plot_available
from .clip import (
    ClipInputView,
    CropComparisonView,
    SimilarityView,
    clip_input_images,
    cosine_similarity,
    crop_comparison,
    similarity,
    source_label,
    source_labels,
    what_clip_saw,
)
from .dataset import DatasetMap, dataset_map
from .denoising import (
    LATENT_STAT_NAMES,
    MAX_FILMSTRIP_FRAMES,
    FilmstripView,
    filmstrip,
    frame_indices,
    latent_statistics,
)
from .gallery import ImageGridView, image_grid
from .interpolation import InterpolationView, interpolation_view
from .norms import (
    DEFAULT_PROMPTS,
    DirectionGapView,
    ScaleGapView,
    direction_gap,
    scale_gap,
    text_prompt_embeds,
    token_norms,
)
from .pooled import NO_POOLED_SLOT, PooledSlotView, pooled_slot
from .tokens import TokenView, patch_norms, token_view
from .words import WordsView, words_view

__all__ = [
    "DEFAULT_PROMPTS",
    "LATENT_STAT_NAMES",
    "MAX_FILMSTRIP_FRAMES",
    "NO_POOLED_SLOT",
    "PLOT_MISSING",
    "AttentionView",
    "ClipInputView",
    "CropComparisonView",
    "DatasetMap",
    "DirectionGapView",
    "FigureView",
    "FilmstripView",
    "ImageGridView",
    "InspectError",
    "InterpolationView",
    "PlotUnavailableError",
    "PooledSlotView",
    "ScaleGapView",
    "SimilarityView",
    "Summary",
    "TextTowerUnavailable",
    "TokenView",
    "WordsView",
    "adapter_tokens",
    "attention_summary",
    "attention_view",
    "clip_input_images",
    "cosine_similarity",
    "crop_comparison",
    "dataset_map",
    "direction_gap",
    "filmstrip",
    "frame_indices",
    "image_grid",
    "interpolation_view",
    "latent_statistics",
    "patch_norms",
    "plot_available",
    "pooled_slot",
    "scale_gap",
    "similarity",
    "source_label",
    "source_labels",
    "summarize",
    "summarize_all",
    "text_prompt_embeds",
    "token_norms",
    "token_view",
    "what_clip_saw",
    "words_view",
]
