"""The pure tensor functions of conditioning.py, each against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from imageprompt_widgets import conditioning as c
from imageprompt_widgets.settings import BLENDS, COMBINES, GenerationSettings, SettingsError, setting_specs

A = torch.tensor([[3.0, 0.0, 1.0]])
B = torch.tensor([[0.0, 4.0, -1.0]])
AB = torch.cat([A, B])  # two "images", D = 3


def test_repeat_and_single_tokens_shapes_and_values():
    embeds = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    repeated = c.repeat_tokens(embeds, scale=2.0)
    assert repeated.shape == (2, 77, 2)
    assert torch.equal(repeated[1, 50], torch.tensor([6.0, 8.0]))
    assert torch.equal(c.single_token(embeds, scale=2.0), torch.tensor([[[2.0, 4.0]], [[6.0, 8.0]]]))


def test_mode_functions_reject_wrong_shapes_with_a_settings_error():
    with pytest.raises(SettingsError, match=r"image_embeds must be \[N, D\], got shape \(2, 3, 4\)"):
        c.repeat_tokens(torch.zeros(2, 3, 4))


def test_project_vision_tokens_applies_both_layers_to_every_token():
    hidden = torch.arange(24, dtype=torch.float32).reshape(1, 4, 6)
    tokens = c.project_vision_tokens(hidden, lambda x: x + 1, lambda x: x[..., :2] * 10)
    assert torch.equal(tokens, (hidden[..., :2] + 1) * 10)


def test_average_is_the_normalised_weighted_mean():
    assert torch.allclose(c.average(AB, torch.tensor([1.0, 3.0])), torch.tensor([[0.75, 3.0, -0.5]]))
    assert torch.allclose(c.average(AB), torch.tensor([[1.5, 2.0, 0.0]]))


def test_norm_average_keeps_mean_length_along_mean_direction():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    result = c.norm_average(torch.cat([a, b]))
    # unit directions (1,0) and (0,1) average to (1,1)/sqrt(2) as a direction; mean length (3+4)/2
    expected = torch.tensor([[3.5 / math.sqrt(2), 3.5 / math.sqrt(2)]])
    assert torch.allclose(result, expected)
    weighted = c.norm_average(torch.cat([a, b]), torch.tensor([3.0, 1.0]))
    direction = torch.tensor([3.0, 1.0]) / math.sqrt(10)
    assert torch.allclose(weighted, (direction * (3 * 3 + 4) / 4)[None])


def test_concat_puts_weighted_sequences_side_by_side():
    seqs = torch.stack([torch.ones(2, 3), 2 * torch.ones(2, 3)])  # [2 images, 2 tokens, 3]
    result = c.concat(seqs, torch.tensor([2.0, 0.5]))
    assert result.shape == (1, 4, 3)
    assert torch.equal(result[0, :, 0], torch.tensor([2.0, 2.0, 1.0, 1.0]))
    # vectors [N, D] become one token each through combine()
    assert torch.equal(c.combine("concat", AB), torch.stack([A[0], B[0]])[None])


def test_add_and_subtract():
    assert torch.equal(c.add(AB, torch.tensor([2.0, 1.0])), torch.tensor([[6.0, 4.0, 1.0]]))
    assert torch.equal(c.subtract(AB), torch.tensor([[3.0, -4.0, 2.0]]))
    three = torch.cat([A, B, B])
    assert torch.equal(c.subtract(three, torch.tensor([1.0, 0.5, 0.5])), torch.tensor([[3.0, -4.0, 2.0]]))
    with pytest.raises(SettingsError, match="'subtract' needs at least two images"):
        c.subtract(A)


def test_max_and_min_are_elementwise_over_weighted_images():
    assert torch.equal(c.elementwise_max(AB), torch.tensor([[3.0, 4.0, 1.0]]))
    assert torch.equal(c.elementwise_min(AB), torch.tensor([[0.0, 0.0, -1.0]]))
    assert torch.equal(c.elementwise_max(AB, torch.tensor([-1.0, 1.0])), torch.tensor([[0.0, 4.0, -1.0]]))


def test_slerp_follows_the_great_circle():
    ab = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(c.slerp(ab), torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)]]))
    # weights [1, 3] mean t = 0.75: angle 0.75 * 90 degrees from a
    assert torch.allclose(c.slerp(ab, torch.tensor([1.0, 3.0])),
                          torch.tensor([[math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)]]))
    # parallel vectors fall back to linear interpolation instead of dividing by sin(0)
    assert torch.allclose(c.slerp(torch.tensor([[1.0, 0.0], [2.0, 0.0]])), torch.tensor([[1.5, 0.0]]))


def test_slerp_with_three_images_is_a_readable_settings_error():
    with pytest.raises(SettingsError, match=r"^'slerp' interpolates between exactly two images, got 3\.$"):
        c.combine("slerp", torch.zeros(3, 4))


def test_wrong_number_of_weights_is_named():
    with pytest.raises(SettingsError, match=r"^Got 3 weights for 2 images: give one weight per image\.$"):
        c.average(AB, [1.0, 2.0, 3.0])


def test_combine_functions_and_settings_choices_are_one_list():
    assert tuple(c.COMBINE_FUNCTIONS) == COMBINES
    assert tuple(c.BLEND_FUNCTIONS) == BLENDS


def test_typical_token_norm_leaves_out_the_start_token():
    text = torch.zeros(1, 5, 2)
    text[0, 0] = torch.tensor([30.0, 40.0])  # norm 50: the outlier start token
    text[0, 1:] = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0], [6.0, 8.0]])  # norms 5, 1, 2, 10
    assert c.typical_token_norm(text) == pytest.approx(2.0)  # torch's median: lower of the middle two


def test_match_norm_rescales_every_token_and_keeps_zeros():
    tokens = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [0.0, 0.5]]])
    assert torch.allclose(c.match_norm(tokens, 10.0), torch.tensor([[[6.0, 8.0], [0.0, 0.0], [0.0, 10.0]]]))


def test_blend_interpolate_endpoints_are_exact_and_middle_is_linear():
    text, image = torch.randn(1, 77, 4), torch.randn(1, 77, 4)
    assert torch.equal(c.blend_interpolate(text, image, 0.0), text)
    assert torch.equal(c.blend_interpolate(text, image, 1.0), image)
    assert torch.allclose(c.blend_interpolate(text, image, 0.25), 0.75 * text + 0.25 * image)
    with pytest.raises(SettingsError, match="needs image tokens shaped like the text"):
        c.blend_interpolate(text, torch.randn(1, 1, 4), 0.5)


def test_blend_concat_appends_weighted_image_tokens():
    text, image = torch.ones(1, 77, 4), 2 * torch.ones(1, 1, 4)
    mixed = c.blend_concat(text, image, 0.25)
    assert mixed.shape == (1, 78, 4)
    assert torch.equal(mixed[0, :77], 0.75 * text[0]) and torch.equal(mixed[0, 77], 0.5 * torch.ones(4))
    assert torch.equal(c.blend_concat(text, image, 0.0), text)


def test_pad_with_mask_pads_with_zeros_and_masks_them():
    short, long = torch.ones(2, 1, 3), torch.ones(2, 4, 3)
    (padded_short, padded_long), mask = c.pad_with_mask([short, long])
    assert padded_short.shape == (2, 4, 3) and torch.equal(padded_short[:, 1:], torch.zeros(2, 3, 3))
    assert torch.equal(padded_long, long)
    assert torch.equal(mask, torch.tensor([[1.0, 0, 0, 0]] * 2 + [[1.0, 1, 1, 1]] * 2))
    same, none = c.pad_with_mask([long, long])
    assert none is None and same[0] is long


def test_weights_setting_accepts_lists_and_comma_separated_text():
    assert GenerationSettings(weights="1, 0.5").weights == (1.0, 0.5)
    assert GenerationSettings(weights=[2, 3]).weights == (2.0, 3.0)
    assert GenerationSettings().weights == ()
    with pytest.raises(SettingsError, match=r"^weights must be comma-separated numbers such as 1,0.5, not 'a,b'\.$"):
        GenerationSettings(weights="a,b")
    with pytest.raises(SettingsError, match="outside its range"):
        GenerationSettings(weights=[1, 100])


def test_adapter_window_must_be_ordered():
    with pytest.raises(SettingsError, match=r"^adapter_start=0.5 must be less than adapter_end=0.5\.$"):
        GenerationSettings(adapter_start=0.5, adapter_end=0.5)


def test_every_setting_kind_is_one_the_controls_know_or_the_new_floats():
    kinds = {spec.kind for spec in setting_specs()}
    assert kinds <= {"float", "int", "choice", "bool", "text", "size", "floats", "units"}
    assert {"mode", "combine", "weights", "negative", "crop", "norm_match", "prompt", "image_weight"} <= {
        spec.name for spec in setting_specs()
    }


def test_cli_accepts_comma_separated_weights_and_new_flags():
    from imageprompt_widgets.cli import build_parser
    from imageprompt_widgets.cli.common import chosen_settings

    args = build_parser().parse_args(
        ["generate", "a.png", "b.png", "-o", "out", "--weights", "1,0.5", "--combine", "slerp", "--norm-match",
         "--mode", "blend", "--prompt", "a cat", "--crop", "pad"]
    )
    settings = GenerationSettings.from_kwargs(**chosen_settings(args))
    assert (settings.weights, settings.combine, settings.norm_match) == ((1.0, 0.5), "slerp", True)
    assert (settings.mode, settings.prompt, settings.crop) == ("blend", "a cat", "pad")


# -- round two: one window rule, one guidance rule, combines that need two images ------------------


def test_one_step_window_rule_is_diffusers_controlnet_rule():
    import inspect as python_inspect

    from diffusers.pipelines.controlnet import pipeline_controlnet

    # The rule diffusers applies to control_guidance_start/_end (read from its source, so a change there shows).
    assert "1.0 - float(i / len(timesteps) < s or (i + 1) / len(timesteps) > e)" in python_inspect.getsource(
        pipeline_controlnet.StableDiffusionControlNetPipeline.__call__
    )
    for total in (1, 4, 7, 31):
        for start, end in ((0.0, 1.0), (0.25, 0.75), (0.2, 0.55), (0.5, 1.0), (0.0, 0.1)):
            keep = [1.0 - float(i / total < start or (i + 1) / total > end) for i in range(total)]
            assert [float(c.in_window(i, total, start, end)) for i in range(total)] == keep


def test_guidance_rule_computes_negatives_only_when_guided():
    def never() -> torch.Tensor:
        raise AssertionError("the negative was computed without guidance")

    prompt = torch.randn(1, 3, 4)
    cond = c.Conditioning(prompt, negative=never, adapter_embeds=torch.ones(1, 2, 4), negative_adapter_embeds=never)
    unguided = c.for_unet(cond, guided=False, copies=2)
    assert unguided.negative_prompt_embeds is None and unguided.padded()[1:] == (None, None)
    assert torch.equal(unguided.prompt_embeds, prompt.repeat(2, 1, 1))
    assert [t.tolist() for t in unguided.ip_adapter_image_embeds] == [torch.ones(2, 2, 4).tolist()]

    short = torch.randn(1, 1, 4)
    guided = c.for_unet(c.Conditioning(prompt, negative=lambda: short, adapter_embeds=torch.ones(1, 2, 4)),
                        guided=True, copies=2)
    assert torch.equal(guided.negative_prompt_embeds, short.repeat(2, 1, 1))  # unpadded: what the trace keeps
    # diffusers' IP-Adapter layout: the negatives (zeros by default) first, then the images.
    # one tensor per adapter (diffusers takes a list)
    (adapter,) = guided.ip_adapter_image_embeds
    assert torch.equal(adapter, torch.cat([torch.zeros(2, 2, 4), torch.ones(2, 2, 4)]))
    padded_prompt, padded_negative, mask = guided.padded()
    assert padded_negative.shape == padded_prompt.shape == (2, 3, 4)
    assert mask.tolist() == [[1, 0, 0]] * 2 + [[1, 1, 1]] * 2


@pytest.mark.parametrize("name", ["subtract", "slerp"])
def test_combines_that_need_two_images_refuse_one(name):
    with pytest.raises(c.ConditioningError, match=f"combine='{name}' needs at least 2 images"):
        c.combined_images(name, torch.randn(1, 77, 8))
    assert c.combined_images("average", torch.ones(1, 77, 8)).shape == (1, 77, 8)  # one image: as it is


def test_slerp_of_opposite_vectors_turns_through_a_perpendicular_instead_of_collapsing():
    a = torch.tensor([[3.0, 4.0, 0.0]])
    halfway = c.slerp(torch.cat([a, -2 * a]))  # opposite directions, lengths 5 and 10
    assert halfway.norm().item() == pytest.approx(7.5)  # the lengths, interpolated
    assert (halfway * a).sum().item() == pytest.approx(0.0, abs=1e-5)  # perpendicular to both ends
    ends = c.slerp(torch.cat([a, -2 * a]), torch.tensor([1.0, 0.0])), c.slerp(torch.cat([a, -2 * a]), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ends[0], a)
    torch.testing.assert_close(ends[1], -2 * a)
    assert torch.equal(c.slerp(torch.cat([a, -2 * a])), halfway)  # the same inputs take the same path
