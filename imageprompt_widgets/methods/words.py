"""``words``: a picture turned into words SD can read, through CLIP's own text tower and projection.

For SD 1.x, SD's text encoder *is* CLIP ViT-L/14's text tower, so an image embedding and the projected embedding
of any candidate prompt live in one space: the words nearest the picture there are words SD reads. Three uses:

- :meth:`WordSpace.nearest`: the phrases of a shipped table (``phrases/*.txt``: subjects, colours, media, styles,
  lighting, ...; the toy world's own words for the toy CLIP) nearest an image embedding, with cosines;
- :meth:`WordSpace.chain` (``words="chain"``): CLIP Interrogator's greedy chain. From a start text (the prompt
  typed, or the caption route's caption), add the phrase that most raises the cosine; stop when none raises it by
  more than ``words_min_gain``, or when the next would pass the tokenizer's 77 tokens;
- :meth:`WordSpace.search` (``words="search"``): PEZ ("Hard Prompts Made Easy", 2023), N free token embeddings
  optimised against the image embedding, projected to the nearest real vocabulary token at every step
  (straight-through), seeded.

SD then draws from the words found (its own text encoder on them); ``res.provenance.notes["words"]`` keeps them,
with the chain's steps or the search's cosines beside them. The table's text embeddings are computed once per
model and kept on disk under the package's cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..conditioning import Conditioning
from ..faults import TextTowerUnavailable
from ..presets import TOY_CLIP_FOLDER
from ..settings import SettingsError
from .inputs import ConditioningInputs, negative_text, refuse_image_settings, text_pooled

#: The shipped phrase tables (``scripts/write_phrase_tables.py`` writes them).
TABLE_FOLDER = Path(__file__).resolve().parent / "phrases"
#: How many of the table's nearest phrases the chain considers at each step (CLIP Interrogator pre-selects too).
CHAIN_POOL = 64
#: PEZ's learning rate and weight decay (the paper's defaults).
SEARCH_LEARNING_RATE = 0.1
SEARCH_WEIGHT_DECAY = 0.1
#: Texts embedded per batch (the table's embedding, the chain's candidates).
EMBED_BATCH = 256
#: Bump when the way embeddings are computed changes, so stale caches are recomputed rather than reused.
EMBEDDINGS_VERSION = "1"


@dataclass(frozen=True)
class PhraseTable:
    """A shipped list of phrases and how the chain joins them (``", "``, or a space for the toy world's captions)."""

    name: str
    phrases: tuple[str, ...]
    joiner: str = ", "

    def join(self, text: str, phrase: str) -> str:
        return f"{text}{self.joiner}{phrase}" if text else phrase


@cache
def load_table(name: str) -> PhraseTable:
    """``phrases/{name}.txt``: one phrase a line; ``# ...`` lines are section titles, ``# joiner: space`` sets the
    joiner."""
    path = TABLE_FOLDER / f"{name}.txt"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TABLE_FOLDER.glob("*.txt")))
        raise SettingsError(f"There is no phrase table {name!r}: the package ships {known}.")
    phrases, joiner = [], ", "
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line == "# joiner: space":
            joiner = " "
        elif line and not line.startswith("#"):
            phrases.append(line)
    return PhraseTable(name, tuple(dict.fromkeys(phrases)), joiner)


def table_name_for(clip_model: str) -> str:
    """The table for a CLIP checkpoint: the toy world's words for the toy CLIP, the general table otherwise."""
    try:
        if Path(clip_model).resolve() == TOY_CLIP_FOLDER.resolve():
            return "toy"
    except (OSError, ValueError):
        pass
    return "general"


@dataclass
class ChainStep:
    """One phrase the chain added: the cosine after adding it, and how much it raised the cosine."""

    phrase: str
    cosine: float
    gain: float


@dataclass
class Chain:
    """What the chain found: the start, each step, the final text and why it stopped."""

    start: str
    start_cosine: float
    steps: list[ChainStep]
    text: str
    cosine: float
    stop: str

    def notes(self) -> dict[str, Any]:
        return {"words": self.text, "words_route": "chain", "words_cosine": round(self.cosine, 6),
                "words_start": self.start, "words_start_cosine": round(self.start_cosine, 6),
                "words_chain": [{k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(step).items()}
                                for step in self.steps],
                "words_stop": self.stop}


@dataclass
class Search:
    """What the hard-prompt search found: its tokens (real vocabulary ids), their text, the cosine of the
    projected tokens at every step, and the cosine of the text as the tokenizer reads it back."""

    token_ids: list[int]
    text: str
    cosines: list[float]
    best_step: int
    cosine: float
    seed: int = 0
    steps: int = field(default=0)

    def notes(self) -> dict[str, Any]:
        return {"words": self.text, "words_route": "search", "words_cosine": round(self.cosine, 6),
                "words_search": {"token_ids": self.token_ids, "best_step": self.best_step,
                                 "cosines": [round(c, 6) for c in self.cosines]}}


class WordSpace:
    """CLIP's text tower with projection, a phrase table and the table's (normalised) text embeddings."""

    def __init__(self, tower: Any, table: PhraseTable, embeddings: torch.Tensor) -> None:
        self.tower = tower  # encoding.ClipTextTower
        self.table = table
        self.embeddings = embeddings  # [P, D], unit length, float32 on the CPU

    @property
    def max_tokens(self) -> int:
        return int(self.tower.tokenizer.model_max_length)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), D]`` unit-length projected text embeddings (float32, CPU)."""
        return embed_texts(self.tower, texts)

    def target(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The unit direction the words are scored against: the mean of the images' unit embeddings."""
        image_embeds = image_embeds.detach().float().cpu().reshape(-1, image_embeds.shape[-1])
        if image_embeds.shape[-1] != self.embeddings.shape[-1]:
            raise TextTowerUnavailable(
                f"The image embedding has {image_embeds.shape[-1]} dims but {self.tower.source} projects to "
                f"{self.embeddings.shape[-1]}, so the picture cannot be compared with words."
            )
        return torch.nn.functional.normalize(torch.nn.functional.normalize(image_embeds, dim=-1).mean(0), dim=0)

    def nearest(self, image_embeds: torch.Tensor, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` phrases of the table nearest the image, best first, with their cosines."""
        if k < 1:
            raise SettingsError(f"k={k} must be at least 1.")
        cosines = self.embeddings @ self.target(image_embeds)
        values, indices = cosines.topk(min(k, len(self.table.phrases)))
        return [(self.table.phrases[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]

    def token_count(self, text: str) -> int:
        """Tokens of ``text`` with its start and end tokens, counted up to one past the limit (a longer text is
        not tokenized in full, and the tokenizer does not warn about it)."""
        limit = self.max_tokens + 1
        return len(self.tower.tokenizer(text, truncation=True, max_length=limit)["input_ids"])

    def chain(self, image_embeds: torch.Tensor, start: str = "", min_gain: float = 0.0,
              pool: int = CHAIN_POOL) -> Chain:
        """Greedy: add the phrase (of the ``pool`` nearest) that most raises the cosine, while it raises it by more
        than ``min_gain`` and the text fits the tokenizer's length."""
        target = self.target(image_embeds)
        start = start.strip()
        candidates = [p for p, _ in self.nearest(image_embeds, pool) if p not in start]
        text, cosine = start, float(self.embed([start])[0] @ target)
        start_cosine, steps, stop = cosine, [], "the table has no phrase left"
        while candidates:
            texts = [self.table.join(text, p) for p in candidates]
            fits = [i for i, t in enumerate(texts) if self.token_count(t) <= self.max_tokens]
            if not fits:
                stop = f"every next phrase would pass {self.max_tokens} tokens"
                break
            scores = self.embed([texts[i] for i in fits]) @ target
            best = int(scores.argmax())
            gain = float(scores[best]) - cosine
            if gain <= min_gain:
                stop = (f"no phrase raises the cosine by more than {min_gain:g}" if min_gain > 0
                        else "no phrase raises the cosine")
                break
            chosen = fits[best]
            text, cosine = texts[chosen], float(scores[best])
            steps.append(ChainStep(candidates[chosen], cosine, gain))
            del candidates[chosen]
        return Chain(start, start_cosine, steps, text, cosine, stop)

    def search(self, image_embeds: torch.Tensor, tokens: int = 8, steps: int = 100, seed: int = 0) -> Search:
        """PEZ: ``tokens`` free embeddings, each step projected to their nearest real tokens (cosine), the projected
        prompt's cosine with the image back-propagated to the free ones (straight-through); the best projected
        prompt over all steps is kept."""
        return hard_prompt_search(self.tower.model, self.tower.tokenizer, self.target(image_embeds),
                                  tokens=tokens, steps=steps, seed=seed)


def embed_texts(tower: Any, texts: Sequence[str]) -> torch.Tensor:
    """Projected text embeddings, unit length. Padded to the batch's longest text: CLIP's causal attention and
    end-token pooling make that exactly what padding to 77 gives, at a fraction of the work."""
    model, tokenizer = tower.model, tower.tokenizer
    out = []
    with torch.inference_mode():
        for begin in range(0, len(texts), EMBED_BATCH):
            batch = tokenizer(list(texts[begin:begin + EMBED_BATCH]), padding="longest", truncation=True,
                              max_length=tokenizer.model_max_length, return_tensors="pt")
            embeds = model(input_ids=batch["input_ids"].to(model.device)).text_embeds
            out.append(torch.nn.functional.normalize(embeds.float().cpu(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, model.config.projection_dim)


def special_token_ids(tokenizer: Any) -> set[int]:
    return {int(i) for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             tokenizer.unk_token_id) if i is not None}


def hard_prompt_search(model: Any, tokenizer: Any, target: torch.Tensor, *, tokens: int = 8, steps: int = 100,
                       seed: int = 0) -> Search:
    """PEZ on a ``CLIPTextModelWithProjection`` towards the unit vector ``target`` ``[D]``: the best tokens found
    (:func:`search_tokens`), their text, and that text's cosine as the tokenizer reads it back."""
    ids, cosines, best_step = search_tokens(
        model, target, tokens=tokens, steps=steps, seed=seed, special_ids=special_token_ids(tokenizer),
        bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
    )
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    with torch.inference_mode():
        read_back = tokenizer([text], return_tensors="pt", truncation=True)["input_ids"].to(model.device)
        text_cosine = float(torch.nn.functional.cosine_similarity(
            model(input_ids=read_back).text_embeds[0].float(), target.to(model.device).float(), dim=0))
    return Search(ids, text, cosines, best_step, text_cosine, seed=seed, steps=steps)


def search_tokens(model: Any, target: torch.Tensor, *, tokens: int, steps: int, seed: int, special_ids: set[int],
                  bos_id: int, eos_id: int) -> tuple[list[int], list[float], int]:
    """PEZ's loop: ``tokens`` free embeddings (seeded from random real tokens), each step projected to their
    nearest real tokens (cosine, special tokens left out); the text tower runs on the real ids
    ``[bos, t_1..t_N, eos]`` while a forward hook swaps their token embeddings for a leaf tensor with the same
    values, whose gradient (of the cosine with ``target``) steps the free embeddings (AdamW, straight-through).
    Returns the best step's ids, every step's cosine and the best step."""
    if tokens < 1 or steps < 1:
        raise SettingsError(f"The search needs at least one token and one step, not tokens={tokens}, steps={steps}.")
    with torch.inference_mode(False), torch.enable_grad():  # a run may sit inside inference mode
        return _search(model, target.clone(), tokens, steps, seed, special_ids, bos_id, eos_id)


def _search(model: Any, target: torch.Tensor, tokens: int, steps: int, seed: int, special_ids: set[int],
            bos_id: int, eos_id: int) -> tuple[list[int], list[float], int]:
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    vocab = embedding.weight.detach().float()
    allowed = torch.tensor([i for i in range(vocab.shape[0]) if i not in special_ids], device=device)
    allowed_unit = torch.nn.functional.normalize(vocab[allowed], dim=-1)
    generator = torch.Generator().manual_seed(seed)
    start = allowed[torch.randint(len(allowed), (tokens,), generator=generator).to(device)]
    free = vocab[start].clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([free], lr=SEARCH_LEARNING_RATE, weight_decay=SEARCH_WEIGHT_DECAY)
    bos = torch.tensor([bos_id], device=device)
    eos = torch.tensor([eos_id], device=device)
    target = target.to(device, torch.float32)
    swapped: dict[str, torch.Tensor] = {}

    def swap(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        leaf = swapped["leaf"].to(output.dtype)
        return torch.cat([output[:, :1], leaf[None], output[:, 1 + tokens:]], dim=1)

    cosines: list[float] = []
    best_ids: list[int] = start.tolist()
    best_cosine, best_step = -2.0, 0
    handle = embedding.register_forward_hook(swap)
    try:
        for step in range(steps):
            with torch.no_grad():
                ids = allowed[(torch.nn.functional.normalize(free, dim=-1) @ allowed_unit.T).argmax(-1)]
            leaf = vocab[ids].clone().requires_grad_(True)
            swapped["leaf"] = leaf
            feature = model(input_ids=torch.cat([bos, ids, eos])[None]).text_embeds[0].float()
            cosine = torch.nn.functional.cosine_similarity(feature, target, dim=0)
            (grad,) = torch.autograd.grad(-cosine, [leaf])
            value = float(cosine.detach())
            cosines.append(value)
            if value > best_cosine:
                best_cosine, best_ids, best_step = value, ids.tolist(), step
            free.grad = grad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        handle.remove()
    return best_ids, cosines, best_step


# -- the table's embeddings, once per model, on disk ------------------------------------------------


def tower_fingerprint(tower: Any) -> str:
    """What makes one text tower's embeddings differ from another's: its config, projection, final norm and the
    first rows of its token embedding (cheap to hash, and different for any two trained towers)."""
    model = tower.model
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    text_model = model.text_model
    for tensor in (model.text_projection.weight, text_model.final_layer_norm.weight,
                   text_model.embeddings.token_embedding.weight[:256]):
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def word_space(tower: Any, table_name: str) -> WordSpace:
    """The tower's :class:`WordSpace` over table ``table_name``; the table's embeddings come from the disk cache
    (``cache_dir()/words``) when this tower embedded this table before."""
    from safetensors.torch import load_file, save_file

    from ..loading.offline import cache_dir

    table = load_table(table_name)
    key = hashlib.sha256("\n".join((EMBEDDINGS_VERSION, tower_fingerprint(tower), table.joiner, *table.phrases))
                         .encode()).hexdigest()[:24]
    path = cache_dir() / "words" / f"{table.name}-{key}.safetensors"
    embeddings = None
    if path.is_file():
        try:
            embeddings = load_file(str(path))["embeddings"]
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed, not an error
            embeddings = None
        if embeddings is not None and embeddings.shape[0] != len(table.phrases):
            embeddings = None
    if embeddings is None:
        embeddings = embed_texts(tower, table.phrases)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"embeddings": embeddings.contiguous()}, str(partial))
        os.replace(partial, path)
    return WordSpace(tower, table, embeddings)


# -- the method ----------------------------------------------------------------------------------


def build(inputs: ConditioningInputs) -> Conditioning:
    """``words``: the chain's or the search's words, through SD's own text encoder."""
    settings = inputs.settings
    refuse_image_settings(inputs)
    if inputs.words is None:
        raise TextTowerUnavailable(
            f"The {inputs.preset_name!r} model offers no CLIP text tower here, so the picture cannot be put in words."
        )
    space = inputs.words()
    if settings.words == "chain":
        start = settings.prompt.strip()
        captioner = inputs.parts.get("captioner")
        if not start and captioner is not None and inputs.images:
            start = captioner.caption(inputs.images[0])
        found: Chain | Search = space.chain(inputs.embedding.image_embeds, start, min_gain=settings.words_min_gain)
    else:
        found = space.search(inputs.embedding.image_embeds, tokens=settings.words_tokens,
                             steps=settings.words_steps, seed=settings.seed)
    prompt = inputs.text.encode(found.text)
    negative = negative_text(inputs) if settings.negative == "empty_prompt" else lambda: torch.zeros_like(prompt)
    pooled, negative_pooled = text_pooled(inputs, found.text)  # SDXL's pooled slot (None on SD 1.x)
    return Conditioning(prompt, negative=negative, notes=found.notes(),
                        pooled=pooled, negative_pooled=negative_pooled)
