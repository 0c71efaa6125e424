"""What a notebook says first when its pictures cannot mean anything: a banner for random-weight presets
(and a milder one for the toy world, whose weights are trained but know only coloured shapes).

The offline presets (``tiny`` and its twins) are built on this machine with random, seeded weights: they
run every method end to end in seconds without a download, so shapes, arithmetic and plumbing are real,
but every picture is noise and no number says anything about what real CLIP or SD do. The example
notebooks show this banner whenever such a preset runs, and say which preset gives real pictures.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from ..presets import Preset, resolve_preset, runs_toy_weights

#: What to pick for real pictures (a GPU runtime on Colab).
REAL_PRESETS_ADVICE = (
    'For real pictures open this notebook on Colab with a GPU runtime (Runtime → Change runtime type) and set '
    'PRESET = "sd14" in the first cell (about 7 GB download; "sd15" works too, and the methods with parts of '
    'their own use "ip-adapter", "caption" and "variations").'
)


def has_random_weights(preset: str | Preset) -> bool:
    """Whether a preset's models are built here with random weights (``offline_builder`` set) rather than loaded."""
    return resolve_preset(preset).offline_builder is not None


@dataclass(frozen=True)
class Banner:
    """A warning shown as a coloured box in a notebook (plain text elsewhere)."""

    headline: str
    text: str

    def __str__(self) -> str:
        return f"{self.headline} {self.text}"

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        return (
            "<div style='border: 2px solid #c77700; background: #fff4e0; color: #3d2600; padding: 8px 12px; "
            "border-radius: 4px; margin: 4px 0; font-size: 14px; line-height: 1.4'>"
            f"<b>{html.escape(self.headline)}</b> {html.escape(self.text)}</div>"
        )


def is_toy_world(preset: str | Preset) -> bool:
    """Whether a preset runs the toy world's shipped weights (trained on coloured shapes, not photographs): ``toy``,
    its 16 × 16 base ``toy-fine``, and its image-prompt presets (``toy-ip-adapter``, ``toy-ip-adapter-plus``,
    ``toy-variations``)."""
    return runs_toy_weights(resolve_preset(preset))


def weights_banner(preset: str | Preset) -> Banner | None:
    """The banner for ``preset``, or ``None`` when its weights are real Stable Diffusion's."""
    resolved = resolve_preset(preset)
    if is_toy_world(resolved):
        return Banner(
            f"The toy world ({resolved.name!r}):",
            "a miniature Stable Diffusion and CLIP trained in minutes on 64 px pictures of one coloured shape on a "
            "plain background. It follows captions like 'a red circle on a blue background' and image prompts of "
            "such pictures, so the methods really differ here, but it knows nothing else. " + REAL_PRESETS_ADVICE,
        )
    if not has_random_weights(resolved):
        return None
    return Banner(
        f"Random weights ({resolved.name!r}):",
        "these pictures are noise from random weights; the numbers are not real weights' either (shapes and each "
        "method's arithmetic are real, what they say about CLIP and Stable Diffusion is not). " + REAL_PRESETS_ADVICE,
    )
