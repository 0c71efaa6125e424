"""Where in the picture each prompt token acts: a run's cross-attention maps over its output (DAAM-style).

The maps come from ``generate(..., trace_attention=True)`` (:mod:`imageprompt_widgets.engine.attention`): for every
latent position, the share of the conditional branch's cross-attention each prompt token got, averaged
over heads, layers and steps (the shares sum to 1 at every position). A view sums them over groups of
tokens chosen from the run's method: the image token(s) against the text's start token, words and padding
in ``blend``; CLS against the patch tokens in ``tokens`` (whose shares are also laid out on the input's
patch grid: which parts of the input picture the output read); the IP-Adapter's own tokens beside the text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..presets import TOY_FINE_FOLDER, runs_toy_weights
from .base import FigureView, InspectError, new_figure, number, show_image
from .clip import clip_input_images

#: What the Attention view says on the toy world's 8 × 8 presets: how well its maps localise, measured
#: (toy/localise.py; docs/toy_world.md, "Do the attention maps show where?").
TOY_LOCALISATION_NOTE = (
    "On the toy world's 8 × 8 base these maps do not show where. Measured as DAAM does (τ = 0.4; python -m "
    "imageprompt_widgets.toy.localise), the colour and shape words' maps overlap the drawn shape with mIoU 0.34 on 23 "
    "held-out captions, below a fixed centred disc's 0.37 on the same pictures, and the IP-Adapter's image-token maps "
    "overlap it with mIoU 0.24, below the disc's 0.38 on 24 outputs. A map on the 8 × 8 latent could score 0.87; "
    "the UNet trained on it spreads its attention broadly and reads the caption mostly from the padding tokens. "
    "The preset toy-fine, the same world on a 16 × 16 latent, localises: its word maps score 0.59 against "
    "the disc's 0.30."
)
#: What it says on ``toy-fine``, the 16 × 16 base whose maps do show where.
TOY_FINE_LOCALISATION_NOTE = (
    "On this toy base the word maps show where. Measured as DAAM does (τ = 0.4; python -m "
    "imageprompt_widgets.toy.localise), the colour and shape words' maps overlap the drawn shape with mIoU 0.59 "
    "on 22 held-out captions, 0.28 above a fixed centred disc's 0.30 on the same pictures (a map on "
    "its 16 × 16 latent could score 0.95). The price of the finer latent at the toy world's budget: this base "
    "draws the named shape for 67 % of the 48 held-out captions where the 8 × 8 base (toy) draws 94 %, so the "
    "image-prompt presets stay on the 8 × 8 base, whose maps do not localise (0.34 against the disc's 0.37)."
)


def toy_localisation_note(preset: Any) -> str | None:
    """What the view says about how well maps localise on ``preset``: one of the notes above on the toy world's
    presets, ``None`` on real or random weights (nothing measured there)."""
    if preset is None or not runs_toy_weights(preset):
        return None
    fine = Path(preset.sd_model).resolve() == TOY_FINE_FOLDER.resolve()
    return TOY_FINE_LOCALISATION_NOTE if fine else TOY_LOCALISATION_NOTE


#: Individual tokens shown besides the groups (the ones with the largest share).
TOP_TOKENS = 3
#: A text of at most this many words gets a panel per word, in order (a caption's colour and shape words are
#: rarely among the most attended: "on", "a" and padding are); a longer one its :data:`TOP_TOKENS`.
EVERY_WORD_UP_TO = 8
#: Panels per row of the figure (three keep its titles readable in the panel's column).
COLUMNS = 3


@dataclass
class AttentionView(FigureView):
    """Token groups' attention over the output image; ``group_maps`` and ``shares`` hold the numbers."""

    output: Any  # the output image (PIL)
    maps: torch.Tensor  # [L, h, w]: share of each prompt token at each latent position
    groups: dict[str, list[int]]  # label -> token indices summed in its panel
    token_labels: list[str]  # one per token
    adapter_maps: torch.Tensor | None = None  # [n, h, w] IP-Adapter tokens (their own softmax)
    patch_shares: torch.Tensor | None = None  # [g, g] mean share of each patch token (tokens mode)
    seen: Any = None  # what CLIP saw (the patch grid's picture)
    mode: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def group_maps(self) -> dict[str, torch.Tensor]:
        """Each group's share at every latent position, ``[h, w]`` (its tokens' maps summed)."""
        return {label: self.maps[indices].sum(0) for label, indices in self.groups.items()}

    @property
    def shares(self) -> dict[str, float]:
        """Each group's share of all the attention, averaged over the positions (0 to 1)."""
        return {label: float(values.mean()) for label, values in self.group_maps.items()}

    @property
    def adapter_shares(self) -> list[float]:
        """Each IP-Adapter token's mean share of the adapter's attention (empty without an adapter)."""
        return [] if self.adapter_maps is None else self.adapter_maps.mean((1, 2)).tolist()

    def describe(self) -> str:
        parts = [f"{label}: {100 * share:.1f}%" for label, share in self.shares.items()]
        text = f"Share of the prompt's attention, averaged over the picture: {'; '.join(parts)}."
        return " ".join([text, *self.notes])

    def panels(self) -> list[tuple[str, torch.Tensor | None, Any]]:
        """``(title, map or None, picture)`` of every panel, in order."""
        found: list[tuple[str, torch.Tensor | None, Any]] = [("output", None, self.output)]
        alone = len(self.groups) == 1  # one group has all the attention: where it acts, not its (100 %) share
        for label, values in self.group_maps.items():
            share = "where it acts" if alone else f"{100 * float(values.mean()):.1f}% of attention"
            found.append((f"{label}\n{share}", values, self.output))
        if self.adapter_maps is not None:
            order = sorted(range(len(self.adapter_maps)), key=lambda i: -float(self.adapter_maps[i].mean()))
            for i in order[:COLUMNS]:
                share = float(self.adapter_maps[i].mean())
                found.append((f"IP-Adapter token {i}\n{100 * share:.1f}% of the adapter's", self.adapter_maps[i],
                              self.output))
        if self.patch_shares is not None and self.seen is not None:
            side = self.patch_shares.shape[0]
            found.append((f"input's {side}x{side} patches: attention\neach patch token got", self.patch_shares,
                          self.seen))
        return found

    def figure(self) -> Any:
        panels = self.panels()
        rows = math.ceil(len(panels) / COLUMNS)
        columns = min(len(panels), COLUMNS)
        figure = new_figure(2.4 * max(columns, COLUMNS), 2.4 * rows + 0.6)  # room for the title over two panels
        axes = figure.subplots(rows, columns, squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_axis_off()
        for ax, (title, values, picture) in zip(axes.flat, panels):
            if values is None:
                show_image(ax, picture, title, fontsize=8)
                continue
            # The map over a grey copy of the picture, so its colours read as the map's alone.
            show_image(ax, picture.convert("L").convert("RGB"), title, fontsize=8)
            low, top = float(values.min()), max(float(values.max()), 1e-6)
            if top - low < 1e-3 * top:  # a flat map: show it against 0, not a range of rounding noise
                low = 0.0
            extent = (-0.5, picture.width - 0.5, picture.height - 0.5, -0.5)
            overlay = ax.imshow(values.numpy(), cmap="inferno", alpha=0.75, vmin=low, vmax=top, extent=extent,
                                interpolation="nearest")
            bar = figure.colorbar(overlay, ax=ax, shrink=0.8, pad=0.02)
            bar.ax.tick_params(labelsize=7)
            bar.set_label("share of attention", fontsize=7)
        figure.suptitle(f"Where each prompt token acts ({self.mode}): its share of the cross-attention at each "
                        "position\n(mean over heads, layers and steps; each panel has its own colour range)",
                        fontsize=10)
        return figure


def attention_view(
    result: Any, pipeline: Any = None, index: int = 0, groups: Mapping[str, Sequence[int]] | None = None,
) -> AttentionView:
    """The attention maps of output ``index`` over it, summed over token groups (default: chosen from the run's
    method). ``pipeline`` (optional) names the text's words (its tokenizer) and shows the input's patch grid
    (its image processor) in ``tokens`` mode; ``groups`` maps a label to token indices."""
    trace = result.trace
    if trace.attention_maps is None:
        raise InspectError("This run recorded no attention: generate with trace_attention=True to see where "
                           "each token acts.")
    maps = trace.attention_maps
    if not result.images:
        raise InspectError("This run was cancelled before its images were decoded: there is no picture to lay "
                           "the attention maps over (trace.attention_maps holds the steps that ran).")
    if not 0 <= index < maps.shape[0]:
        raise InspectError(f"This run made {maps.shape[0]} images; there is no image {index}.")
    maps = maps[index].float()
    settings = result.settings
    words = _prompt_words(result, pipeline)
    labels = _token_labels(maps.shape[0], settings, words)
    notes: list[str] = []
    chosen = dict(groups) if groups is not None else _default_groups(maps, settings, words, labels, notes)
    for label, indices in chosen.items():
        bad = [i for i in indices if not 0 <= i < maps.shape[0]]
        if bad:
            raise InspectError(f"Group {label!r} names token {bad[0]}, but the prompt has {maps.shape[0]} tokens.")
    patch_shares, seen = None, None
    if settings.mode == "tokens":
        patches = trace.hidden_states.shape[1] - 1
        side = math.isqrt(patches)
        if side * side == patches and maps.shape[0] >= 1 + patches:
            patch_shares = maps[1 : 1 + patches].mean((1, 2)).reshape(side, side)
            if pipeline is not None:
                seen = clip_input_images(trace.pixel_values[:1], pipeline.image_processor)[0]
    localises = toy_localisation_note(getattr(pipeline, "preset", None))
    if localises:
        notes.append(localises)
    adapter = trace.extras.get("adapter_attention_maps")
    if adapter is not None:
        adapter = adapter[index].float()
        notes.append("The IP-Adapter's tokens have their own softmax beside the text's: their shares sum to 1 "
                     "among themselves, weighted by the adapter's scale in each layer and step.")
    return AttentionView(result.images[index], maps,
                         {label: list(indices) for label, indices in chosen.items()}, labels, adapter,
                         patch_shares, seen, settings.mode, notes)


def _prompt_words(result: Any, pipeline: Any) -> list[str] | None:
    """The text's tokens as SD's tokenizer splits them (without start and end), where the run had a text."""
    settings = result.settings
    tokenizer = getattr(getattr(pipeline, "sd", None), "tokenizer", None)
    if tokenizer is None or settings.mode not in ("text", "blend", "ip_adapter", "caption"):
        return None
    text = settings.prompt
    if settings.mode == "caption":
        text = str(result.provenance.notes.get("caption") or settings.prompt)
    ids = tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return [token.replace("</w>", "") for token in tokenizer.convert_ids_to_tokens(ids[1:-1])]


def _token_labels(count: int, settings: Any, words: list[str] | None) -> list[str]:
    labels = [f"token {i}" for i in range(count)]
    if words is not None:
        labels[0] = "<start>"
        for i, word in enumerate(words, start=1):
            if i < count:
                labels[i] = repr(word)
        for i in range(len(words) + 1, min(count, 77)):
            labels[i] = "<end>" if i == len(words) + 1 else f"<pad {i}>"
    for i in range(77, count):
        labels[i] = f"image token {i - 76}"  # blend's concat: one token per image after the text
    if settings.mode == "tokens":
        labels[0] = "CLS"
        labels[1:] = [f"patch {i}" for i in range(1, count)]
    return labels


def _default_groups(maps: torch.Tensor, settings: Any, words: list[str] | None, labels: list[str],
                    notes: list[str]) -> dict[str, list[int]]:
    count = maps.shape[0]
    mode = settings.mode
    shares = maps.mean((1, 2))
    if mode == "repeat":
        notes.append(f"In repeat all {count} tokens are one: the same image vector copied {count} times, so the "
                     "picture cannot tell them apart and the map shows where that one image token acts.")
        return {f"all {count} tokens are one image token": list(range(count))}
    if mode == "single":
        return {"the image token" if count == 1 else f"{count} image tokens": list(range(count))}
    if mode == "tokens":
        patches = list(range(1, count))
        top = sorted(patches, key=lambda i: -float(shares[i]))[:TOP_TOKENS]
        return {"CLS token": [0], f"all {len(patches)} patch tokens": patches,
                **{f"{labels[i]} (most attended)": [i] for i in top}}
    text_groups = _text_groups(min(count, 77), words)
    if mode == "blend" and settings.blend == "concat" and count > 77:
        notes.append("concat: the 77 text tokens, then one token per image.")
        return {**text_groups, f"image token{'s' if count > 78 else ''}": list(range(77, count))}
    if mode == "blend":
        notes.append(f"interpolate: every token is (1 - {settings.image_weight}) x text + {settings.image_weight} x "
                     "image, so the groups are the text's positions, each a mix.")
    if words:
        positions = range(1, 1 + min(len(words), count - 1))
        shown = (list(positions) if len(words) <= EVERY_WORD_UP_TO
                 else sorted(positions, key=lambda i: -float(shares[i]))[:TOP_TOKENS])
        text_groups.update({f"token {i}: {labels[i]}": [i] for i in shown})  # the same word may come twice
    return text_groups


def _text_groups(count: int, words: list[str] | None) -> dict[str, list[int]]:
    """Start token, words, and the end token with the padding after it (which SD attends to a lot)."""
    if words is None:
        return {"start token": [0], f"tokens 1 to {count - 1}": list(range(1, count))}
    last_word = min(len(words), count - 1)
    groups = {"start token": [0]}
    if last_word:
        groups[f"the {last_word} word token{'s' if last_word > 1 else ''}"] = list(range(1, last_word + 1))
    if last_word + 1 < count:
        groups["end + padding"] = list(range(last_word + 1, count))
    return groups


def attention_summary(view: AttentionView) -> str:
    """Per-group shares as aligned text lines (the inspector's table)."""
    width = max((len(label) for label in view.shares), default=0)
    return "\n".join(f"{label:<{width}}  {number(100 * share)}%" for label, share in view.shares.items())
