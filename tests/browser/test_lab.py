"""End to end in a real JupyterLab (and Notebook 7): what a user does with the panel, checked in the DOM.

The kernel runs the tiny preset offline. Every wait is on a condition in the page, with a timeout.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import nbformat
import pytest
from PIL import Image

from imageprompt_widgets.images import ImageInputError, load_image

pytestmark = pytest.mark.browser

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
#: Long enough on the busiest machine for the kernel to run the cell, build the tiny model once and run.
RUN_TIMEOUT = int(os.environ.get("IMAGEPROMPT_E2E_TIMEOUT_MS", "120000"))
GRID_CLASS = "ipw-e2e-grid"
WIDGET_CELL = f"""\
from imageprompt_widgets import ImagePromptWidget

w = ImagePromptWidget(model="tiny", steps=12, preview_interval=0.02)
w.grid.add_class("{GRID_CLASS}")  # so the test can tell the output tiles from the other thumbnails
w"""

#: Records, in the page, every image the output tiles show: the blob's MIME type, size and first bytes.
#: The blob URL is resolved when fetch() is called, so a later revoke by the next update does not race.
WATCH_TILES = """
(selector) => {
  window.__tiles = [];
  const grid = document.querySelector(selector);
  const seen = (img) => {
    if (!img.src) return;
    const entry = {src: img.src};
    window.__tiles.push(entry);
    fetch(img.src).then((r) => r.blob()).then(async (b) => {
      entry.type = b.type; entry.size = b.size;
      entry.magic = Array.from(new Uint8Array(await b.slice(0, 4).arrayBuffer()))
        .map((x) => x.toString(16).padStart(2, "0")).join("");
    }).catch((e) => { entry.error = String(e); });
  };
  new MutationObserver((records) => {
    for (const record of records) {
      if (record.type === "attributes" && record.target.tagName === "IMG") seen(record.target);
      for (const node of record.addedNodes || []) {
        if (node.tagName === "IMG") seen(node);
        if (node.querySelectorAll) node.querySelectorAll("img").forEach(seen);
      }
    }
  }).observe(grid, {subtree: true, childList: true, attributes: true, attributeFilter: ["src"]});
}
"""
JPEG, PNG = "ffd8ff", "89504e47"  # leading bytes of each format, in hex


def write_notebook(path: Path, *sources: str) -> None:
    cells = [nbformat.v4.new_code_cell(source) for source in sources]
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


STATUS_LINE = r"""(pattern) => {
    const lines = Array.from(document.querySelectorAll(".jp-OutputArea-output"))
        .flatMap((el) => el.innerText.split("\n"));
    return lines.find((line) => new RegExp(pattern).test(line.trim())) || false;
}"""


def wait_for_status(page: Any, pattern: str, timeout: float = 30_000) -> str:
    """Wait until a line of the panel's output reads like ``pattern`` (a regex) and return that line."""
    return page.wait_for_function(STATUS_LINE, arg=pattern, timeout=timeout, polling=50).json_value()


def wait_for_kernel(page: Any) -> None:
    """Wait until the notebook's kernel is connected and idle (code sent earlier would be lost)."""
    page.locator(".jp-CodeCell .jp-InputArea-editor").first.wait_for()
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first.wait_for(timeout=RUN_TIMEOUT)


def run_cells(page: Any, run_all: bool = False) -> None:
    """Run the first cell (click into it, Ctrl+Enter) or all cells (Run menu), as a user does.

    A keystroke or menu command that lands while the front end is still wiring the kernel up is
    either dropped or answered with the "Select Kernel" dialog (accepted here, as a user would), so
    it is retried until the first code cell's prompt shows that it was executed.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    wait_for_kernel(page)
    executed = page.locator(".jp-CodeCell .jp-InputPrompt", has_text=re.compile(r"\[(\*|\d+)\]")).first
    kernel_dialog = page.locator(".jp-Dialog .jp-mod-accept")
    for _ in range(5):
        if run_all:
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name=re.compile("^Run All Cells")).click()
        else:
            page.locator(".jp-CodeCell .jp-InputArea-editor").first.click()
            page.keyboard.press("Control+Enter")
        try:
            executed.or_(kernel_dialog).first.wait_for(timeout=10_000)
        except PlaywrightTimeout:  # the command was dropped: try again
            continue
        if kernel_dialog.is_visible():
            kernel_dialog.click()
            continue
        return
    executed.wait_for(timeout=1)  # fails with Playwright's own message


def set_slider(page: Any, label: str, value: int) -> None:
    """Type a value into a slider's readout, as a user can in ipywidgets 8 (and press Enter)."""
    slider = page.locator(".widget-slider", has=page.locator("label", has_text=re.compile(f"^{label}$"))).first
    readout = slider.locator(".widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(str(value))
    page.keyboard.press("Enter")
    page.wait_for_function("([el, v]) => el.textContent.trim() === v", arg=[readout.element_handle(), str(value)])


def choose_file(page: Any, path: Path) -> None:
    """Click the panel's Upload button and pick ``path`` in the file chooser it opens."""
    with page.expect_file_chooser() as chooser:
        page.locator(".widget-upload", has_text=re.compile("^Upload")).first.click()
    chooser.value.set_files(str(path))


def not_an_image(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("these are notes, not a picture\n")
    return path


def an_image(tmp_path: Path) -> Path:
    path = tmp_path / "sunset.png"
    shutil.copy(EXAMPLES / "images" / "sunset.png", path)
    return path


def test_panel_in_jupyterlab(lab_server: Any, page: Any, console: Any, tmp_path: Path) -> None:
    """Upload through the file chooser, Generate (previews, then final PNGs in the tiles), Cancel a long
    run, upload a non-image: each shows up in the DOM, and no error reaches the browser console."""
    write_notebook(lab_server.root / "panel.ipynb", WIDGET_CELL)
    page.goto(lab_server.url("lab/tree/panel.ipynb"))
    run_cells(page)
    generate = page.get_by_role("button", name="Generate")
    generate.wait_for(timeout=RUN_TIMEOUT)
    page.locator(f".{GRID_CLASS}").wait_for()

    # Upload through the browser's file chooser, which the FileUpload button opens.
    choose_file(page, an_image(tmp_path))
    wait_for_status(page, r"^Added 1 image")
    page.locator(".widget-image[src]").first.wait_for()  # the input thumbnail

    # Generate: previews (JPEG) first, then the final image (PNG) in the tile.
    page.evaluate(WATCH_TILES, f".{GRID_CLASS}")
    generate.click()
    wait_for_status(page, r"^Done: 1 image", RUN_TIMEOUT)
    page.wait_for_function("() => window.__tiles.length > 0 && window.__tiles.every((t) => 'magic' in t || 'error' in t)")
    shown = page.evaluate("() => window.__tiles.filter((t) => t.size > 0)")
    kinds = ["jpeg" if entry["magic"].startswith(JPEG) else "png" if entry["magic"] == PNG else "?" for entry in shown]
    assert "jpeg" in kinds, f"no JPEG preview reached the tile: {shown}"
    assert kinds[-1] == "png", f"the tile does not end on the final PNG: {shown}"
    assert "?" not in kinds, shown
    tiles = page.locator(f".{GRID_CLASS} img")
    assert tiles.count() == 1
    assert tiles.first.get_attribute("src")
    final = page.evaluate("""async (sel) => {
        const b = await (await fetch(document.querySelector(sel).src)).blob();
        return Array.from(new Uint8Array(await b.arrayBuffer())); }""", f".{GRID_CLASS} img")
    assert Image.open(io.BytesIO(bytes(final))).size == (64, 64)  # the tiny preset's native size
    screenshot = os.environ.get("IMAGEPROMPT_SCREENSHOT")
    if screenshot:  # scripts/screenshot.py: the whole panel, in a window tall enough to hold it
        page.set_viewport_size({"width": 1400, "height": 2400})
        panel = page.locator(".jp-OutputArea-output").first
        panel.scroll_into_view_if_needed()
        panel.screenshot(path=screenshot)
        page.set_viewport_size({"width": 1400, "height": 1000})

    # Cancel a long run: the status line says it was cancelled, well before the run could have ended.
    # (The scheduler may count one step more than asked for: PNDM runs 151 steps for steps=150.)
    set_slider(page, "steps", 150)
    generate.click()
    wait_for_status(page, r"^Step \d+/1[56]\d\b", RUN_TIMEOUT)
    page.get_by_role("button", name="Cancel").click()
    cancelled = wait_for_status(page, r"^Cancelled after step \d+ of \d+", RUN_TIMEOUT)
    step, total = map(int, re.findall(r"\d+", cancelled)[:2])
    assert total >= 150 and step < total // 2, cancelled

    # A file that is not an image: the status line shows the loader's own sentence, naming the file.
    notes = not_an_image(tmp_path)
    with pytest.raises(ImageInputError) as expected:
        load_image(notes.read_bytes(), name=notes.name)
    choose_file(page, notes)
    assert wait_for_status(page, r"notes\.txt") == str(expected.value)

    assert console.errors == []


def test_quickstart_renders_in_notebook7(notebook_server: Any, page: Any, console: Any) -> None:
    """The quickstart runs top to bottom in Notebook 7: its panel renders there and its run shows up."""
    shutil.copytree(EXAMPLES, notebook_server.root / "examples", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    page.goto(notebook_server.url("notebooks/examples/quickstart.ipynb"))
    run_cells(page, run_all=True)
    page.get_by_role("button", name="Generate").first.wait_for(timeout=RUN_TIMEOUT)
    page.get_by_role("button", name="Cancel").first.wait_for()
    page.locator(".widget-upload", has_text=re.compile("^Upload")).first.wait_for()
    # The quickstart's own run (w.set_images + w.generate) finishes and its image reaches the page.
    wait_for_status(page, r"^Done: 1 image", RUN_TIMEOUT)
    page.wait_for_function("""() => Array.from(document.querySelectorAll(".jp-OutputArea-output img.widget-image"))
        .some((img) => img.src && img.naturalWidth === 64)""")  # the tiny preset's 64 px output
    assert console.errors == []
