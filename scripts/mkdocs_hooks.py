"""MkDocs hooks (mkdocs.yml names this file): the site refuses a notebook a reader would see without results,
and shows the "Open in Colab" badge from its own copy.

The notebook pages render the outputs committed with examples/*.ipynb (scripts/execute_notebooks.py writes
them; tests/test_notebooks.py fails when they are stale). A notebook committed without them, or with an
error in them, would still render, as code without pictures or with a traceback: this stops the build.
The badge's address stays Colab's in the notebooks and the README (GitHub shows it from there); the site
serves docs/images/colab-badge.svg instead, so its pages load no third-party picture and show whole offline.
"""

from __future__ import annotations

import json
from pathlib import Path

COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
LOCAL_BADGE = "images/colab-badge.svg"


def unfinished_cells(path: Path) -> list[str]:
    """Why each code cell of a notebook is not fit to show: never ran, or ended in an error."""
    cells = [cell for cell in json.loads(path.read_text(encoding="utf-8"))["cells"] if cell["cell_type"] == "code"]
    problems = []
    for number, cell in enumerate(cells, start=1):
        if cell.get("execution_count") is None:
            problems.append(f"code cell {number} never ran")
        errors = [output.get("ename", "") for output in cell.get("outputs", []) if output["output_type"] == "error"]
        if errors:
            problems.append(f"code cell {number} ended in {errors[0]}")
    return problems


def on_files(files, config):  # MkDocs' hook signature
    from mkdocs.exceptions import PluginError  # here: the tests read unfinished_cells without MkDocs

    for file in files:
        if file.src_path.endswith(".ipynb"):
            problems = unfinished_cells(Path(file.abs_src_path))
            if problems:
                raise PluginError(f"{file.src_path} is not executed ({'; '.join(problems[:3])}): run "
                                  f"python scripts/execute_notebooks.py {Path(file.src_path).stem}")
    return files


def local_badge(html: str, page_url: str) -> str:
    """``html`` with Colab's badge picture replaced by the site's copy, addressed from a page at ``page_url``."""
    return html.replace(COLAB_BADGE, "../" * page_url.count("/") + LOCAL_BADGE)


def on_post_page(output, page, config):  # MkDocs' hook signature
    return local_badge(output, page.url)
