"""Words for a picture: the phrases nearest its embedding, and what the ``words`` method found, step by step.

For a chain, each phrase it added with the cosine after it and its gain (what each word adds, which no other tool
shows); for a search, the cosine of its projected tokens at every step; for any run, the table's nearest phrases
with their cosines (``pipe.nearest_words``, passed in: views load no model). Pure: numbers in, a figure out.

```python
res = pipe.generate(image, mode="words", words="chain")
view = views.words.words_view(res, nearest=pipe.nearest_words(res.trace.image_embeds, k=8))
print(view.table())
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import FigureView, new_figure

#: What the section says about a run of another method (nearest words still show).
NOT_A_WORDS_RUN = "This run used no words route: mode='words' shows its chain's steps or its search's cosines here."


@dataclass
class WordsView(FigureView):
    """What a ``words`` run found (``route`` "chain", "search" or "" for another method) and the nearest phrases."""

    route: str
    words: str = ""
    cosine: float | None = None
    #: The chain's steps: (phrase, cosine after it, gain).
    steps: list[tuple[str, float, float]] = field(default_factory=list)
    start: str = ""
    start_cosine: float | None = None
    stop: str = ""
    #: The search's cosine at each step, and its tokens.
    search_cosines: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    nearest: list[tuple[str, float]] = field(default_factory=list)

    def table(self) -> str:
        """The words and numbers as plain text lines (what the inspector prints under the plot)."""
        lines = []
        if self.route == "chain":
            lines.append(f"start {self.start or '(empty)'!r}: cosine {self.start_cosine:.3f}")
            lines += [f"+ {phrase!r}: cosine {cosine:.3f} (gain {gain:+.3f})" for phrase, cosine, gain in self.steps]
            lines.append(f"stopped: {self.stop}")
        elif self.route == "search":
            best = max(self.search_cosines) if self.search_cosines else float("nan")
            lines.append(f"{len(self.token_ids)} tokens {self.token_ids}, best projected cosine {best:.3f} over "
                         f"{len(self.search_cosines)} steps; as text {self.words!r}: cosine {self.cosine:.3f}")
        if self.nearest:
            lines.append("nearest phrases: " + ", ".join(f"{p} ({c:.3f})" for p, c in self.nearest))
        return "\n".join(lines)

    def describe(self) -> str:
        if self.route == "chain":
            return (f"The chain added {len(self.steps)} phrase{'s' if len(self.steps) != 1 else ''}: "
                    f"{self.words!r}, cosine {self.cosine:.3f} with the picture ({self.stop}).")
        if self.route == "search":
            return f"The search found {self.words!r} (cosine {self.cosine:.3f} as text)."
        return NOT_A_WORDS_RUN

    def figure(self) -> Any:
        panels = [name for name, present in (("chain", self.route == "chain" and self.steps),
                                             ("search", self.route == "search" and self.search_cosines),
                                             ("nearest", self.nearest)) if present]
        figure = new_figure(4.2 * max(1, len(panels)), 3.2)
        axes = figure.subplots(1, max(1, len(panels)), squeeze=False)[0]
        for ax, panel in zip(axes, panels):
            if panel == "chain":
                labels = [phrase for phrase, _, _ in self.steps]
                gains = [gain for _, _, gain in self.steps]
                ax.barh(range(len(gains)), gains, color="#4c72b0")
                ax.set_yticks(range(len(labels)), labels, fontsize=7)
                ax.invert_yaxis()
                ax.set_xlabel("cosine gain")
                ax.set_title(f"chain: {self.start_cosine:.2f} -> {self.cosine:.2f}", fontsize=9)
            elif panel == "search":
                ax.plot(range(1, len(self.search_cosines) + 1), self.search_cosines, color="#dd8452")
                ax.set_xlabel("step")
                ax.set_ylabel("cosine (projected tokens)")
                ax.set_title("hard-prompt search", fontsize=9)
            else:
                ax.barh(range(len(self.nearest)), [c for _, c in self.nearest], color="#55a868")
                ax.set_yticks(range(len(self.nearest)), [p for p, _ in self.nearest], fontsize=7)
                ax.invert_yaxis()
                ax.set_xlabel("cosine with the picture")
                ax.set_title("nearest phrases", fontsize=9)
        if not panels:
            axes[0].axis("off")
            axes[0].text(0.5, 0.5, NOT_A_WORDS_RUN, ha="center", va="center", wrap=True, fontsize=8)
        return figure


def words_view(result: Any, nearest: Sequence[tuple[str, float]] = ()) -> WordsView:
    """The view of a finished run: its ``provenance.notes`` (a ``words`` run's) and the nearest phrases given."""
    notes: Mapping[str, Any] = result.provenance.notes if getattr(result, "provenance", None) else {}
    route = notes.get("words_route", "")
    search = notes.get("words_search", {})
    return WordsView(
        route=route, words=notes.get("words", ""), cosine=notes.get("words_cosine"),
        steps=[(s["phrase"], s["cosine"], s["gain"]) for s in notes.get("words_chain", [])],
        start=notes.get("words_start", ""), start_cosine=notes.get("words_start_cosine"),
        stop=notes.get("words_stop", ""), search_cosines=list(search.get("cosines", [])),
        token_ids=list(search.get("token_ids", [])), nearest=[(p, float(c)) for p, c in nearest],
    )
