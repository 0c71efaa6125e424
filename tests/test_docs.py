"""The documents a reader meets: a README that is a front door into the site, a site whose navigation holds
every page and notebook, and citation and changelog files that name this version and repository."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from imageprompt_widgets._version import __version__

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
REPOSITORY = re.search(r'^Repository\s*=\s*"([^"]*)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
MKDOCS = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
#: The README's length limit: a front door, everything else on the site.
README_MAX_LINES = 150


def _nav_targets(entries: list) -> list[str]:
    targets = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        targets += _nav_targets(value) if isinstance(value, list) else [value]
    return targets


NAV = _nav_targets(MKDOCS["nav"])


def _bash_blocks(text: str) -> list[list[str]]:
    return [[line.split("#")[0].strip() for line in block.strip().splitlines()]
            for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)]


def test_the_readme_is_a_front_door() -> None:
    assert len(README.splitlines()) <= README_MAX_LINES
    assert len(re.findall(r"(?<!\[)!\[", README)) == 1  # one picture (the Colab badge is a link's image)
    for heading in ("## Set-up", "## Run, and test", "## In a notebook", "## Documentation"):
        assert heading in README


def test_every_set_up_block_installs_cpu_torch_before_the_package() -> None:
    installs = [block for block in _bash_blocks(README) if any("pip install" in line for line in block)]
    assert len(installs) == 2  # a teacher's and a developer's
    for block in installs:
        torch = block.index("pip install torch --index-url https://download.pytorch.org/whl/cpu")
        (package,) = [i for i, line in enumerate(block) if "imageprompt_widgets" in line or line.startswith("pip install -e")]
        assert torch < package
    teacher, developer = installs
    assert f'pip install "imageprompt_widgets[teach] @ git+{REPOSITORY}"' in teacher
    assert 'pip install -e ".[test,dev]"' in developer


def test_the_readme_gives_the_run_and_test_commands_that_ci_runs() -> None:
    (run_and_test,) = [block for block in _bash_blocks(README) if "python -m pytest" in block and len(block) == 2]
    assert run_and_test[0].startswith(
        "imageprompt generate examples/images/yellow_triangle_on_black.png -o out/ --model toy-ip-adapter")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "python -m pytest" in [line.strip() for line in ci]
    assert any(line.startswith("imageprompt generate examples/images/yellow_triangle_on_black.png")
               and "--model toy-ip-adapter" in line for line in ci)


def test_the_readmes_links_into_the_docs_are_pages_of_the_site() -> None:
    pages = re.findall(re.escape(REPOSITORY) + r"/blob/main/docs/([\w.-]+\.md)", README)
    assert len(set(pages)) >= 14  # a page per concept
    assert sorted(set(pages) - set(NAV)) == []


def test_every_page_and_notebook_is_in_the_sites_navigation() -> None:
    pages = {path.name for path in (ROOT / "docs").glob("*.md")}
    notebooks = {f"notebooks/{path.name}" for path in (ROOT / "examples").glob("*.ipynb")}
    assert (pages | notebooks) - set(NAV) == set()
    assert [target for target in NAV if not (ROOT / "docs" / target).exists()] == []
    assert (ROOT / "docs" / "notebooks").resolve() == (ROOT / "examples").resolve()


def test_ci_builds_the_site_strictly_and_git_ignores_it() -> None:
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert "pip_install -e '.[docs]'" in ci
    (build,) = [line for line in ci if "mkdocs build" in line and not line.startswith("step ")]
    assert "--strict" in build and " -q" not in build and "--quiet" not in build  # quiet hides what strict counts
    assert MKDOCS["strict"] is True and "site/" in (ROOT / ".gitignore").read_text().splitlines()
    assert MKDOCS["repo_url"] == REPOSITORY


def test_citation_and_changelog_name_this_version_and_repository() -> None:
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation["cff-version"] == "1.2.0" and citation["version"] == __version__
    assert citation["repository-code"] == REPOSITORY and citation["license"] == "MIT"
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## {re.escape(__version__)}\b", changelog, re.MULTILINE)


@pytest.fixture(scope="module")
def hooks():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_site_refuses_a_notebook_that_never_ran_or_ended_in_an_error(hooks, tmp_path: Path) -> None:
    def notebook(*cells: dict) -> Path:
        path = tmp_path / "n.ipynb"
        path.write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": "# t"}, *cells]}))
        return path

    ran = {"cell_type": "code", "execution_count": 1, "outputs": [{"output_type": "stream", "text": "ok"}]}
    never = {"cell_type": "code", "execution_count": None, "outputs": []}
    failed = {"cell_type": "code", "execution_count": 2, "outputs": [{"output_type": "error", "ename": "KeyError"}]}
    assert hooks.unfinished_cells(notebook(ran)) == []
    assert hooks.unfinished_cells(notebook(ran, never, failed)) == ["code cell 2 never ran", "code cell 3 ended in KeyError"]


def test_the_site_shows_the_colab_badge_from_its_own_copy(hooks) -> None:
    page = f'<a href="https://colab.research.google.com/github/x"><img src="{hooks.COLAB_BADGE}"></a>'
    assert hooks.local_badge(page, "notebooks/quickstart/") == (
        '<a href="https://colab.research.google.com/github/x"><img src="../../images/colab-badge.svg"></a>')
    assert hooks.local_badge(page, "") == page.replace(hooks.COLAB_BADGE, "images/colab-badge.svg")
    assert (ROOT / "docs" / hooks.LOCAL_BADGE).read_text().startswith("<svg")
