"""The browser suite's own rule: a missing browser skips on a laptop and fails in CI. No browser needed."""

from __future__ import annotations

from typing import Any

import pytest


def test_missing_browser_skips_with_the_reason(unavailable_policy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEPROMPT_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="^Chromium is not installed"):
        unavailable_policy("Chromium is not installed")


def test_missing_browser_fails_where_ci_requires_it(unavailable_policy: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEPROMPT_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="^Chromium is not installed .*not a skip"):
        unavailable_policy("Chromium is not installed")
