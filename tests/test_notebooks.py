"""The example notebooks: each runs top to bottom offline on the tiny preset, and is committed clean.

Execution is marked ``notebooks`` (a kernel per notebook, ~15 s each); the static checks are not, so
they also run in the Colab-pinned environment.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import nbformat
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
#: Seconds one cell may take on the tiny preset (the first one builds the tiny models).
CELL_TIMEOUT = 300


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


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs_top_to_bottom_offline(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cell runs without an error on the tiny preset, offline, from the examples folder."""
    from nbclient import NotebookClient

    monkeypatch.setenv("IMAGEPROMPT_MODEL", "tiny")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # One torch thread per kernel: on a shared 2-core machine more threads only spin against each other.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    notebook = read(path)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert errors == []
    ran = [cell.execution_count for cell in notebook.cells if cell.cell_type == "code"]
    assert None not in ran, "some code cells did not run"
