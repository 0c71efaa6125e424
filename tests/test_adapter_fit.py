"""No reachable adapter/encoder mismatch: an IP-Adapter's needs come from its own tensor shapes.

Every h94 SD 1.5 and SDXL variant is written as a ``.safetensors`` file with its true key names and shapes (the
values are zeros in a sparse file: only the header is ever read, so a 700 MB adapter costs nothing), checked
against the real encoders' widths and the real SD 1.5 and SDXL UNet layouts (built on the meta device). The widths
of each UNet's cross-attention layers come from an independent source: the per-layer channel lists ComfyUI's
IP-Adapter node and the A1111 ControlNet extension hard-code (``SD_V12_CHANNELS``, ``SD_XL_CHANNELS``, one entry
each for ``to_k_ip`` and ``to_v_ip``). The tiny twins then show the whole route: a refused file leaves the pipeline
computing exactly what it computed before; a fitting one makes ``mode="ip_adapter"`` available.
"""

from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import pixels

from imageprompt_widgets import ImagePromptPipeline
from imageprompt_widgets.faults import EncoderMismatchError, ModelLoadError
from imageprompt_widgets.loading.adapter_fit import (
    AdapterFitError,
    adapter_needs,
    check_adapter_file,
    read_adapter_shapes,
    unet_cross_attention_widths,
)
from imageprompt_widgets.presets import Preset

SD_V12_CHANNELS = [320] * 4 + [640] * 4 + [1280] * 4 + [1280] * 6 + [640] * 6 + [320] * 6 + [1280] * 2
SD_XL_CHANNELS = [640] * 8 + [1280] * 40 + [1280] * 60 + [640] * 12 + [1280] * 20
SD15_LAYERS, SDXL_LAYERS = tuple(SD_V12_CHANNELS[::2]), tuple(SD_XL_CHANNELS[::2])

#: The encoders' widths (projection, hidden): OpenAI ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14 (h94's folders).
ENCODERS = {
    "ViT-L/14": SimpleNamespace(projection_dim=768, hidden_size=1024),
    "ViT-H/14": SimpleNamespace(projection_dim=1024, hidden_size=1280),
    "ViT-bigG/14": SimpleNamespace(projection_dim=1280, hidden_size=1664),
}
SOURCES = {"ViT-H/14": "h94/IP-Adapter:models/image_encoder", "ViT-bigG/14": "h94/IP-Adapter:sdxl_models/image_encoder"}


# -- h94's layouts (tencent-ailab/IP-Adapter's ImageProjModel, Resampler, MLPProjModel) --------------------------

def plain(tokens: int, cross: int, embed: int) -> dict:
    return {"image_proj.proj.weight": (tokens * cross, embed), "image_proj.proj.bias": (tokens * cross,),
            "image_proj.norm.weight": (cross,), "image_proj.norm.bias": (cross,)}


def resampler(dim: int, heads: int, queries: int, embedding_dim: int, output_dim: int, depth: int = 4) -> dict:
    inner, shapes = heads * 64, {
        "image_proj.latents": (1, queries, dim), "image_proj.proj_in.weight": (dim, embedding_dim),
        "image_proj.proj_in.bias": (dim,), "image_proj.proj_out.weight": (output_dim, dim),
        "image_proj.proj_out.bias": (output_dim,), "image_proj.norm_out.weight": (output_dim,),
        "image_proj.norm_out.bias": (output_dim,),
    }
    for i in range(depth):
        attention, feed_forward = f"image_proj.layers.{i}.0", f"image_proj.layers.{i}.1"
        shapes.update({
            f"{attention}.norm1.weight": (dim,), f"{attention}.norm1.bias": (dim,),
            f"{attention}.norm2.weight": (dim,), f"{attention}.norm2.bias": (dim,),
            f"{attention}.to_q.weight": (inner, dim), f"{attention}.to_kv.weight": (2 * inner, dim),
            f"{attention}.to_out.weight": (dim, inner),
            f"{feed_forward}.0.weight": (dim,), f"{feed_forward}.0.bias": (dim,),
            f"{feed_forward}.1.weight": (4 * dim, dim), f"{feed_forward}.3.weight": (dim, 4 * dim),
        })
    return shapes


def full_face(hidden: int, cross: int) -> dict:
    return {"image_proj.proj.0.weight": (hidden, hidden), "image_proj.proj.0.bias": (hidden,),
            "image_proj.proj.2.weight": (cross, hidden), "image_proj.proj.2.bias": (cross,),
            "image_proj.proj.3.weight": (cross,), "image_proj.proj.3.bias": (cross,)}


def face_id(cross: int, tokens: int = 4, id_dim: int = 512) -> dict:
    return {"image_proj.proj.0.weight": (2 * id_dim, id_dim), "image_proj.proj.0.bias": (2 * id_dim,),
            "image_proj.proj.2.weight": (tokens * cross, 2 * id_dim), "image_proj.proj.2.bias": (tokens * cross,),
            "image_proj.norm.weight": (cross,), "image_proj.norm.bias": (cross,)}


def attention(widths: tuple[int, ...], cross: int) -> dict:
    shapes = {}
    for index, width in enumerate(widths):
        shapes[f"ip_adapter.{2 * index + 1}.to_k_ip.weight"] = (width, cross)
        shapes[f"ip_adapter.{2 * index + 1}.to_v_ip.weight"] = (width, cross)
    return shapes


SD15 = attention(SD15_LAYERS, 768)
SDXL = attention(SDXL_LAYERS, 2048)
#: file -> (shapes, kind, tokens, reads, input width, encoder, UNet)
VARIANTS = {
    "ip-adapter_sd15.safetensors": ({**plain(4, 768, 1024), **SD15}, "plain", 4, "image_embeds", 1024, "ViT-H/14",
                                    "sd15"),
    "ip-adapter_sd15_light.safetensors": ({**plain(4, 768, 1024), **SD15}, "plain", 4, "image_embeds", 1024,
                                          "ViT-H/14", "sd15"),
    "ip-adapter_sd15_vit-G.safetensors": ({**plain(4, 768, 1280), **SD15}, "plain", 4, "image_embeds", 1280,
                                          "ViT-bigG/14", "sd15"),
    "ip-adapter-plus_sd15.safetensors": ({**resampler(768, 12, 16, 1280, 768), **SD15}, "plus", 16, "hidden_states",
                                         1280, "ViT-H/14", "sd15"),
    "ip-adapter-plus-face_sd15.safetensors": ({**resampler(768, 12, 16, 1280, 768), **SD15}, "plus-face", 16,
                                              "hidden_states", 1280, "ViT-H/14", "sd15"),
    "ip-adapter-full-face_sd15.safetensors": ({**full_face(1280, 768), **SD15}, "full-face", None, "hidden_states",
                                              1280, "ViT-H/14", "sd15"),
    "ip-adapter_sdxl.safetensors": ({**plain(4, 2048, 1280), **SDXL}, "plain", 4, "image_embeds", 1280,
                                    "ViT-bigG/14", "sdxl"),
    "ip-adapter_sdxl_vit-h.safetensors": ({**plain(4, 2048, 1024), **SDXL}, "plain", 4, "image_embeds", 1024,
                                          "ViT-H/14", "sdxl"),
    "ip-adapter-plus_sdxl_vit-h.safetensors": ({**resampler(1280, 20, 16, 1280, 2048), **SDXL}, "plus", 16,
                                               "hidden_states", 1280, "ViT-H/14", "sdxl"),
    "ip-adapter-plus-face_sdxl_vit-h.safetensors": ({**resampler(1280, 20, 16, 1280, 2048), **SDXL}, "plus-face", 16,
                                                    "hidden_states", 1280, "ViT-H/14", "sdxl"),
}


def write_shapes(path, shapes: dict, dtype: str = "F16") -> None:
    """A valid ``.safetensors`` file with these shapes whose values are all zero, written sparsely: the header,
    then the file extended to its full length without writing the data."""
    size = {"F16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for key in sorted(shapes):
        length = int(np.prod(shapes[key], dtype=np.int64)) * size
        header[key] = {"dtype": dtype, "shape": list(shapes[key]), "data_offsets": [offset, offset + length]}
        offset += length
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        file.truncate(8 + len(text) + offset)


@pytest.fixture(scope="module")
def unets():
    """The real SD 1.5 and SDXL UNet layouts on the meta device (no memory): only configs and processors count."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        sdxl = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        )
    return {"sd15": sd15, "sdxl": sdxl}


@pytest.fixture(scope="module")
def variant_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("h94")
    for name, (shapes, *_) in VARIANTS.items():
        write_shapes(folder / name, shapes)
    return folder


def test_the_sparse_writer_writes_what_safetensors_reads(tmp_path):
    from safetensors.torch import load_file

    write_shapes(tmp_path / "a.safetensors", {"b": (2, 3), "a": (5,)}, dtype="F32")
    loaded = load_file(tmp_path / "a.safetensors")
    assert {k: tuple(v.shape) for k, v in loaded.items()} == {"a": (5,), "b": (2, 3)}
    assert all(not v.any() for v in loaded.values())


def test_the_unet_layouts_have_the_layers_h94s_adapters_were_trained_for(unets):
    assert unet_cross_attention_widths(unets["sd15"]) == SD15_LAYERS and len(SD15_LAYERS) == 16
    assert unet_cross_attention_widths(unets["sdxl"]) == SDXL_LAYERS and len(SDXL_LAYERS) == 70


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_h94_variant_says_what_it_needs_from_its_shapes(name, variant_files):
    shapes, kind, tokens, reads, width, encoder, unet = VARIANTS[name]
    read = read_adapter_shapes(variant_files / name)
    assert read == shapes
    needs = adapter_needs(read, name)
    assert (needs.kind, needs.tokens, needs.reads, needs.input_width) == (kind, tokens, reads, width)
    assert needs.encoder is not None and needs.encoder.name == encoder
    assert needs.cross_attention_dim == {"sd15": 768, "sdxl": 2048}[unet]
    assert needs.layer_widths == {"sd15": SD15_LAYERS, "sdxl": SDXL_LAYERS}[unet]
    assert needs.layers == {"sd15": 16, "sdxl": 70}[unet]
    assert needs.unet == {"sd15": "SD 1.x", "sdxl": "SDXL"}[unet]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_encoder_and_unet_pair_either_fits_or_is_one_sentence_naming_the_need(name, variant_files, unets):
    _, kind, _, reads, width, encoder, unet = VARIANTS[name]
    for unet_name, model in unets.items():
        for encoder_name, config in ENCODERS.items():
            label = f"h94/IP-Adapter:x:{name}"
            if (unet_name, encoder_name) == (unet, encoder):
                path, needs = check_adapter_file(variant_files / name, config, model, name=label)
                assert path == str(variant_files / name) and needs.kind == kind
                continue
            with pytest.raises(AdapterFitError) as caught:
                check_adapter_file(variant_files / name, config, model, name=label, encoder_name=encoder_name)
            message = str(caught.value)
            assert isinstance(caught.value, EncoderMismatchError) and isinstance(caught.value, ValueError)
            assert message.startswith(f"The IP-Adapter {label!r} ") and message.endswith(".")
            assert "\n" not in message and "size mismatch" not in message
            if unet_name != unet:
                trained = {"sd15": "SD 1.x's UNet (768-wide", "sdxl": "SDXL's UNet (2,048-wide"}
                assert f"was trained for {trained[unet]} cross-attention) but this model has {trained[unet_name]}" \
                       in message
                assert message.endswith(f"use it with an {'SDXL' if unet == 'sdxl' else 'SD 1.x'} model.")
            else:
                what = "image embeddings" if reads == "image_embeds" else "hidden states"
                have = config.projection_dim if reads == "image_embeds" else config.hidden_size
                assert f"reads {encoder} {what} ({width:,} wide) but the image encoder {encoder_name!r} gives " \
                       f"{have:,}-wide {what}" in message
                assert message.endswith(f"load it with the image encoder {SOURCES[encoder]!r}.")


def test_the_issue_s_complaint_is_a_sentence_not_a_size_mismatch(variant_files, unets):
    """``size mismatch for proj.weight [8192,1024] vs [8192,1280]``: the ViT-H SDXL adapter beside bigG."""
    with pytest.raises(AdapterFitError) as caught:
        check_adapter_file(variant_files / "ip-adapter_sdxl_vit-h.safetensors", ENCODERS["ViT-bigG/14"],
                           unets["sdxl"], name="ip-adapter_sdxl_vit-h", encoder_name="h94/IP-Adapter")
    assert str(caught.value) == (
        "The IP-Adapter 'ip-adapter_sdxl_vit-h' reads ViT-H/14 image embeddings (1,024 wide) but the image encoder "
        "'h94/IP-Adapter' gives 1,280-wide image embeddings (ViT-bigG/14): load it with the image encoder "
        "'h94/IP-Adapter:models/image_encoder'."
    )


def test_faceid_other_layouts_and_foreign_files_are_named(tmp_path, unets):
    write_shapes(tmp_path / "ip-adapter-faceid_sd15.safetensors", {**face_id(768), **SD15})
    needs = adapter_needs(read_adapter_shapes(tmp_path / "ip-adapter-faceid_sd15.safetensors"))
    assert (needs.kind, needs.reads, needs.input_width, needs.tokens) == ("faceid", "face_id", 512, 4)
    with pytest.raises(AdapterFitError, match=r"is a FaceID adapter: it reads InsightFace face-ID embeddings "
                                              r"\(512 wide\), which this package does not compute"):
        check_adapter_file(tmp_path / "ip-adapter-faceid_sd15.safetensors", ENCODERS["ViT-H/14"], unets["sd15"])
    write_shapes(tmp_path / "lora.safetensors", {"unet.down.lora_A.weight": (4, 320)})
    with pytest.raises(ModelLoadError, match=r"^The file '.*lora\.safetensors' is not an IP-Adapter: it has no "
                                             r"image_proj\.\* weights\.$"):
        check_adapter_file(tmp_path / "lora.safetensors", ENCODERS["ViT-H/14"], unets["sd15"])
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ModelLoadError, match=r"is corrupt \(cut short or damaged"):
        read_adapter_shapes(tmp_path / "cut.safetensors")


def test_a_pickle_file_is_read_only_when_allowed_and_gives_the_same_needs(tmp_path, variant_files):
    shapes = VARIANTS["ip-adapter_sd15.safetensors"][0]
    nested: dict = {"image_proj": {}, "ip_adapter": {}}
    for key, shape in shapes.items():  # h94's .bin layout: two nested dictionaries
        part, rest = key.split(".", 1)
        nested[part][rest] = torch.empty(shape, dtype=torch.float16)
    torch.save(nested, tmp_path / "ip-adapter_sd15.bin")
    with pytest.raises(ModelLoadError, match=r"is a pickle file, which can run code when loaded: use its "
                                             r"\.safetensors version, or pass allow_pickle=True"):
        read_adapter_shapes(tmp_path / "ip-adapter_sd15.bin")
    assert read_adapter_shapes(tmp_path / "ip-adapter_sd15.bin", allow_pickle=True) == shapes


@pytest.mark.parametrize("layout", ["plain", "plus", "full-face"])
def test_the_layouts_are_the_ones_diffusers_converter_reads(layout, unets):
    """At a tiny scale with real values: diffusers' own checkpoint converter builds a projection whose input width
    is the one read from the shapes (so the key names above are h94's, as diffusers knows them)."""
    from diffusers import UNet2DConditionModel

    shapes = {"plain": plain(4, 32, 48), "plus": resampler(64, 1, 16, 40, 32), "full-face": full_face(40, 32)}[layout]
    torch.manual_seed(0)
    state = {key.removeprefix("image_proj."): torch.randn(shape) for key, shape in shapes.items()}
    projection = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
        unets["sd15"], state, low_cpu_mem_usage=False)
    needs = adapter_needs({**shapes, **attention((320,), 32)})
    first = {"plain": lambda p: p.image_embeds, "plus": lambda p: p.proj_in, "full-face": lambda p: p.ff.net[0].proj}
    assert first[layout](projection).in_features == needs.input_width == {"plain": 48}.get(layout, 40)


# -- the tiny twins: the whole route ------------------------------------------------------------------------------

FAST = {"steps": 2, "seed": 7, "prompt": "a cat"}
#: The two-adapter twin, as tests/test_adapters.py builds it.
MIXED = Preset(
    name="tiny-mixed-adapters", sd_model="tiny-ip-adapter", clip_model="tiny-ip-adapter",
    ip_adapter=("tiny-ip-adapter", "tiny-ip-adapter-plus"), method="ip_adapter",
    defaults=(("mode", "ip_adapter"),), image_tokens_fit=False,
)
#: The tiny IP-Adapter's SD and encoder without an adapter.
BARE = Preset(name="tiny-no-adapter", sd_model="tiny-ip-adapter", clip_model="tiny-ip-adapter", image_tokens_fit=False)


def private(preset) -> ImagePromptPipeline:
    """A pipeline of its own (not the process cache's): these tests add adapters to it."""
    from imageprompt_widgets.loading.components import load_components
    from imageprompt_widgets.methods import part_loaders
    from imageprompt_widgets.presets import resolve_preset

    preset = resolve_preset(preset)
    return ImagePromptPipeline.from_components(
        load_components(preset, torch.device("cpu"), torch.float32, part_loaders=part_loaders(preset)))


@pytest.mark.slow
def test_a_refused_adapter_leaves_the_pipeline_computing_what_it_did(tmp_path, image):
    from safetensors.torch import save_file

    from imageprompt_widgets.loading.offline import (
        tiny_ip_adapter_plus_state_dict,
        tiny_ip_adapter_state_dict,
    )
    from imageprompt_widgets.methods.ip_adapter import adapter_processors

    pipe = private("tiny-ip-adapter")
    before = pipe.generate(image, **FAST)
    processors, handle = adapter_processors(pipe.sd.unet), pipe.parts["ip_adapter"]
    weights = {name: value.clone() for name, value in pipe.sd.unet.state_dict().items()}
    torch.manual_seed(0)
    wide = tiny_ip_adapter_plus_state_dict(pipe.sd.unet, 48)  # a resampler over 48-wide hidden states; ours are 32
    save_file({k: v.contiguous() for k, v in wide.items()}, str(tmp_path / "wide-plus.safetensors"))
    with pytest.raises(AdapterFitError, match=r"^The IP-Adapter '.*wide-plus\.safetensors' reads hidden states \(48 "
                                              r"wide\) but the image encoder 'tiny-ip-adapter' gives 32-wide hidden "
                                              r"states: load it with an image encoder whose hidden states are 48 "
                                              r"wide\.$"):
        pipe.load_ip_adapter(tmp_path / "wide-plus.safetensors")
    write_shapes(tmp_path / "ip-adapter_sdxl.safetensors", {**plain(4, 2048, 1280), **SDXL})
    with pytest.raises(AdapterFitError, match=r"was trained for SDXL's UNet \(2,048-wide cross-attention\) but this "
                                              r"model has a UNet with 32-wide cross-attention: use it with an SDXL"):
        pipe.load_ip_adapter(f"{tmp_path}::ip-adapter_sdxl.safetensors")
    other = UNetLike(cross_attention_dim=32)  # the twin has 3 down + 1 mid + 2 x 3 up = 10 layers
    save_file({k: v.contiguous() for k, v in tiny_ip_adapter_state_dict(other, 48).items()},
              str(tmp_path / "other-layout.safetensors"))
    with pytest.raises(AdapterFitError, match=r"has 2 cross-attention layers but this model's UNet has 10: "):
        pipe.load_ip_adapter(tmp_path / "other-layout.safetensors")
    assert adapter_processors(pipe.sd.unet) == processors and pipe.parts["ip_adapter"] is handle
    assert all(torch.equal(weights[name], value) for name, value in pipe.sd.unet.state_dict().items())
    after = pipe.generate(image, **FAST)
    assert np.array_equal(pixels(after.images), pixels(before.images))


class UNetLike:
    """A UNet's config and processor names only: two cross-attention layers (what the twins' builder reads)."""

    def __init__(self, cross_attention_dim: int) -> None:
        self.config = SimpleNamespace(cross_attention_dim=cross_attention_dim, block_out_channels=(8, 16))
        self.attn_processors = dict.fromkeys(
            ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
             "mid_block.attentions.0.transformer_blocks.0.attn2.processor"])


@pytest.mark.slow
def test_load_ip_adapter_makes_the_mode_available_and_equals_the_preset_and_bare_diffusers(image):
    pipe = private(BARE)
    assert "ip_adapter" not in pipe.methods() and "ip_adapter" not in pipe.capabilities()
    needs = pipe.load_ip_adapter("tiny-ip-adapter")
    assert (needs.kind, needs.reads, needs.input_width, needs.tokens) == ("plain", "image_embeds", 48, 4)
    assert "ip_adapter" in pipe.methods() and pipe.ip_adapters == ("tiny-ip-adapter",)
    res = pipe.generate(image, mode="ip_adapter", **FAST)
    preset = ImagePromptPipeline.from_preset("tiny-ip-adapter").generate(image, **FAST)
    assert np.array_equal(pixels(res.images), pixels(preset.images))
    bare = pipe.sd("a cat", ip_adapter_image=image, num_inference_steps=2, guidance_scale=7.5,
                   generator=torch.Generator("cpu").manual_seed(7)).images
    assert np.array_equal(pixels(res.images), pixels(bare))
    assert res.recipe["model"]["ip_adapter"] == "tiny-ip-adapter"


@pytest.mark.slow
def test_a_second_adapter_loads_beside_the_first_as_the_two_adapter_preset_does(image, other_image):
    pipe = private("tiny-ip-adapter")
    assert pipe.load_ip_adapter("tiny-ip-adapter-plus").kind == "plus"
    assert pipe.ip_adapters == ("tiny-ip-adapter", "tiny-ip-adapter-plus")
    assert pipe.parts["ip_adapter"].reads_hidden_states == (False, True)
    settings = dict(adapter_images=[[image], [other_image]], adapter_scales=[0.8, 0.3], **FAST)
    res = pipe.generate(image, **settings)
    both = ImagePromptPipeline.from_preset(MIXED).generate(image, **settings)
    assert np.array_equal(pixels(res.images), pixels(both.images))


def test_on_sdxl_the_named_blocks_are_instantstyles_sdxl_layers(unets):
    """InstantStyle's README (and diffusers' guide): style is up_blocks.0.attentions.1, layout
    down_blocks.2.attentions.1; diffusers' own expansion says which layers each name reaches on the real UNets."""
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    from imageprompt_widgets.methods.ip_adapter import (
        BLOCK_PRESETS,
        SDXL_BLOCK_PRESETS,
        check_block_configs,
        is_sdxl_unet,
    )

    assert is_sdxl_unet(unets["sdxl"]) and not is_sdxl_unet(unets["sd15"])

    def reached(unet, config) -> set[str]:
        (expanded,) = _maybe_expand_lora_scales(unet, [config], default_scale=0.0)
        return {layer for layer, scale in expanded.items() if scale}

    check_block_configs(unets["sdxl"], [SDXL_BLOCK_PRESETS[name](0.7) for name in SDXL_BLOCK_PRESETS])
    assert reached(unets["sdxl"], SDXL_BLOCK_PRESETS["style"](0.7)) == {"up_blocks.0.attentions.1"}
    assert reached(unets["sdxl"], SDXL_BLOCK_PRESETS["composition"](0.7)) == {"down_blocks.2.attentions.1"}
    assert reached(unets["sdxl"], SDXL_BLOCK_PRESETS["style_and_composition"](0.7)) == {
        "up_blocks.0.attentions.1", "down_blocks.2.attentions.1"}
    assert reached(unets["sd15"], BLOCK_PRESETS["style"](0.7)) == {f"up_blocks.1.attentions.{i}" for i in range(3)}


@pytest.mark.slow
def test_the_encoder_the_sentence_names_can_be_loaded_with_the_adapter(image):
    from imageprompt_widgets.loading.offline import ensure_tiny_ip_adapter_models, ensure_tiny_models

    narrow = ensure_tiny_models()[1]  # the tiny CLIP: 32-wide embeddings
    pipe = private(Preset(name="narrow", sd_model=ensure_tiny_ip_adapter_models()[0], clip_model=narrow,
                          image_tokens_fit=False))
    encoder = pipe.image_encoder
    with pytest.raises(AdapterFitError, match=r"^The IP-Adapter 'tiny-ip-adapter' reads image embeddings \(48 wide\) "
                                              r"but the image encoder '.*' gives 32-wide image embeddings: load it "
                                              r"with an image encoder whose image embeddings are 48 wide\.$"):
        pipe.load_ip_adapter("tiny-ip-adapter")
    assert pipe.image_encoder is encoder and "ip_adapter" not in pipe.parts
    wide = ensure_tiny_ip_adapter_models()[1]
    pipe.load_ip_adapter("tiny-ip-adapter", image_encoder=wide)
    assert pipe.image_encoder.config.projection_dim == 48 and pipe.preset.clip_model == wide
    res = pipe.generate(image, mode="ip_adapter", **FAST)
    preset = ImagePromptPipeline.from_preset("tiny-ip-adapter").generate(image, **FAST)
    assert np.array_equal(pixels(res.images), pixels(preset.images))


@pytest.mark.parametrize("preset", ["ip-adapter", "ip-adapter-plus", "ip-adapter-plus-face", "sdxl-ip-adapter",
                                    "sdxl-ip-adapter-plus"])
def test_each_h94_preset_pairs_its_file_with_the_encoder_and_unet_its_shapes_need(preset):
    from imageprompt_widgets.presets import PRESETS

    chosen = PRESETS[preset]
    (spec,) = chosen.ip_adapters
    shapes, *_ = VARIANTS[spec.rsplit(":", 1)[1]]
    needs = adapter_needs(shapes, spec)
    assert needs.encoder is not None and needs.encoder.source == f"{chosen.clip_model}:{chosen.clip_subfolder}"
    assert needs.unet == ("SDXL" if chosen.is_sdxl else "SD 1.x")


def test_the_panel_names_an_adapter_loaded_from_a_path_by_its_file():
    from imageprompt_widgets.widget.adapters import adapter_label

    assert adapter_label("/models/ip-adapter-plus_sdxl_vit-h.safetensors") == "ip-adapter-plus_sdxl_vit-h"
    assert adapter_label("h94/IP-Adapter:sdxl_models:ip-adapter_sdxl.safetensors") == "ip-adapter_sdxl"
    assert adapter_label("tiny-sdxl-ip-adapter") == "tiny-sdxl-ip-adapter"
