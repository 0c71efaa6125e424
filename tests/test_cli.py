"""The command line: PNGs written and printed, one line and exit 2 on bad input."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imageprompt_widgets.cli import main
from imageprompt_widgets.engine.results import recipe_from_png
from imageprompt_widgets.settings import setting_specs


@pytest.fixture
def photo(tmp_path, image):
    path = tmp_path / "photo.png"
    image.save(path)
    return path


def test_generate_writes_pngs_and_prints_their_paths(photo, tmp_path, capsys, tiny_pipe):
    out = tmp_path / "out"
    code = main(["generate", str(photo), "-o", str(out), "--model", "tiny", "--steps", "3", "--seed", "4",
                 "--num-images", "2"])
    printed = capsys.readouterr()
    assert code == 0
    paths = printed.out.split()
    assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
    assert sorted(str(p) for p in out.iterdir()) == sorted(paths)
    recipe = recipe_from_png(paths[0])
    assert recipe["settings"]["steps"] == 3 and recipe["settings"]["seed"] == 4
    expected = tiny_pipe.generate(str(photo), steps=3, seed=4, num_images=2).images[0]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(paths[0]).convert("RGB")), np.asarray(expected))


def test_a_bad_input_is_one_line_naming_the_file_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    code = main(["generate", str(bad), "-o", str(tmp_path / "out"), "--model", "tiny"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "notes.txt" in err and err.startswith("imageprompt: error:")
    assert not (tmp_path / "out").exists()


def test_an_out_of_range_setting_is_exit_2(photo, tmp_path, capsys):
    code = main(["generate", str(photo), "-o", str(tmp_path / "out"), "--model", "tiny", "--steps", "0"])
    assert code == 2
    assert "steps=0 is outside its range" in capsys.readouterr().err


def test_negative_images_from_the_command_line(photo, tmp_path, capsys, tiny_pipe, other_image):
    negative = tmp_path / "avoid.png"
    other_image.save(negative)
    code = main(["generate", str(photo), "-o", str(tmp_path / "out"), "--model", "tiny", "--steps", "3",
                 "--negative-image", str(negative)])
    path = capsys.readouterr().out.split()[0]
    assert code == 0
    assert recipe_from_png(path)["settings"]["negative"] == "image"
    expected = tiny_pipe.generate(str(photo), steps=3, negative_image=str(negative)).images[0]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(expected))


def test_a_bad_negative_image_is_exit_2(photo, tmp_path, capsys):
    code = main(["generate", str(photo), "-o", str(tmp_path / "out"), "--model", "tiny",
                 "--negative-image", str(tmp_path / "missing.png")])
    assert code == 2 and "missing.png" in capsys.readouterr().err


def test_help_lists_every_setting():
    help_text = subprocess.run(
        [sys.executable, "-m", "imageprompt_widgets.cli", "generate", "--help"],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    for flag in ("--model", "--mode", "--steps", "--seed", "--scale", "--guidance-scale", "--num-images"):
        assert flag in help_text


def test_the_installed_command_exists():
    script = Path(sys.executable).with_name("imageprompt")  # the console script next to this interpreter
    top = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert top.returncode == 0 and "generate" in top.stdout


def test_version_prints_the_packages_version_without_loading_torch():
    from imageprompt_widgets._version import __version__

    check = ("import sys\nfrom imageprompt_widgets.cli import main\ntry:\n    main(['--version'])\n"
             "except SystemExit as done:\n    print(done.code, 'torch' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, check=False)
    assert run.stdout.splitlines() == [f"imageprompt {__version__}", "0 False"], run.stderr


# -- checked before torch, and the preset's own defaults ---------------------------------------------------

CHECK_WITHOUT_TORCH = """
import sys
from imageprompt_widgets.cli import main
code = main(sys.argv[1:])
print("torch imported" if "torch" in sys.modules else "torch not imported", code)
"""


@pytest.mark.parametrize(
    "case, says",
    [
        ("missing-input", "'missing.png' does not exist"),
        ("output-is-a-file", "-o 'taken.png' is an existing file, not a folder"),
        ("output-under-a-file", "is a file, not a folder"),
        ("missing-negative", "'gone.png' does not exist"),
        ("missing-structure", "'sketch.png' does not exist"),
        ("unknown-model", "Unknown model 'sd99'"),
        ("bad-setting", "steps=0 is outside its range"),
    ],
)
def test_bad_paths_and_settings_exit_2_before_torch_is_imported(photo, tmp_path, case, says):
    (tmp_path / "taken.png").write_bytes(b"an earlier result")
    args = {
        "missing-input": [str(photo), str(tmp_path / "missing.png"), "-o", "out"],
        "output-is-a-file": [str(photo), "-o", "taken.png"],
        "output-under-a-file": [str(photo), "-o", str(tmp_path / "taken.png" / "out")],
        "missing-negative": [str(photo), "-o", "out", "--negative-image", "gone.png"],
        "missing-structure": [str(photo), "-o", "out", "--structure", "img2img", "--structure-image", "sketch.png"],
        "unknown-model": [str(photo), "-o", "out", "--model", "sd99"],
        "bad-setting": [str(photo), "-o", "out", "--steps", "0"],
    }[case]
    run = subprocess.run([sys.executable, "-c", CHECK_WITHOUT_TORCH, "generate", *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.stdout.split() == ["torch", "not", "imported", "2"], run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("imageprompt: error: ") and says in line
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_written_is_refused_first(photo, tmp_path, capsys, monkeypatch):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else real_access(path, mode))
    code = main(["generate", str(photo), "-o", str(locked / "out"), "--model", "tiny"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"imageprompt: error: -o '{locked / 'out'}' is not writable: '{locked}' does not let you create files; "
        "choose another folder."
    )


def test_a_presets_own_settings_apply_like_in_the_api_and_the_panel(photo, tmp_path, capsys):
    from imageprompt_widgets import ImagePromptPipeline

    code = main(["generate", str(photo), "-o", str(tmp_path / "out"), "--model", "tiny-variations", "--steps", "2"])
    path = capsys.readouterr().out.split()[0]
    assert code == 0
    settings = recipe_from_png(path)["settings"]
    assert (settings["mode"], settings["negative"]) == ("single", "zeros")
    expected = ImagePromptPipeline.from_preset("tiny-variations").generate(str(photo), steps=2).images[0]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(expected))


def test_the_step_bar_knows_its_total_from_the_start_and_says_why_it_is_one_more(photo, tmp_path, capsys, tiny_pipe):
    code = main(["generate", str(photo), "-o", str(tmp_path / "out"), "--model", "tiny", "--steps", "3"])
    err = capsys.readouterr().err
    assert code == 0
    assert "4 denoising steps: the PNDM scheduler adds 1 warm-up step to the 3 asked for." in err
    frames = [frame for frame in err.replace("\r", "\n").splitlines() if frame.startswith("denoising")]
    assert frames and all("/4 " in frame for frame in frames)  # never a guessed /3 corrected later
    assert "4/4" in frames[-1]


def _generate_help() -> dict[str, str]:
    """The help text of every option of ``imageprompt generate``, by destination, as argparse holds it."""
    from imageprompt_widgets.cli import build_parser

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {action.dest: action.help for action in commands.choices["generate"]._actions}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("steps", ("denoising steps; 1 to 150 (default: 30; 20 on toy, toy-fine, toy-ip-adapter, toy-ip-adapter-plus, toy-variations; 4 on sd15-live, "
                   "tiny-live, sdxl-live, tiny-sdxl-live; 8 on sd15-hyper, tiny-hyper)")),
        ("guidance_scale", ("classifier-free guidance: how hard each step pulls towards the prompt and away from the "
                           "negative; 1 or less turns it off; 0 to 20 (default: 7.5; 2.0 on toy, toy-fine, toy-ip-adapter, toy-ip-adapter-plus, toy-variations; 1.0 on sd15-live, "
                           "tiny-live, sdxl-live, tiny-sdxl-live; 5.0 on sd15-hyper, tiny-hyper, sdxl, tiny-sdxl, sdxl-ip-adapter, "
                           "sdxl-ip-adapter-plus, tiny-sdxl-ip-adapter, tiny-sdxl-ip-adapter-plus)")),
        ("seed", "same seed, same picture; 0 to 4294967295 (default: 0)"),
        ("num_images", "how many images, batched; 1 to 8 (default: 1)"),
        ("height", ("pixels, a multiple of 8; empty = the model's native size (512 on SD 1.x, 1024 on SDXL); 64 to "
                    "1536 (default: none)")),
        ("weights", "one number per image, comma-separated; empty = equal; each -10 to 10 (default: none)"),
        ("mode", "how the image becomes the prompt (default: repeat)"),
        ("prompt", 'the words to draw from (text, blend, ip_adapter and caption) (default: "")'),
    ],
)
def test_help_shows_each_settings_range_and_default(name: str, expected: str) -> None:
    assert _generate_help()[name] == expected


def test_help_ranges_come_from_the_settings_table() -> None:
    help_by_name = _generate_help()
    ranged = [spec for spec in setting_specs() if spec.min is not None]
    assert len(ranged) >= 15
    for spec in ranged:
        match = re.search(r"; (?:each )?(-?[\d.]+) to (-?[\d.]+) \(default: ", help_by_name[spec.name])
        assert match, (spec.name, help_by_name[spec.name])
        assert (float(match[1]), float(match[2])) == (spec.min, spec.max), spec.name


def test_help_on_the_terminal_shows_the_ranges() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "imageprompt_widgets.cli", "generate", "--help"],
        capture_output=True, text=True, check=True, timeout=120, env={**os.environ, "COLUMNS": "250"},
    ).stdout
    assert ("--steps STEPS         denoising steps; 1 to 150 (default: 30; 20 on toy, toy-fine, toy-ip-adapter, toy-ip-adapter-plus, toy-variations; 4 on "
            "sd15-live, tiny-live, sdxl-live, tiny-sdxl-live; 8 on sd15-hyper, tiny-hyper)\n") in help_text  # each preset's own starting value, where it has one
    assert "0 to 4294967295" in help_text


def test_a_full_disk_while_saving_is_one_line_and_exit_2(photo, tmp_path, capsys, monkeypatch):
    import errno

    from PIL import Image

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    code = main(["generate", str(photo), "-o", str(tmp_path / "out"), "--model", "tiny", "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("imageprompt: error: ") and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.slow
def test_a_lora_from_the_command_line_reaches_the_run_at_its_weight(photo, tmp_path, capsys, image):
    from imageprompt_widgets import ImagePromptPipeline
    from imageprompt_widgets.loading.components import load_components

    out = tmp_path / "out"
    try:
        code = main(["generate", str(photo), "-o", str(out), "--model", "tiny", "--steps", "3", "--seed", "4",
                     "--lora", "tiny-lora=0.5"])
    finally:
        ImagePromptPipeline.from_preset("tiny").unload_loras()  # the CLI loaded it into the cached pipeline
    assert code == 0, capsys.readouterr().err
    path = capsys.readouterr().out.split()[0]
    assert recipe_from_png(path)["model"]["loras"] == [
        {"name": "tiny-lora", "source": "tiny-lora", "weight": 0.5, "fused": False}]
    own = ImagePromptPipeline.from_components(load_components("tiny", "cpu", None))
    own.load_lora("tiny-lora", weight=0.5)
    expected = own.generate(str(photo), steps=3, seed=4).images[0]
    plain = own.unload_loras() or own.generate(str(photo), steps=3, seed=4).images[0]
    from PIL import Image

    written = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(written, np.asarray(expected))
    assert not np.array_equal(written, np.asarray(plain))  # the LoRA changed the picture


@pytest.mark.parametrize(("flag", "says"), [
    (["--lora", "tiny-lora=lots"], "the weight after '=' must be a number"),
    (["--lora", "=0.5"], "names no LoRA"),
    (["--lora", "tiny-lora=9"], "outside -4 to 4"),
    (["--lora", "/nowhere/style.safetensors"], "does not exist"),
])
def test_a_bad_lora_is_one_line_and_exit_2(photo, tmp_path, capsys, flag, says):
    code = main(["generate", str(photo), "-o", str(tmp_path / "out"), "--model", "tiny", "--steps", "2", *flag])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and says in err and err.startswith("imageprompt: error:")


def test_memory_level_from_the_command_line_is_a_load_option(photo, tmp_path, monkeypatch, capsys):
    from imageprompt_widgets.engine import controller

    seen = {}
    original = controller.Controller.__init__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        original(self, *args, **kwargs)

    monkeypatch.setattr(controller.Controller, "__init__", spy)
    code = main(["generate", str(photo), "-o", str(tmp_path / "out"), "--model", "tiny", "--steps", "2",
                 "--memory", "balanced"])
    assert code == 0, capsys.readouterr().err
    assert seen["memory"] == "balanced"
    with pytest.raises(SystemExit):
        main(["generate", str(photo), "-o", str(tmp_path / "out"), "--memory", "tiny-ish"])
    assert "invalid choice: 'tiny-ish'" in capsys.readouterr().err


def test_a_prompt_without_image_draws_from_words_alone(tmp_path, capsys, tiny_pipe):
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "a cat", "-o", str(out), "--model", "tiny", "--steps", "2", "--seed", "3"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    (path,) = printed.out.split()
    recipe = recipe_from_png(path)
    assert recipe["settings"]["mode"] == "text" and recipe["settings"]["prompt"] == "a cat" and recipe["inputs"] == []
    expected = tiny_pipe.generate(mode="text", prompt="a cat", steps=2, seed=3).images[0]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(expected))


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        ([], 'Give an IMAGE or a --prompt (e.g. --prompt "a red circle on a blue background").'),
        (["--prompt", "a cat", "--mode", "repeat"], "--mode repeat needs an IMAGE: give one, or leave --mode out"),
    ],
)
def test_no_image_and_nothing_to_draw_from_words_is_one_line_and_exit_2(tmp_path, capsys, flags, says):
    code = main(["generate", "-o", str(tmp_path / "out"), "--model", "tiny", *flags])
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.count("\n") == 1


# -- SDXL ---------------------------------------------------------------------------------------------------------


def test_generate_on_sdxl_takes_micro_conditioning_flags_and_the_native_size(photo, tmp_path, capsys):
    """``--original-size 32x48`` (or ``32,48``) and ``--crops-coords-top-left`` reach SDXL: the PNG equals the API's
    run with those settings, is the model's native size when no size is given, and its recipe says what SDXL was
    told (the target size filled in as diffusers does)."""
    from PIL import Image

    from imageprompt_widgets import ImagePromptPipeline

    out = tmp_path / "out"
    code = main(["generate", str(photo), "-o", str(out), "--model", "tiny-sdxl", "--steps", "2", "--seed", "3",
                 "--original-size", "32x48", "--crops-coords-top-left", "0,8"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    (path,) = printed.out.split()
    sdxl = ImagePromptPipeline.from_preset("tiny-sdxl")
    native = sdxl.native_size
    recipe = recipe_from_png(path)
    assert recipe["settings"]["original_size"] == [32, 48] and recipe["settings"]["crops_coords_top_left"] == [0, 8]
    assert recipe["micro_conditioning"] == {"original_size": [32, 48], "crops_coords_top_left": [0, 8],
                                            "target_size": [native, native]}
    expected = sdxl.generate(str(photo), steps=2, seed=3, original_size=(32, 48),
                             crops_coords_top_left=(0, 8)).images[0]
    plain = sdxl.generate(str(photo), steps=2, seed=3).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(expected))  # SDXL's time ids changed the picture
    picture = Image.open(path).convert("RGB")
    assert picture.size == (native, native)
    assert np.array_equal(np.asarray(picture), np.asarray(expected))


@pytest.mark.parametrize(("flags", "says"), [
    (["--model", "tiny-sdxl", "--original-size", "1024"],
     "original_size takes two numbers, (height, width) in pixels, not 1: e.g. 1024, 1024; or leave it empty"),
    (["--model", "tiny-sdxl", "--crops-coords-top-left", "0xtop"], "crops_coords_top_left must be comma-separated"),
    (["--model", "tiny", "--target-size", "512x512"],
     ("target_size is SDXL's micro-conditioning, and 'tiny' is not SDXL: leave it empty, or use the 'sdxl' or "
      "'tiny-sdxl' preset.")),
])
def test_bad_micro_conditioning_flags_are_one_line_and_exit_2(photo, tmp_path, capsys, flags, says):
    code = main(["generate", str(photo), "-o", str(tmp_path / "out"), "--steps", "1", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "imageprompt: error: " in err and says in err
    assert not list(tmp_path.joinpath("out").glob("*.png"))


def test_help_names_the_micro_conditioning_flags():
    help_text = _generate_help()
    assert help_text["original_size"].startswith("SDXL: the size (height, width) SDXL is told the picture had")
    assert {"crops_coords_top_left", "target_size"} <= set(help_text)
