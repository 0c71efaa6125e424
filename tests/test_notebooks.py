"""The example notebooks: each runs top to bottom offline on the tiny preset, and is committed clean.

Execution is marked ``notebooks`` (a kernel per notebook, under a minute or two each on the tiny presets),
once as in Jupyter and once as on Colab: with a stand-in ``google.colab`` (tests/colab_stand_in) imported at
kernel start, so the setup cell takes its Colab branch (without the install from GitHub: the stand-in marks
itself) and the panel its inline runner. The static checks are not marked, so they run in every environment.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import nbformat
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
PROJECT_REPOSITORY = re.search(r'^Repository\s*=\s*"([^"]*)"', (EXAMPLES.parent / "pyproject.toml").read_text(),
                               re.MULTILINE).group(1)
#: Seconds one cell may take on the tiny preset (the first one builds the tiny models).
CELL_TIMEOUT = 300
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
def test_notebook_is_committed_without_outputs(path: Path) -> None:
    """Outputs are not committed: they would be stale, large, and noise from the tiny models."""
    notebook = read(path)
    nbformat.validate(notebook)
    dirty = [i for i, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert dirty == [], f"{path.name}: cells {dirty} carry outputs; clear them before committing"


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
    """Every cell runs without an error on the toy preset (and the tiny twins of what it lacks), offline, from the examples folder; as in Jupyter,
    and as on Colab (the stand-in google.colab imported at kernel start: Colab's setup branch, inline runs)."""
    from nbclient import NotebookClient

    monkeypatch.setenv("IMAGEPROMPT_MODEL", "toy")  # the toy world: trained, shipped, offline; twins beside it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # One torch thread per kernel: on a shared 2-core machine more threads only spin against each other.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    notebook = read(path)
    extra_arguments = []
    if colab:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(COLAB_STAND_IN),
                                                                       os.environ.get("PYTHONPATH")])))
        extra_arguments = ["--IPKernelApp.exec_lines=import google.colab"]
        notebook.cells.append(nbformat.v4.new_code_cell(COLAB_CHECK))
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3", extra_arguments=extra_arguments,
                            resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert errors == []
    ran = [cell.execution_count for cell in notebook.cells if cell.cell_type == "code"]
    assert None not in ran, "some code cells did not run"
    banner = notebook.cells[1].outputs[-1]  # the setup cell ends with the banner: the toy world here
    assert "The toy world" in banner.data["text/html"]


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
