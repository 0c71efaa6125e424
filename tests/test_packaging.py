"""The package as it is published: one version, typed, licensed, each dependency where it belongs, and one
repository location that every Colab badge, install cell and README link copies."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the suite's CI runs 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(text).name) for text in requirements}


def _extra(name: str) -> list[Requirement]:
    return [Requirement(text) for text in PROJECT["optional-dependencies"][name]]


# --------------------------------------------------------------------------- version, types, licence


def test_the_version_is_written_once() -> None:
    import imageprompt_widgets
    from imageprompt_widgets import _version

    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["hatch"]["version"]["path"] == "imageprompt_widgets/_version.py"
    assert imageprompt_widgets.__version__ == _version.__version__
    Version(_version.__version__)  # a valid PEP 440 version, or this raises
    assignments = [
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "imageprompt_widgets").rglob("*.py")
        if re.search(r"^\s*__version__\s*=", path.read_text(encoding="utf-8"), re.MULTILINE)
    ]
    assert assignments == ["imageprompt_widgets/_version.py"]


def test_a_recipe_records_the_package_version(tiny_pipe, image) -> None:
    from imageprompt_widgets._version import __version__

    assert tiny_pipe.generate(image, steps=1, height=64, width=64).recipe["version"] == __version__


def test_the_package_is_marked_typed() -> None:
    assert (ROOT / "imageprompt_widgets" / "py.typed").is_file()
    assert "Typing :: Typed" in PROJECT["classifiers"]


def test_the_licence_file_is_the_mit_licence_the_metadata_names() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    assert text.startswith("MIT License\n")
    assert re.search(r"^Copyright \(c\) \d{4} the imageprompt_widgets authors$", text, re.MULTILINE)
    assert "Permission is hereby granted, free of charge" in text


def test_the_metadata_names_the_repository_and_python_versions() -> None:
    urls = PROJECT["urls"]
    assert urls["Repository"].startswith("https://github.com/")
    assert all(url.startswith(urls["Repository"]) for url in urls.values())
    minimum = PROJECT["requires-python"].removeprefix(">=")
    assert f"Programming Language :: Python :: {minimum}" in PROJECT["classifiers"]


# --------------------------------------------------------------------------- dependencies


def test_a_plain_install_has_the_widget_but_not_the_kernel_or_tools() -> None:
    base = _names(PROJECT["dependencies"])
    assert {"ipywidgets", "torch", "diffusers", "transformers", "pillow"} <= base
    tools = {"ipykernel", "jupyterlab", "notebook", "pytest", "hypothesis", "ruff", "build", "twine", "matplotlib"}
    assert not base & tools


def test_the_kernel_is_an_extra_that_skips_the_broken_release() -> None:
    (kernel,) = _extra("notebook")
    assert kernel.name == "ipykernel"
    assert not kernel.specifier.contains("7.0.0")  # widget updates from threads broke there (fixed in 7.1)
    assert kernel.specifier.contains("6.17.1")  # what Colab ships
    assert kernel.specifier.contains("7.1.0")


def test_test_and_dev_tools_are_separate_extras() -> None:
    test = _extra("test")
    (itself,) = [r for r in test if canonicalize_name(r.name) == "imageprompt-widgets"]
    assert itself.extras == {"notebook", "plot", "edges", "batch", "lora", "lowmem"}
    assert {"pytest", "pytest-timeout", "hypothesis", "nbclient", "nbformat", "jupyterlab", "notebook", "playwright"} <= {
        canonicalize_name(r.name) for r in test
    }
    assert {canonicalize_name(r.name) for r in _extra("dev")} == {"ruff", "build", "twine"}
    assert not {"ruff", "build", "twine"} & {canonicalize_name(r.name) for r in test}


def test_a_teachers_install_is_the_kernel_and_what_the_notebooks_draw_with() -> None:
    """[teach] is a classroom's install: no test runner, no release tool, no documentation builder; the
    developer's [test] covers it, so CI tests what a teacher gets."""
    (itself,) = _extra("teach")
    assert canonicalize_name(itself.name) == "imageprompt-widgets" and itself.extras == {"notebook", "plot", "edges"}
    (tested,) = [r for r in _extra("test") if canonicalize_name(r.name) == "imageprompt-widgets"]
    assert itself.extras <= tested.extras


def test_the_docs_extra_builds_the_site_and_nothing_else_needs_it() -> None:
    docs = {canonicalize_name(r.name) for r in _extra("docs")}
    assert docs == {"mkdocs", "mkdocs-material", "mkdocstrings", "mkdocs-jupyter"}
    assert "python" in next(r for r in _extra("docs") if r.name == "mkdocstrings").extras
    assert not docs & (_names(PROJECT["dependencies"]) | _declared_for_tests())


def _declared_for_tests() -> set[str]:
    """Distributions a `.[test]` install brings: the base, the test extra and the extras it names."""
    declared = _names(PROJECT["dependencies"])
    for requirement in _extra("test"):
        if canonicalize_name(requirement.name) == "imageprompt-widgets":
            for extra in requirement.extras:
                declared |= {canonicalize_name(r.name) for r in _extra(extra)}
        else:
            declared.add(canonicalize_name(requirement.name))
    return declared


def _requirements_of(distribution: str) -> set[str]:
    try:
        requires = importlib.metadata.requires(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {canonicalize_name(Requirement(text).name) for text in requires if "extra ==" not in text}


def test_every_module_the_suite_imports_is_declared() -> None:
    """A new `import x` in tests/ or the package must come with x in pyproject.toml (or with a dependency)."""
    distributions = importlib.metadata.packages_distributions()
    declared = _declared_for_tests()
    reachable = declared.union(*(_requirements_of(name) for name in declared))
    ours = {"imageprompt_widgets", "benchmarks", "conftest", "tests", "examples", "scripts",
            *(path.stem for path in (ROOT / "tests").glob("*.py"))}  # a test module may import another's server
    missing = {}
    for folder in ("imageprompt_widgets", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top in ours:
                        continue
                    names = {canonicalize_name(d) for d in distributions.get(top, [top])}
                    if not names & reachable:
                        missing[top] = path.relative_to(ROOT).as_posix()
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


# --------------------------------------------------------------------------- CI and README agree


def test_ci_runs_the_readmes_test_command_and_checks_the_package() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    development = readme.split("## Development", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in development.strip().splitlines()]
    assert commands == [
        'python -m pytest -m "not slow and not browser and not notebooks"',
        "python -m pytest",
        "bash .ci/run",
    ]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert "python -m pytest" in ci_lines  # the full suite, exactly as the README says
    assert "pip_install -e '.[test,dev]'" in [line.split("#")[0].strip() for line in ci_lines]
    assert "bash .ci/check_package" in ci_lines
    # CI shows the slowest tests of every run, and a missing optional test dependency fails instead of skipping.
    exported = [line.split("#")[0].strip() for line in ci_lines if line.startswith("export ")]
    assert 'export PYTEST_ADDOPTS="--durations=25"' in exported and "export IMAGEPROMPT_REQUIRE_OPTIONAL=1" in exported
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "pip install torch==2.13.0" not in readme  # gives the CUDA build on an ordinary Linux machine


# --------------------------------------------------------------------------- one repository location

#: A repository path ("owner/name") where it follows GitHub, Colab's GitHub opener or GitHub's raw files.
REFERENCE = re.compile(
    r"https://(?:github\.com|colab\.research\.google\.com/github|raw\.githubusercontent\.com)/"
    r"([^/\s\"'()\\#]+/[^/\s\"'()\\#]+)"
)
REPOSITORY = PROJECT["urls"]["Repository"]
REPOSITORY_PATH = REPOSITORY.removeprefix("https://github.com/")


def _documents(root: Path) -> list[Path]:
    return [root / "README.md", root / "mkdocs.yml", root / "CITATION.cff", *sorted((root / "docs").glob("*.md")),
            *sorted((root / "examples").glob("*.ipynb"))]


#: Other GitHub projects the documents cite (sources, not this repository): left out of the checks.
CITED_PROJECTS = {"InstantStyle/InstantStyle"}  # the IP-Adapter block presets' source (README, IP-Adapters)


def _references(root: Path) -> dict[str, list[str]]:
    return {
        path.name: [ref for ref in REFERENCE.findall(path.read_text(encoding="utf-8")) if ref not in CITED_PROJECTS]
        for path in _documents(root)
    }


def _cell_sources(notebook: Path) -> list[str]:
    return ["".join(cell["source"]) for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]]


def _colab_badge(repository_path: str, notebook: str) -> str:
    return f"https://colab.research.google.com/github/{repository_path}/blob/main/examples/{notebook}"


def test_every_link_to_the_repository_uses_pyprojects_url() -> None:
    """Badges, install cells and links in README, docs and examples: exactly [project.urls] Repository.

    (Linking another GitHub project from these files? Then exempt it here by name.)
    """
    references = _references(ROOT)
    assert references["README.md"] and references["examples.md"]
    wrong = {name: sorted(set(found) - {REPOSITORY_PATH}) for name, found in references.items()}
    assert not any(wrong.values()), f"not {REPOSITORY_PATH}: {wrong}"


def test_every_notebook_has_its_badge_and_installs_from_the_repository() -> None:
    assert len(NOTEBOOKS) >= 3
    examples_doc = (ROOT / "docs" / "examples.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert _colab_badge(REPOSITORY_PATH, "quickstart.ipynb") in readme
    for notebook in NOTEBOOKS:
        sources = _cell_sources(notebook)
        assert _colab_badge(REPOSITORY_PATH, notebook.name) in sources[0]  # the title cell
        assert _colab_badge(REPOSITORY_PATH, notebook.name) in examples_doc
        (setup,) = [source for source in sources if "pip" in source and "install" in source]
        assert re.findall(r'REPO = "([^"]*)"', setup) == [REPOSITORY]
        assert 'f"imageprompt_widgets @ git+{REPO}"' in setup


def test_the_readme_shows_on_the_package_index() -> None:
    """PyPI renders README.md without the repository around it: images need absolute URLs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", readme)
    assert f"https://raw.githubusercontent.com/{REPOSITORY_PATH}/main/docs/screenshot.png" in images
    assert all(url.startswith("https://") for url in images), images
    relative_links = [url for url in re.findall(r"\]\(([^)\s]+)", readme) if not url.startswith(("https://", "#"))]
    assert not relative_links


def test_set_repository_moves_every_reference_and_nothing_else(tmp_path: Path) -> None:
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for name in ("README.md", "mkdocs.yml", "CITATION.cff"):
        shutil.copy(ROOT / name, tmp_path)
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("*.png", "notebooks"))
    (tmp_path / "examples").mkdir()
    for notebook in NOTEBOOKS:
        shutil.copy(notebook, tmp_path / "examples")
    before = {path: path.read_text(encoding="utf-8") for path in [tmp_path / "pyproject.toml", *_documents(tmp_path)]}
    counts = {name: len(found) for name, found in _references(tmp_path).items()}

    script = ROOT / "scripts" / "set_repository.py"
    new = "https://github.com/a-fork/imageprompt_widgets_fork"
    done = subprocess.run(
        [sys.executable, str(script), new + ".git", "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    referring = ["pyproject.toml", *(p.relative_to(tmp_path).as_posix() for p in _documents(tmp_path) if counts[p.name])]
    assert sorted(done.stdout.split()) == sorted(referring)

    after = _references(tmp_path)
    assert {name: len(found) for name, found in after.items()} == counts
    assert {ref for found in after.values() for ref in found} == {"a-fork/imageprompt_widgets_fork"}
    assert tomllib.loads((tmp_path / "pyproject.toml").read_text())["project"]["urls"]["Repository"] == new
    for path, text in before.items():  # only the repository path changed, byte for byte
        moved_back = path.read_text(encoding="utf-8").replace("a-fork/imageprompt_widgets_fork", REPOSITORY_PATH)
        assert moved_back == text, path.name
    for notebook in (tmp_path / "examples").glob("*.ipynb"):
        json.loads(notebook.read_text(encoding="utf-8"))

    again = subprocess.run(
        [sys.executable, str(script), new, "--root", str(tmp_path)], capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert again.returncode == 0 and again.stdout == ""  # already there: nothing to change

    refused = subprocess.run(
        [sys.executable, str(script), "https://gitlab.com/a/b", "--root", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert refused.returncode == 2 and "not a GitHub repository URL" in refused.stderr
