"""Training the toy world's models: a CLIP, a VAE, a text-to-image UNet (and an IP-Adapter), on two CPU cores.

The same classes as the real system, only small: transformers' ``CLIPModel`` (vision tower, text
tower, projections), diffusers' ``AutoencoderKL`` (8× downsampling, like SD's) and
``UNet2DConditionModel`` reading the CLIP text tower's *un-projected* last hidden state, as SD 1.x
reads ViT-L/14's. Each stage is seeded and runs in one thread, so the shipped weights are what
``scripts/train_toy.py`` writes (bit for bit with the same torch on the same kind of CPU).

The code lives in the package rather than the script so that a quick test can run every stage for
a few steps with today's libraries: training code nobody runs rots silently.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import world

#: Words of the toy tokenizer's vocabulary (each one token); any other text falls back to single bytes.
WORDS = ("a", "on", "background", *world.SHAPES, *world.COLOURS)
#: Width of the text tower = projection = the UNet's cross-attention (like 768 for ViT-L/14 and SD 1.x).
WIDTH = 64
#: CLIP's normalisation (the CLIPImageProcessor defaults), applied to the world's 64 px pictures.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "num_attention_heads": 4, "num_hidden_layers": 4,
    "max_position_embeddings": 77, "projection_dim": WIDTH,
}
VISION_CONFIG: dict[str, Any] = {
    "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH, "num_attention_heads": 4, "num_hidden_layers": 4,
    "image_size": world.IMAGE_SIZE, "patch_size": 8, "projection_dim": WIDTH,
}
#: The VAE's downsampling of the 64 px pictures: 8 is SD's own factor and the shipped world's 8 × 8 latent (its
#: UNet's attention maps are flat); 4 gives a 16 × 16 latent, whose UNet's maps show where the shape is but which
#: draws the named shape less often (docs/toy_world.md, "Do the attention maps show where?").
LATENT_FACTORS = (4, 8)


def vae_config(latent_factor: int) -> dict[str, Any]:
    """The toy ``AutoencoderKL``: one encoder block per halving (SD's has four, for its factor 8)."""
    blocks = {8: (16, 16, 32, 32), 4: (16, 32, 32)}[_checked(latent_factor)]
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
        "block_out_channels": blocks, "sample_size": world.IMAGE_SIZE,
        "down_block_types": ("DownEncoderBlock2D",) * len(blocks), "up_block_types": ("UpDecoderBlock2D",) * len(blocks),
    }


def unet_config(latent_factor: int) -> dict[str, Any]:
    """The toy ``UNet2DConditionModel`` on that latent.

    On the 16 × 16 latent a third, narrow level in front keeps the 8 × 8 and 4 × 4 levels of the 8 × 8 world and
    costs 13 % more per training step: its blocks have no attention (attention at 16 × 16 and 16 channels makes a
    step 2× as long with 2 heads, 3.5× with 8), so the cross-attention maps stay at 8 × 8 and 4 × 4.
    """
    config: dict[str, Any] = {
        "sample_size": world.IMAGE_SIZE // _checked(latent_factor), "in_channels": 4, "out_channels": 4,
        "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 8, "cross_attention_dim": WIDTH,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    }
    if latent_factor == 4:
        config.update(block_out_channels=(16, 32, 64),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    return config


def _checked(latent_factor: int) -> int:
    if latent_factor not in LATENT_FACTORS:
        raise ValueError(f"the toy VAE downsamples by {' or '.join(map(str, LATENT_FACTORS))}, not {latent_factor}")
    return latent_factor


#: SD 1.x's noise schedule (the PNDM config saved with the pipeline uses the same betas).
TRAIN_TIMESTEPS, BETA_START, BETA_END = 1000, 0.00085, 0.012


@dataclass(frozen=True)
class Budget:
    """Steps, batch sizes and learning rates of every stage, and the latent's size (``Budget()``: what made the
    shipped weights)."""

    #: The VAE's downsampling (:data:`LATENT_FACTORS`): the shipped world's 8 × 8 latent.
    latent_factor: int = 8
    clip_steps: int = 1000
    clip_batch: int = 128
    clip_lr: float = 2e-3
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    #: Pictures whose latents set the VAE's scaling factor, and the standard deviation it gives the latents (SD's:
    #: 1). Below 1 every noise level's signal-to-noise ratio is that much lower for the same noise schedule.
    scaling_pictures: int = 256
    latent_std: float = 1.0
    latent_pool: int = 12288
    unet_steps: int = 3000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    #: The base UNet's timesteps drawn with density ∝ t^(bias-1) (diffusion_loss); 1 is uniform.
    unet_noisy_bias: float = 1.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    adapter_steps: int = 2200
    adapter_batch: int = 16
    adapter_lr: float = 2e-3
    adapter_tokens: int = 4  # diffusers' loader reads a plain IP-Adapter's projection as 4 tokens
    #: The plain IP-Adapter's own timestep bias and teacher share (see ``noisy_bias`` and ``teacher_weight``):
    #: uniform timesteps and the caption-conditioned UNet's prediction as the whole target kept the input's shape
    #: on 71 % of the held-out pictures, against 60 % with the other stages' 2.0 and 0.5 (docs/toy_world.md).
    adapter_noisy_bias: float = 1.0
    adapter_teacher_weight: float = 1.0
    #: The image-prompt stages (IP-Adapter, Plus, variations, projector) on the frozen base; pictures encoded once.
    image_pool: int = 4096
    #: Timesteps of the other image-prompt stages (Plus, variations, projector) drawn with density ∝ t^(bias-1)
    #: (diffusion_loss).
    noisy_bias: float = 2.0
    #: How much of those stages' target is the frozen UNet's own prediction on the picture's caption (the text
    #: route as teacher) rather than the data's v (diffusion_loss).
    teacher_weight: float = 0.5
    plus_steps: int = 1000
    plus_batch: int = 16
    plus_lr: float = 1e-3
    plus_queries: int = 16
    variations_steps: int = 1500
    variations_batch: int = 16
    variations_lr: float = 4e-4
    projector_steps: int = 2000
    projector_batch: int = 16
    projector_lr: float = 1e-3
    projector_hidden: int = 256
    #: The ``fine`` stage: a second text-to-image base (VAE and UNet) on a 16 × 16 latent, whose word maps show
    #: where (docs/toy_world.md, "Do the attention maps show where?"); latents at half SD's spread and timesteps
    #: leaning noisy (bias 2), the two changes that kept most of the named shapes at that size.
    fine_latent_factor: int = 4
    fine_latent_std: float = 0.5
    fine_unet_noisy_bias: float = 2.0

    def fine(self) -> Budget:
        """This budget for the ``fine`` stage's base: the same steps, on the finer latent."""
        return replace(self, latent_factor=self.fine_latent_factor, latent_std=self.fine_latent_std,
                       unet_noisy_bias=self.fine_unet_noisy_bias)

    @classmethod
    def smoke(cls) -> Budget:
        """A few steps of everything: checks the code runs, teaches nothing."""
        return cls(clip_steps=2, clip_batch=8, vae_steps=2, vae_batch=2, scaling_pictures=8, latent_pool=8,
                   unet_steps=2, unet_batch=4, adapter_steps=2, adapter_batch=4, image_pool=8, plus_steps=2,
                   plus_batch=4, variations_steps=2, variations_batch=4, projector_steps=2, projector_batch=4)


Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Pictures as tensors


def clip_pixels(images: list[Any]) -> torch.Tensor:
    """World pictures → CLIP's input, exactly what ``CLIPImageProcessor`` gives for 64 px pictures."""
    array = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def vae_pixels(images: list[Any]) -> torch.Tensor:
    """World pictures → the VAE's input range, -1 to 1 (what diffusers' image processor gives)."""
    array = np.stack([np.asarray(image, dtype=np.float32) / 127.5 - 1.0 for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def draw_batch(stream: Iterator[world.Scene], count: int) -> tuple[list[world.Scene], list[Any]]:
    scenes = [next(stream) for _ in range(count)]
    return scenes, [scene.draw() for scene in scenes]


# ---------------------------------------------------------------------------------------------
# Tokenizer


def write_tokenizer(folder: str | Path) -> Any:
    """CLIP's tokenizer class with a byte vocabulary plus one token per word of the world.

    BPE applies merges by rank, so a word's first merge can fire inside another word ("r e" inside
    "green"); words whose tokens come out split are moved to the front until every word is one token.
    """
    from transformers import CLIPTokenizer

    from ..loading.offline import _bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    order = list(WORDS)
    for _ in range(len(WORDS) + 1):
        symbols = list(_bytes_to_unicode().values())
        vocab = {s: i for i, s in enumerate(symbols)}
        vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
        merges: list[str] = []
        for word in order:
            pieces = list(word[:-1]) + [word[-1] + "</w>"]
            current = pieces[0]
            for piece in pieces[1:]:
                merges.append(f"{current} {piece}")
                current += piece
                vocab.setdefault(current, len(vocab))
        vocab["<|startoftext|>"] = len(vocab)
        vocab["<|endoftext|>"] = len(vocab)
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n",
                                           encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
        split = [word for word in WORDS if len(tokenizer(word, add_special_tokens=False).input_ids) != 1]
        if not split:
            return tokenizer
        order = split + [word for word in order if word not in split]
    raise RuntimeError(f"Could not make one token of each of the words {split}.")


def tokenize(tokenizer: Any, texts: list[str], length: int | None = None) -> torch.Tensor:
    """Token ids padded like SD pads them (to 77 with ``<|endoftext|>``), or to ``length``."""
    return tokenizer(texts, padding="max_length", max_length=length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------
# Stage 1: CLIP


def new_clip(tokenizer: Any) -> Any:
    from transformers import CLIPConfig, CLIPModel

    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}
    config = CLIPConfig(text_config={**TEXT_CONFIG, **special}, vision_config=VISION_CONFIG, projection_dim=WIDTH)
    return CLIPModel(config)


def train_clip(tokenizer: Any, budget: Budget, seed: int, log: Log) -> Any:
    """Contrastive training on the world: each picture against every training caption, and back.

    With only 66 captions a batch holds many pictures of the same one; the loss counts all of them
    as positives (a soft target) instead of pretending they are negatives.
    """
    torch.manual_seed(seed)
    clip = new_clip(tokenizer)
    captions = [world.caption(c, s, b) for s, c, b in world.TRAINING_COMBINATIONS]
    index = {text: i for i, text in enumerate(captions)}
    ids = tokenize(tokenizer, captions, length=16)
    stream = world.iter_scenes(seed, "train")
    optimizer = torch.optim.AdamW(clip.parameters(), lr=budget.clip_lr, weight_decay=0.1)
    schedule = _warmup_cosine(optimizer, budget.clip_steps)
    clip.train()
    for step in range(budget.clip_steps):
        scenes, images = draw_batch(stream, budget.clip_batch)
        labels = torch.tensor([index[scene.caption] for scene in scenes])
        image_embeds = F.normalize(clip.get_image_features(pixel_values=clip_pixels(images)).pooler_output, dim=-1)
        text_embeds = F.normalize(clip.get_text_features(input_ids=ids).pooler_output, dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * image_embeds @ text_embeds.T  # [B, captions]
        image_loss = F.cross_entropy(logits, labels)
        present = labels.unique()
        targets = (labels[None, :] == present[:, None]).float()
        text_loss = -(targets / targets.sum(1, keepdim=True) * logits[:, present].T.log_softmax(1)).sum(1).mean()
        loss = (image_loss + text_loss) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == budget.clip_steps - 1:
            accuracy = float((logits.argmax(1) == labels).float().mean())
            log(f"clip step {step}: loss {loss.item():.3f}, caption accuracy in batch {accuracy:.2f}")
    clip.eval()
    return clip


@torch.no_grad()
def clip_caption_accuracy(clip: Any, tokenizer: Any, scenes: list[world.Scene]) -> float:
    """How often CLIP picks a scene's caption among all 90 of the world (held-out scenes: unseen captions)."""
    captions = [world.caption(c, s, b) for s, c, b in world.ALL_COMBINATIONS]
    text = F.normalize(clip.get_text_features(input_ids=tokenize(tokenizer, captions)).pooler_output, dim=-1)
    image = F.normalize(clip.get_image_features(pixel_values=clip_pixels([s.draw() for s in scenes])).pooler_output,
                        dim=-1)
    chosen = (image @ text.T).argmax(1)
    return float(np.mean([captions[int(i)] == scene.caption for i, scene in zip(chosen, scenes)]))


# ---------------------------------------------------------------------------------------------
# Stage 2: VAE


def train_vae(budget: Budget, seed: int, log: Log) -> Any:
    """An ``AutoencoderKL`` (64 px → 16 × 16 × 4 at the shipped factor 4), L1 + MSE reconstruction and a tiny KL."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config(budget.latent_factor))
    stream = world.iter_scenes(seed + 1, "train")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=budget.vae_lr, weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, budget.vae_steps)
    vae.train()
    for step in range(budget.vae_steps):
        _, images = draw_batch(stream, budget.vae_batch)
        pixels = vae_pixels(images)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        error = (reconstruction - pixels)
        loss = error.abs().mean() + (error**2).mean() + budget.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == budget.vae_steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():  # SD's scaling factor: latents with unit standard deviation for the UNet
        _, images = draw_batch(world.iter_scenes(seed + 2, "train"), budget.scaling_pictures)
        std = float(vae.encode(vae_pixels(images)).latent_dist.sample().std())
    vae.register_to_config(scaling_factor=round(budget.latent_std / std, 5))
    log(f"vae scaling factor {vae.config.scaling_factor}")
    return vae


# ---------------------------------------------------------------------------------------------
# Stage 3: text-to-image UNet


def text_hidden_states(text_encoder: Any, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """What SD's pipeline feeds the UNet for these prompts: the text tower's last hidden state, 77 tokens."""
    with torch.no_grad():
        return text_encoder(tokenize(tokenizer, texts))[0]


@dataclass
class LatentPool:
    """Training pictures encoded once: scenes, VAE posterior means and standard deviations, and (with a CLIP)
    the vision tower's projected embeddings, penultimate and last hidden states."""

    scenes: list[world.Scene]
    means: torch.Tensor
    stds: torch.Tensor
    image_embeds: torch.Tensor | None = None  # [N, D]: what ip_adapter and variations read
    penultimate: torch.Tensor | None = None  # [N, T, Dv]: what IP-Adapter Plus reads
    last_hidden: torch.Tensor | None = None  # [N, T, Dv]: what the projector reads

    def sample(self, rows: torch.Tensor, generator: torch.Generator, factor: float) -> torch.Tensor:
        noise = torch.randn(self.means[rows].shape, generator=generator)
        return (self.means[rows] + self.stds[rows] * noise) * factor


def encode_pool(vae: Any, count: int, seed: int, clip: Any = None, hidden: bool = False) -> LatentPool:
    """``count`` training pictures through the VAE (and CLIP's vision tower, keeping its hidden states when
    ``hidden``): the same numbers ``CLIPVisionModelWithProjection`` gives the pipeline for these pictures."""
    stream = world.iter_scenes(seed, "train")
    scenes, means, stds = [], [], []
    columns: dict[str, list[torch.Tensor]] = {"embeds": [], "penultimate": [], "last": []}
    with torch.no_grad():
        for start in range(0, count, 256):
            batch, images = draw_batch(stream, min(256, count - start))
            posterior = vae.encode(vae_pixels(images)).latent_dist
            scenes += batch
            means.append(posterior.mean)
            stds.append(posterior.std)
            if clip is not None:
                out = clip.vision_model(pixel_values=clip_pixels(images), output_hidden_states=hidden)
                columns["embeds"].append(clip.visual_projection(out.pooler_output))
                if hidden:
                    columns["penultimate"].append(out.hidden_states[-2])
                    columns["last"].append(out.last_hidden_state)
    joined = {name: torch.cat(parts) if parts else None for name, parts in columns.items()}
    return LatentPool(scenes, torch.cat(means), torch.cat(stds), joined["embeds"], joined["penultimate"],
                      joined["last"])


def noise_schedule() -> torch.Tensor:
    """``alphas_cumprod`` of SD's scaled-linear schedule."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def diffusion_loss(unet: Any, latents: torch.Tensor, generator: torch.Generator, alphas: torch.Tensor,
                   noisy_bias: float = 1.0, teacher: Callable[..., torch.Tensor] | None = None,
                   teacher_weight: float = 0.0, **conditioning: Any) -> torch.Tensor:
    """v-prediction MSE at uniformly drawn timesteps (``noisy_bias`` > 1: drawn with density ∝ t^(bias-1)).

    v-prediction (SD 2's objective) weighs every noise level's error on the clean picture at least
    once; ε-prediction weighs it by the signal-to-noise ratio, almost nothing at the high noise levels
    where the caption decides the colours, and a UNet trained that way for minutes ignores its caption.
    The image-prompt stages lean further towards high noise (as SD 3's logit-normal sampling leans to the
    middle): there the picture's colours and shape are decided, and the frozen UNet already draws the edges.
    """
    noise = torch.randn(latents.shape, generator=generator)
    if noisy_bias == 1.0:
        timesteps = torch.randint(0, TRAIN_TIMESTEPS, (latents.shape[0],), generator=generator)
    else:
        uniform = torch.rand(latents.shape[0], generator=generator)
        timesteps = (TRAIN_TIMESTEPS * uniform ** (1 / noisy_bias)).long().clamp(max=TRAIN_TIMESTEPS - 1)
    alpha = alphas[timesteps].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    target = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    if teacher is not None and teacher_weight:
        with torch.no_grad():
            target = torch.lerp(target, teacher(noisy, timesteps), teacher_weight)
    return F.mse_loss(unet(noisy, timesteps, **conditioning).sample, target)


class EMA:
    """An exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float) -> None:
        self.parameters = parameters
        self.averages = [p.detach().clone() for p in parameters]
        self.decay = decay
        self.steps = 0

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for average, parameter in zip(self.averages, self.parameters):
            average.lerp_(parameter.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to_parameters(self) -> None:
        for average, parameter in zip(self.averages, self.parameters):
            parameter.copy_(average)


def train_unet(text_encoder: Any, tokenizer: Any, vae: Any, budget: Budget, seed: int, log: Log,
               config: dict[str, Any] | None = None) -> Any:
    """Text-to-image on the captions through the frozen text tower, with caption dropout and EMA weights.

    Dropped captions become ``""``, whose hidden states are exactly the unconditional embeddings the
    pipeline uses for classifier-free guidance. ``config`` replaces :func:`unet_config` (experiments).
    """
    from diffusers import UNet2DConditionModel

    captions = [world.caption(c, s, b) for s, c, b in world.TRAINING_COMBINATIONS]
    index = {text: i for i, text in enumerate(captions)}
    conditions = text_hidden_states(text_encoder, tokenizer, [*captions, ""])  # last row: the empty prompt
    pool = encode_pool(vae, budget.latent_pool, seed + 3)
    labels = torch.tensor([index[scene.caption] for scene in pool.scenes])
    alphas = noise_schedule()

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(config or unet_config(budget.latent_factor)))
    ema = EMA(list(unet.parameters()), budget.ema_decay)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=budget.unet_lr, weight_decay=0.01)
    schedule = _warmup_cosine(optimizer, budget.unet_steps)
    generator = torch.Generator().manual_seed(seed)
    unet.train()
    for step in range(budget.unet_steps):
        rows = torch.randint(0, len(pool.scenes), (budget.unet_batch,), generator=generator)
        dropped = torch.rand(budget.unet_batch, generator=generator) < budget.caption_dropout
        condition = conditions[torch.where(dropped, len(captions), labels[rows])]
        latents = pool.sample(rows, generator, vae.config.scaling_factor)
        loss = diffusion_loss(unet, latents, generator, alphas, budget.unet_noisy_bias,
                              encoder_hidden_states=condition)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.update()
        if step % 250 == 0 or step == budget.unet_steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f}")
    ema.copy_to_parameters()
    unet.eval()
    return unet


# ---------------------------------------------------------------------------------------------
# Stage 4: image prompts on the frozen base (IP-Adapter, IP-Adapter Plus, image variations, a projector)


def adapter_state_dict(unet: Any, tokens: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """A fresh IP-Adapter for ``unet`` in diffusers' layout: a projection of the image embedding to
    ``tokens`` tokens, and ``to_k_ip``/``to_v_ip`` per cross-attention layer initialised from the
    layer's own ``to_k``/``to_v`` (as the IP-Adapter paper does)."""
    generator = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(tokens * width, WIDTH, generator=generator) / WIDTH**0.5,
        "proj.bias": torch.zeros(tokens * width),
        "norm.weight": torch.ones(width),
        "norm.bias": torch.zeros(width),
    }
    return {"image_proj": image_proj, "ip_adapter": _attention_copies(unet)}


def _attention_copies(unet: Any) -> dict[str, torch.Tensor]:
    """``{id}.to_k_ip/to_v_ip`` for every cross-attention layer, copies of the layer's own ``to_k``/``to_v``."""
    layers, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attention = unet.get_submodule(name.removesuffix(".processor"))
        layers[f"{key_id}.to_k_ip.weight"] = attention.to_k.weight.detach().clone()
        layers[f"{key_id}.to_v_ip.weight"] = attention.to_v.weight.detach().clone()
        key_id += 2
    return layers


def plus_state_dict(unet: Any, queries: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """A fresh IP-Adapter Plus for ``unet``: diffusers' resampler (``queries`` learned queries, one 64-d head,
    4 layers: the depth diffusers' converter builds) over the vision tower's penultimate hidden states, in the original Resampler's key names
    (h94's ``ip-adapter-plus_sd15`` layout), and ``to_k_ip``/``to_v_ip`` copied from each layer."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from ..loading.offline import resampler_to_original_keys

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        resampler = IPAdapterPlusImageProjection(
            embed_dims=VISION_CONFIG["hidden_size"], output_dims=unet.config.cross_attention_dim, hidden_dims=64,
            depth=4, dim_head=64, heads=1, num_queries=queries,
        )
    return {"image_proj": resampler_to_original_keys(resampler.state_dict()), "ip_adapter": _attention_copies(unet)}


def read_adapter(unet: Any) -> dict[str, torch.Tensor]:
    """The adapter loaded into ``unet`` as the flat ``image_proj.*`` / ``ip_adapter.*`` safetensors dict, in the
    keys h94's checkpoints use (a Plus resampler's written back in the original Resampler's names)."""
    from diffusers.models.embeddings import ImageProjection

    from ..loading.offline import resampler_to_original_keys

    projection = unet.encoder_hid_proj.image_projection_layers[0]
    if isinstance(projection, ImageProjection):
        state = {
            "image_proj.proj.weight": projection.image_embeds.weight,
            "image_proj.proj.bias": projection.image_embeds.bias,
            "image_proj.norm.weight": projection.norm.weight, "image_proj.norm.bias": projection.norm.bias,
        }
    else:
        state = {f"image_proj.{k}": v for k, v in resampler_to_original_keys(projection.state_dict()).items()}
    key_id = 1
    for name, processor in unet.attn_processors.items():
        if name.endswith("attn1.processor") or name.startswith("encoder_hid_proj."):  # the resampler's own
            continue
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = processor.to_k_ip[0].weight
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = processor.to_v_ip[0].weight
        key_id += 2
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


@dataclass
class ImagePromptBase:
    """What every image-prompt stage trains against: the frozen base models and one pool of encoded pictures."""

    clip: Any
    text_encoder: Any
    tokenizer: Any
    vae: Any
    unet: Any
    pool: LatentPool
    empty: torch.Tensor  # [1, 77, D]: the empty prompt's hidden states (the text side of every stage)
    captions: torch.Tensor  # [C, 77, D]: the training captions' hidden states ...
    labels: torch.Tensor  # [N]: ... and which one each pool picture has

    def teacher(self, rows: torch.Tensor, dropped: torch.Tensor | None = None,
                ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The frozen UNet on the pictures' own captions (the empty prompt where the picture was ``dropped``): what
        the text route predicts for these latents."""
        condition = self.captions[self.labels[rows]]
        if dropped is not None:
            condition = torch.where(dropped[:, None, None], self.empty, condition)
        return lambda noisy, timesteps: self.unet(noisy, timesteps, encoder_hidden_states=condition).sample


def image_prompt_base(clip: Any, text_encoder: Any, tokenizer: Any, vae: Any, unet: Any, budget: Budget,
                      seed: int) -> ImagePromptBase:
    """Encode ``budget.image_pool`` training pictures once (VAE latents, CLIP embeddings and hidden states)."""
    pool = encode_pool(vae, budget.image_pool, seed + 4, clip=clip, hidden=True)
    captions = [world.caption(c, s, b) for s, c, b in world.TRAINING_COMBINATIONS]
    index = {text: i for i, text in enumerate(captions)}
    labels = torch.tensor([index[scene.caption] for scene in pool.scenes])
    unet.requires_grad_(False)
    return ImagePromptBase(clip, text_encoder, tokenizer, vae, unet, pool,
                           text_hidden_states(text_encoder, tokenizer, [""]),
                           text_hidden_states(text_encoder, tokenizer, captions), labels)


def _fit(name: str, base: ImagePromptBase, parameters: list[torch.nn.Parameter], steps: int, batch: int, lr: float,
         ema_decay: float, seed: int, loss_of: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor],
         log: Log, dropout: float = 0.1) -> None:
    """The loop every image-prompt stage shares: AdamW with warm-up and cosine decay, EMA weights at the end.

    ``loss_of(rows, dropped, generator)`` gets the pool rows of the batch and which of them lose their picture
    (the unconditional branch classifier-free guidance will use)."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    schedule = _warmup_cosine(optimizer, steps)
    ema = EMA(parameters, ema_decay)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        rows = torch.randint(0, len(base.pool.scenes), (batch,), generator=generator)
        dropped = torch.rand(batch, generator=generator) < dropout
        loss = loss_of(rows, dropped, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.update()
        if step % 250 == 0 or step == steps - 1:
            log(f"{name} step {step}: loss {loss.item():.4f}")
    ema.copy_to_parameters()


def _with_adapter(unet: Any, state: dict[str, dict[str, torch.Tensor]]) -> tuple[Any, list[torch.nn.Parameter]]:
    """A frozen copy of ``unet`` with a fresh adapter loaded (diffusers' own loader), and the adapter's parameters."""
    import copy

    unet = copy.deepcopy(unet)
    unet.requires_grad_(False)
    frozen = {id(parameter) for parameter in unet.parameters()}
    unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    trainable = [p for p in unet.parameters() if id(p) not in frozen]  # the freshly loaded adapter layers
    for parameter in trainable:
        parameter.requires_grad_(True)
    unet.train()
    return unet, trainable


#: Which of a caption's tokens the plain adapter's tokens start as (BOS, a, colour, shape, on, a, background
#: colour, background, EOS): the three words that differ between captions, then EOS (which has read them all).
CAPTION_TOKEN_POSITIONS = (2, 3, 6, 8)


def caption_token_projection(base: ImagePromptBase, tokens: int) -> dict[str, torch.Tensor]:
    """A warm start for the plain adapter's projection: least squares from the pool's image embeddings to the
    text encoder's hidden states of their captions' words (before its final LayerNorm's gain and bias, which the
    projection's LayerNorm takes over), so that ``to_k_ip``/``to_v_ip`` (copies of ``to_k``/``to_v``) first read
    the adapter's tokens as they read the words; diffusion training then takes over."""
    captions = sorted({scene.caption for scene in base.pool.scenes})
    index = {text: i for i, text in enumerate(captions)}
    hidden = text_hidden_states(base.text_encoder, base.tokenizer, captions)
    positions = list(CAPTION_TOKEN_POSITIONS[:tokens])
    norm = base.text_encoder.final_layer_norm
    rows = torch.tensor([index[scene.caption] for scene in base.pool.scenes])
    targets = ((hidden[rows][:, positions] - norm.bias.detach()) / norm.weight.detach()).reshape(len(rows), -1)
    inputs = torch.cat([base.pool.image_embeds, torch.ones(len(rows), 1)], dim=1).double()
    # The normal equations in float64 (LU solve): torch.linalg.lstsq's QR gives other last bits from run to run.
    gram = inputs.T @ inputs + 1e-6 * torch.eye(inputs.shape[1], dtype=torch.float64)
    solution = torch.linalg.solve(gram, inputs.T @ targets.double()).float()  # [D + 1, tokens * width]
    return {"proj.weight": solution[:-1].T.contiguous(), "proj.bias": solution[-1].contiguous(),
            "norm.weight": norm.weight.detach().clone(), "norm.bias": norm.bias.detach().clone()}


def train_adapter(base: ImagePromptBase, budget: Budget, seed: int, log: Log) -> dict[str, torch.Tensor]:
    """IP-Adapter: only the adapter (projection to ``adapter_tokens`` tokens, ``to_k_ip``, ``to_v_ip``) learns, on a
    frozen copy of the UNet.

    The text prompt is always ``""`` (the picture alone must say everything); one picture in ten is replaced by
    a zero embedding, the unconditional branch diffusers (and the engine's ``ip_adapter`` mode) guides from."""
    state = adapter_state_dict(base.unet, budget.adapter_tokens, seed)
    state["image_proj"].update(caption_token_projection(base, budget.adapter_tokens))
    unet, trainable = _with_adapter(base.unet, state)
    alphas, factor = noise_schedule(), base.vae.config.scaling_factor

    def loss_of(rows: torch.Tensor, dropped: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        embeds = torch.where(dropped[:, None], 0.0, base.pool.image_embeds[rows])[:, None, :]
        latents = base.pool.sample(rows, generator, factor)
        return diffusion_loss(unet, latents, generator, alphas, budget.adapter_noisy_bias,
                              base.teacher(rows, dropped), budget.adapter_teacher_weight,
                              encoder_hidden_states=base.empty.expand(len(rows), -1, -1),
                              added_cond_kwargs={"image_embeds": [embeds]})

    _fit("ip_adapter", base, trainable, budget.adapter_steps, budget.adapter_batch, budget.adapter_lr,
         budget.ema_decay, seed, loss_of, log)
    return read_adapter(unet)


def train_adapter_plus(base: ImagePromptBase, budget: Budget, seed: int, log: Log) -> dict[str, torch.Tensor]:
    """IP-Adapter Plus: a resampler over the penultimate hidden states and ``to_k_ip``/``to_v_ip``, on the frozen
    UNet; a dropped picture becomes an all-zero input's hidden states (diffusers' negative for Plus)."""
    state = plus_state_dict(base.unet, budget.plus_queries, seed)
    unet, trainable = _with_adapter(base.unet, state)
    alphas, factor = noise_schedule(), base.vae.config.scaling_factor
    with torch.no_grad():
        zero = base.clip.vision_model(pixel_values=torch.zeros(1, 3, world.IMAGE_SIZE, world.IMAGE_SIZE),
                                      output_hidden_states=True).hidden_states[-2]

    def loss_of(rows: torch.Tensor, dropped: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        states = torch.where(dropped[:, None, None], zero, base.pool.penultimate[rows])[:, None]
        latents = base.pool.sample(rows, generator, factor)
        return diffusion_loss(unet, latents, generator, alphas, budget.noisy_bias, base.teacher(rows, dropped),
                              budget.teacher_weight, encoder_hidden_states=base.empty.expand(len(rows), -1, -1),
                              added_cond_kwargs={"image_embeds": [states]})

    _fit("ip_adapter_plus", base, trainable, budget.plus_steps, budget.plus_batch, budget.plus_lr, budget.ema_decay,
         seed, loss_of, log)
    return read_adapter(unet)


def train_variations(base: ImagePromptBase, budget: Budget, seed: int, log: Log) -> Any:
    """Image variations, lambdalabs' recipe: the whole UNet fine-tuned to read one token, the CLIP image embedding
    (projected, not normalised: what ``StableDiffusionImageVariationPipeline`` feeds it), instead of the text; a
    dropped picture becomes a zero token, the pipeline's unconditional input."""
    import copy

    unet = copy.deepcopy(base.unet)
    unet.requires_grad_(True)
    unet.train()
    alphas, factor = noise_schedule(), base.vae.config.scaling_factor

    def loss_of(rows: torch.Tensor, dropped: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        embeds = torch.where(dropped[:, None], 0.0, base.pool.image_embeds[rows])[:, None, :]
        latents = base.pool.sample(rows, generator, factor)
        return diffusion_loss(unet, latents, generator, alphas, budget.noisy_bias, base.teacher(rows, dropped),
                              budget.teacher_weight, encoder_hidden_states=embeds)

    _fit("variations", base, list(unet.parameters()), budget.variations_steps, budget.variations_batch,
         budget.variations_lr, budget.ema_decay, seed, loss_of, log)
    unet.eval()
    return unet


def train_projector(base: ImagePromptBase, budget: Budget, seed: int, log: Log) -> Any:
    """The projector (Redux's recipe at toy size): vision-tower tokens → text-token space, appended to the empty
    prompt's 77 tokens, trained through the frozen UNet. No dropout: the unconditional branch is the empty prompt
    alone, which the UNet already knows."""
    from ..methods.projector import Projector

    torch.manual_seed(seed)
    projector = Projector(VISION_CONFIG["hidden_size"], budget.projector_hidden, base.unet.config.cross_attention_dim)
    projector.train()
    unet = base.unet
    unet.requires_grad_(False)
    alphas, factor = noise_schedule(), base.vae.config.scaling_factor

    def loss_of(rows: torch.Tensor, dropped: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        tokens = projector(base.pool.last_hidden[rows])
        condition = torch.cat([base.empty.expand(len(rows), -1, -1), tokens], dim=1)
        latents = base.pool.sample(rows, generator, factor)
        return diffusion_loss(unet, latents, generator, alphas, budget.noisy_bias, base.teacher(rows),
                              budget.teacher_weight, encoder_hidden_states=condition)

    _fit("projector", base, list(projector.parameters()), budget.projector_steps, budget.projector_batch,
         budget.projector_lr, budget.ema_decay, seed, loss_of, log, dropout=0.0)
    projector.eval()
    return projector


# ---------------------------------------------------------------------------------------------
# Saving: the layouts real weights come in


#: Where the IP-Adapter lives inside the weights folder, and its file name.
ADAPTER_SUBFOLDER, ADAPTER_WEIGHT_NAME = "ip_adapter", "ip-adapter_toy.safetensors"


def scheduler() -> Any:
    """SD 1.4's PNDM configuration, predicting v (the objective the toy UNet was trained with)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=BETA_START, beta_end=BETA_END, beta_schedule="scaled_linear", num_train_timesteps=TRAIN_TIMESTEPS,
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
    )


def text_encoder_of(clip: Any) -> Any:
    """The CLIP's text tower as the ``CLIPTextModel`` a Stable Diffusion folder carries (same weights)."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return text_encoder.eval()


def save_clip(folder: Path, clip: Any, tokenizer: Any) -> None:
    """The whole CLIP (both towers), its tokenizer and image processor, as openai's checkpoints ship."""
    from transformers import CLIPImageProcessor

    clip.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    side = world.IMAGE_SIZE
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        str(folder)
    )
    write_captions(folder)


def write_captions(folder: Path) -> None:
    """The world's 90 captions beside the CLIP: what makes it a zero-shot captioner (methods/caption.py)."""
    captions = [world.caption(c, s, b) for s, c, b in world.ALL_COMBINATIONS]
    (Path(folder) / "captions.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")


def save_sd(folder: Path, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=_unsourced(vae), text_encoder=text_encoder, tokenizer=tokenizer, unet=_unsourced(unet),
        scheduler=scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


def save_fine(folder: Path, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any) -> None:
    """The ``fine`` base as an SD folder, its VAE and UNet stored in float16 (half the bytes, so all the toy weights
    stay under 20 MB; diffusers loads them as float32, and every measurement of it is on these rounded weights).
    The text encoder is the base's, in float32, byte for byte."""
    import copy

    save_sd(folder, copy.deepcopy(vae).half(), text_encoder, tokenizer, copy.deepcopy(unet).half())


#: The image-prompt stages, in the order they train (``scripts/train_toy.py --stages``).
IMAGE_PROMPT_STAGES = ("ip_adapter", "ip_adapter_plus", "variations", "projector")
#: Every stage, in order; all but ``clip`` can be trained again alone (``train_all(stages=...)``). ``fine`` is
#: the second base on the 16 × 16 latent (its own VAE and UNet, the same CLIP), written to ``fine/``.
STAGES = ("clip", "vae", "unet", *IMAGE_PROMPT_STAGES, "fine")
PLUS_WEIGHT_NAME = "ip-adapter-plus_toy.safetensors"
VARIATIONS_SUBFOLDER, PROJECTOR_SUBFOLDER, FINE_SUBFOLDER = "variations", "projector", "fine"
#: What each stage after the base writes under the weights folder (removed before it trains again).
STAGE_OUTPUTS = {
    "ip_adapter": f"{ADAPTER_SUBFOLDER}/{ADAPTER_WEIGHT_NAME}",
    "ip_adapter_plus": f"{ADAPTER_SUBFOLDER}/{PLUS_WEIGHT_NAME}",
    "variations": VARIATIONS_SUBFOLDER,
    "projector": PROJECTOR_SUBFOLDER,
    "fine": FINE_SUBFOLDER,
}
#: The stage records of training.json, in the order they train.
_RECORD_ORDER = ("clip", "vae", "unet", "image_pool", *IMAGE_PROMPT_STAGES, "fine_vae", "fine_unet")
_STAGE_STEPS = {"ip_adapter": "adapter_steps", "ip_adapter_plus": "plus_steps", "variations": "variations_steps",
                "projector": "projector_steps"}


def vision_model_of(clip: Any) -> Any:
    """The CLIP's vision tower with its projection as ``CLIPVisionModelWithProjection`` (same weights): the image
    encoder an image-variations folder carries."""
    from transformers import CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection(clip.config.vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return vision.eval()


def save_variations(folder: Path, vae: Any, clip: Any, unet: Any) -> None:
    """lambdalabs' layout: a ``StableDiffusionImageVariationPipeline`` folder with its image encoder and processor."""
    from diffusers import StableDiffusionImageVariationPipeline
    from transformers import CLIPImageProcessor

    side = world.IMAGE_SIZE
    pipe = StableDiffusionImageVariationPipeline(
        vae=_unsourced(vae), image_encoder=vision_model_of(clip), unet=_unsourced(unet), scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)


def _unsourced(model: Any) -> Any:
    """``model`` with no ``_name_or_path`` in its config: ``from_pretrained`` records the folder it read (a stage
    trained alone loads the base), which would write the training machine's path into the shipped config."""
    from diffusers.configuration_utils import FrozenDict

    if "_name_or_path" in model.config:
        model._internal_dict = FrozenDict({k: v for k, v in model.config.items() if k != "_name_or_path"})
    return model


def load_base(weights: str | Path) -> tuple[Any, Any, Any, Any, Any]:
    """The shipped base models ``(clip, text_encoder, tokenizer, vae, unet)`` from a weights folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    weights = Path(weights)
    clip = CLIPModel.from_pretrained(str(weights / "clip")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(weights / "sd"), subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(str(weights / "sd"), subfolder="text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(str(weights / "sd"), subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(str(weights / "sd"), subfolder="unet").eval()
    return clip, text_encoder, tokenizer, vae, unet


def load_clip(weights: str | Path) -> tuple[Any, Any]:
    """The toy CLIP and its tokenizer from a weights folder."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = str(Path(weights) / "clip")
    return CLIPModel.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder)


def _load_sd_part(weights: Path, part: str) -> Any:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    kind = AutoencoderKL if part == "vae" else UNet2DConditionModel
    return kind.from_pretrained(str(weights / "sd"), subfolder=part).eval()


def train_image_prompts(out: Path, models: tuple[Any, Any, Any, Any, Any], budget: Budget, seed: int, log: Log,
                        reports: list[StageReport], stages: tuple[str, ...] = IMAGE_PROMPT_STAGES) -> None:
    """The image-prompt stages with a step budget, on the base ``models``, each written where its preset loads it."""
    from safetensors.torch import save_file

    stages = tuple(stage for stage in stages if getattr(budget, _STAGE_STEPS[stage]))
    if not stages:
        return
    clip, text_encoder, tokenizer, vae, unet = models
    base = timed("image_pool", reports, log)(
        lambda: image_prompt_base(clip, text_encoder, tokenizer, vae, unet, budget, seed)
    )
    for stage in stages:
        if stage in ("ip_adapter", "ip_adapter_plus"):
            trainer = train_adapter if stage == "ip_adapter" else train_adapter_plus
            state = timed(stage, reports, log)(lambda trainer=trainer: trainer(base, budget, seed, log))
            path = out / STAGE_OUTPUTS[stage]
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(path))
        elif stage == "variations":
            fine_tuned = timed(stage, reports, log)(lambda: train_variations(base, budget, seed, log))
            save_variations(out / VARIATIONS_SUBFOLDER, vae, clip, fine_tuned)
        else:
            projector = timed(stage, reports, log)(lambda: train_projector(base, budget, seed, log))
            projector.save(out / PROJECTOR_SUBFOLDER)


def train_all(out: str | Path, budget: Budget | None = None, seed: int = 0, log: Log = print,
              stages: tuple[str, ...] | None = None) -> list[StageReport]:
    """Every stage in order, written to ``out/clip``, ``out/sd``, the image-prompt folders (``ip_adapter``,
    ``variations``, ``projector``) and ``out/fine`` (the 16 × 16 base); returns the stages' wall times and peak
    memory (also written to ``out/training.json``).

    ``stages`` (a subset of :data:`STAGES` without ``clip``) trains only those, on the models already in ``out``
    (the CLIP, and the VAE and UNet unless they are among ``stages``); the records of the other stages in
    ``training.json`` are kept. Every stage seeds itself, so a stage trained alone writes what the full run writes.
    """
    from ..loading.quiet import quiet_loaders

    budget = budget or Budget()
    out = Path(out)
    reports: list[StageReport] = []
    with quiet_loaders():
        if stages is None:
            tokenizer = write_tokenizer(out / "clip")
            clip = timed("clip", reports, log)(lambda: train_clip(tokenizer, budget, seed, log))
            reports[-1].notes["held_out_caption_accuracy"] = clip_caption_accuracy(clip, tokenizer,
                                                                                    world.held_out_scenes())
            save_clip(out / "clip", clip, tokenizer)
        else:
            clip, tokenizer = load_clip(out)
        text_encoder = text_encoder_of(clip)
        retrain = stages is None or "vae" in stages or "unet" in stages
        if stages is None or "vae" in stages:
            vae = timed("vae", reports, log)(lambda: train_vae(budget, seed, log))
        else:
            vae = _load_sd_part(out, "vae")
        if stages is None or "unet" in stages:
            unet = timed("unet", reports, log)(lambda: train_unet(text_encoder, tokenizer, vae, budget, seed, log))
        else:
            unet = _load_sd_part(out, "unet")
        if retrain:
            save_sd(out / "sd", vae, text_encoder, tokenizer, unet)
        chosen = IMAGE_PROMPT_STAGES if stages is None else tuple(s for s in IMAGE_PROMPT_STAGES if s in stages)
        train_image_prompts(out, (clip, text_encoder, tokenizer, vae, unet), budget, seed, log, reports, chosen)
        if stages is None or "fine" in stages:
            fine = budget.fine()
            fine_vae = timed("fine_vae", reports, log)(lambda: train_vae(fine, seed, log))
            fine_unet = timed("fine_unet", reports, log)(
                lambda: train_unet(text_encoder, tokenizer, fine_vae, fine, seed, log))
            save_fine(out / FINE_SUBFOLDER, fine_vae, text_encoder, tokenizer, fine_unet)
    record = {"seed": seed, "budget": asdict(budget), "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "stages": [asdict(report) for report in reports]}
    previous = out / "training.json"
    if stages is not None and previous.is_file():
        kept = json.loads(previous.read_text(encoding="utf-8")).get("stages", [])
        trained = {report.name for report in reports}
        merged = [stage for stage in kept if stage["name"] not in trained] + record["stages"]
        record["stages"] = sorted(merged, key=lambda stage: _RECORD_ORDER.index(stage["name"])
                                  if stage["name"] in _RECORD_ORDER else len(_RECORD_ORDER))
    record["total_seconds"] = round(sum(stage["seconds"] for stage in record["stages"]), 1)
    record["peak_memory_mib"] = max(stage["peak_mib"] for stage in record["stages"])
    previous.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return reports


# ---------------------------------------------------------------------------------------------
# Helpers


def _warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 50) -> Any:
    warmup = min(warmup, max(1, steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def peak_memory_mib() -> float:
    """This process's peak resident memory so far (Linux and macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


@dataclass
class StageReport:
    """One stage's wall time and the process's peak resident memory when it finished."""

    name: str
    seconds: float
    peak_mib: float
    notes: dict[str, Any] = field(default_factory=dict)


def timed(name: str, reports: list[StageReport], log: Log) -> Callable[[Callable[[], Any]], Any]:
    """Run a stage, recording its wall time and the process's peak memory after it."""

    def run(stage: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = stage()
        reports.append(StageReport(name, round(time.perf_counter() - start, 1), round(peak_memory_mib(), 1)))
        log(f"{name}: {reports[-1].seconds:.0f} s, peak memory so far {reports[-1].peak_mib:.0f} MiB")
        return result

    return run
