"""The example notebooks: each runs top to bottom offline on the toy world, and is committed with its outputs.

The outputs are what a reader on GitHub and on the documentation site sees, so CI re-executes each notebook
and fails when a committed output is stale (``scripts/execute_notebooks.py`` writes them; its
``stale_outputs`` says what stale means: texts equal, pictures the same size and near-equal).
Execution is marked ``notebooks`` (a kernel per notebook, under a minute or two each on the tiny presets),
once as in Jupyter and once as on Colab: with a stand-in ``google.colab`` (tests/colab_stand_in) imported at
kernel start, so the setup cell takes its Colab branch (without the install from GitHub: the stand-in marks
itself) and the panel its inline runner. The static checks are not marked, so they run in every environment.
"""

from __future__ import annotations

import ast
import base64
import importlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
PROJECT_REPOSITORY = re.search(r'^Repository\s*=\s*"([^"]*)"', (EXAMPLES.parent / "pyproject.toml").read_text(),
                               re.MULTILINE).group(1)
_SPEC = importlib.util.spec_from_file_location("execute_notebooks", EXAMPLES.parent / "scripts" / "execute_notebooks.py")
execute_notebooks = sys.modules.setdefault("execute_notebooks", importlib.util.module_from_spec(_SPEC))
_SPEC.loader.exec_module(execute_notebooks)  # the script CI and developers run: one definition of stale
#: What a whole committed notebook may weigh with its outputs (pictures shrunk; the largest is about a third).
MAX_NOTEBOOK_BYTES = 1_500_000
#: The stand-in google.colab package (put on the kernel's PYTHONPATH for the Colab runs).
COLAB_STAND_IN = Path(__file__).resolve().parent / "colab_stand_in"
#: Appended to a notebook run as on Colab: the stand-in was live and the panel would run inline, as on Colab.
COLAB_CHECK = """
import sys
colab = sys.modules["google.colab"]
assert colab.STAND_IN and colab.output.custom_widget_manager_enabled, "the setup cell did not take its Colab branch"
from imageprompt_widgets.engine.runners import default_runner
assert default_runner().background is False, "the panel would not run generations inline, as Colab needs"
"""


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def code_of(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")


def test_the_three_teaching_notebooks_exist() -> None:
    assert {path.name for path in NOTEBOOKS} >= {"quickstart.ipynb", "inspect_embeddings.ipynb",
                                                 "compare_methods.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_committed_with_its_outputs_and_pictures(path: Path) -> None:
    """A reader on GitHub sees every cell's result and the pictures, none of them an error; the file stays small."""
    notebook = read(path)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [i for i, cell in enumerate(code) if cell.execution_count is None] == [], \
        f"{path.name} has cells that never ran: python scripts/execute_notebooks.py {path.stem}"
    assert [i for i, cell in enumerate(code) for out in cell.outputs if out.output_type == "error"] == []
    pictures = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert pictures, f"{path.name} shows no picture"
    assert all(Image.open(io.BytesIO(base64.b64decode(out.data["image/png"]))).width
               <= execute_notebooks.MAX_IMAGE_WIDTH for out in pictures)
    assert "widgets" not in notebook.metadata  # widget state would carry every picture again
    assert path.stat().st_size <= MAX_NOTEBOOK_BYTES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_colab_only_code_is_guarded(path: Path) -> None:
    """``google.colab`` is imported only under ``if IN_COLAB`` (or ``"google.colab" in sys.modules``)."""
    tree = ast.parse(code_of(read(path)))
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and re.search(r"IN_COLAB|google\.colab", ast.unparse(node.test)):
            guarded.update(id(child) for statement in node.body for child in ast.walk(statement))
    unguarded = [
        ast.unparse(node) for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in guarded
        and "google.colab" in ast.unparse(node)
    ]
    assert unguarded == []
    assert re.search(r'IN_COLAB = "google\.colab" in sys\.modules', code_of(read(path)))


def test_quickstart_has_a_colab_badge_and_an_install_cell() -> None:
    notebook = read(EXAMPLES / "quickstart.ipynb")
    intro = notebook.cells[0].source
    assert "colab.research.google.com/github/" in intro and intro.count("examples/quickstart.ipynb") == 1
    install = notebook.cells[1].source
    assert "pip" in install and "install" in install and "if IN_COLAB:" in install


def _setup_cell(path: Path) -> str:
    return next(cell.source for cell in read(path).cells if cell.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_setup_cell_installs_on_colab_but_not_under_the_ci_stand_in(
    path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On Colab the setup cell installs the package and fetches the pictures; under CI's stand-in, which marks
    itself, it only enables the widget manager (the package is installed there already)."""
    calls: list[str] = []
    monkeypatch.setattr(subprocess, "run", lambda command, **_: calls.append(f"pip {command[-1]}"))
    monkeypatch.setattr(urllib.request, "urlretrieve", lambda url, _: calls.append(f"fetch {url.rsplit('/', 1)[1]}"))
    monkeypatch.chdir(tmp_path)
    for name in ("google", "google.colab", "google.colab.output"):
        monkeypatch.delitem(sys.modules, name, raising=False)  # whatever is imported below is removed after
    monkeypatch.delenv("IMAGEPROMPT_COLAB_STAND_IN", raising=False)

    colab = types.ModuleType("google.colab")  # real Colab, as far as the cell looks at it
    colab.output = types.SimpleNamespace(enable_custom_widget_manager=lambda: calls.append("widgets"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    exec(compile(_setup_cell(path), path.name, "exec"), {})  # noqa: S102 - the notebook's own code
    repository = PROJECT_REPOSITORY
    assert calls == [f"pip imageprompt_widgets @ git+{repository}", "fetch sunset.png", "fetch still_life.png",
                     "widgets"]

    calls.clear()
    del sys.modules["google.colab"]
    monkeypatch.syspath_prepend(str(COLAB_STAND_IN))
    stand_in = importlib.import_module("google.colab")
    assert stand_in.STAND_IN and os.environ["IMAGEPROMPT_COLAB_STAND_IN"] == "1"  # it marks itself
    exec(compile(_setup_cell(path), path.name, "exec"), {})  # noqa: S102
    assert calls == [] and stand_in.output.custom_widget_manager_enabled
    stand_in.output.disable_custom_widget_manager()

    calls.clear()
    del sys.modules["google.colab"]  # plain Jupyter: nothing Colab at all
    namespace: dict = {}
    exec(compile(_setup_cell(path), path.name, "exec"), namespace)  # noqa: S102
    assert calls == [] and namespace["IN_COLAB"] is False


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_random_weights_show_a_banner_and_one_cell_chooses_the_preset(path: Path) -> None:
    code = code_of(read(path))
    assert code.count("PRESET = ") == 1  # the one place (issue 20's toy preset replaces tiny there)
    assert "BANNER = weights_banner(PRESET)" in _setup_cell(path) and _setup_cell(path).rstrip().endswith("BANNER")
    assert "from_preset()" not in code and "ImagePromptWidget()" not in code  # every load names PRESET


@pytest.mark.notebooks
@pytest.mark.parametrize("colab", [False, True], ids=["jupyter", "colab"])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs_top_to_bottom_offline(path: Path, colab: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cell runs without an error on the toy preset (and the tiny twins of what it lacks), offline, from
    the examples folder; as in Jupyter, where the committed outputs must equal the run's (not stale), and as on
    Colab (the stand-in google.colab imported at kernel start: Colab's setup branch, inline runs)."""
    extra_arguments, extra_cells = [], []
    if colab:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(COLAB_STAND_IN),
                                                                       os.environ.get("PYTHONPATH")])))
        extra_arguments = ["--IPKernelApp.exec_lines=import google.colab"]
        extra_cells = [COLAB_CHECK]
    notebook = execute_notebooks.execute(path, extra_arguments=extra_arguments, extra_cells=extra_cells)
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert errors == []
    ran = [cell.execution_count for cell in notebook.cells if cell.cell_type == "code"]
    assert None not in ran, "some code cells did not run"
    banner = notebook.cells[1].outputs[-1]  # the setup cell ends with the banner: the toy world here
    assert "The toy world" in banner.data["text/html"]
    if not colab:
        stale = execute_notebooks.stale_outputs(read(path), execute_notebooks.tidy(notebook))
        assert stale == [], (f"{path.name}: committed outputs are stale; run python scripts/execute_notebooks.py "
                             f"{path.stem} and commit it:\n" + "\n".join(stale))


# --------------------------------------------------------------------------- what "stale" means

def _png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype("uint8")).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid(seed: int = 0) -> np.ndarray:
    """A 5x3 grid of 64 px tiles, each one flat colour, like the notebooks' method grids."""
    colours = np.random.default_rng(seed).integers(0, 256, size=(3, 5, 3))
    return np.kron(colours, np.ones((64, 64, 1))).astype(int)


def _notebook(*outputs: dict, source: str = "run()") -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source, execution_count=1)
    cell.outputs = [nbformat.from_dict(output) for output in outputs]
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"), cell])


def _picture(pixels: np.ndarray) -> dict:
    return nbformat.v4.new_output("display_data", data={"image/png": _png(pixels), "text/plain": "<Figure>"})


def _printed(text: str) -> dict:
    return nbformat.v4.new_output("stream", name="stdout", text=text)


def test_a_rerun_with_the_same_results_is_not_stale() -> None:
    committed = _notebook(_printed("prompt_embeds (1, 77, 32) in 0.41 s at 0x7f3a2c0d1e50\n"), _picture(_grid()))
    noise = np.random.default_rng(1).integers(-2, 3, size=_grid().shape)  # another CPU's rounding
    fresh = _notebook(_printed("prompt_embeds (1, 77, 32) in 1.9 s at 0x7f00deadbeef\n"),
                      _picture(np.clip(_grid() + noise, 0, 255)))
    assert execute_notebooks.stale_outputs(committed, fresh) == []


def test_timings_rates_and_where_things_live_may_move() -> None:
    normalise = execute_notebooks.normalise_text
    assert normalise("Done: 1 image in 2.6 s, 8.8 it/s; 0.1 s encoding (171 images/s)") == \
        normalise("Done: 1 image in 31 s, 0.5 it/s; 12 s encoding (2 images/s)")
    assert normalise("tower of '/work/wt30/imageprompt_widgets/toy/weights/clip'.") == \
        normalise("tower of '/home/ci/clone/imageprompt_widgets/toy/weights/clip'.")
    assert normalise("image_embeds tensor[1, 64] min=-2.466") != normalise("image_embeds tensor[1, 64] min=-2.467")
    assert normalise("1 image in 2.6 s") != normalise("2 images in 2.6 s")


def test_a_changed_text_is_stale_and_named() -> None:
    committed = _notebook(_printed("prompt_embeds (1, 77, 32)\n"))
    fresh = _notebook(_printed("prompt_embeds (1, 257, 32)\n"))
    (problem,) = execute_notebooks.stale_outputs(committed, fresh)
    assert problem.startswith("code cell 1 (run())") and "(1, 257, 32)" in problem


def test_one_changed_tile_of_a_grid_is_stale() -> None:
    changed = _grid()
    changed[64:128, 128:192] = 255 - changed[64:128, 128:192]  # one tile of fifteen repainted
    (problem,) = execute_notebooks.stale_outputs(_notebook(_picture(_grid())), _notebook(_picture(changed)))
    assert "pixels moved" in problem


def test_a_picture_of_another_size_is_stale() -> None:
    (problem,) = execute_notebooks.stale_outputs(_notebook(_picture(_grid())), _notebook(_picture(_grid()[:, :256])))
    assert "size 320x192 became 256x192" in problem


def test_a_missing_output_an_error_or_unrun_cell_is_stale() -> None:
    committed = _notebook(_printed("a\n"), _picture(_grid()))
    assert execute_notebooks.stale_outputs(committed, _notebook(_printed("a\n")))
    error = nbformat.v4.new_output("error", ename="ValueError", evalue="no", traceback=[])
    assert execute_notebooks.stale_outputs(_notebook(_printed("a\n")), _notebook(error))
    never_ran = _notebook()
    never_ran.cells[1].execution_count = None
    assert execute_notebooks.stale_outputs(never_ran, _notebook())


def test_a_widgets_new_model_id_is_not_stale_but_another_widget_is() -> None:
    def view(model_id: str, version: int = 2) -> dict:
        return nbformat.v4.new_output("display_data", data={
            "application/vnd.jupyter.widget-view+json": {"model_id": model_id, "version_major": version,
                                                         "version_minor": 0},
            "text/plain": "ImagePromptWidget(...)"})

    assert execute_notebooks.stale_outputs(_notebook(view("a1")), _notebook(view("b2"))) == []
    assert execute_notebooks.stale_outputs(_notebook(view("a1")), _notebook(view("b2", version=3)))


def test_tidy_shrinks_wide_pictures_and_drops_widget_state() -> None:
    wide = np.kron(_grid(), np.ones((3, 3, 1))).astype(int)  # 960 x 576
    notebook = _notebook(_picture(wide), _picture(_grid()))
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    small = notebook.cells[1].outputs[1].data["image/png"]
    execute_notebooks.tidy(notebook)
    shrunk = Image.open(io.BytesIO(base64.b64decode(notebook.cells[1].outputs[0].data["image/png"])))
    assert shrunk.size == (execute_notebooks.MAX_IMAGE_WIDTH, 432)
    assert notebook.cells[1].outputs[1].data["image/png"] == small  # a small picture is left as it was
    assert "widgets" not in notebook.metadata


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_a_preset_that_cannot_load_is_one_sentence_and_the_toy_world(
    path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offline, with the default sd14 not downloaded: the setup cell prints one sentence and runs on ``toy``
    (no page of traceback later, when the first Generate would have tried to download)."""
    from imageprompt_widgets.loading import availability

    monkeypatch.delenv("IMAGEPROMPT_MODEL", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(availability, "hub_file_cached", lambda *args, **kwargs: False)  # nothing downloaded
    namespace: dict = {}
    exec(compile(_setup_cell(path), path.name, "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out.strip().splitlines()
    assert namespace["PRESET"] == "toy"
    assert printed == [("Model 'sd14' is not on this machine (about 7.2 GB) and HF_HUB_OFFLINE=1 forbids downloading "
                       "it: using the offline toy world ('toy') instead.")]


def test_a_printed_decimal_may_round_differently_on_another_cpu_but_a_count_may_not() -> None:
    """Another CPU rounds torch's floats differently in the last printed digits (seen: an AVX2 machine against
    the AVX-512 one that executed the notebooks): that is not a stale output; a changed count or shape is."""
    committed = _notebook(_printed("tensor([[-8.9776e-04,  8.1505e-02]]) cos 0.8294 min=-2.466\n"))
    fresh = _notebook(_printed("tensor([[-8.9813e-04,  8.1505e-02]]) cos 0.8295 min=-2.467\n"))
    assert execute_notebooks.stale_outputs(committed, fresh) == []
    agree = execute_notebooks.texts_agree
    assert not agree("cosine 0.8294", "cosine 0.8394")  # a different number, not rounding
    assert not agree("14 pictures", "15 pictures") and not agree("(1, 77, 32)", "(1, 257, 32)")
    assert not agree("largest pixel difference: 0 of 255", "largest pixel difference: 1 of 255")
    assert not agree("cos 0.8294 for a cat", "cos 0.8294 for a dog")
