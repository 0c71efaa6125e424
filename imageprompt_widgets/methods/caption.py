"""The caption route: BLIP describes the image, the user may edit the words, SD draws from the text.

The guide's "BLIP caption + SD text encoder" path: the image reaches SD only as words, so it lands
exactly in the space SD was trained on, at the price of everything words cannot say. BLIP is part
of transformers, so this route needs no extra dependency; its weights (about 1 GB for
``Salesforce/blip-image-captioning-base``) download on first use of the ``caption`` preset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..conditioning import Conditioning
from ..loading.cache import translate_load_errors
from ..loading.quiet import quiet_loaders
from ..presets import Preset
from ..settings import SettingsError
from .inputs import ConditioningInputs, negative_text, refuse_image_settings, text_pooled

#: The longest caption BLIP may write, in tokens.
MAX_CAPTION_TOKENS = 30


@dataclass
class Captioner:
    """A BLIP captioning model and its processor; ``caption(image)`` is greedy, so deterministic."""

    model: Any  # transformers.BlipForConditionalGeneration
    processor: Any  # transformers.BlipProcessor
    max_new_tokens: int = MAX_CAPTION_TOKENS

    def caption(self, image: Any) -> str:
        with torch.inference_mode():
            inputs = self.processor(images=image, return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self.model.device, self.model.dtype)
            tokens = self.model.generate(
                pixel_values=pixel_values, max_new_tokens=self.max_new_tokens, do_sample=False
            )
        return self.processor.decode(tokens[0], skip_special_tokens=True).strip()


@dataclass
class ZeroShotCaptioner:
    """A CLIP choosing, zero-shot, the caption of a fixed list that fits an image best (the toy world's route:
    its CLIP knows the world's 90 captions; it writes nothing new, it picks)."""

    model: Any  # transformers.CLIPModel
    processor: Any  # transformers.CLIPImageProcessor
    tokenizer: Any
    captions: tuple[str, ...]
    _text: torch.Tensor | None = None

    def text_embeddings(self) -> torch.Tensor:
        if self._text is None:
            ids = self.tokenizer(list(self.captions), padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
            with torch.inference_mode():
                out = self.model.get_text_features(input_ids=ids.to(self.model.device))
            self._text = torch.nn.functional.normalize(_pooled(out).float(), dim=-1)
        return self._text

    def scores(self, image: Any) -> torch.Tensor:
        """Cosine similarity of the image with every caption, ``[len(captions)]``."""
        with torch.inference_mode():
            pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
            out = self.model.get_image_features(pixel_values=pixels.to(self.model.device, self.model.dtype))
            image_embeds = torch.nn.functional.normalize(_pooled(out).float(), dim=-1)
        return (image_embeds @ self.text_embeddings().T)[0]

    def caption(self, image: Any) -> str:
        return self.captions[int(self.scores(image).argmax())]


def _pooled(out: Any) -> torch.Tensor:
    """``get_*_features`` gives a tensor (older transformers) or an output whose pooler_output is the projection."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


#: The candidate captions beside a CLIP folder that makes it a zero-shot captioner (one caption a line).
CAPTIONS_FILE = "captions.txt"


def is_zero_shot_folder(path: str) -> bool:
    """Whether ``path`` is a local CLIPModel folder with a list of captions (the toy world's: all 90 of its
    captions, held-out combinations included), rather than a BLIP."""
    import os

    return os.path.isfile(os.path.join(path, CAPTIONS_FILE)) and os.path.isfile(os.path.join(path, "config.json"))


def read_captions(path: str) -> tuple[str, ...]:
    import os

    with open(os.path.join(path, CAPTIONS_FILE), encoding="utf-8") as handle:
        return tuple(line.strip() for line in handle if line.strip())


def load_zero_shot_captioner(path: str, device: Any, dtype: torch.dtype,
                             captions: tuple[str, ...] | None = None) -> ZeroShotCaptioner:
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    with quiet_loaders():
        model = CLIPModel.from_pretrained(path, dtype=dtype, use_safetensors=True)
        processor = CLIPImageProcessor.from_pretrained(path)
        tokenizer = CLIPTokenizer.from_pretrained(path)
    model.to(device)
    model.eval()
    return ZeroShotCaptioner(model, processor, tokenizer, captions or read_captions(path))


def load_parts(
    *, preset: Preset, local: Preset, device: Any, dtype: torch.dtype, allow_pickle: bool,
    say: Callable[[str], None], **_: Any,
) -> dict[str, Any]:
    """Load the preset's BLIP (``local.captioner`` is its folder, or the Hub id), or for a CLIP folder (the toy
    world's) the zero-shot captioner over the world's captions."""
    if is_zero_shot_folder(str(local.captioner)):
        say(f"Loading the CLIP {preset.captioner!r} as a zero-shot captioner…")
        return {"captioner": load_zero_shot_captioner(str(local.captioner), device, dtype)}
    return {"captioner": load_captioner(str(preset.captioner), str(local.captioner), device, dtype,
                                        allow_pickle=allow_pickle, say=say)}


def load_captioner(
    name: str, path: str, device: Any, dtype: torch.dtype, *, allow_pickle: bool = False,
    say: Callable[[str], None] = lambda message: None,
) -> Captioner:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    say(f"Loading the captioner {name!r}…")
    with translate_load_errors(name, allow_pickle), quiet_loaders():
        model = BlipForConditionalGeneration.from_pretrained(
            path, dtype=dtype, use_safetensors=None if allow_pickle else True
        )
        processor = BlipProcessor.from_pretrained(path)
    model.to(device)
    model.eval()
    # The tiny twin's random words would run to the limit; a short caption keeps tests fast.
    return Captioner(model, processor, max_new_tokens=8 if name == "tiny" else MAX_CAPTION_TOKENS)


def build(inputs: ConditioningInputs) -> Conditioning:
    """``caption``: SD's text encoder on ``settings.prompt`` (the edited caption) or, when empty, BLIP's caption."""
    settings = inputs.settings
    refuse_image_settings(inputs)
    text = settings.prompt.strip()
    if not text:
        captioner = inputs.parts.get("captioner")
        if captioner is None:
            raise SettingsError(
                f"The {inputs.preset_name!r} preset has no captioner: use the 'caption' or 'tiny-caption' preset, "
                "or type the words in prompt."
            )
        text = captioner.caption(inputs.images[0])
    prompt = inputs.text.encode(text)
    negative = negative_text(inputs) if settings.negative == "empty_prompt" else lambda: torch.zeros_like(prompt)
    pooled, negative_pooled = text_pooled(inputs, text)  # SDXL's pooled slot (None on SD 1.x)
    return Conditioning(prompt, negative=negative, notes={"caption": text},
                        pooled=pooled, negative_pooled=negative_pooled)
