"""A real JupyterLab / Notebook 7 server and Debian's Chromium, driven by Playwright.

Every test here is marked ``browser``. Without Chromium or Playwright the tests are skipped with the
reason, unless ``IMAGEPROMPT_REQUIRE_BROWSER=1`` (CI), where a missing browser is a failure instead.
Servers listen on 127.0.0.1 with a random token, in a temporary root and temporary Jupyter config/data
folders, so nothing of the user's Jupyter setup leaks in and nothing is left behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SERVER_START_TIMEOUT = 90  # seconds; a cold start on a busy 2-core machine takes 10-20 s
#: Console errors that are not ours, each matched against "message (url)" or "uncaught: error\nstack":
#: a favicon the server lacks; the notebooks' "Open in Colab" badge image, which cannot load offline;
#: Notebook 7.6's own keyboard-shortcut settings bug (thrown on its file browser with no notebook open).
CONSOLE_NOISE = [
    re.compile(r"\(\S*/favicon\S*\)$"),
    re.compile(r"^Failed to load resource: \S+ \(https://colab\.research\.google\.com/assets/colab-badge\.svg\)$"),
    re.compile(r"^uncaught: Cannot read properties of undefined \(reading 'schema'\)\nTypeError: .*\n"
               r"\s+at http://127\.0\.0\.1:\d+/static/notebook/notebook_core\.[0-9a-f]+\.js"),
]


def chromium_path() -> str | None:
    """Debian's Chromium (``IMAGEPROMPT_CHROMIUM`` overrides); Playwright cannot download browsers here."""
    candidates = [os.environ.get("IMAGEPROMPT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")]
    return next((path for path in candidates if path and os.access(path, os.X_OK)), None)


def browser_unavailable(reason: str) -> None:
    """Skip with the reason, or fail where CI demands the browser suite (IMAGEPROMPT_REQUIRE_BROWSER=1)."""
    if os.environ.get("IMAGEPROMPT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (IMAGEPROMPT_REQUIRE_BROWSER=1, so this is an error, not a skip)", pytrace=False)
    pytest.skip(reason)


@dataclass
class JupyterServer:
    """One ``jupyter lab`` or ``jupyter notebook`` process on 127.0.0.1 with a token."""

    app: str  # "lab" or "notebook"
    root: Path
    port: int
    token: str
    process: subprocess.Popen
    log_path: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}?token={self.token}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """Ask the server to shut down (it stops its kernels), then make sure the process is gone."""
        request = urllib.request.Request(self.url("api/shutdown"), method="POST")
        try:
            urllib.request.urlopen(request, timeout=10).close()
            self.process.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kernel_environment(home: Path, app: str) -> dict[str, str]:
    """What the server (and so its kernels) runs with: offline, tiny preset, isolated Jupyter folders."""
    env = dict(os.environ)
    env.update(
        IMAGEPROMPT_MODEL="tiny",
        HF_HUB_OFFLINE="1",
        # One torch thread: on a shared 2-core machine, two spinning threads per process made each tiny
        # denoising step ~10x slower (measured: 1.1 s -> 0.11 s per step under load).
        OMP_NUM_THREADS="1",
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(home / f"{app}-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "lab-workspaces"),
        IPYTHONDIR=str(home / "ipython"),
    )
    env.setdefault("IMAGEPROMPT_CACHE_DIR", os.environ.get("IMAGEPROMPT_CACHE_DIR", ""))
    if not env["IMAGEPROMPT_CACHE_DIR"]:
        del env["IMAGEPROMPT_CACHE_DIR"]
    # No news or update checks in JupyterLab: they would reach for the network. (Only there: Notebook 7
    # lacks that plugin, and a settings file for a missing plugin breaks its settings registry.)
    if app == "lab":
        settings = home / f"{app}-settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True, exist_ok=True)
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"checkForUpdates": False, "fetchNews": "false"})
        )
    return env


def start_server(app: str, root: Path, home: Path) -> JupyterServer:
    """Start ``jupyter <app>`` and wait until its REST API answers (a failure shows the server's log)."""
    token, port = secrets.token_hex(16), free_port()
    log_path = home / f"{app}.log"
    command = [
        sys.executable, "-m", "jupyter", app,
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--ServerApp.open_browser=False", "--no-browser",
        "--LabApp.extension_manager=readonly",  # no PyPI queries from the extension manager
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
        command.append("--allow-root")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=kernel_environment(home, app),
                                   cwd=root)
    server = JupyterServer(app, root, port, token, process, log_path)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"jupyter {app} exited with {process.returncode}:\n{server.log()}", pytrace=False)
        try:
            urllib.request.urlopen(server.url("api/status"), timeout=2).close()
            return server
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)  # polling a process we started; the browser side always waits on conditions
    server.stop()
    pytest.fail(f"jupyter {app} did not answer within {SERVER_START_TIMEOUT} s:\n{server.log()}", pytrace=False)


@dataclass
class ConsoleLog:
    """Browser console errors and uncaught page errors, minus the allow-listed noise."""

    errors: list[str] = field(default_factory=list)

    def record(self, text: str) -> None:
        if not any(pattern.search(text) for pattern in CONSOLE_NOISE):
            self.errors.append(text)


@pytest.fixture
def unavailable_policy() -> Any:
    """The skip-or-fail rule itself, for the test that pins it down."""
    return browser_unavailable


@pytest.fixture(scope="session")
def playwright_api() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_unavailable("playwright is not installed (pip install -e '.[test]')")
    if chromium_path() is None:
        browser_unavailable("Chromium is not installed (apt-get install chromium)")
    with sync_playwright() as api:
        yield api


@pytest.fixture(scope="session")
def browser(playwright_api: Any) -> Iterator[Any]:
    try:
        browser = playwright_api.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
    except Exception as err:  # noqa: BLE001 - whatever Playwright says, it means: no usable browser
        browser_unavailable(f"Chromium at {chromium_path()} did not start: {err}")
    yield browser
    browser.close()


@pytest.fixture(scope="session")
def jupyter_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jupyter-home")


@pytest.fixture(scope="session")
def lab_server(browser: Any, tmp_path_factory: pytest.TempPathFactory, jupyter_home: Path) -> Iterator[JupyterServer]:
    """``jupyter lab`` serving an empty temporary root (tests write their notebooks into it)."""
    server = start_server("lab", tmp_path_factory.mktemp("lab-root"), jupyter_home)
    yield server
    server.stop()
    print(f"jupyter lab log (tail):\n{server.log()}")


@pytest.fixture(scope="session")
def notebook_server(browser: Any, tmp_path_factory: pytest.TempPathFactory,
                    jupyter_home: Path) -> Iterator[JupyterServer]:
    """``jupyter notebook`` (Notebook 7) serving an empty temporary root."""
    server = start_server("notebook", tmp_path_factory.mktemp("notebook-root"), jupyter_home)
    yield server
    server.stop()


@pytest.fixture
def console() -> ConsoleLog:
    return ConsoleLog()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


FAILED = pytest.StashKey[bool]()
#: Where a failing test leaves a screenshot of the page (ignored by git).
FAILURE_DIR = Path(__file__).resolve().parents[2] / "screenshots"


@pytest.fixture
def page(request: pytest.FixtureRequest, browser: Any, console: ConsoleLog) -> Iterator[Any]:
    """A fresh browser page that records console errors; a failing test leaves its screenshot behind."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.on("console", lambda message: message.type == "error"
            and console.record(f"{message.text} ({message.location.get('url', '')})"))
    page.on("pageerror", lambda error: console.record(f"uncaught: {error}\n{error.stack}"))
    # A busy server sometimes answers a notebook's first run with the "Select Kernel" dialog over the page
    # (its own kernel preselected): accept it whenever it stands in the way of a click, as a user would.
    page.add_locator_handler(
        page.locator(".jp-Dialog").filter(has_text=re.compile("Select Kernel")),
        lambda dialog: dialog.locator(".jp-mod-accept").click(),
    )
    yield page
    if request.node.stash.get(FAILED, False):
        FAILURE_DIR.mkdir(exist_ok=True)
        path = FAILURE_DIR / f"failed-{request.node.name}.png"
        page.screenshot(path=str(path), full_page=True)
        outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
        print(f"screenshot of the failing page: {path}\nconsole errors: {console.errors}\noutputs: {outputs}")
    context.close()
