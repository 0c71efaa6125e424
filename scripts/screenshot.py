"""Regenerate the README screenshot, docs/screenshot.png, from the end-to-end test in a real JupyterLab.

    python scripts/screenshot.py

It runs ``tests/browser/test_lab.py::test_the_toy_world_draws_its_input_anew_in_jupyterlab`` (Debian's Chromium;
the toy world's trained IP-Adapter, offline, so the picture follows its input) with ``IMAGEPROMPT_SCREENSHOT``
set, which makes the test capture the panel after its run; then it shrinks the capture to a small palette PNG.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "screenshot.png"
MAX_WIDTH = 900
COLOURS = 96


def shrink(source: Path, target: Path) -> int:
    """Scale to at most MAX_WIDTH px wide and quantise to a palette; returns the file size in bytes."""
    image = Image.open(source).convert("RGB")
    if image.width > MAX_WIDTH:
        image = image.resize((MAX_WIDTH, round(image.height * MAX_WIDTH / image.width)), Image.LANCZOS)
    image.quantize(COLOURS, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    return target.stat().st_size


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        capture = Path(folder) / "panel.png"
        env = dict(os.environ, IMAGEPROMPT_SCREENSHOT=str(capture), IMAGEPROMPT_REQUIRE_BROWSER="1")
        test = "tests/browser/test_lab.py::test_the_toy_world_draws_its_input_anew_in_jupyterlab"
        done = subprocess.run([sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider"],
                              check=False, cwd=ROOT, env=env)
        if done.returncode != 0 or not capture.exists():
            print(f"the end-to-end test failed, {TARGET} is unchanged", file=sys.stderr)
            return 1
        TARGET.parent.mkdir(exist_ok=True)
        size = shrink(capture, TARGET)
    print(f"wrote {TARGET} ({size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
