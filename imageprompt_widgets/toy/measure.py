"""Measuring the toy world: does text-to-image follow captions, and does each image-prompt method keep
the input's colour and shape?

Every number comes from the same held-out scenes (combinations no model was trained on) and the
judge (judge.py). Text-to-image goes through the engine's own route, ``mode="blend"`` with
``image_weight=0`` (the text prompt's embeddings, bit for bit); its input image is a plain grey
picture that this setting ignores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..settings import COMBINES
from .judge import Judgement, judge
from .world import IMAGE_SIZE, Scene, held_out_scenes

#: The picture handed to text-to-image runs (``image_weight=0`` never looks at it).
GREY = (128, 128, 128)


@dataclass(frozen=True)
class Method:
    """One row of the method table: a label, the settings it runs with, and how many input pictures."""

    label: str
    settings: dict[str, Any]
    inputs: int = 1


def _single(mode: str, norm_match: bool, **extra: Any) -> Method:
    label = f"{mode}, norm_match {'on' if norm_match else 'off'}"
    return Method(label, {"mode": mode, "norm_match": norm_match, **extra})


#: Every image-prompt method on one picture, with norm matching off and on.
SINGLE_METHODS: tuple[Method, ...] = tuple(
    _single(mode, norm_match) for mode in ("repeat", "single", "tokens", "blend") for norm_match in (False, True)
)


def combine_methods(base: dict[str, Any]) -> tuple[Method, ...]:
    """Each combine operation (settings.COMBINES) on two inputs, on top of ``base`` settings (a mode and its
    norm matching); the first picture is the one ``subtract`` keeps."""
    return tuple(Method(f"{name} of two", {**base, "combine": name}, inputs=2) for name in COMBINES)


@dataclass
class Tally:
    """How often outputs matched (colour, shape) of the first input and, with two inputs, of the second."""

    count: int = 0
    colour: int = 0
    shape: int = 0
    both: int = 0
    second_colour: int = 0
    second_shape: int = 0
    nothing: int = 0  # outputs where the judge saw no shape at all
    background: int = 0

    def add(self, seen: Judgement, first: Scene, second: Scene | None = None) -> None:
        self.count += 1
        colour, shape = seen.matches(first.colour, first.shape)
        self.colour += colour
        self.shape += shape
        self.both += colour and shape
        self.nothing += seen.colour is None
        self.background += seen.background == first.background
        if second is not None:
            self.second_colour += seen.colour == second.colour
            self.second_shape += seen.shape == second.shape

    def rate(self, name: str) -> float:
        return getattr(self, name) / self.count if self.count else 0.0


@dataclass
class Run:
    """The inputs, outputs and judgements of one measured setting (kept for pictures of it)."""

    label: str
    tally: Tally = field(default_factory=Tally)
    inputs: list[tuple[Scene, ...]] = field(default_factory=list)
    outputs: list[Image.Image] = field(default_factory=list)
    judgements: list[Judgement] = field(default_factory=list)
    #: The toy CLIP's image–image cosine of each output with its (first) input (routes only).
    cosines: list[float] = field(default_factory=list)


def text_to_image(pipe: Any, scenes: Sequence[Scene] | None = None, **settings: Any) -> Run:
    """Generate each scene's caption (seed = its index) and judge it against the caption."""
    scenes = list(held_out_scenes() if scenes is None else scenes)
    grey = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), GREY)
    run = Run("text-to-image")
    for index, scene in enumerate(scenes):
        result = pipe.generate(grey, mode="blend", prompt=scene.caption, image_weight=0.0, seed=index, **settings)
        _record(run, (scene,), result.images[0])
    return run


def pairs_of(scenes: Sequence[Scene]) -> list[tuple[Scene, Scene]]:
    """Each scene with the next one that differs from it in both colour and shape (wrapping around)."""
    pairs = []
    for index, first in enumerate(scenes):
        for offset in range(1, len(scenes)):
            second = scenes[(index + offset) % len(scenes)]
            if second.colour != first.colour and second.shape != first.shape:
                pairs.append((first, second))
                break
    return pairs


def image_prompt(pipe: Any, method: Method, scenes: Sequence[Scene] | None = None, **settings: Any) -> Run:
    """Generate from each held-out picture (or pair of pictures) with ``method``; judge against the input."""
    scenes = list(held_out_scenes() if scenes is None else scenes)
    groups = [(scene,) for scene in scenes] if method.inputs == 1 else pairs_of(scenes)
    run = Run(method.label)
    for index, group in enumerate(groups):
        pictures = [scene.draw() for scene in group]
        result = pipe.generate(pictures, seed=index, **{**method.settings, **settings})
        _record(run, group, result.images[0])
    return run


def _record(run: Run, group: tuple[Scene, ...], output: Image.Image) -> None:
    seen = judge(output)
    run.tally.add(seen, group[0], group[1] if len(group) > 1 else None)
    run.inputs.append(group)
    run.outputs.append(output)
    run.judgements.append(seen)


def method_table(
    pipe: Any, methods: Sequence[Method], scenes: Sequence[Scene] | None = None,
    on_run: Callable[[Run], None] | None = None, **settings: Any,
) -> list[Run]:
    """Every method over the same scenes; ``on_run`` is called as each finishes (progress)."""
    runs = []
    for method in methods:
        runs.append(image_prompt(pipe, method, scenes, **settings))
        if on_run is not None:
            on_run(runs[-1])
    return runs


def markdown_table(runs: Sequence[Run]) -> str:
    """The runs as a Markdown table of percentages (the second input's columns only where there is one)."""
    two = any(run.inputs and len(run.inputs[0]) > 1 for run in runs)
    header = "| method | n | colour | shape | both |" + (" colour of 2nd | shape of 2nd |" if two else "")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for run in runs:
        t = run.tally
        cells = [run.label, str(t.count), *(f"{100 * t.rate(name):.0f} %" for name in ("colour", "shape", "both"))]
        if two:
            paired = run.inputs and len(run.inputs[0]) > 1
            cells += [f"{100 * t.rate(n):.0f} %" if paired else "" for n in ("second_colour", "second_shape")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid(rows: Sequence[Sequence[Image.Image]], scale: int = 1, gap: int = 2) -> Image.Image:
    """Pictures in rows on a grey canvas (``scale`` enlarges each picture with nearest-neighbour)."""
    side = IMAGE_SIZE * scale
    columns = max(len(row) for row in rows)
    canvas = Image.new("RGB", (columns * (side + gap) + gap, len(rows) * (side + gap) + gap), GREY)
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            tile = picture.convert("RGB").resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(tile, (gap + c * (side + gap), gap + r * (side + gap)))
    return canvas


def all_methods() -> tuple[Method, ...]:
    """The full table: every single-image method with norm matching off and on, then every combine on two
    pictures (through ``single`` with norm matching, the guide's method with its length fixed)."""
    return SINGLE_METHODS + combine_methods({"mode": "single", "norm_match": True})


# ---------------------------------------------------------------------------------------------
# The route scoreboard: every way an image becomes the prompt, each on the toy preset that runs it


@dataclass(frozen=True)
class Route:
    """One row of the scoreboard: the preset that runs it and the settings (its preset's defaults otherwise)."""

    label: str
    preset: str
    settings: dict[str, Any]


_IMG2IMG = {"mode": "blend", "prompt": "", "image_weight": 0.0, "structure": "img2img"}
#: Every route, in the scoreboard's order: the guide's embedding-as-prompt family first (on ``toy``), then the
#: trained routes (each on its toy preset), then the caption, then img2img (the picture itself, noised).
ROUTES: dict[str, Route] = {route.label: route for route in (
    Route("repeat", "toy", {"mode": "repeat"}),
    Route("single", "toy", {"mode": "single"}),
    Route("tokens", "toy", {"mode": "tokens"}),
    Route("blend", "toy", {"mode": "blend", "prompt": ""}),
    Route("norm matching (single)", "toy", {"mode": "single", "norm_match": True}),
    Route("ip_adapter", "toy-ip-adapter", {}),
    Route("ip_adapter plus", "toy-ip-adapter-plus", {}),
    Route("variations", "toy-variations", {}),
    Route("projector", "toy", {"mode": "projector"}),
    Route("caption", "toy", {"mode": "caption"}),
    Route("img2img 0.5", "toy", {**_IMG2IMG, "strength": 0.5}),
    Route("img2img 0.8", "toy", {**_IMG2IMG, "strength": 0.8}),
)}


class ToyClip:
    """The toy CLIP's image embeddings, to compare an output with its input (cosine)."""

    def __init__(self) -> None:
        from transformers import CLIPModel

        from . import CLIP_FOLDER
        from .train import clip_pixels

        self.model = CLIPModel.from_pretrained(str(CLIP_FOLDER)).eval()
        self._pixels = clip_pixels

    def cosine(self, first: Image.Image, second: Image.Image) -> float:
        import torch

        with torch.inference_mode():
            out = self.model.get_image_features(pixel_values=self._pixels([first.convert("RGB"), second.convert("RGB")]))
            embeds = out if isinstance(out, torch.Tensor) else out.pooler_output
            embeds = torch.nn.functional.normalize(embeds, dim=-1)
        return float(embeds[0] @ embeds[1])


def measure_route(route: Route, scenes: Sequence[Scene] | None = None, clip: ToyClip | None = None,
                  **settings: Any) -> Run:
    """Generate from each held-out picture with ``route`` on its preset (seed = the picture's index); judge the
    output against the input (colour, shape, background) and compare them with the toy CLIP."""
    from ..engine.pipeline import ImagePromptPipeline

    scenes = list(held_out_scenes() if scenes is None else scenes)
    pipe = ImagePromptPipeline.from_preset(route.preset)
    run = Run(route.label)
    for index, scene in enumerate(scenes):
        picture = scene.draw()
        result = pipe.generate(picture, seed=index, **{**route.settings, **settings})
        _record(run, (scene,), result.images[0])
        if clip is not None:
            run.cosines.append(clip.cosine(picture, result.images[0]))
    return run


def scoreboard(scenes: Sequence[Scene] | None = None, routes: Sequence[str] | None = None,
               on_run: Callable[[Run], None] | None = None, **settings: Any) -> list[Run]:
    """Every route (or the named ones) over the same held-out scenes, with the toy CLIP's cosines."""
    clip = ToyClip()
    runs = []
    for name in routes or ROUTES:
        runs.append(measure_route(ROUTES[name], scenes, clip, **settings))
        if on_run is not None:
            on_run(runs[-1])
    return runs


def scoreboard_table(runs: Sequence[Run]) -> str:
    """The scoreboard as Markdown: how often each route kept the input's colour, shape and background, and the
    mean toy-CLIP cosine of output and input."""
    lines = ["| route | preset | n | colour | shape | background | CLIP cosine |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        t = run.tally
        cosine = f"{sum(run.cosines) / len(run.cosines):.2f}" if run.cosines else ""
        preset = ROUTES[run.label].preset if run.label in ROUTES else ""
        lines.append(f"| {run.label} | {preset} | {t.count} | {100 * t.rate('colour'):.0f} % | "
                     f"{100 * t.rate('shape'):.0f} % | {100 * t.rate('background'):.0f} % | {cosine} |")
    return "\n".join(lines)


#: The full scoreboard (48 held-out pictures, the presets' defaults) as last measured with ``--routes --save``, shipped
#: beside the weights it measures: docs/toy_world.md and examples/toy_scoreboard.ipynb show this very text.
SCOREBOARD_FILE = Path(__file__).resolve().parent / "weights" / "scoreboard.md"


def published_scoreboard() -> str:
    """The stored full scoreboard (:data:`SCOREBOARD_FILE`) as Markdown: recomputing it takes minutes, reading it
    none."""
    return SCOREBOARD_FILE.read_text(encoding="utf-8").strip()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m imageprompt_widgets.toy.measure``: text-to-image accuracy and the method table, as Markdown."""
    import argparse
    import time

    import torch

    parser = argparse.ArgumentParser(description="Measure the toy preset on the held-out scenes.")
    parser.add_argument("--scenes", type=int, default=len(held_out_scenes()), help="how many held-out scenes")
    parser.add_argument("--no-methods", action="store_true", help="text-to-image only")
    parser.add_argument("--routes", action="store_true",
                        help="the route scoreboard (every route on its toy preset) instead of the method table")
    parser.add_argument("--grid", default=None, metavar="PNG",
                        help="with --routes: save the first six inputs, each beside every route's output, as a grid")
    parser.add_argument("--save", default=None, metavar="MD",
                        help=f"with --routes: write the table there too (the shipped one: {SCOREBOARD_FILE.name} in "
                             "the weights folder)")
    args = parser.parse_args(argv)
    if (args.save or args.grid) and not args.routes:
        parser.error("--save and --grid belong to the route scoreboard: add --routes")
    torch.set_num_threads(1)
    from ..engine.pipeline import ImagePromptPipeline

    start = time.perf_counter()
    pipe = ImagePromptPipeline.from_preset("toy")
    print(f"loaded 'toy' in {time.perf_counter() - start:.1f} s (one thread)")
    scenes = held_out_scenes(args.scenes)
    if args.routes:
        start = time.perf_counter()
        runs = scoreboard(scenes, on_run=lambda r: print(f"  {r.label}: colour {100 * r.tally.rate('colour'):.0f} %",
                                                       flush=True))
        print(f"\n{scoreboard_table(runs)}\n\n({len(runs) * len(scenes)} pictures in "
              f"{time.perf_counter() - start:.0f} s)")
        if args.save:
            Path(args.save).write_text(scoreboard_table(runs) + "\n", encoding="utf-8")
        if args.grid:
            # docs/toy_routes.png: one row per picture (the first six), the input then each route's output
            rows = [[scene.draw(), *(run.outputs[i] for run in runs)] for i, scene in enumerate(scenes[:6])]
            # a 256-colour palette, as the docs' pictures are stored (a third of the bytes, the same tiles)
            grid(rows, scale=1).quantize(256, method=Image.Quantize.MEDIANCUT).save(args.grid, optimize=True)
        return 0
    start = time.perf_counter()
    run = text_to_image(pipe, scenes)
    seconds = (time.perf_counter() - start) / len(scenes)
    t = run.tally
    print(f"text-to-image on {t.count} held-out captions: colour {100 * t.rate('colour'):.0f} %, "
          f"shape {100 * t.rate('shape'):.0f} %, both {100 * t.rate('both'):.0f} % ({seconds:.2f} s per picture)")
    if not args.no_methods:
        start = time.perf_counter()
        runs = method_table(pipe, all_methods(), scenes)
        count = sum(r.tally.count for r in runs)
        print(f"\n{markdown_table(runs)}\n\n({count} pictures, {(time.perf_counter() - start) / count:.2f} s each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
