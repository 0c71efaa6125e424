"""SDXL's pooled slot: the one vector beside the 77 tokens, and where it points.

SDXL's UNet reads ``pooled_prompt_embeds`` (``text_encoder_2``'s projected text embedding: OpenCLIP bigG's
contrastive space, the space bigG's image projection lands in too). Text-to-image fills it with the prompt's
pooled embedding; repeat/single/tokens with bigG's image embedding; ``revision`` with a blend of both. This view
sets the vector the UNet got beside live reference points (the prompt's own pooled embedding, the input image's
bigG embedding): their lengths and the cosines between them, so one sees which way the slot leans.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .base import FigureView, InspectError, new_figure, number
from .clip import cosine_similarity
from .norms import DEFAULT_PROMPTS

#: The one sentence for an SD 1.x run (its trace has no pooled slot).
NO_POOLED_SLOT = ("SD 1.x has no pooled slot; its UNet reads only the 77 prompt tokens (the Scale gap and Direction "
                  "gap views show them). The pooled slot view is for SDXL presets such as 'sdxl' or 'tiny-sdxl'.")

#: Colours by kind of vector (the bars and the heatmap's labels agree).
_COLOURS = {"fed": "C0", "negative": "C7", "text": "C2", "image": "C1", "image_fed": "C3"}


def _short(text: str, width: int = 30) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class PooledSlotView(FigureView):
    """The pooled vector(s) fed to SDXL's UNet beside their reference points.

    ``vectors`` ``[K, P]`` in ``labels`` order; ``kinds`` says what each is: ``fed`` (the conditional pooled slot),
    ``negative`` (the unconditional branch's, when guided), ``text`` (a prompt's pooled embedding, computed live),
    ``image`` (an input image's bigG embedding, computed live), ``image_fed`` (revision's image embedding as it was
    blended in: combined and noise-augmented, from the trace). ``norms`` ``[K]`` are L2 norms; ``cosines`` ``[K, K]``
    cosine similarities, NaN where a vector is all zeros (it has no direction).
    """

    labels: list[str]
    kinds: list[str]
    vectors: torch.Tensor
    mode: str = ""
    revision_strength: float | None = None  # only for revision runs
    note: str = ""
    norms: torch.Tensor = field(init=False)
    cosines: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        vectors = self.vectors.detach().float().cpu()
        self.vectors = vectors
        self.norms = vectors.norm(dim=-1)
        cosines = cosine_similarity(vectors)
        zero = self.norms == 0
        cosines[zero, :] = float("nan")
        cosines[:, zero] = float("nan")
        self.cosines = cosines

    def cosine(self, a: str, b: str) -> float:
        """The cosine between the vectors labelled ``a`` and ``b``."""
        return float(self.cosines[self.labels.index(a), self.labels.index(b)])

    def describe(self) -> str:
        how = self.mode + (f" at strength {number(self.revision_strength)}" if self.revision_strength is not None else "")
        fed = self.kinds.index("fed")
        toward = [f"{number(float(self.cosines[fed, i]))} towards {label}" for i, (label, kind)
                  in enumerate(zip(self.labels, self.kinds)) if kind in ("text", "image")]
        text = f"{how}: the pooled slot fed to the UNet has L2 norm {number(float(self.norms[fed]))}"
        if toward:
            text += "; it points " + ", ".join(toward) + " (cosine similarity)"
        if "negative" in self.kinds:
            negative = self.kinds.index("negative")
            norm = float(self.norms[negative])
            text += ("; the negative pooled slot is all zeros" if norm == 0
                     else f"; the negative pooled slot has L2 norm {number(norm)}")
        return f"{text}. {self.note}".strip()

    def figure(self) -> Any:
        count = len(self.labels)
        figure = new_figure(10.4, 3.2 + 0.32 * count)
        bar_ax, cos_ax = figure.subplots(1, 2, width_ratios=[1, 1.25])
        names = [f"{i + 1}. {_short(label)}" for i, label in enumerate(self.labels)]
        positions = np.arange(count)[::-1]
        norms = self.norms.numpy()
        bar_ax.barh(positions, norms, color=[_COLOURS[kind] for kind in self.kinds])
        for y, value in zip(positions, norms):
            bar_ax.text(value, y, f" {number(float(value))}", va="center", fontsize=8)
        bar_ax.set_yticks(positions, names, fontsize=8)
        bar_ax.set_xlabel("L2 norm (length of the vector)")
        bar_ax.set_xlim(0, float(norms.max()) * 1.4 or 1)
        bar_ax.set_title("Lengths", fontsize=10)
        bar_ax.grid(axis="x", alpha=0.3)

        from matplotlib import colormaps

        matrix = self.cosines.numpy()
        shown = np.ma.masked_invalid(matrix)
        cmap = colormaps["RdBu_r"].with_extremes(bad="#dddddd")
        image = cos_ax.imshow(shown, cmap=cmap, vmin=-1, vmax=1)
        for row in range(count):
            for col in range(count):
                value = matrix[row, col]
                cos_ax.text(col, row, "–" if np.isnan(value) else f"{value:.2f}", ha="center", va="center",
                            fontsize=8, color="white" if not np.isnan(value) and abs(value) > 0.6 else "black")
        numbers = [str(i + 1) for i in range(count)]
        cos_ax.set_xticks(range(count), numbers, fontsize=8)
        cos_ax.set_yticks(range(count), numbers, fontsize=8)
        cos_ax.set_xlabel("vector (–: all zeros)")
        cos_ax.set_ylabel("vector")
        cos_ax.set_title("Cosine similarity (direction)", fontsize=10)
        figure.colorbar(image, ax=cos_ax, label="cosine similarity", shrink=0.9, pad=0.08)
        # The text references are the run's prompt or, with none typed, reference texts: the title claims neither.
        title = "SDXL's pooled slot: what the UNet got, beside text and image embeddings"
        figure.suptitle(f"{title} ({self.mode})" if self.mode else title, fontsize=10)
        return figure


def pooled_slot(
    result: Any, pipeline: Any, images: Any = None, prompts: Sequence[str] | None = None, index: int = 0
) -> PooledSlotView:
    """Output ``index``'s pooled slot (and its negative, when guided) beside live references: the pooled text
    embedding of ``prompts`` (default: the run's prompt, or :data:`DEFAULT_PROMPTS` when it had none) and the bigG
    image embedding of ``images`` (the run's input images, encoded with its crop; left out when not given).
    A revision run adds its image embedding as blended in (from the trace)."""
    trace, settings = result.trace, result.settings
    if trace.pooled_prompt_embeds is None:
        raise InspectError(NO_POOLED_SLOT)
    if not 0 <= index < trace.pooled_prompt_embeds.shape[0]:
        raise InspectError(f"This run made {trace.pooled_prompt_embeds.shape[0]} images; there is no image {index}.")
    labels, kinds, vectors = ["fed to the UNet"], ["fed"], [trace.pooled_prompt_embeds[index]]
    if trace.negative_pooled_prompt_embeds is not None:
        labels.append("negative fed to the UNet")
        kinds.append("negative")
        vectors.append(trace.negative_pooled_prompt_embeds[index])
    if prompts is None:
        prompts = [settings.prompt] if settings.prompt.strip() else list(DEFAULT_PROMPTS)
    for prompt in prompts:
        labels.append(f"text {prompt!r}")
        kinds.append("text")
        vectors.append(pipeline.encode_pooled_text(prompt)[0])
    note = ""
    if images is not None:
        second = pipeline.encode_image(images, crop=settings.crop).second
        if second is None:  # e.g. an SDXL IP-Adapter preset whose only image encoder is the adapter's
            note = (f"The {pipeline.preset.name!r} model loads no bigG image encoder beside SDXL: no image "
                    "embedding in the pooled slot's space to compare with.")
        for number_, embed in enumerate(() if second is None else second.image_embeds, start=1):
            labels.append(f"image {number_} (bigG)" if len(second.image_embeds) > 1 else "image (bigG)")
            kinds.append("image")
            vectors.append(embed)
    else:
        note = "Pass the run's input images to compare with their bigG image embedding."
    fed_image = trace.extras.get("revision_image_pooled")
    # Revision's image side as blended in: shown where it differs from the live image (noise, several images).
    if fed_image is not None and (images is None or settings.noise_augmentation > 0 or kinds.count("image") != 1):
        labels.append("revision's image (blended in)")
        kinds.append("image_fed")
        vectors.append(fed_image[0])
    strength = float(settings.revision_strength) if settings.mode == "revision" else None
    return PooledSlotView(labels, kinds, torch.stack([v.detach().float().cpu() for v in vectors]), settings.mode,
                          strength, note)
