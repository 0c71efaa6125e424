"""Point the Colab badges, the notebooks' install cell and the README's links at another repository.

    python scripts/set_repository.py https://github.com/someone/imageprompt_widgets

The repository location has one source: ``Repository`` under ``[project.urls]`` in pyproject.toml. This
script writes the new URL there and rewrites every copy of the old one in README.md, mkdocs.yml,
CITATION.cff, docs/*.md and examples/*.ipynb (Colab badges, the notebooks' ``REPO = "…"`` install cell, the README's absolute links
and screenshot, which must be absolute to show on the package index). tests/test_packaging.py checks
that all of them agree. Only GitHub works: Colab opens notebooks from github.com.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GITHUB_URL = re.compile(r"https://github\.com/([A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)/([A-Za-z0-9_.-]+?)(?:\.git)?/?")
REPOSITORY_LINE = re.compile(r'^(Repository\s*=\s*")([^"]*)(")', re.MULTILINE)
#: The sites that carry an "owner/name" repository path right after their own prefix.
SITES = r"https://(?:github\.com|colab\.research\.google\.com/github|raw\.githubusercontent\.com)/"


def repository_path(url: str) -> str:
    """``https://github.com/owner/name`` (optionally ``.git`` or ``/``) → ``owner/name``; ValueError otherwise."""
    match = GITHUB_URL.fullmatch(url.strip())
    if match is None:
        raise ValueError(f"{url!r} is not a GitHub repository URL like https://github.com/owner/name")
    return f"{match.group(1)}/{match.group(2)}"


def current_repository(root: Path) -> str:
    match = REPOSITORY_LINE.search((root / "pyproject.toml").read_text(encoding="utf-8"))
    if match is None:
        raise ValueError("pyproject.toml has no Repository = \"…\" line under [project.urls]")
    return match.group(2)


def files_to_rewrite(root: Path) -> list[Path]:
    return [
        root / "pyproject.toml",
        root / "README.md",
        *[path for path in (root / "mkdocs.yml", root / "CITATION.cff") if path.exists()],
        *sorted((root / "docs").glob("*.md")),
        *sorted((root / "examples").glob("*.ipynb")),
    ]


def rewrite(text: str, old_path: str, new_path: str) -> str:
    """Replace ``old_path`` where it follows one of SITES and ends there (not a longer name that starts alike)."""
    pattern = re.compile("(" + SITES + ")" + re.escape(old_path) + r"(?=[/\"'#)\s\\]|$)")
    return pattern.sub(lambda m: m.group(1) + new_path, text)


def set_repository(url: str, root: Path = ROOT) -> list[Path]:
    """Write ``url`` as the repository everywhere; returns the files that changed."""
    new_path = repository_path(url)
    old_path = repository_path(current_repository(root))
    changed = []
    for path in files_to_rewrite(root):
        text = path.read_text(encoding="utf-8")
        new_text = rewrite(text, old_path, new_path)
        if new_text != text:
            path.write_text(new_text, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the repository, e.g. https://github.com/someone/imageprompt_widgets")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to rewrite (default: this one)")
    args = parser.parse_args(argv)
    try:
        changed = set_repository(args.url, args.root)
    except ValueError as err:
        print(f"set_repository: error: {err}", file=sys.stderr)
        return 2
    for path in changed:
        print(path.relative_to(args.root))
    print(f"{len(changed)} file(s) now point at https://github.com/{repository_path(args.url)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
