"""The banner notebooks show when a preset's weights are random: which presets, and what it says."""

from __future__ import annotations

import pytest

from imageprompt_widgets.presets import PRESETS
from imageprompt_widgets.views.banner import has_random_weights, weights_banner


def test_every_offline_preset_and_only_those_get_the_banner():
    random = {name for name in PRESETS if weights_banner(name) is not None}
    assert random >= {"tiny", "tiny-variations", "tiny-ip-adapter", "tiny-caption"}
    assert random.isdisjoint({"sd14", "sd15", "variations", "ip-adapter", "caption"})
    assert not has_random_weights("sd14") and weights_banner(PRESETS["sd14"]) is None


def test_the_banner_says_the_pictures_are_noise_and_what_to_pick_instead():
    banner = weights_banner("tiny-caption")
    text = str(banner)
    assert text.startswith("Random weights ('tiny-caption'): these pictures are noise from random weights; "
                           "the numbers are not real weights' either")
    assert 'PRESET = "sd14"' in text and "GPU runtime" in text
    html = banner._repr_html_()
    assert html.startswith("<div style=") and "PRESET = &quot;sd14&quot;" in html and "<b>Random weights" in html
    assert repr(banner) == text


def test_an_unknown_preset_is_refused_as_everywhere():
    from imageprompt_widgets.presets import UnknownPresetError

    with pytest.raises(UnknownPresetError):
        weights_banner("no-such-preset")


def test_the_toy_world_gets_its_own_banner_not_the_random_weights_one():
    from imageprompt_widgets.views.banner import is_toy_world

    banner = weights_banner("toy")
    assert is_toy_world("toy") and not is_toy_world("tiny") and not has_random_weights("toy")
    assert str(banner).startswith("The toy world ('toy'): a miniature Stable Diffusion and CLIP trained")
    assert "noise" not in str(banner) and 'PRESET = "sd14"' in str(banner)
