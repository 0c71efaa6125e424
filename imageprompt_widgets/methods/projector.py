"""``projector``: a small trained network from the vision tower's tokens into SD's text-token space ("Redux for SD 1.x").

FLUX Redux turns SigLIP's image tokens into T5-token space with two linear layers and appends them to the
prompt's tokens; the guide's idea (image tokens as the prompt), trained. Here: the vision tower's last hidden
state ``[T, Dv]`` (every token, CLS first), a LayerNorm, ``Linear(Dv, H)``, SiLU, ``Linear(H, D)``, each token on
its own, appended to the prompt's 77 tokens (``""`` when no prompt is typed). Trained with the frozen UNet's
diffusion loss (:func:`train`, ``imageprompt train-projector``); saved as ``projector.safetensors`` plus
``projector.json`` (its sizes). The negative is the prompt's negative alone: no projector tokens (the engine
pads the shorter sequence with masked tokens, which cross-attention ignores exactly).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..conditioning import Conditioning
from ..settings import SettingsError
from .inputs import ConditioningInputs, negative_text

WEIGHT_NAME, CONFIG_NAME = "projector.safetensors", "projector.json"
#: Which of the vision tower's outputs the projector reads (ImageEmbedding.hidden_states).
SOURCE = "last_hidden_state"


class Projector(nn.Module):
    """Vision tokens ``[..., T, Dv]`` → text-space tokens ``[..., T, D]``: LayerNorm, Linear, SiLU, Linear."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.config = {"input_dim": int(input_dim), "hidden_dim": int(hidden_dim), "output_dim": int(output_dim),
                       "source": SOURCE}
        self.norm = nn.LayerNorm(input_dim)
        self.up = nn.Linear(input_dim, hidden_dim)
        self.down = nn.Linear(hidden_dim, output_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.up(self.norm(tokens))))

    def save(self, folder: str | Path) -> Path:
        """Write ``projector.safetensors`` and ``projector.json`` into ``folder`` (made if missing)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        save_file(state, str(folder / WEIGHT_NAME))
        (folder / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> Projector:
        """A projector saved by :meth:`save` (a folder, or its ``projector.safetensors``)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if folder.is_file():
            folder = folder.parent
        config_path, weight_path = folder / CONFIG_NAME, folder / WEIGHT_NAME
        if not config_path.is_file() or not weight_path.is_file():
            raise FileNotFoundError(f"No projector in {str(folder)!r}: it needs {CONFIG_NAME} and {WEIGHT_NAME} "
                                    "(written by imageprompt train-projector).")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        projector = cls(config["input_dim"], config["hidden_dim"], config["output_dim"])
        projector.load_state_dict(load_file(str(weight_path)))
        return projector.to(device, dtype).eval()


def load_parts(*, image_encoder: Any, sd: Any, local: Any, device: Any = "cpu",
               dtype: torch.dtype = torch.float32, say: Callable[[str], None] = lambda m: None,
               **_: Any) -> dict[str, Any]:
    """The preset's projector (``local.projector``, a folder), checked against the image encoder and the UNet."""
    projector = local.projector
    if not projector:
        return {}
    say(f"Loading the projector {projector!r}…")
    loaded = Projector.load(projector, device, dtype)
    check_fits(loaded, image_encoder.config.hidden_size, sd.unet.config.cross_attention_dim, projector)
    return {"projector": loaded}


def check_fits(projector: Projector, vision_width: int, cross_attention_dim: int, name: str = "projector") -> None:
    config = projector.config
    if config["input_dim"] != vision_width or config["output_dim"] != cross_attention_dim:
        raise SettingsError(
            f"The projector {name!r} maps {config['input_dim']}-d vision tokens to {config['output_dim']}-d ones, but "
            f"this model's vision tower gives {vision_width}-d tokens and its UNet reads {cross_attention_dim}-d "
            "ones: train one for this model (imageprompt train-projector)."
        )


def projected_tokens(projector: Projector, hidden_states: torch.Tensor, weights: Sequence[float] = ()) -> torch.Tensor:
    """``[N, T, Dv]`` vision tokens of N pictures → one ``[1, N*T, D]`` sequence (each picture's tokens in turn,
    scaled by its weight when weights are given)."""
    with torch.inference_mode():
        tokens = projector(hidden_states.to(next(projector.parameters()).dtype))
    if weights:
        tokens = tokens * torch.tensor(list(weights), dtype=tokens.dtype, device=tokens.device)[:, None, None]
    return tokens.reshape(1, -1, tokens.shape[-1])


def build(inputs: ConditioningInputs) -> Conditioning:
    """``projector``: the prompt's 77 tokens (``""`` unless typed) followed by the projector's tokens of every
    picture, times ``scale``; the negative is the prompt's negative (or zeros) alone."""
    settings = inputs.settings
    projector = inputs.parts.get("projector")
    if projector is None:
        raise SettingsError(f"The {inputs.preset_name!r} preset has no projector: load one with "
                            "projector='folder' (imageprompt train-projector writes one), or use the 'toy' preset.")
    if settings.negative == "image":
        raise SettingsError("mode='projector' guides from text: use negative='empty_prompt' or 'zeros'.")
    hidden = inputs.embedding.hidden_states
    if hidden is None:
        raise SettingsError("mode='projector' needs the pictures' vision tokens; this embedding has only "
                            "image_embeds.")
    text = inputs.text.encode(settings.prompt) if settings.prompt.strip() else inputs.text.empty()
    tokens = settings.scale * projected_tokens(projector, hidden, settings.weights)
    prompt = torch.cat([text, tokens.to(text.device, text.dtype)], dim=1)
    negative = negative_text(inputs) if settings.negative == "empty_prompt" else lambda: torch.zeros_like(text)
    return Conditioning(prompt, negative=negative, notes={"projector_tokens": tokens.shape[1]})


# ---------------------------------------------------------------------------------------------
# Training (imageprompt train-projector; the toy world's stage is toy/train.py's train_projector)


def training_loss(projector: Projector, unet: Any, scheduler: Any, latents: torch.Tensor, hidden: torch.Tensor,
                  text: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The frozen UNet's diffusion loss with the projector's tokens appended to ``text`` (``[B, 77, D]``), for the
    scheduler's own objective (ε or v)."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    steps = steps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, steps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, steps)
    else:
        target = noise
    condition = torch.cat([text, projector(hidden).to(text.dtype)], dim=1)
    prediction = unet(noisy, steps, encoder_hidden_states=condition).sample
    return nn.functional.mse_loss(prediction.float(), target.float())


def image_files(folder: str | Path) -> list[Path]:
    """The pictures in ``folder`` (sorted), each with an optional caption in a ``.txt`` file of the same name."""
    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in suffixes)
    if not files:
        raise SettingsError(f"No pictures in {str(folder)!r} (png, jpg, webp or bmp).")
    return files


def caption_for(path: Path) -> str:
    caption = path.with_suffix(".txt")
    return caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""


def train(pipe: Any, folder: str | Path, out: str | Path, *, steps: int = 1000, batch: int = 4, lr: float = 1e-4,
          hidden_dim: int | None = None, seed: int = 0, log: Callable[[str], None] = print) -> Projector:
    """Train a projector for a loaded :class:`~imageprompt_widgets.ImagePromptPipeline` on the pictures in
    ``folder`` (captions optional: ``name.txt`` beside ``name.png``; without one the text side is ``""``) and save
    it to ``out``. Only the projector learns; SD's VAE, text encoder and UNet and the vision tower stay frozen."""
    from PIL import Image

    from ..encoding import encode_images

    sd, device = pipe.sd, pipe.device
    files = image_files(folder)
    vision = pipe.image_encoder.config.hidden_size
    width = sd.unet.config.cross_attention_dim
    torch.manual_seed(seed)
    projector = Projector(vision, hidden_dim or 4 * width, width).to(device)
    projector.train()
    sd.unet.requires_grad_(False)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    size = (sd.unet.config.sample_size * sd.vae_scale_factor,) * 2
    dtype = sd.unet.dtype

    def batches() -> Iterator[list[Path]]:
        while True:
            order = torch.randperm(len(files), generator=generator).tolist()
            for start in range(0, len(order), batch):
                yield [files[i] for i in order[start:start + batch]]

    stream = batches()
    for step in range(steps):
        paths = next(stream)
        pictures = [Image.open(path).convert("RGB") for path in paths]
        embedding = encode_images(pictures, pipe.image_encoder, pipe.image_processor)
        with torch.no_grad():
            pixels = sd.image_processor.preprocess([p.resize(size) for p in pictures]).to(device, sd.vae.dtype)
            latents = sd.vae.encode(pixels).latent_dist.sample(generator=None) * sd.vae.config.scaling_factor
            text = torch.cat([pipe.encode_text(caption_for(path)) for path in paths]).to(device, dtype)
        loss = training_loss(projector, sd.unet, sd.scheduler, latents.to(dtype), embedding.hidden_states.clone(),
                             text, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log(f"projector step {step}: loss {loss.item():.4f}")
    projector.eval()
    projector.save(out)
    return projector
