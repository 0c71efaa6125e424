"""Measuring the words route on the toy world: does the chain find the caption's words, does SD keep the input's
colour when it draws from them, and how close does the hard-prompt search get with the default steps?

The toy world's table is its own words (``methods/phrases/toy.txt``: every caption and its two parts), so the
right answer is known exactly: a picture's chain is right when its words are the picture's caption, word for word.
``python -m imageprompt_widgets.toy.measure_words`` prints the numbers docs/toy_world.md records.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .judge import judge
from .world import COLOURS, SHAPES, Scene, held_out_scenes


def words_named(text: str) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, background) the words name, read like the world's captions: the first ``{colour} {shape}``
    and the first ``{colour} background``; ``None`` where the words name none."""
    words = text.replace(",", " ").split()
    colour = shape = background = None
    for first, second in itertools.pairwise(words):
        if first in COLOURS and second in SHAPES and colour is None:
            colour, shape = first, second
        elif first in COLOURS and second == "background" and background is None:
            background = first
    return colour, shape, background


@dataclass
class WordsTally:
    """Per picture: the chain's words, whether they are the caption, and the judge's reading of SD's drawing."""

    count: int = 0
    exact: int = 0  # the words are the caption, word for word
    attributes: int = 0  # colour, shape and background all named right (first mention)
    drawn_colour: int = 0  # SD's drawing from the words has the input's shape colour
    texts: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def rate(self, name: str) -> float:
        return getattr(self, name) / self.count if self.count else 0.0


def chain_run(pipe: Any, scenes: Sequence[Scene], **settings: Any) -> WordsTally:
    """Generate with ``mode="words", words="chain"`` from each picture (seed = its index) and judge it."""
    tally = WordsTally()
    for index, scene in enumerate(scenes):
        result = pipe.generate(scene.draw(), mode="words", words="chain", seed=index, **settings)
        text = result.provenance.notes["words"]
        tally.count += 1
        tally.exact += text == scene.caption
        tally.attributes += words_named(text) == (scene.colour, scene.shape, scene.background)
        tally.drawn_colour += judge(result.images[0]).colour == scene.colour
        tally.texts.append(text)
        tally.steps.append(len(result.provenance.notes["words_chain"]))
    return tally


def search_ratio(pipe: Any, scenes: Sequence[Scene], steps: int, factor: int = 10, tokens: int = 8) -> list[tuple[float, float]]:
    """Per picture, the search's best cosine at ``steps`` and at ``factor`` times as many (same seed)."""
    space = pipe.word_space()
    pairs = []
    for index, scene in enumerate(scenes):
        embeds = pipe.encode_image(scene.draw()).image_embeds
        short = space.search(embeds, tokens=tokens, steps=steps, seed=index)
        long = space.search(embeds, tokens=tokens, steps=steps * factor, seed=index)
        pairs.append((max(short.cosines), max(long.cosines)))
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import time

    import torch

    from ..engine.pipeline import ImagePromptPipeline
    from ..settings import GenerationSettings

    parser = argparse.ArgumentParser(description="Measure the words route on the toy world's held-out scenes.")
    parser.add_argument("--scenes", type=int, default=len(held_out_scenes()))
    parser.add_argument("--search-scenes", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = ImagePromptPipeline.from_preset("toy")
    scenes = held_out_scenes(args.scenes)
    start = time.perf_counter()
    tally = chain_run(pipe, scenes)
    print(f"chain on {tally.count} held-out pictures ({time.perf_counter() - start:.0f} s): caption word for word "
          f"{tally.exact} ({100 * tally.rate('exact'):.0f} %), colour+shape+background named "
          f"{tally.attributes} ({100 * tally.rate('attributes'):.0f} %), drawing keeps the colour "
          f"{tally.drawn_colour} ({100 * tally.rate('drawn_colour'):.0f} %); steps per chain {tally.steps}")
    for scene, text in zip(scenes, tally.texts):
        if text != scene.caption:
            print(f"  {scene.caption!r} -> {text!r}")
    steps = GenerationSettings().words_steps
    start = time.perf_counter()
    pairs = search_ratio(pipe, held_out_scenes(args.search_scenes), steps)
    ratios = [short / long for short, long in pairs]
    print(f"search, 8 tokens, {steps} vs {10 * steps} steps on {len(pairs)} pictures "
          f"({time.perf_counter() - start:.0f} s): best cosine {sum(s for s, _ in pairs) / len(pairs):.3f} vs "
          f"{sum(lo for _, lo in pairs) / len(pairs):.3f}; ratio mean {sum(ratios) / len(ratios):.3f}, "
          f"min {min(ratios):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
