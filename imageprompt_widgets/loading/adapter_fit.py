"""Which image encoder and which UNet an IP-Adapter file needs, read from its tensor shapes alone.

The most frequent IP-Adapter complaint is a file paired with the wrong image encoder: ``ip-adapter_sdxl`` reads
ViT-bigG/14's 1,280-wide embedding, the ``*_vit-h`` files ViT-H/14's 1,024-wide one (or its 1,280-wide hidden
states, for Plus), and diffusers only finds out while copying weights, with torch's ``size mismatch for
proj.weight``. Everything an adapter needs is written in its shapes:

- ``image_proj.proj.weight`` ``[tokens * cross, embed]``: a plain adapter reads the encoder's projected embedding;
- ``image_proj.proj_in.weight`` ``[dim, hidden]`` and ``image_proj.latents`` ``[1, tokens, dim]``: Plus (a
  resampler) reads the encoder's penultimate hidden states;
- ``image_proj.proj.0.weight`` ``[hidden, hidden]`` with ``proj.3`` (a LayerNorm): Full-Face reads every hidden
  state; ``norm.weight`` beside ``proj.0``/``proj.2`` without ``latents``: FaceID, which reads InsightFace's
  512-wide face embedding, not CLIP;
- ``ip_adapter.{id}.to_k_ip.weight`` ``[inner, cross]``: one per UNet cross-attention layer, numbered as
  diffusers numbers attention processors (odd ids), so their count and widths name the UNet.

:func:`read_adapter_shapes` reads a ``.safetensors`` header without loading a value (``.bin`` only with
``allow_pickle``); :func:`adapter_needs` turns shapes into :class:`AdapterNeeds`; :func:`check_adapter_file_fits`
refuses a file that does not fit the loaded encoder or UNet with one sentence naming what it needs, before
anything is loaded into the UNet. This module imports only the ground, so the offline builders can use it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..faults import PICKLE_SUFFIXES, DamagedModelError, EncoderMismatchError, ModelLoadError, load_error

Shapes = Mapping[str, tuple[int, ...]]


class AdapterFitError(EncoderMismatchError):
    """An IP-Adapter file that does not fit the loaded image encoder or UNet; the sentence names what it needs."""


@dataclass(frozen=True)
class KnownEncoder:
    """A CLIP image encoder people know by name, with the widths an adapter can read from it."""

    name: str
    embed_width: int  # the projected image embedding (what a plain adapter reads)
    hidden_width: int  # the vision tower's hidden states (what Plus and Full-Face read)
    source: str  # where to get it: "repo" or "repo:subfolder"


#: The encoders h94's adapters were trained with (and ViT-L/14, SD 1.x's own text-side CLIP).
ENCODERS = (
    KnownEncoder("ViT-L/14", 768, 1024, "openai/clip-vit-large-patch14"),
    KnownEncoder("ViT-H/14", 1024, 1280, "h94/IP-Adapter:models/image_encoder"),
    KnownEncoder("ViT-bigG/14", 1280, 1664, "h94/IP-Adapter:sdxl_models/image_encoder"),
)
#: UNets by cross-attention width, and how many cross-attention layers each has.
UNETS = {768: ("SD 1.x", 16), 1024: ("SD 2.x", 16), 2048: ("SDXL", 70)}
#: What an adapter's image projection reads: the projected embedding, the hidden states, or a face-ID embedding.
READS = ("image_embeds", "hidden_states", "face_id")


@dataclass(frozen=True)
class AdapterNeeds:
    """What an IP-Adapter file needs, from its shapes: its kind, what it reads from the image encoder and how
    wide, and the UNet it was trained for (cross-attention width, one inner width per cross-attention layer)."""

    kind: str  # "plain", "plus", "plus-face", "full-face", "faceid", "faceid-plus"
    tokens: int | None  # image tokens per picture; None: one per vision token (Full-Face)
    reads: str  # one of READS
    input_width: int  # the width of what it reads
    cross_attention_dim: int  # the UNet's cross-attention width it was trained for
    layer_widths: tuple[int, ...]  # each IP cross-attention layer's inner width, in diffusers' order

    @property
    def layers(self) -> int:
        """How many UNet cross-attention layers it adds its image attention to."""
        return len(self.layer_widths)

    @property
    def encoder(self) -> KnownEncoder | None:
        """The known encoder whose output it reads (None: a width no known encoder gives, or FaceID)."""
        return encoder_for(self.reads, self.input_width)

    def describe(self) -> str:
        """What it reads, in words: ``"ViT-H/14 image embeddings (1,024 wide)"``."""
        if self.reads == "face_id":
            return f"InsightFace face-ID embeddings ({self.input_width:,} wide)"
        what = "image embeddings" if self.reads == "image_embeds" else "hidden states"
        encoder = self.encoder
        return f"{encoder.name + ' ' if encoder else ''}{what} ({self.input_width:,} wide)"

    @property
    def unet(self) -> str:
        """The UNet it was trained for, in words: ``"SDXL"``, or its widths where no known UNet has them."""
        return unet_name(self.cross_attention_dim)


def encoder_for(reads: str, width: int) -> KnownEncoder | None:
    """The known encoder that gives ``width``-wide ``reads`` (embeddings or hidden states)."""
    for encoder in ENCODERS:
        if (reads, width) in (("image_embeds", encoder.embed_width), ("hidden_states", encoder.hidden_width)):
            return encoder
    return None


def unet_name(cross_attention_dim: int) -> str:
    known = UNETS.get(cross_attention_dim)
    return known[0] if known else f"a UNet with {cross_attention_dim:,}-wide cross-attention"


# ---------------------------------------------------------------------------------------------
# Reading shapes


def read_adapter_shapes(path: str | os.PathLike, *, allow_pickle: bool = False, name: str | None = None) -> dict:
    """Every tensor's shape in an IP-Adapter file, as flat ``image_proj.*``/``ip_adapter.*`` keys; a
    ``.safetensors`` file's header only (no value is read); a pickle file (``.bin``) only with ``allow_pickle``."""
    path = os.fspath(path)
    name = name or path
    if path.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise ModelLoadError(
                f"The IP-Adapter {name!r} is a pickle file, which can run code when loaded: use its .safetensors "
                "version, or pass allow_pickle=True only for a file you trust."
            )
        return _pickle_shapes(path, name)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as weights:
            return {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise DamagedModelError(
            f"The IP-Adapter file {path} of {name!r} is corrupt (cut short or damaged, e.g. by an interrupted "
            f"download: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}): delete it "
            "and download it again.", path) from err


def _pickle_shapes(path: str, name: str) -> dict:
    import torch

    try:  # mmap: the values stay on disk
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a damaged or foreign pickle: one sentence
        raise ModelLoadError(f"The IP-Adapter file {name!r} cannot be read ({type(err).__name__}: {err}).") from err
    flat: dict[str, tuple[int, ...]] = {}
    for part in ("image_proj", "ip_adapter"):
        for key, value in (state.get(part) or {}).items() if isinstance(state, dict) else ():
            flat[f"{part}.{key}"] = tuple(value.shape)
    if not flat and isinstance(state, dict):  # already flat
        flat = {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}
    return flat


def adapter_needs(shapes: Shapes, name: str = "") -> AdapterNeeds:
    """What an IP-Adapter needs, from its shapes alone (see the module docstring for the layouts). ``name`` (its
    file name) tells Plus-Face from Plus, which share one layout."""
    label = name or "this file"
    proj = {key.removeprefix("image_proj."): shape for key, shape in shapes.items() if key.startswith("image_proj.")}
    layer_keys = sorted(
        (int(match.group(1)), shape) for key, shape in shapes.items()
        if (match := re.fullmatch(r"ip_adapter\.(\d+)\.to_k_ip\.weight", key))
    )
    if not proj or not layer_keys:
        raise ModelLoadError(
            f"The file {label!r} is not an IP-Adapter: it has no {'image_proj' if not proj else 'ip_adapter'}.* "
            "weights."
        )
    widths = tuple(shape[0] for _, shape in layer_keys)
    cross = layer_keys[0][1][1]
    base = os.path.basename(name).lower()
    if "proj.weight" in proj:  # ImageProjModel: Linear(embed, tokens * cross) + LayerNorm(cross)
        out = proj["norm.weight"][0] if "norm.weight" in proj else cross
        kind, reads, width, tokens = "plain", "image_embeds", proj["proj.weight"][1], proj["proj.weight"][0] // out
    elif "proj.3.weight" in proj:  # MLPProjModel over every hidden state
        out = proj["proj.3.weight"][0]
        kind, reads, width, tokens = "full-face", "hidden_states", proj["proj.0.weight"][1], None
    elif "perceiver_resampler.proj_in.weight" in proj:  # FaceID Plus: face ID embedding and CLIP hidden states
        out = proj["norm.weight"][0]
        kind, reads, width, tokens = "faceid-plus", "face_id", proj["proj.0.weight"][1], proj["proj.2.weight"][0] // out
    elif "norm.weight" in proj and "proj.0.weight" in proj:  # FaceID: an MLP over the face ID embedding
        out = proj["norm.weight"][0]
        kind, reads, width, tokens = "faceid", "face_id", proj["proj.0.weight"][1], proj["proj.2.weight"][0] // out
    elif "latents" in proj and "proj_in.weight" in proj:  # Resampler over the penultimate hidden states
        out = proj["proj_out.weight"][0]
        kind = "plus-face" if "face" in base else "plus"
        reads, width, tokens = "hidden_states", proj["proj_in.weight"][1], proj["latents"][1]
    else:
        raise ModelLoadError(f"The IP-Adapter {label!r} has an image projection of a kind this package does not "
                             f"know (keys {', '.join(sorted(proj)[:4])}, ...).")
    if out != cross or any(shape[1] != cross for _, shape in layer_keys):
        raise ModelLoadError(
            f"The IP-Adapter {label!r} is inconsistent: its image projection gives {out:,}-wide tokens but its "
            f"attention layers read {cross:,}-wide ones (a damaged or hand-edited file)."
        )
    return AdapterNeeds(kind, tokens, reads, width, cross, widths)


# ---------------------------------------------------------------------------------------------
# Checking the fit


def unet_cross_attention_widths(unet: Any) -> tuple[int, ...]:
    """The inner width of each of the UNet's cross-attention layers in diffusers' IP-Adapter order (its
    ``attn_processors`` order; ``_convert_ip_adapter_attn_to_diffusers`` reads the same widths)."""
    config = unet.config
    widths = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        if name.startswith("mid_block"):
            widths.append(config.block_out_channels[-1])
        elif name.startswith("up_blocks"):
            widths.append(list(reversed(config.block_out_channels))[int(name[len("up_blocks.")])])
        else:
            widths.append(config.block_out_channels[int(name[len("down_blocks.")])])
    return tuple(widths)


def _unet_phrase(cross_attention_dim: int) -> str:
    known = UNETS.get(cross_attention_dim)
    if known:
        return f"{known[0]}'s UNet ({cross_attention_dim:,}-wide cross-attention)"
    return f"a UNet with {cross_attention_dim:,}-wide cross-attention"


def _widths_text(widths: tuple[int, ...]) -> str:
    unique = [f"{width:,}" for width in sorted(set(widths))]
    return unique[0] if len(unique) == 1 else f"{', '.join(unique[:-1])} and {unique[-1]}"


def check_adapter_fits_models(needs: AdapterNeeds, image_encoder: Any, unet: Any, *, name: str,
                              encoder_name: str = "the loaded one") -> None:
    """Raise :class:`AdapterFitError` (one sentence: what the adapter needs) unless the adapter fits this UNet
    (cross-attention width, layer count and widths) and this image encoder (the width of what it reads)."""
    if needs.reads == "face_id":
        raise AdapterFitError(
            f"The IP-Adapter {name!r} is a FaceID adapter: it reads {needs.describe()}, which this package does not "
            "compute; use a CLIP-based IP-Adapter (plain, Plus, Plus-Face or Full-Face)."
        )
    have_cross = unet.config.cross_attention_dim
    if needs.cross_attention_dim != have_cross:
        fix = f"an {needs.unet} model" if needs.cross_attention_dim in UNETS else "the model it was trained for"
        raise AdapterFitError(
            f"The IP-Adapter {name!r} was trained for {_unet_phrase(needs.cross_attention_dim)} but this model has "
            f"{_unet_phrase(have_cross)}: use it with {fix}."
        )
    have_widths = unet_cross_attention_widths(unet)
    if len(have_widths) != needs.layers:
        raise AdapterFitError(
            f"The IP-Adapter {name!r} has {needs.layers} cross-attention layers but this model's UNet has "
            f"{len(have_widths)}: it was trained for another UNet layout"
            f"{f' ({needs.unet})' if needs.cross_attention_dim in UNETS else ''}."
        )
    if have_widths != needs.layer_widths:
        raise AdapterFitError(
            f"The IP-Adapter {name!r} was trained for a UNet whose cross-attention layers are "
            f"{_widths_text(needs.layer_widths)} wide but this model's are {_widths_text(have_widths)}: it was "
            "trained for another UNet."
        )
    config = getattr(image_encoder, "config", image_encoder)
    have = config.projection_dim if needs.reads == "image_embeds" else config.hidden_size
    if have != needs.input_width:
        what = "image embeddings" if needs.reads == "image_embeds" else "hidden states"
        known_have = encoder_for(needs.reads, have)
        encoder = needs.encoder
        fix = (f"load it with the image encoder {encoder.source!r}" if encoder else
               f"load it with an image encoder whose {what} are {needs.input_width:,} wide")
        raise AdapterFitError(
            f"The IP-Adapter {name!r} reads {needs.describe()} but the image encoder {encoder_name!r} gives "
            f"{have:,}-wide {what}{f' ({known_have.name})' if known_have else ''}: {fix}."
        )


# ---------------------------------------------------------------------------------------------
# Finding the file


def parse_adapter(spec: str) -> tuple[str, str, str]:
    """``"repo_or_folder:subfolder:weight_name"`` → its three parts (subfolder may be empty)."""
    parts = spec.rsplit(":", 2)  # a folder path may hold a colon itself (C:\\...)
    if len(parts) != 3:
        raise ModelLoadError(
            f"IP-Adapter {spec!r} is neither a file nor a spec 'repo_or_folder:subfolder:weight_name' "
            "('folder::weight_name' for a folder)."
        )
    return parts[0], parts[1], parts[2]


def adapter_file(spec: str | os.PathLike, *, allow_pickle: bool = False) -> str:
    """The local file an IP-Adapter names: a file path as it is; ``"folder::weight_name"`` or
    ``"repo:subfolder:weight_name"`` joined, from the Hub's cache (downloaded once, as diffusers would)."""
    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return spec
    folder, subfolder, weight = parse_adapter(spec)
    if os.path.isdir(folder):
        path = os.path.join(folder, subfolder, weight)
        if not os.path.isfile(path):  # a damaged build or download: DamagedModelError names it (offline builds heal)
            raise DamagedModelError(f"The IP-Adapter {spec!r} is incomplete: its weights file {path} is missing (an "
                                    "interrupted download or copy?): restore that file, or download it again.", path)
        return path
    if folder.startswith((".", "/", "~")) or os.sep + os.sep in folder:
        raise ModelLoadError(f"The IP-Adapter folder {folder!r} does not exist.")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(folder, weight, subfolder=subfolder or None)
    except Exception as err:  # the Hub's many failures: one sentence (faults.py)
        raise load_error(err, spec, allow_pickle) from err


def check_adapter_file(spec: str | os.PathLike, image_encoder: Any, unet: Any, *, name: str | None = None,
                       encoder_name: str = "the loaded one", allow_pickle: bool = False) -> tuple[str, AdapterNeeds]:
    """Find an IP-Adapter file, read its needs from its shapes, and check them against the encoder and UNet
    before anything is loaded: ``(local file, needs)``, or :class:`AdapterFitError`."""
    label = name or os.fspath(spec)
    path = adapter_file(spec, allow_pickle=allow_pickle)
    needs = adapter_needs(read_adapter_shapes(path, allow_pickle=allow_pickle, name=label), os.path.basename(path))
    check_adapter_fits_models(needs, image_encoder, unet, name=label, encoder_name=encoder_name)
    return path, needs
