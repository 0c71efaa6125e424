"""Step previews: the latent → RGB maps, TAESD, and that previews show the predicted clean image."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from imageprompt_widgets.engine import preview
from imageprompt_widgets.loading.offline import sample_image


class Config(dict):
    """Like diffusers' FrozenDict: keys readable as attributes."""

    __getattr__ = dict.__getitem__


class LinearVae(torch.nn.Module):
    """A stand-in VAE whose decoder is exactly linear: ``rgb = W·(z·s) + b``, upsampled ×2."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, scaling: float = 0.5) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device and a dtype
        self.config = Config(latent_channels=weight.shape[0], scaling_factor=scaling, block_out_channels=[4, 8])

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        scaled = z * self.config.scaling_factor
        rgb = torch.einsum("bchw,cr->brhw", scaled, self.weight) + self.bias[None, :, None, None]
        return SimpleNamespace(sample=rgb.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_sd1_coefficients_are_applied_as_published():
    latents = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    factors = np.array(preview.SD1_LATENT_RGB_FACTORS)
    by_hand = np.einsum("bchw,cr->brhw", latents.numpy(), factors)
    expected = np.clip((by_hand + 1) / 2, 0, 1)
    np.testing.assert_allclose(preview.sd1_linear_decoder()(latents).numpy(), expected, atol=1e-6)


def test_fit_recovers_an_exactly_linear_decoder():
    weight = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -0.4], [0.2, 0.2, 0.2], [-0.1, 0.0, 0.6]])
    bias = torch.tensor([0.1, -0.05, 0.0])
    fitted = preview.fit_linear_decoder(LinearVae(weight, bias))
    torch.testing.assert_close(fitted.weight, weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fitted.bias, bias, atol=1e-5, rtol=1e-4)


def test_sd1_vae_gets_the_public_coefficients_and_others_a_fit(tiny_pipe, monkeypatch):
    monkeypatch.setattr(tiny_pipe, "_tiny_decoder", None)  # as before any decoder="tiny" run
    sd1 = SimpleNamespace(config=Config(latent_channels=4, scaling_factor=0.18215, block_out_channels=[128, 256, 512, 512]))
    assert preview.is_sd1_vae(sd1)
    assert not preview.is_sd1_vae(tiny_pipe.sd.vae)
    decoder = preview.decoder_for(tiny_pipe, "linear")
    assert decoder.name == "linear (fitted)"
    assert preview.decoder_for(tiny_pipe, "auto").name == "vae"  # a VAE this small decodes its own previews
    monkeypatch.setattr(tiny_pipe, "_tiny_decoder", None)
    held = tiny_pipe.tiny_decoder()  # a decoder="tiny" run loads it: previews then match that run's pictures
    auto = preview.decoder_for(tiny_pipe, "auto")
    assert auto.name == "taesd" and auto.model is held


def test_previews_show_the_predicted_clean_image_and_approach_the_result(tiny_pipe, image):
    decoder = preview.decoder_for(tiny_pipe, "linear")
    seen = []
    result = tiny_pipe.generate(image, steps=8, seed=3, on_step=lambda info: seen.append(decoder(info.x0())))
    final = torch.tensor(np.asarray(result.images[0]), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    final = torch.nn.functional.avg_pool2d(final, tiny_pipe.sd.vae_scale_factor)
    errors = [float(((frame - final) ** 2).mean()) for frame in seen]
    assert errors[-1] < errors[0]  # the previews converge on the picture the run ends with


def test_preview_jpegs_are_small_and_one_per_image():
    latents = torch.randn(3, 4, 64, 64, generator=torch.Generator().manual_seed(1))
    jpegs = preview.preview_jpegs(latents, preview.sd1_linear_decoder(), max_side=256)
    assert len(jpegs) == 3
    for data in jpegs:
        assert data[:2] == b"\xff\xd8"  # JPEG
        assert len(data) < 40_000
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (256, 256)


def test_taesd_from_a_local_folder(tiny_pipe, tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    taesd = AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
    )
    taesd.save_pretrained(tmp_path / "taesd")
    decoder = preview.decoder_for(tiny_pipe, "taesd", taesd=tmp_path / "taesd")
    assert decoder.name == "taesd"
    rgb = decoder(torch.randn(2, 4, 8, 8))
    assert rgb.shape == (2, 3, 16, 16) and 0 <= float(rgb.min()) and float(rgb.max()) <= 1
    with torch.no_grad():
        expected = ((taesd.decode(torch.zeros(1, 4, 8, 8)).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(decoder(torch.zeros(1, 4, 8, 8)), expected)


def test_missing_taesd_is_named(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match="TAESD .*could not be loaded.*preview='linear'"):
        preview.decoder_for(tiny_pipe, "taesd", taesd=tmp_path / "nothing-here")
    with pytest.raises(ValueError, match="preview='fast' is not one of auto, linear, taesd"):
        preview.decoder_for(tiny_pipe, "fast")


def test_thumbnail_never_upscales():
    small = sample_image(0, size=(40, 30))
    assert preview.thumbnail(small, 96).size == (40, 30)
    assert preview.thumbnail(sample_image(0, size=(200, 100)), 96).size == (96, 48)


def test_on_toy_the_last_preview_is_the_final_picture():
    """Previews in the final picture's colours: the toy world's VAE is cheap, so it decodes the previews itself (a
    fitted linear map showed orange-red where the picture was yellow), and the last one matches the picture."""
    from imageprompt_widgets import ImagePromptPipeline

    toy = ImagePromptPipeline.from_preset("toy")
    decoder = preview.decoder_for(toy, "auto")
    assert decoder.name == "vae"
    frames = []
    result = toy.generate(sample_image(2), mode="blend", prompt="a red square on a yellow background", image_weight=0.0,
                          seed=1, on_step=lambda info: frames.append(decoder(info.x0())))
    final = torch.tensor(np.asarray(result.images[0]), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    last = frames[-1]
    assert last.shape == final.shape
    assert float((last - final).abs().mean()) < 0.01  # within a few grey levels on average
    per_channel = last.mean(dim=(0, 2, 3)) - final.mean(dim=(0, 2, 3))
    assert float(per_channel.abs().max()) < 0.01  # the same colours, not only the same shapes
