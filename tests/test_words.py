"""Words for a picture (methods/words.py): nearest phrases, the phrase chain and the hard-prompt search, on tiny;
the toy world's floors in the slow tier."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from imageprompt_widgets import ImagePromptPipeline
from imageprompt_widgets.engine.results import recipe_from_png
from imageprompt_widgets.faults import TextTowerUnavailable
from imageprompt_widgets.methods import METHODS
from imageprompt_widgets.methods.words import (
    CHAIN_POOL,
    TABLE_FOLDER,
    load_table,
    special_token_ids,
    word_space,
)
from imageprompt_widgets.settings import GenerationSettings, SettingsError

ROOT = Path(__file__).resolve().parents[1]


def _cosine(tower, text: str, target: torch.Tensor) -> float:
    """Independent of the method's batching: the tower's own 77-token padding, one text at a time."""
    return float(torch.nn.functional.cosine_similarity(tower.embed([text])[0], target, dim=0))


def _target(tiny_pipe, image) -> torch.Tensor:
    return torch.nn.functional.normalize(tiny_pipe.encode_image(image).image_embeds[0].float(), dim=0)


def test_nearest_words_are_the_tables_best_cosines(tiny_pipe, image):
    found = tiny_pipe.nearest_words(image, k=5)
    tower, phrases = tiny_pipe.clip_text_tower(), load_table("general").phrases
    target = _target(tiny_pipe, image)
    everything = torch.nn.functional.cosine_similarity(tower.embed(list(phrases)), target[None], dim=-1)
    best = everything.topk(5)
    assert [p for p, _ in found] == [phrases[i] for i in best.indices.tolist()]
    np.testing.assert_allclose([c for _, c in found], best.values.numpy(), atol=1e-5)


def test_the_tables_embeddings_are_cached_on_disk_once_per_model(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEPROMPT_CACHE_DIR", str(tmp_path))
    tower = tiny_pipe.clip_text_tower()
    first = word_space(tower, "toy")
    (cached,) = (tmp_path / "words").glob("toy-*.safetensors")
    again = word_space(tower, "toy")
    assert torch.equal(first.embeddings, again.embeddings)
    assert list((tmp_path / "words").iterdir()) == [cached]


def test_the_chains_cosine_never_decreases_and_it_stops_when_nothing_helps(tiny_pipe, image):
    res = tiny_pipe.generate(image, mode="words", words="chain", steps=2, seed=0)
    notes = res.provenance.notes
    steps = notes["words_chain"]
    assert steps, "on tiny some phrase raises the cosine from the empty start"
    tower, target = tiny_pipe.clip_text_tower(), _target(tiny_pipe, image)
    cosines = [notes["words_start_cosine"]] + [step["cosine"] for step in steps]
    assert all(b > a for a, b in itertools.pairwise(cosines))
    assert all(step["gain"] > 0 for step in steps)
    assert ", ".join(step["phrase"] for step in steps) == notes["words"]
    assert _cosine(tower, notes["words"], target) == pytest.approx(notes["words_cosine"], abs=1e-4)
    assert notes["words_stop"] == "no phrase raises the cosine"
    pool = [p for p, _ in tiny_pipe.nearest_words(image, k=CHAIN_POOL) if p not in notes["words"]]
    assert max(_cosine(tower, f"{notes['words']}, {p}", target) for p in pool) <= notes["words_cosine"] + 1e-4
    # SD drew from exactly those words
    assert torch.equal(res.trace.prompt_embeds, tiny_pipe.encode_text(notes["words"]))


def test_a_min_gain_stops_the_chain_earlier(tiny_pipe, image):
    full = tiny_pipe.generate(image, mode="words", steps=1, seed=0).provenance.notes
    gains = [step["gain"] for step in full["words_chain"]]
    cut = sorted(gains)[len(gains) // 2]
    short = tiny_pipe.generate(image, mode="words", words_min_gain=cut, steps=1, seed=0).provenance.notes
    assert [s["phrase"] for s in short["words_chain"]] == [s["phrase"] for s in full["words_chain"]][
        : next(i for i, g in enumerate(gains) if g <= cut)]
    assert "more than" in short["words_stop"]


def test_search_tokens_are_real_vocabulary_ids_and_their_cosine_is_the_towers(tiny_pipe, image):
    res = tiny_pipe.generate(image, mode="words", words="search", words_tokens=4, words_steps=12, steps=1, seed=3)
    search = res.provenance.notes["words_search"]
    tower, target = tiny_pipe.clip_text_tower(), _target(tiny_pipe, image)
    ids = search["token_ids"]
    assert len(ids) == 4 and len(search["cosines"]) == 12
    vocab = tower.model.get_input_embeddings().weight.shape[0]
    assert all(0 <= i < vocab for i in ids) and not set(ids) & special_token_ids(tower.tokenizer)
    tok = tower.tokenizer
    with torch.inference_mode():
        by_hand = tower.model(input_ids=torch.tensor([[tok.bos_token_id, *ids, tok.eos_token_id]])).text_embeds[0]
    best = max(search["cosines"])
    assert search["cosines"][search["best_step"]] == best
    assert float(torch.nn.functional.cosine_similarity(by_hand, target, dim=0)) == pytest.approx(best, abs=1e-4)
    assert res.provenance.notes["words"] == tok.decode(ids, skip_special_tokens=True).strip()


@pytest.mark.parametrize("route", ["chain", "search"])
def test_words_runs_are_deterministic_and_regenerate_from_their_png(tiny_pipe, image, tmp_path, route):
    settings = {"mode": "words", "words": route, "words_steps": 8, "steps": 2, "seed": 5}
    first = tiny_pipe.generate(image, **settings)
    again = tiny_pipe.generate(image, **settings)
    assert first.provenance.notes == again.provenance.notes
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    (path,) = first.save(tmp_path)
    recipe = recipe_from_png(path)
    assert recipe["words"] == first.provenance.notes["words"]
    redone = tiny_pipe.generate(image, GenerationSettings.from_kwargs(**recipe["settings"]))
    assert redone.provenance.notes["words"] == recipe["words"]
    assert np.array_equal(np.asarray(redone.images[0]), np.asarray(first.images[0]))


def test_another_seed_starts_the_search_elsewhere(tiny_pipe, image):
    runs = [tiny_pipe.generate(image, mode="words", words="search", words_steps=1, steps=1, seed=seed)
            for seed in (0, 1)]
    ids = [run.provenance.notes["words_search"]["token_ids"] for run in runs]
    assert ids[0] != ids[1]


def test_a_model_without_clips_text_tower_says_so_in_a_sentence(image):
    pipe = ImagePromptPipeline.from_preset("tiny-ip-adapter")
    with pytest.raises(TextTowerUnavailable, match="text tower") as caught:
        pipe.nearest_words(image, k=3)
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)
    assert "words" not in pipe.methods()  # its encoder (not SD's width) is no CLIP whose text tower SD reads
    with pytest.raises(ValueError):
        pipe.generate(image, mode="words", steps=1)


def test_words_settings_are_checked_and_read_by_the_method():
    with pytest.raises(SettingsError, match="words="):
        GenerationSettings(words="beam")
    with pytest.raises(SettingsError, match="words_tokens"):
        GenerationSettings(words_tokens=0)
    assert {"words", "words_tokens", "words_steps", "words_min_gain", "prompt"} <= set(METHODS["words"].reads)


def test_the_cli_takes_the_words_route():
    from imageprompt_widgets.cli import build_parser

    args = build_parser().parse_args(["generate", "x.png", "-o", "out", "--mode", "words", "--words", "search",
                                      "--words-tokens", "4"])
    assert (args.mode, args.words, args.words_tokens) == ("words", "search", 4)


def test_the_inspector_shows_the_chains_steps(tiny_pipe, image):
    from imageprompt_widgets.widget.inspector import InspectorTab

    res = tiny_pipe.generate(image, mode="words", steps=1, seed=0)
    tab = InspectorTab()
    tab.show(res, tiny_pipe, inputs=[image])
    tab.sections.selected_index = tab.shown_sections.index("Words")  # a section draws when it is opened
    assert "Words" not in tab.errors
    first = res.provenance.notes["words_chain"][0]["phrase"]
    assert "The chain added" in tab.words.text.value and first in tab.words.text.value
    tab.words.find_nearest()  # inline controller: runs now
    best = tiny_pipe.nearest_words(res.trace.image_embeds[:1], k=1)[0][0]
    assert "nearest phrases" in tab.words.text.value and best in tab.words.text.value


def _script():
    spec = importlib.util.spec_from_file_location("write_phrase_tables", ROOT / "scripts" / "write_phrase_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_tables_are_what_the_script_writes():
    script = _script()
    for name, lines in (("general", script.general_table()), ("toy", script.toy_table())):
        assert (TABLE_FOLDER / f"{name}.txt").read_text(encoding="utf-8") == "\n".join(lines) + "\n"
    assert 2000 <= len(load_table("general").phrases) <= 5000


def test_the_toy_table_is_the_worlds_own_words():
    from imageprompt_widgets.toy.world import ALL_COMBINATIONS, caption

    toy = load_table("toy")
    assert toy.joiner == " "
    assert {caption(c, s, b) for s, c, b in ALL_COMBINATIONS} <= set(toy.phrases)
    words = {w for phrase in toy.phrases for w in phrase.split()}
    from imageprompt_widgets.toy.world import COLOURS, SHAPES

    assert words == {*COLOURS, *SHAPES, "a", "on", "background"}


@pytest.mark.slow
def test_toy_chain_recovers_the_caption_and_drawing_keeps_the_colour():
    """docs/toy_world.md "Words": on 48 pictures 83 % word for word, 90 % colour kept; here 12 pictures."""
    from imageprompt_widgets.toy.measure_words import chain_run, search_ratio
    from imageprompt_widgets.toy.world import held_out_scenes

    pipe = ImagePromptPipeline.from_preset("toy")
    tally = chain_run(pipe, held_out_scenes(12))
    assert tally.rate("exact") >= 0.75  # the floor on 48 is 80 %; 12 pictures allow one more miss
    assert tally.rate("drawn_colour") >= 0.75
    pairs = search_ratio(pipe, held_out_scenes(2), steps=GenerationSettings().words_steps)
    assert all(short >= 0.9 * long for short, long in pairs)
