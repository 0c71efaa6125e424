"""Presets: which Stable Diffusion model goes with which CLIP image encoder.

An image prompt only makes sense when the image encoder's embedding width equals the UNet's
cross-attention width, so the pair is chosen together and named once here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

#: Environment variable that replaces the default preset (the notebooks run in CI with ``toy``).
MODEL_ENV = "IMAGEPROMPT_MODEL"
#: The toy world's trained weights, shipped inside the package (``imageprompt_widgets.toy`` trains and measures
#: them): ``sd`` a StableDiffusionPipeline folder, ``clip`` a CLIPModel folder. Named here, the table's level, so
#: that the presets need none of the toy world's training and measuring code.
TOY_WEIGHTS = Path(__file__).resolve().parent / "toy" / "weights"
TOY_SD_FOLDER = TOY_WEIGHTS / "sd"
TOY_CLIP_FOLDER = TOY_WEIGHTS / "clip"
#: The toy world's image-prompt weights (toy/train.py's stage 4, on the frozen base): h94's IP-Adapter layout,
#: an image-variations pipeline folder (lambdalabs' layout), and a projector (methods/projector.py).
TOY_ADAPTER_FOLDER = TOY_WEIGHTS / "ip_adapter"
TOY_IP_ADAPTER = f"{TOY_ADAPTER_FOLDER}::ip-adapter_toy.safetensors"
TOY_IP_ADAPTER_PLUS = f"{TOY_ADAPTER_FOLDER}::ip-adapter-plus_toy.safetensors"
TOY_VARIATIONS_FOLDER = TOY_WEIGHTS / "variations"
TOY_PROJECTOR_FOLDER = TOY_WEIGHTS / "projector"
#: The toy world's second text-to-image base, on a 16 × 16 latent (toy/train.py's ``fine`` stage): the one whose
#: cross-attention maps show where (the 8 × 8 base's do not).
TOY_FINE_FOLDER = TOY_WEIGHTS / "fine"
DEFAULT_PRESET = "sd14"


@dataclass(frozen=True)
class Preset:
    """A matched pair of a Stable Diffusion model and the CLIP image encoder that fits it.

    ``sd_model`` and ``clip_model`` are Hugging Face model ids or local folders. A preset with
    ``offline_builder`` set is built on this machine (random, seeded weights) instead of downloaded.
    """

    name: str
    sd_model: str
    clip_model: str
    note: str = ""
    download_size: str = ""
    offline_builder: str | None = None
    #: The method the preset stands for in recipes ("variations", "ip_adapter", "caption"); None: the mode.
    method: str | None = None
    #: Settings this preset starts from, as (name, value) pairs (e.g. the variations model's zero negative).
    defaults: tuple[tuple[str, Any], ...] = ()
    #: IP-Adapter weights as "repo_or_folder:subfolder:weight_name" (loaded with diffusers' load_ip_adapter);
    #: a tuple of such specs loads several adapters at once (they share the one image encoder).
    ip_adapter: str | tuple[str, ...] | None = None
    #: A BLIP captioning model (Hub id or folder) for the caption route; "tiny" for the offline twin; a CLIP
    #: folder (the toy world's) chooses zero-shot among the toy world's captions.
    captioner: str | None = None
    #: A trained projector (methods/projector.py): a folder with projector.safetensors and projector.json.
    projector: str | None = None
    #: A Hub revision (branch or tag) of ``sd_model``, e.g. the variations model's ``v2.0``.
    revision: str | None = None
    #: Where in ``clip_model`` the image encoder lives (h94/IP-Adapter keeps it in ``models/image_encoder``).
    clip_subfolder: str | None = None
    #: The ControlNets that fit this SD (structure/controlnets.py): "sd15" for lllyasviel's SD 1.x ones (canny for
    #: ``structure="edges"``, depth for ``"depth"``), "tiny" for the offline twins, "sdxl" for diffusers' SDXL ones,
    #: "tiny-sdxl" for their twins; a Hub id or folder is taken
    #: as the canny ControlNet alone. None: no ControlNet.
    controlnet: str | None = None
    #: Whether SD has its text encoder (the image-variations model was fine-tuned without one).
    text_encoder: bool = True
    #: Whether the image encoder's embeddings have the UNet's cross-attention width, so image tokens can
    #: be the prompt (an IP-Adapter preset's encoder is the adapter's own, wider one).
    image_tokens_fit: bool = True
    #: LoRAs loaded with the model, as (Hub id, folder or .safetensors file, weight) pairs ("tiny-lcm-lora":
    #: the offline twin of the LCM-LoRA).
    loras: tuple[tuple[str, float], ...] = ()
    #: The model family: ``"sd1"`` (SD 1.x: ``StableDiffusionPipeline``) or ``"sdxl"``
    #: (``StableDiffusionXLPipeline``: two text encoders, the pooled slot, micro-conditioning). The one source of
    #: truth for which pipeline class loads ``sd_model`` and what the engine feeds it.
    family: str = "sd1"
    #: SDXL's second image encoder (OpenCLIP ViT-bigG-14, whose image projection shares the pooled slot's space):
    #: its image embedding is the pooled slot of the image methods and of ``revision``, and its projected tokens
    #: stand beside ``clip_model``'s (ViT-L/14) in SDXL's 2,048-wide tokens. None: no second tower.
    clip_model_2: str | None = None

    @property
    def is_sdxl(self) -> bool:
        """Whether the preset loads an SDXL pipeline (``family="sdxl"``)."""
        return self.family == "sdxl"

    @property
    def ip_adapters(self) -> tuple[str, ...]:
        """The IP-Adapter specs of this preset, one per adapter (empty without one)."""
        if not self.ip_adapter:
            return ()
        return (self.ip_adapter,) if isinstance(self.ip_adapter, str) else tuple(self.ip_adapter)


#: The settings the variations model was trained for: one image token, a zero unconditional embedding.
_VARIATIONS_DEFAULTS = (("mode", "single"), ("negative", "zeros"))
#: The toy world's sampling: 20 steps, guidance 2 (what its measurements use).
_TOY_DEFAULTS = (("steps", 20), ("guidance_scale", 2.0))
#: The toy world's text-to-image bases (``toy``, ``toy-fine``) add ``words_min_gain``: the toy CLIP scores any
#: longer text a little higher (it saw captions only), so its words chain stops at the caption only when a phrase
#: must raise the cosine clearly (docs/toy_world.md, Words).
_TOY_TEXT_TO_IMAGE_DEFAULTS = (*_TOY_DEFAULTS, ("words_min_gain", 0.1))
#: The live mode: LCM-LoRA's 4 steps with the LCM scheduler and no unconditional pass (guidance 1), decoded by the
#: tiny decoder (TAESD: at 512 px the full VAE decoder is ~40 % of a 4-step run's work, TAESD's ~3 %).
LIVE_DEFAULTS = (("scheduler", "lcm"), ("steps", 4), ("guidance_scale", 1.0), ("decoder", "tiny"))
#: Latent Consistency distilled into a LoRA for SD 1.5 (about 135 MB): 2-8 steps instead of 30.
LCM_LORA_SD15 = "latent-consistency/lcm-lora-sdv1-5"
#: Few steps that keep classifier-free guidance: ByteDance's Hyper-SD LoRA trained with CFG preserved (8 steps,
#: DDIM on trailing timesteps, guidance 5-8 as its README says), so negative text and negative images still act;
#: LCM-LoRA at guidance 1 runs no unconditional branch at all. The tiny decoder as in live mode.
HYPER_SD15_CFG = "ByteDance/Hyper-SD:Hyper-SD15-8steps-CFG-lora.safetensors"
HYPER_DEFAULTS = (("scheduler", "ddim_trailing"), ("steps", 8), ("guidance_scale", 5.0), ("decoder", "tiny"))
#: SDXL base 1.0 and the towers its image methods read: ViT-L/14 (its first text encoder's CLIP, 768 wide) and
#: OpenCLIP ViT-bigG-14 (its second's, 1,280 wide: the pooled slot's space).
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
CLIP_VIT_L = "openai/clip-vit-large-patch14"
CLIP_VIT_BIGG = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
#: Latent Consistency distilled into a LoRA for SDXL (about 394 MB).
LCM_LORA_SDXL = "latent-consistency/lcm-lora-sdxl"
#: SDXL base's own sampling (its scheduler is Euler; 30 steps, guidance 5 as diffusers' pipeline defaults).
SDXL_DEFAULTS = (("scheduler", "euler"), ("guidance_scale", 5.0))
#: h94's SDXL adapters: the plain one reads OpenCLIP bigG's embedding (``sdxl_models/image_encoder``), the Plus one
#: ViT-H's hidden states (``models/image_encoder``): loading/adapter_fit.py reads which from their shapes.
IP_ADAPTER_SDXL = "h94/IP-Adapter:sdxl_models:ip-adapter_sdxl.safetensors"
IP_ADAPTER_PLUS_SDXL = "h94/IP-Adapter:sdxl_models:ip-adapter-plus_sdxl_vit-h.safetensors"
#: lllyasviel's ControlNets (canny, depth; structure/controlnets.py), trained on SD 1.5 (its UNet is SD 1.4's,
#: fine-tuned), so they fit both.
SD15_CONTROLNETS = "sd15"
#: diffusers' SDXL ControlNets (canny, depth: diffusers/controlnet-canny-sdxl-1.0, diffusers/controlnet-depth-sdxl-1.0;
#: about 5 GB each in fp32 safetensors, 2.5 GB as their fp16 variant); "tiny-sdxl" names their offline twins.
SDXL_CONTROLNETS = "sdxl"
#: h94's Plus adapters for SD 1.5 (they read the ViT-H encoder's penultimate hidden states).
IP_ADAPTER_PLUS = "h94/IP-Adapter:models:ip-adapter-plus_sd15.safetensors"
IP_ADAPTER_PLUS_FACE = "h94/IP-Adapter:models:ip-adapter-plus-face_sd15.safetensors"

PRESETS: MappingProxyType[str, Preset] = MappingProxyType(
    {
        "sd14": Preset(
            name="sd14",
            sd_model="CompVis/stable-diffusion-v1-4",
            clip_model="openai/clip-vit-large-patch14",
            note="the method of the original guide",
            download_size="about 5.5 GB (SD 1.4 fp32 safetensors) + 1.7 GB (CLIP ViT-L/14)",
            controlnet=SD15_CONTROLNETS,
        ),
        "sd15": Preset(
            name="sd15",
            sd_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            clip_model="openai/clip-vit-large-patch14",
            download_size="about 5.5 GB (SD 1.5 fp32 safetensors) + 1.7 GB (CLIP ViT-L/14)",
            controlnet=SD15_CONTROLNETS,
        ),
        "tiny": Preset(
            name="tiny",
            sd_model="tiny",
            clip_model="tiny",
            note="built offline with random, seeded weights: for tests, CI and demos without network",
            download_size="nothing (built locally in about a second, under 2 MB)",
            offline_builder="tiny",
            controlnet="tiny",
        ),
        "toy": Preset(
            name="toy",
            sd_model=str(TOY_SD_FOLDER),
            clip_model=str(TOY_CLIP_FOLDER),
            note="the toy world: a miniature SD and CLIP trained on 64 px coloured shapes ('a red circle on a "
                 "blue background'), shipped with the package: real behaviour offline, not Stable Diffusion",
            download_size="nothing (shipped inside the package, about 8 MB of safetensors)",
            defaults=_TOY_TEXT_TO_IMAGE_DEFAULTS,
            captioner=str(TOY_CLIP_FOLDER),
            projector=str(TOY_PROJECTOR_FOLDER),
        ),
        "toy-fine": Preset(
            name="toy-fine",
            sd_model=str(TOY_FINE_FOLDER),
            clip_model=str(TOY_CLIP_FOLDER),
            note="the toy world on a 16 × 16 latent (its own VAE and UNet, the same CLIP): the base whose attention "
                 "maps show where the named shape is drawn; it draws the named shape less often than toy",
            download_size="nothing (shipped inside the package)",
            defaults=_TOY_TEXT_TO_IMAGE_DEFAULTS,
            captioner=str(TOY_CLIP_FOLDER),
        ),
        "toy-ip-adapter": Preset(
            name="toy-ip-adapter",
            sd_model=str(TOY_SD_FOLDER),
            clip_model=str(TOY_CLIP_FOLDER),
            ip_adapter=TOY_IP_ADAPTER,
            method="ip_adapter",
            defaults=(*_TOY_DEFAULTS, ("mode", "ip_adapter")),
            image_tokens_fit=False,
            note="the toy world's IP-Adapter (4 tokens from the toy CLIP's image embedding), trained on the frozen "
                 "toy UNet, in h94's checkpoint layout",
            download_size="nothing (shipped inside the package)",
        ),
        "toy-ip-adapter-plus": Preset(
            name="toy-ip-adapter-plus",
            sd_model=str(TOY_SD_FOLDER),
            clip_model=str(TOY_CLIP_FOLDER),
            ip_adapter=TOY_IP_ADAPTER_PLUS,
            method="ip_adapter",
            defaults=(*_TOY_DEFAULTS, ("mode", "ip_adapter")),
            image_tokens_fit=False,
            note="the toy world's IP-Adapter Plus: a resampler (16 queries) over the toy vision tower's penultimate "
                 "tokens, trained on the frozen toy UNet",
            download_size="nothing (shipped inside the package)",
        ),
        "toy-variations": Preset(
            name="toy-variations",
            sd_model=str(TOY_VARIATIONS_FOLDER),
            clip_model=str(TOY_VARIATIONS_FOLDER),
            method="variations",
            defaults=(*_TOY_DEFAULTS, *_VARIATIONS_DEFAULTS),
            text_encoder=False,
            note="the toy world's image variations: the toy UNet fine-tuned on one CLIP image token (lambdalabs' "
                 "recipe), a StableDiffusionImageVariationPipeline folder",
            download_size="nothing (shipped inside the package)",
        ),
        "sd15-live": Preset(
            name="sd15-live",
            sd_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            clip_model="openai/clip-vit-large-patch14",
            loras=((LCM_LORA_SD15, 1.0),),
            defaults=LIVE_DEFAULTS,
            note="live mode for teaching: SD 1.5 + LCM-LoRA, 4 steps with the lcm scheduler, guidance 1, the tiny "
                 "decoder (TAESD)",
            download_size="about 5.5 GB (SD 1.5) + 1.7 GB (CLIP ViT-L/14) + 135 MB (LCM-LoRA) + 10 MB (TAESD)",
            controlnet=SD15_CONTROLNETS,
        ),
        "tiny-live": Preset(
            name="tiny-live",
            sd_model="tiny",
            clip_model="tiny",
            loras=(("tiny-lcm-lora", 1.0),),
            defaults=LIVE_DEFAULTS,
            note="offline twin of 'sd15-live': the tiny preset plus a random LoRA shaped like LCM-LoRA and a random "
                 "tiny decoder shaped like TAESD",
            download_size="nothing (built locally, under 1 MB more than tiny)",
            offline_builder="tiny",
            controlnet="tiny",
        ),
        "variations": Preset(
            name="variations",
            sd_model="lambdalabs/sd-image-variations-diffusers",
            clip_model="lambdalabs/sd-image-variations-diffusers",
            revision="v2.0",
            method="variations",
            defaults=_VARIATIONS_DEFAULTS,
            text_encoder=False,
            note="SD fine-tuned on one CLIP image token (image_encoder and feature_extractor ship in the repo)",
            download_size="about 5 GB (fp32 UNet, VAE, ViT-L/14 vision tower) + 1.2 GB safety checker unless off",
            controlnet=SD15_CONTROLNETS,
        ),
        "tiny-variations": Preset(
            name="tiny-variations",
            sd_model="tiny-variations",
            clip_model="tiny-variations",
            method="variations",
            defaults=_VARIATIONS_DEFAULTS,
            text_encoder=False,
            note="offline twin of 'variations': random, seeded weights",
            download_size="nothing (built locally, about 8 MB)",
            offline_builder="tiny-variations",
            controlnet="tiny",
        ),
        "ip-adapter": Preset(
            name="ip-adapter",
            sd_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            clip_model="h94/IP-Adapter",
            clip_subfolder="models/image_encoder",
            ip_adapter="h94/IP-Adapter:models:ip-adapter_sd15.safetensors",
            method="ip_adapter",
            defaults=(("mode", "ip_adapter"),),
            image_tokens_fit=False,
            note="SD 1.5 + IP-Adapter (ViT-H/14 image encoder, 4 adapter tokens); a text prompt works alongside",
            download_size="about 5.5 GB (SD 1.5) + 2.5 GB (ViT-H/14 image encoder) + 44 MB (ip-adapter_sd15)",
            controlnet=SD15_CONTROLNETS,
        ),
        "tiny-ip-adapter": Preset(
            name="tiny-ip-adapter",
            sd_model="tiny-ip-adapter",
            clip_model="tiny-ip-adapter",
            ip_adapter="tiny-ip-adapter",
            method="ip_adapter",
            defaults=(("mode", "ip_adapter"),),
            image_tokens_fit=False,
            note="offline twin of 'ip-adapter': tiny UNet with SD's block layout, random adapter weights",
            download_size="nothing (built locally, about 4 MB)",
            offline_builder="tiny-ip-adapter",
        ),
        "ip-adapter-plus": Preset(
            name="ip-adapter-plus",
            sd_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            clip_model="h94/IP-Adapter",
            clip_subfolder="models/image_encoder",
            ip_adapter=IP_ADAPTER_PLUS,
            method="ip_adapter",
            defaults=(("mode", "ip_adapter"),),
            image_tokens_fit=False,
            note="SD 1.5 + IP-Adapter Plus: a resampler turns ViT-H's patch features into 16 tokens (closer to the "
                 "image than ip-adapter's 4)",
            download_size="about 5.5 GB (SD 1.5) + 2.5 GB (ViT-H/14 image encoder) + 98 MB (ip-adapter-plus_sd15)",
            controlnet=SD15_CONTROLNETS,
        ),
        "ip-adapter-plus-face": Preset(
            name="ip-adapter-plus-face",
            sd_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            clip_model="h94/IP-Adapter",
            clip_subfolder="models/image_encoder",
            ip_adapter=IP_ADAPTER_PLUS_FACE,
            method="ip_adapter",
            defaults=(("mode", "ip_adapter"),),
            image_tokens_fit=False,
            note="SD 1.5 + IP-Adapter Plus-Face: the Plus resampler trained on cropped faces; give it a face crop",
            download_size="about 5.5 GB (SD 1.5) + 2.5 GB (ViT-H/14 image encoder) + 98 MB "
                          "(ip-adapter-plus-face_sd15)",
            controlnet=SD15_CONTROLNETS,
        ),
        "ip-adapter-plus-and-face": Preset(
            name="ip-adapter-plus-and-face",
            sd_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            clip_model="h94/IP-Adapter",
            clip_subfolder="models/image_encoder",
            ip_adapter=(IP_ADAPTER_PLUS, IP_ADAPTER_PLUS_FACE),
            method="ip_adapter",
            defaults=(("mode", "ip_adapter"),),
            image_tokens_fit=False,
            note="two IP-Adapters at once: Plus for a scene or style image, Plus-Face for a face "
                 "(adapter_images=[[scene], [face]], adapter_scales=[...])",
            download_size="about 5.5 GB (SD 1.5) + 2.5 GB (ViT-H/14 image encoder) + 2 × 98 MB",
            controlnet=SD15_CONTROLNETS,
        ),
        "tiny-ip-adapter-plus": Preset(
            name="tiny-ip-adapter-plus",
            sd_model="tiny-ip-adapter",
            clip_model="tiny-ip-adapter",
            ip_adapter="tiny-ip-adapter-plus",
            method="ip_adapter",
            defaults=(("mode", "ip_adapter"),),
            image_tokens_fit=False,
            note="offline twin of 'ip-adapter-plus': a tiny resampler (16 queries) with random weights",
            download_size="nothing (built locally, about 4 MB + 0.8 MB)",
            offline_builder="tiny-ip-adapter",
        ),
        "tiny-ip-adapter-plus-face": Preset(
            name="tiny-ip-adapter-plus-face",
            sd_model="tiny-ip-adapter",
            clip_model="tiny-ip-adapter",
            ip_adapter="tiny-ip-adapter-plus-face",
            method="ip_adapter",
            defaults=(("mode", "ip_adapter"),),
            image_tokens_fit=False,
            note="offline twin of 'ip-adapter-plus-face': the tiny Plus architecture with other random weights",
            download_size="nothing (built locally, about 4 MB + 0.8 MB)",
            offline_builder="tiny-ip-adapter",
        ),
        "tiny-ip-adapter-plus-and-face": Preset(
            name="tiny-ip-adapter-plus-and-face",
            sd_model="tiny-ip-adapter",
            clip_model="tiny-ip-adapter",
            ip_adapter=("tiny-ip-adapter-plus", "tiny-ip-adapter-plus-face"),
            method="ip_adapter",
            defaults=(("mode", "ip_adapter"),),
            image_tokens_fit=False,
            note="offline twin of 'ip-adapter-plus-and-face': both tiny Plus adapters at once",
            download_size="nothing (built locally, about 4 MB + 1.7 MB)",
            offline_builder="tiny-ip-adapter",
        ),
        "caption": Preset(
            name="caption",
            sd_model="CompVis/stable-diffusion-v1-4",
            clip_model="openai/clip-vit-large-patch14",
            captioner="Salesforce/blip-image-captioning-base",
            method="caption",
            defaults=(("mode", "caption"),),
            note="BLIP writes a caption you can edit; SD draws from the text (the image modes work too)",
            download_size="about 5.5 GB (SD 1.4) + 1.7 GB (CLIP ViT-L/14) + 1 GB (BLIP base)",
            controlnet=SD15_CONTROLNETS,
        ),
        "sd15-hyper": Preset(
            name="sd15-hyper",
            sd_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
            clip_model="openai/clip-vit-large-patch14",
            loras=((HYPER_SD15_CFG, 1.0),),
            defaults=HYPER_DEFAULTS,
            note="fast with guidance: SD 1.5 + Hyper-SD's CFG-preserved LoRA, 8 steps (ddim_trailing), guidance 5, "
                 "so negative text and negative images still act; the tiny decoder (TAESD)",
            download_size="about 5.5 GB (SD 1.5) + 1.7 GB (CLIP ViT-L/14) + 135 MB (Hyper-SD LoRA) + 10 MB (TAESD)",
            controlnet=SD15_CONTROLNETS,
        ),
        "tiny-hyper": Preset(
            name="tiny-hyper",
            sd_model="tiny",
            clip_model="tiny",
            loras=(("tiny-hyper-lora", 1.0),),
            defaults=HYPER_DEFAULTS,
            note="offline twin of 'sd15-hyper': the tiny preset plus a random LoRA shaped like Hyper-SD's and a random "
                 "tiny decoder shaped like TAESD",
            download_size="nothing (built locally, under 1 MB more than tiny)",
            offline_builder="tiny",
        ),
        "sdxl": Preset(
            name="sdxl",
            sd_model=SDXL_BASE,
            clip_model=CLIP_VIT_L,
            clip_model_2=CLIP_VIT_BIGG,
            family="sdxl",
            defaults=SDXL_DEFAULTS,
            controlnet=SDXL_CONTROLNETS,
            note="SDXL base 1.0 at 1,024 px: image tokens fill both of its token spaces (ViT-L/14 beside "
                 "OpenCLIP bigG), and revision puts bigG's image embedding in its pooled slot; edges and depth "
                 "download diffusers' SDXL ControlNets (about 5 GB each) on first use",
            download_size="about 14 GB (SDXL base fp32 safetensors) + 1.7 GB (CLIP ViT-L/14) + 10 GB "
                          "(OpenCLIP ViT-bigG-14)",
        ),
        "sdxl-live": Preset(
            name="sdxl-live",
            sd_model=SDXL_BASE,
            clip_model=CLIP_VIT_L,
            clip_model_2=CLIP_VIT_BIGG,
            family="sdxl",
            loras=((LCM_LORA_SDXL, 1.0),),
            defaults=LIVE_DEFAULTS,
            controlnet=SDXL_CONTROLNETS,
            note="live mode on SDXL: SDXL base + LCM-LoRA SDXL, 4 steps with the lcm scheduler, guidance 1, the tiny "
                 "decoder (TAESDXL)",
            download_size="about 14 GB (SDXL base) + 1.7 GB (CLIP ViT-L/14) + 10 GB (OpenCLIP ViT-bigG-14) + "
                          "394 MB (LCM-LoRA SDXL) + 10 MB (TAESDXL)",
        ),
        "tiny-sdxl": Preset(
            name="tiny-sdxl",
            sd_model="tiny-sdxl",
            clip_model="tiny-sdxl",
            clip_model_2="tiny-sdxl",
            family="sdxl",
            defaults=SDXL_DEFAULTS,
            controlnet="tiny-sdxl",
            note="offline twin of 'sdxl': a tiny SDXL (two text encoders, the pooled slot, micro-conditioning) and "
                 "tiny ViT-L and bigG analogs, random seeded weights",
            download_size="nothing (built locally in about a second, about 4 MB)",
            offline_builder="tiny-sdxl",
        ),
        "tiny-sdxl-live": Preset(
            name="tiny-sdxl-live",
            sd_model="tiny-sdxl",
            clip_model="tiny-sdxl",
            clip_model_2="tiny-sdxl",
            family="sdxl",
            loras=(("tiny-sdxl-lcm-lora", 1.0),),
            defaults=LIVE_DEFAULTS,
            controlnet="tiny-sdxl",
            note="offline twin of 'sdxl-live': tiny-sdxl plus a random LoRA shaped like LCM-LoRA SDXL and a random "
                 "tiny decoder shaped like TAESDXL",
            download_size="nothing (built locally, under 1 MB more than tiny-sdxl)",
            offline_builder="tiny-sdxl",
        ),
        "sdxl-ip-adapter": Preset(
            name="sdxl-ip-adapter",
            sd_model=SDXL_BASE,
            clip_model="h94/IP-Adapter",
            clip_subfolder="sdxl_models/image_encoder",
            ip_adapter=IP_ADAPTER_SDXL,
            family="sdxl",
            method="ip_adapter",
            defaults=(*SDXL_DEFAULTS, ("mode", "ip_adapter")),
            controlnet=SDXL_CONTROLNETS,
            image_tokens_fit=False,
            note="SDXL base + IP-Adapter SDXL: OpenCLIP ViT-bigG/14's image embedding as 4 adapter tokens (the "
                 "encoder its shapes ask for); a text prompt works alongside",
            download_size="about 14 GB (SDXL base fp32 safetensors) + 3.7 GB (ViT-bigG/14 image encoder) + 703 MB "
                          "(ip-adapter_sdxl)",
        ),
        "sdxl-ip-adapter-plus": Preset(
            name="sdxl-ip-adapter-plus",
            sd_model=SDXL_BASE,
            clip_model="h94/IP-Adapter",
            clip_subfolder="models/image_encoder",
            ip_adapter=IP_ADAPTER_PLUS_SDXL,
            family="sdxl",
            method="ip_adapter",
            defaults=(*SDXL_DEFAULTS, ("mode", "ip_adapter")),
            controlnet=SDXL_CONTROLNETS,
            image_tokens_fit=False,
            note="SDXL base + IP-Adapter Plus SDXL: a resampler over ViT-H/14's patch features gives 16 tokens (the "
                 "ViT-H file needs ViT-H, not bigG)",
            download_size="about 14 GB (SDXL base fp32 safetensors) + 2.5 GB (ViT-H/14 image encoder) + 848 MB "
                          "(ip-adapter-plus_sdxl_vit-h)",
        ),
        "tiny-sdxl-ip-adapter": Preset(
            name="tiny-sdxl-ip-adapter",
            sd_model="tiny-sdxl",
            clip_model="tiny-sdxl-ip-adapter",  # the tiny encoder its adapter's shapes fit (offline_sdxl_adapters.py)
            ip_adapter="tiny-sdxl-ip-adapter",
            family="sdxl",
            method="ip_adapter",
            defaults=(*SDXL_DEFAULTS, ("mode", "ip_adapter")),
            controlnet="tiny-sdxl",
            image_tokens_fit=False,
            note="offline twin of 'sdxl-ip-adapter': tiny-sdxl with a random adapter over the bigG analog",
            download_size="nothing (built locally, under 1 MB more than tiny-sdxl)",
            offline_builder="tiny-sdxl",
        ),
        "tiny-sdxl-ip-adapter-plus": Preset(
            name="tiny-sdxl-ip-adapter-plus",
            sd_model="tiny-sdxl",
            clip_model="tiny-sdxl-ip-adapter-plus",
            ip_adapter="tiny-sdxl-ip-adapter-plus",
            family="sdxl",
            method="ip_adapter",
            defaults=(*SDXL_DEFAULTS, ("mode", "ip_adapter")),
            controlnet="tiny-sdxl",
            image_tokens_fit=False,
            note="offline twin of 'sdxl-ip-adapter-plus': tiny-sdxl with a random resampler over a ViT-H analog",
            download_size="nothing (built locally, under 1 MB more than tiny-sdxl)",
            offline_builder="tiny-sdxl",
        ),
        "tiny-caption": Preset(
            name="tiny-caption",
            sd_model="tiny",
            clip_model="tiny",
            captioner="tiny",
            method="caption",
            defaults=(("mode", "caption"),),
            note="offline twin of 'caption': the tiny preset plus a tiny random BLIP",
            download_size="nothing (built locally, under 1 MB more than tiny)",
            offline_builder="tiny",
            controlnet="tiny",
        ),
    }
)


#: The live preset of a preset, for a face's "live" switch: the same SD with LCM-LoRA and the live defaults.
LIVE_TWINS: MappingProxyType[str, str] = MappingProxyType(
    {"sd15": "sd15-live", "tiny": "tiny-live", "sdxl": "sdxl-live", "tiny-sdxl": "tiny-sdxl-live"}
)


def shown_source(source: str) -> str:
    """A model source as a person should read it: folders inside this package named from the package down
    (``imageprompt_widgets/toy/weights/clip``), not by where it happens to be installed; anything else as given."""
    package = Path(__file__).resolve().parent
    if not os.path.exists(source):  # a Hub id
        return source
    try:
        return str(Path(source).resolve().relative_to(package.parent))
    except (ValueError, OSError):
        return source


def runs_toy_weights(preset: Preset) -> bool:
    """Whether a preset runs the toy world's shipped weights (its SD folder lies under the toy weights: ``toy``,
    ``toy-fine``, ``toy-ip-adapter``, ``toy-ip-adapter-plus``, ``toy-variations``)."""
    return bool(preset.sd_model) and Path(preset.sd_model).resolve().is_relative_to(TOY_WEIGHTS.resolve())


class UnknownPresetError(ValueError):
    """A model name that is neither a preset, a local folder nor a plausible Hub id."""


def default_preset_name() -> str:
    """The preset used when none is named: ``$IMAGEPROMPT_MODEL`` where set, else ``sd14``."""
    return os.environ.get(MODEL_ENV, "").strip() or DEFAULT_PRESET


def resolve_preset(model: str | Preset | None = None) -> Preset:
    """Turn a preset name, a local folder or ``None`` (the default) into a :class:`Preset`.

    A local folder is taken as a Stable Diffusion model folder; its image encoder is looked for in
    an ``image_encoder`` subfolder, else the folder's ``clip`` sibling, else ViT-L/14. A folder whose
    ``model_index.json`` names ``StableDiffusionXLPipeline`` loads as SDXL, for the text-side methods (no bigG
    tower beside it, so no image tokens: the ``sdxl`` preset has both towers).
    """
    if isinstance(model, Preset):
        return model
    name = default_preset_name() if model is None else str(model)
    if name in PRESETS:
        return PRESETS[name]
    if os.path.isdir(name):
        clip = _local_clip_for(name)
        if _is_sdxl_folder(name):  # no bigG beside it: words-only and the text-side methods, not image tokens
            return Preset(name=name, sd_model=name, clip_model=clip, note="local SDXL folder", family="sdxl",
                          image_tokens_fit=False)
        return Preset(name=name, sd_model=name, clip_model=clip, note="local folder")
    raise UnknownPresetError(
        f"Unknown model {name!r}: pass one of the presets "
        f"{', '.join(p for p in PRESETS if not p.startswith(('tiny-', 'toy-')))} (or a 'tiny-' or 'toy-' twin) or a "
        "local model folder, or use ImagePromptPipeline.from_pretrained(sd_model=..., clip_model=...) for Hub ids."
    )


def _is_sdxl_folder(folder: str) -> bool:
    """Whether a diffusers folder's ``model_index.json`` names the SDXL pipeline (the family decides the class)."""
    import json

    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as index:
            return json.load(index).get("_class_name") == "StableDiffusionXLPipeline"
    except (OSError, ValueError, AttributeError):
        return False


def _local_clip_for(sd_folder: str) -> str:
    for candidate in (
        os.path.join(sd_folder, "image_encoder"),
        os.path.join(os.path.dirname(os.path.abspath(sd_folder)), "clip"),
    ):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    return PRESETS["sd14"].clip_model
