"""End to end in a real JupyterLab (and Notebook 7): what a user does with the panel, checked in the DOM.

The kernel runs the tiny preset offline. Every wait is on a condition in the page, with a timeout.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import time
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
w.status_line.add_class("ipw-e2e-status")
w.history.add_class("ipw-e2e-history")
w.maps.add_class("ipw-e2e-maps")
w"""
#: A second cell: the next run fails at its second step (to see the panel after a failure).
FAIL_NEXT_CELL = """\
import imageprompt_widgets.engine.pipeline as _pipeline

_generate = _pipeline.ImagePromptPipeline.generate

def _failing(self, *args, on_step=None, **kwargs):
    def step(info):
        on_step(info)
        if info.step == 2:
            _pipeline.ImagePromptPipeline.generate = _generate  # once
            raise RuntimeError("a simulated failure at step 2")
    return _generate(self, *args, on_step=step, **kwargs)

_pipeline.ImagePromptPipeline.generate = _failing"""
#: Shown images with no picture: an <img> without a src, or one whose src did not decode (the browser's
#: broken-image icon). Hidden ones (display: none, a folded section) are not looked at.
BROKEN_IMAGES = """() => Array.from(document.querySelectorAll(".jp-OutputArea-output img"))
    .filter((img) => img.getClientRects().length > 0)
    .filter((img) => !img.getAttribute("src") || (img.complete && img.naturalWidth === 0))
    .map((img) => img.outerHTML.slice(0, 120))"""

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


def lab_path(notebook: str) -> str:
    """JupyterLab's address of ``notebook`` in a workspace of its own: the session's server keeps each workspace's
    layout, and a shared one would reopen an earlier test's notebook in front of this one."""
    return f"lab/workspaces/{Path(notebook).stem}/tree/{notebook}"


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


def accept_kernel_dialog(page: Any) -> bool:
    """Accept a "Select Kernel" dialog (the notebook's own kernel is preselected), as a user would; a busy
    server sometimes shows it instead of starting the kernel, and it covers the page."""
    dialog = page.locator(".jp-Dialog .jp-mod-accept")
    if dialog.count() and dialog.first.is_visible():
        dialog.first.click()
        return True
    return False


def wait_for_kernel(page: Any) -> None:
    """Wait until the notebook's kernel is connected and idle (code sent earlier would be lost), accepting
    the "Select Kernel" dialog whenever it comes up instead."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.locator(".jp-CodeCell .jp-InputArea-editor").first.wait_for(timeout=RUN_TIMEOUT)
    idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").first
    deadline = time.monotonic() + RUN_TIMEOUT / 1000
    while True:
        accept_kernel_dialog(page)
        try:
            idle.wait_for(timeout=2_000)
            return
        except PlaywrightTimeout:
            if time.monotonic() > deadline:
                raise


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


def choose_file(page: Any, path: Path, button: str = "Upload") -> None:
    """Click one of the panel's upload buttons and pick ``path`` in the file chooser it opens."""
    with page.expect_file_chooser() as chooser:
        page.locator(".widget-upload", has_text=re.compile(f"^{button}")).first.click()
    chooser.value.set_files(str(path))


def choose_option(page: Any, label: str, value: str) -> None:
    """Pick ``value`` in the dropdown labelled ``label`` (the option whose text starts with it)."""
    select = page.locator(".widget-dropdown", has=page.locator("label", has_text=re.compile(f"^{label}$")))
    options = select.locator("option").all_inner_texts()
    # ipywidgets writes the labels' spaces as no-break spaces
    # (a setting's choice reads "plain words (name)"; a preset's line starts with its name)
    select.locator("select").select_option(label=next(
        text for text in options
        if text.replace("\xa0", " ").split(" ")[0] == value or f"({value})" in text.replace("\xa0", " ")))


def final_tile(page: Any) -> bytes:
    """The bytes of the picture the output grid's first tile shows now."""
    return bytes(page.evaluate("""async (sel) => {
        const b = await (await fetch(document.querySelector(sel).src)).blob();
        return Array.from(new Uint8Array(await b.arrayBuffer())); }""", f".{GRID_CLASS} img"))


def capture_for_readme(page: Any) -> None:
    """Where ``IMAGEPROMPT_SCREENSHOT`` names a file (scripts/screenshot.py): the whole panel, in a window tall
    enough to hold it."""
    screenshot = os.environ.get("IMAGEPROMPT_SCREENSHOT")
    if screenshot:
        page.set_viewport_size({"width": 1400, "height": 2400})
        panel = page.locator(".jp-OutputArea-output").first
        panel.scroll_into_view_if_needed()
        panel.screenshot(path=screenshot)


def assert_no_broken_image(page: Any) -> None:
    assert page.evaluate(BROKEN_IMAGES) == []


def shoot(page: Any, name: str) -> None:
    """Where ``IMAGEPROMPT_STATE_SHOTS`` names a folder, a screenshot of the page in this state (to look at)."""
    folder = os.environ.get("IMAGEPROMPT_STATE_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"))


def not_an_image(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("these are notes, not a picture\n")
    return path


def an_image(tmp_path: Path) -> Path:
    path = tmp_path / "sunset.png"
    shutil.copy(EXAMPLES / "images" / "sunset.png", path)
    return path


def within_view(page: Any, selectors: list[str]) -> list[str]:
    """Which of ``selectors`` lie entirely inside the browser window as it is scrolled now."""
    return page.evaluate("""(selectors) => selectors.filter((sel) => {
        const box = document.querySelector(sel).getBoundingClientRect();
        return box.height > 0 && box.top >= 0 && box.bottom <= window.innerHeight
            && box.left >= 0 && box.right <= window.innerWidth;
    })""", selectors)


def test_panel_in_jupyterlab(lab_server: Any, page: Any, console: Any, tmp_path: Path) -> None:
    """Upload through the file chooser, switch method and model, Generate (previews, then final PNGs in the
    tiles), look at the inspector, Cancel a long run, a failing run, a non-image upload: each shows up in the
    DOM, no broken image is ever shown, and no error reaches the browser console."""
    write_notebook(lab_server.root / "panel.ipynb", WIDGET_CELL, FAIL_NEXT_CELL)
    page.goto(lab_server.url("lab/tree/panel.ipynb"))  # the default workspace: the first notebook this server opens
    run_cells(page)
    generate = page.get_by_role("button", name="Generate")
    generate.wait_for(timeout=RUN_TIMEOUT)
    page.locator(f".{GRID_CLASS}").wait_for()
    upload = page.locator(".widget-upload", has_text=re.compile("^Upload")).first
    assert upload.inner_text().strip() == "Upload (0)"
    assert_no_broken_image(page)
    shoot(page, "fresh")

    # Upload through the browser's file chooser, which the FileUpload button opens.
    choose_file(page, an_image(tmp_path))
    wait_for_status(page, r"^Added 1 image")
    page.locator(".widget-image[src]").first.wait_for()  # the input thumbnail
    page.wait_for_function("(el) => el.innerText.trim() === 'Upload (1)'", arg=upload.element_handle())
    assert page.get_by_text("sunset.png", exact=True).count() == 1  # its caption, unquoted

    # Switch method: one the tiny model lacks moves to its offline twin; then the model back.
    prompt = page.locator(".widget-text", has=page.locator("label", has_text=re.compile("^prompt$")))
    assert not prompt.is_visible()  # repeat reads no prompt
    choose_option(page, "method", "caption")
    wait_for_status(page, r"^caption needs a captioner \(BLIP\), which 'tiny' lacks: switched to model 'toy'")
    prompt.wait_for(state="visible")
    choose_option(page, "model", "tiny")
    # "built" once the tiny models exist in this cache, "builds in seconds" on a fresh machine before the first run
    # … and says the method it moved to: tiny has no captioner
    wait_for_status(page, r"^Model 'tiny' chosen \(offline, (built|builds in seconds)\)\. caption does not run on "
                          r"'tiny': the method is now repeat\.$")
    prompt.wait_for(state="hidden")

    # Generate: previews (JPEG) first, then the final image (PNG) in the tile.
    page.evaluate(WATCH_TILES, f".{GRID_CLASS}")
    generate.click()
    shoot(page, "loading")
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
    final = final_tile(page)
    assert Image.open(io.BytesIO(final)).size == (256, 256)  # the tiny preset's 64 px, 4× pixel by pixel
    assert_no_broken_image(page)
    capture_for_readme(page)

    # In a 1280×800 window, the grid, the status line and the history are in view together.
    page.set_viewport_size({"width": 1280, "height": 800})
    page.evaluate("(sel) => document.querySelector(sel).scrollIntoView({block: 'start'})", ".ipw-e2e-status")
    page.evaluate("() => document.querySelector('.jp-WindowedPanel-outer').scrollBy(0, -60)")
    parts = [".ipw-e2e-status", f".{GRID_CLASS}", ".ipw-e2e-history"]
    shoot(page, "done-1280x800")
    assert within_view(page, parts) == parts

    # The inspector's tabs: no empty picture before they have content.
    page.get_by_role("tab", name="Inspector", exact=True).click()
    page.locator(".jp-OutputArea-output .lm-TabBar-tab, .jp-OutputArea-output .jupyter-widget-Collapse-header,"
                 " .jp-OutputArea-output .p-Collapse-header").filter(has_text=re.compile("^Denoising$")).first.click()
    page.get_by_text(re.compile("^This run kept no latents")).wait_for()
    assert_no_broken_image(page)
    shoot(page, "inspector-denoising")
    page.locator(".jp-OutputArea-output .jupyter-widget-Collapse-header, .jp-OutputArea-output .p-Collapse-header")\
        .filter(has_text=re.compile("^Interpolation$")).first.click()
    assert_no_broken_image(page)
    shoot(page, "inspector-interpolation")
    page.get_by_role("tab", name="History", exact=True).click()
    page.set_viewport_size({"width": 1400, "height": 1000})

    # Two ControlNets: edges, then a second unit (depth, the kind not used yet); each unit's map is shown
    # before the run (the depth map computed off the kernel thread) and after it, and no picture is broken.
    choose_option(page, "keep layout", "edges")
    page.get_by_role("button", name="add a ControlNet").click()
    page.get_by_text("ControlNet 2 · depth", exact=True).first.wait_for()
    shown_maps = """(n) => { const imgs = Array.from(document.querySelectorAll('.ipw-e2e-maps img'))
        .filter((img) => img.getClientRects().length > 0);
        return imgs.length === n && imgs.every((img) => img.complete && img.naturalWidth > 0); }"""
    page.wait_for_function(shown_maps, arg=2, timeout=RUN_TIMEOUT)
    assert_no_broken_image(page)
    generate.click()
    page.get_by_text(re.compile(r"^What each ControlNet read in this run")).wait_for(timeout=RUN_TIMEOUT)
    wait_for_status(page, r"^Done: 1 image", RUN_TIMEOUT)
    page.wait_for_function(shown_maps, arg=2)
    assert page.locator(".ipw-e2e-maps").get_by_text("ControlNet 1 · Canny edges", exact=True).count() == 1
    assert_no_broken_image(page)
    shoot(page, "two-controlnets")
    choose_option(page, "keep layout", "none")  # the rest runs without ControlNets

    # Cancel a long run: the status line says it was cancelled, well before the run could have ended.
    # (The scheduler may count one step more than asked for: PNDM runs 151 steps for steps=150.)
    set_slider(page, "steps", 150)
    generate.click()
    wait_for_status(page, r"^Step \d+/1[56]\d\b", RUN_TIMEOUT)
    shoot(page, "running")
    page.get_by_role("button", name="Cancel").click()
    cancelled = wait_for_status(page, r"^Cancelled after step \d+ of \d+", RUN_TIMEOUT)
    step, total = map(int, re.findall(r"\d+", cancelled)[:2])
    assert total >= 150 and step < total // 2, cancelled
    page.locator(f".{GRID_CLASS}").get_by_text(re.compile(r"^cancelled at step \d+/\d+")).wait_for()
    assert_no_broken_image(page)
    shoot(page, "cancelled")

    # A run that fails at its second step (the notebook's second cell arranges it): the panel says so.
    page.locator(".jp-CodeCell .jp-InputArea-editor").nth(1).click()
    page.keyboard.press("Control+Enter")
    page.locator(".jp-CodeCell .jp-InputPrompt").nth(1).filter(has_text=re.compile(r"\[\d+\]")).wait_for()
    set_slider(page, "steps", 12)
    generate.click()
    wait_for_status(page, r"^Generation failed \(RuntimeError: a simulated failure at step 2\)", RUN_TIMEOUT)
    page.locator(f".{GRID_CLASS}").get_by_text(re.compile(r"^failed at step 2/13")).wait_for()
    assert_no_broken_image(page)
    shoot(page, "failed")

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
        .some((img) => img.src && img.naturalWidth === 256)""")  # the 64 px toy output, shown 4× pixel by pixel
    assert_no_broken_image(page)
    shoot(page, "notebook7")
    # Switching method and model works here too.
    choose_option(page, "method", "caption")
    wait_for_status(page, r"switched to model 'toy'")
    choose_option(page, "model", "tiny")
    wait_for_status(page, r"^Model 'tiny' chosen")
    assert_no_broken_image(page)
    assert console.errors == []


WORDS_CELL = f"""\
from imageprompt_widgets import ImagePromptWidget

w = ImagePromptWidget(model="toy", preview_interval=0.05)
w.grid.add_class("{GRID_CLASS}")
w.status_line.add_class("ipw-e2e-status")
w"""
TOY_CAPTION = "a red circle on a blue background"


def test_words_only_and_a_mode_change_in_jupyterlab(lab_server: Any, page: Any, console: Any) -> None:
    """At 1280×800 on the toy world: a prompt alone draws (no image), Advanced shows its sizes, a method the toy
    model lacks moves to an offline twin, and one only a download could run asks first; nothing is broken."""
    page.set_viewport_size({"width": 1280, "height": 800})
    write_notebook(lab_server.root / "words.ipynb", WORDS_CELL)
    page.goto(lab_server.url(lab_path("words.ipynb")))
    run_cells(page)
    generate = page.get_by_role("button", name="Generate")
    generate.wait_for(timeout=RUN_TIMEOUT)
    page.get_by_text(re.compile(r"^The toy world \('toy'\):")).first.wait_for()  # the banner, as in the notebooks
    wait_for_status(page, r"^Add an image and press Generate, or choose the method “words only” and type a prompt\.$")
    shoot(page, "fresh")

    # Words only: no image, a prompt; the toy model draws it, shown at teaching size.
    choose_option(page, "method", "text")
    prompt = page.locator(".widget-text", has=page.locator("label", has_text=re.compile("^prompt$"))).first
    prompt.wait_for(state="visible")
    prompt.locator("input").fill(TOY_CAPTION)
    prompt.locator("input").press("Enter")
    generate.click()
    wait_for_status(page, r"^Done: 1 image", RUN_TIMEOUT)
    page.wait_for_function("(sel) => { const img = document.querySelector(sel);"
                           " return img && img.complete && img.naturalWidth === 256; }", arg=f".{GRID_CLASS} img")
    assert_no_broken_image(page)
    shoot(page, "text-only-run")

    # Advanced: the size dropdowns show their first option (not an empty box).
    page.locator(".jp-OutputArea-output .jupyter-widget-Collapse-header, .jp-OutputArea-output .p-Collapse-header")\
        .filter(has_text=re.compile("^Advanced$")).first.click()
    sizes = page.evaluate("""() => Array.from(document.querySelectorAll('.widget-dropdown'))
        .filter((el) => /^(height|width)$/.test(el.querySelector('label')?.innerText.trim() || ''))
        .map((el) => { const s = el.querySelector('select'); return [s.selectedIndex, s.options[s.selectedIndex]?.text]; })""")
    assert sizes == [[0, "native\xa0(64)"], [0, "native\xa0(64)"]], sizes  # the toy model's own side
    shoot(page, "advanced-open")

    # The big view: the picture as wide as the column.
    page.get_by_role("button", name="big view").click()
    page.wait_for_function("(sel) => document.querySelector(sel).getBoundingClientRect().width > 400",
                           arg=f".{GRID_CLASS} img")
    shoot(page, "big-view")
    page.get_by_role("button", name="big view").click()

    # The Inspector after a words-only run: only the sections that apply.
    page.get_by_role("tab", name="Inspector", exact=True).click()
    page.get_by_role("tab", name="Inspector", exact=True).scroll_into_view_if_needed()
    page.evaluate("() => document.querySelector('.jp-WindowedPanel-outer').scrollBy(0, 300)")
    headers = page.locator(".jp-OutputArea-output .jupyter-widget-Collapse-header, "
                           ".jp-OutputArea-output .p-Collapse-header")
    assert [text.strip() for text in headers.all_inner_texts() if text.strip() not in ("Advanced", "details")][-3:] \
        == ["Tensors", "Attention", "Denoising"]
    shoot(page, "inspector-sections")
    page.get_by_role("tab", name="History", exact=True).click()

    # A mode change offline: the toy model has no IP-Adapter; the panel moves to a twin on this machine.
    choose_option(page, "method", "ip_adapter")
    wait_for_status(page, r"^ip_adapter needs an IP-Adapter, which 'toy' lacks: switched to model '(toy|tiny)-ip-adapter")
    shoot(page, "mode-change-offline")

    # From a real model, a method only a download can run asks first, naming the size; "stay" keeps everything.
    choose_option(page, "model", "sd14")
    wait_for_status(page, r"^Model 'sd14' chosen")
    choose_option(page, "method", "ip_adapter")
    wait_for_status(page, r"^ip_adapter needs an IP-Adapter, which 'sd14' lacks: 'ip-adapter' can, and downloads "
                          r"about 8\.0 GB first\. Download it, or stay on 'sd14'\?$")
    page.get_by_role("button", name=re.compile(r"Download ip-adapter \(about 8\.0 GB\)$")).wait_for()  # after its icon
    page.evaluate("(sel) => document.querySelector(sel).scrollIntoView({block: 'center'})", ".ipw-e2e-status")
    shoot(page, "mode-change-asks")
    page.get_by_role("button", name=re.compile(r"Stay on sd14$")).click()
    wait_for_status(page, r"^Stayed on model 'sd14' with repeat; nothing is downloaded\.$")
    assert_no_broken_image(page)
    assert console.errors == []


#: The README's picture: the toy world's IP-Adapter draws a world picture anew, in a real JupyterLab.
TOY_CELL = """\
from imageprompt_widgets import ImagePromptWidget

w = ImagePromptWidget(model="toy-ip-adapter", seed=1)
w.grid.add_class("{grid}")
w.set_images(["{image}"])
w"""


def test_the_toy_world_draws_its_input_anew_in_jupyterlab(lab_server: Any, page: Any, console: Any) -> None:
    """The panel on the toy world's IP-Adapter: Generate draws a picture that keeps what the input shows (the toy
    world's judge reads its colour back); scripts/screenshot.py captures this panel for the README."""
    from imageprompt_widgets.toy.judge import judge

    picture = EXAMPLES / "images" / "yellow_triangle_on_black.png"
    shutil.copy(picture, lab_server.root / picture.name)
    write_notebook(lab_server.root / "toy.ipynb", TOY_CELL.format(grid=GRID_CLASS, image=picture.name))
    page.goto(lab_server.url(lab_path("toy.ipynb")))
    run_cells(page)
    generate = page.get_by_role("button", name="Generate")
    generate.wait_for(timeout=RUN_TIMEOUT)
    wait_for_status(page, r"^1 input image ready")
    generate.click()
    wait_for_status(page, r"^Done: 1 image", RUN_TIMEOUT)
    final = final_tile(page)
    shown = Image.open(io.BytesIO(final)).convert("RGB")
    drawn = judge(shown.resize((64, 64), Image.NEAREST))  # the tile shows the 64 px picture 4× pixel by pixel
    assert drawn.colour == judge(Image.open(picture)).colour == "yellow", drawn
    assert_no_broken_image(page)
    capture_for_readme(page)
