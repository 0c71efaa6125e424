"""The two gaps between CLIP's image embedding and what SD's UNet was trained on: length and direction.

SD's UNet learnt from its text encoder's *un-projected* per-token hidden states; the guide's method feeds
it CLIP's *projected* image embedding. They differ in length (the scale gap: norm matching closes it)
and in direction (the direction gap: rescaling cannot change a cosine, so norm matching leaves it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..faults import TextTowerUnavailable
from .base import FigureView, InspectError, new_figure, number
from .clip import cosine_similarity

#: Prompts whose SD text-encoder token norms are shown beside the image prompt's (computed live).
DEFAULT_PROMPTS = ("a photograph of a cat", "an oil painting of a harbour at sunset", "a simple line diagram")
#: Markers of the text prompts' lines, so lines lying on top of each other stay tellable apart.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def token_norms(embeds: torch.Tensor) -> torch.Tensor:
    """L2 norm of every token: ``[..., L, D] -> [..., L]`` (float32)."""
    return embeds.detach().float().cpu().norm(dim=-1)


def text_prompt_embeds(pipeline: Any, prompts: Sequence[str]) -> torch.Tensor:
    """SD's own text encoder on ``prompts`` (what the UNet was trained on): ``[P, 77, D]``, on the CPU."""
    return torch.cat([pipeline.encode_text(prompt) for prompt in prompts]).detach().float().cpu()


def _short(text: str, width: int = 28) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# ---------------------------------------------------------------------------------------------
# The scale gap


@dataclass
class ScaleGapView(FigureView):
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
            f"Fed to the UNet ({matched} norm matching): mean token norm {number(self.image_mean_norm)}; "
            f"SD's text encoder: mean token norm {number(self.text_mean_norm)} "
            f"({number(self.ratio)} times the image's); typical text-token norm {number(self.target_norm)}"
        )
        if self.other_norms is not None:
            text += f"; {self.other_label}: mean {number(float(self.other_norms.mean()))}"
        return text + "."

    def series(self) -> dict[str, torch.Tensor]:
        """Every curve the plot draws, by its legend label."""
        matched = "norm-matched" if self.norm_matched_run else "not norm-matched"
        curves = {f"image prompt fed to the UNet ({matched})": self.image_norms}
        if self.other_norms is not None:
            curves[self.other_label] = self.other_norms
        curves.update({f"SD text encoder: {_short(repr(prompt))}": norms for prompt, norms in self.text_norms.items()})
        return curves

    def figure(self) -> Any:
        figure = new_figure(9.6, 4.4)
        line_ax, bar_ax = figure.subplots(1, 2, width_ratios=[2.6, 1])
        curves = self.series()
        for index, (label, norms) in enumerate(curves.items()):
            values = norms.numpy()
            x = np.arange(len(values))
            if index == 0:  # the image prompt: thick, solid, drawn last so it is never hidden
                line_ax.plot(x, values, color="C0", linewidth=3, marker="o" if len(values) == 1 else None,
                             label=label, zorder=5)
            elif index == 1 and self.other_norms is not None:
                line_ax.plot(x, values, color="C1", linewidth=2, linestyle="--", label=label, zorder=4)
            else:
                text_index = index - (2 if self.other_norms is not None else 1)
                count = max(len(self.text_norms), 1)
                # Staggered markers: where prompts share values (the padding after the words), every line
                # still shows its own markers.
                line_ax.plot(x, values, color=f"C{2 + text_index}", linewidth=1,
                             marker=_MARKERS[text_index % len(_MARKERS)], markersize=5,
                             markevery=(text_index * 3 // count + 1, 3), label=label, zorder=3)
        every = torch.cat([norms.flatten() for norms in curves.values()])
        positive = every[every > 0]
        if len(positive) and float(positive.max()) > 20 * float(positive.min()):
            line_ax.set_yscale("log")
            line_ax.set_ylabel("L2 norm of each token (log scale)")
        else:
            line_ax.set_ylim(0, float(every.max()) * 1.12 or 1)
            line_ax.set_ylabel("L2 norm of each token")
        line_ax.set_xlabel("token position (0: the text's start token)")
        line_ax.set_title("The scale gap: how long each prompt token is", fontsize=10)
        line_ax.grid(alpha=0.3)

        labels = list(curves)
        means = [float(norms.mean()) for norms in curves.values()]
        colours = ["C0"] + (["C1"] if self.other_norms is not None else []) + [
            f"C{2 + i}" for i in range(len(self.text_norms))]
        positions = np.arange(len(labels))[::-1]
        bar_ax.barh(positions, means, color=colours)
        for y, value in zip(positions, means):
            bar_ax.text(value, y, f" {number(value)}", va="center", fontsize=8)
        bar_ax.set_yticks(positions, [f"{i + 1}" for i in range(len(labels))], fontsize=8)
        bar_ax.set_ylabel("curve (legend order)")
        bar_ax.set_xlabel("mean token norm")
        bar_ax.set_title("Averages", fontsize=10)
        bar_ax.set_xlim(0, max(means + [1e-9]) * 1.35)
        handles, names = line_ax.get_legend_handles_labels()
        figure.legend(handles, [f"{i + 1}. {name}" for i, name in enumerate(names)], loc="outside lower center",
                      ncol=2, fontsize=8, frameon=False)
        return figure


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
# The direction gap

#: Why the direction gap refuses an SDXL run, and where to look instead.
SDXL_DIRECTION_GAP = (
    "The direction gap is SD 1.x's question (a CLIP image embedding forced into SD's token space); on SDXL the image "
    "has a slot in its own space, the pooled slot: see views.pooled_slot (the Inspector's Pooled slot section) for "
    "where it points against the prompt's pooled embedding and the image's bigG embedding."
)


@dataclass
class DirectionGapView(FigureView):
    """Cosines between CLIP's projected image embedding and SD's un-projected text tokens, with references.

    - ``image_vs_sd_tokens`` ``[P, 77]``: the image embedding against every SD text token of each prompt
      (what the UNet is fed against what it learnt from).
    - ``image_vs_sd_tokens_matched``: the same after norm matching (equal: a cosine ignores length).
    - ``sd_tokens_across_prompts`` ``[pairs, 77]``: SD's tokens of two different prompts, position by
      position (how alike two things in SD's own space are).
    - ``clip_text_vs_sd_tokens`` ``[P, 77]`` and ``image_vs_clip_text`` ``[P]``: the same prompt through
      CLIP's projection against its own SD tokens, and the image against it in CLIP's space (``None``
      where the preset has no CLIP text tower; ``note`` says so).
    """

    prompts: list[str]
    image_vs_sd_tokens: torch.Tensor
    image_vs_sd_tokens_matched: torch.Tensor
    sd_tokens_across_prompts: torch.Tensor
    clip_text_vs_sd_tokens: torch.Tensor | None
    image_vs_clip_text: torch.Tensor | None
    image_norm: float  # the image embedding's length
    matched_norm: float  # its length after norm matching
    text_norm: float  # SD's typical text-token norm (the target of norm matching)
    note: str = ""

    def groups(self) -> dict[str, torch.Tensor]:
        """The cosine groups the plot shows, by label."""
        found = {
            "SD text tokens: prompt vs another prompt": self.sd_tokens_across_prompts.flatten(),
            "CLIP image embedding vs SD text tokens": self.image_vs_sd_tokens.flatten(),
            "… after norm matching": self.image_vs_sd_tokens_matched.flatten(),
        }
        if self.clip_text_vs_sd_tokens is not None and self.image_vs_clip_text is not None:
            found["CLIP projected text vs SD tokens, same prompt"] = self.clip_text_vs_sd_tokens.flatten()
            found["image vs CLIP projected text (CLIP's space)"] = self.image_vs_clip_text.flatten()
        return found

    def describe(self) -> str:
        unchanged = float((self.image_vs_sd_tokens - self.image_vs_sd_tokens_matched).abs().max())
        text = (
            f"Mean cosine of the CLIP image embedding with SD's text tokens: "
            f"{number(float(self.image_vs_sd_tokens.mean()))} (SD tokens of two different prompts: "
            f"{number(float(self.sd_tokens_across_prompts.mean()))}). Norm matching changes the image token's "
            f"length from {number(self.image_norm)} to {number(self.matched_norm)} and no cosine "
            f"(largest change {number(unchanged)}): it fixes length, not direction."
        )
        return f"{text} {self.note}".strip()

    def figure(self) -> Any:
        figure = new_figure(10.4, 4.8)
        cos_ax, len_ax = figure.subplots(1, 2, width_ratios=[2.6, 1])
        groups = self.groups()
        for position, (label, values) in enumerate(groups.items()):
            array = values.numpy()
            jitter = np.linspace(-0.28, 0.28, len(array)) if len(array) > 1 else np.zeros(1)
            order = np.argsort(np.argsort(array))  # spread by rank: a deterministic jitter, no random state
            x = position + jitter[order] if len(array) > 1 else position + jitter
            cos_ax.scatter(x, array, s=8, alpha=0.45, color=f"C{position}", label=label)
            cos_ax.hlines(float(array.mean()), position - 0.38, position + 0.38, color="black", linewidth=2)
        cos_ax.axhline(0, color="grey", linewidth=0.8)
        cos_ax.set_xticks(range(len(groups)), [f"{i + 1}\nmean {number(float(values.mean()))}"
                                               for i, values in enumerate(groups.values())], fontsize=8)
        cos_ax.set_xlabel("group (legend below; black bar: the mean)")
        cos_ax.set_ylabel("cosine similarity (direction only)")
        cos_ax.set_ylim(-1.05, 1.05)
        cos_ax.set_title("The direction gap: do the vectors point the same way?", fontsize=10)
        cos_ax.grid(axis="y", alpha=0.3)

        lengths = {"CLIP image\nembedding": self.image_norm, "after norm\nmatching": self.matched_norm,
                   "SD text token\n(typical)": self.text_norm}
        len_ax.bar(range(3), list(lengths.values()), color=["C1", "C2", "C0"])
        for x, value in enumerate(lengths.values()):
            len_ax.text(x, value, number(value), ha="center", va="bottom", fontsize=8)
        len_ax.set_xticks(range(3), list(lengths), fontsize=8)
        len_ax.set_ylabel("L2 norm")
        len_ax.set_title("Length: what norm matching fixes", fontsize=10)
        len_ax.set_ylim(0, max(lengths.values()) * 1.2 or 1)
        handles, labels = cos_ax.get_legend_handles_labels()
        figure.legend(handles, [f"{i + 1}. {label}" for i, label in enumerate(labels)], loc="outside lower center",
                      ncol=2, fontsize=8, frameon=False, markerscale=2)
        return figure


def direction_gap(trace: Any, pipeline: Any, prompts: Sequence[str] = DEFAULT_PROMPTS, index: int = 0) -> DirectionGapView:
    """Where the image embedding of input ``index`` points, against SD's text tokens of ``prompts`` (computed
    live with SD's text encoder) and, where the preset has it, CLIP's projected text embedding of them."""
    from .. import conditioning

    if getattr(trace, "pooled_prompt_embeds", None) is not None:
        raise InspectError(SDXL_DIRECTION_GAP)
    if len(prompts) < 2:
        raise InspectError(f"The direction gap compares prompts with each other: give at least 2, not {len(prompts)}.")
    image = trace.image_embeds[index].detach().float().cpu()
    sd_tokens = text_prompt_embeds(pipeline, prompts)  # [P, 77, D]
    target = float(pipeline.text_token_norm())
    matched = conditioning.match_norm(image[None, None], target)[0, 0]
    flat = sd_tokens.reshape(-1, sd_tokens.shape[-1])
    image_vs = cosine_similarity(image[None], flat).reshape(len(prompts), -1)
    matched_vs = cosine_similarity(matched[None], flat).reshape(len(prompts), -1)
    pairs = [(a, b) for a in range(len(prompts)) for b in range(a + 1, len(prompts))]
    across = torch.stack([torch.nn.functional.cosine_similarity(sd_tokens[a], sd_tokens[b], dim=-1)
                          for a, b in pairs])
    clip_vs_sd = image_vs_clip = None
    note = ""
    try:
        clip_text = pipeline.clip_text_tower().embed(list(prompts)).detach().float().cpu()  # [P, D]
    except TextTowerUnavailable as err:
        note = str(err)
    else:
        clip_vs_sd = torch.stack([cosine_similarity(clip_text[p][None], sd_tokens[p])[0] for p in range(len(prompts))])
        image_vs_clip = cosine_similarity(image[None], clip_text)[0]
    return DirectionGapView(list(prompts), image_vs, matched_vs, across, clip_vs_sd, image_vs_clip,
                            float(image.norm()), float(matched.norm()), target, note)
