"""report.html in headless Chromium (Debian's `chromium`, driven by playwright): it renders offline,
every image decodes, nothing is logged as an error, and the summary table has a row per configuration.

scripts/install.sh installs chromium (or says what to install); playwright is pointed at it and never
downloads a browser of its own. TOKENSIEVE_CHROMIUM names another Chromium binary.
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright
from rich.console import Console

from test_bench_outputs import CONFIGS, write_fake_sweep
from tokensieve.bench.outputs import write_outputs

CHROMIUM = os.environ.get("TOKENSIEVE_CHROMIUM", "chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# 4 plots; per gallery sample the baseline and each configuration that answered it (s0 5, s1 5, s2 4).
EXPECTED_IMAGES = 4 + 5 + 5 + 4


@dataclass
class Rendered:
    """What the browser saw."""

    title: str
    image_widths: dict[str, int]  # alt text (plot name or configuration) with a counter -> naturalWidth
    summary_rows: list[str]  # data-config of each row of the summary table
    errors: list[str] = field(default_factory=list)  # console errors, uncaught page errors, failed requests


def chromium_path() -> str:
    path = shutil.which(CHROMIUM)
    if path is None:
        pytest.fail(f"no Chromium at {CHROMIUM!r}: run 'bash scripts/install.sh' (as root it installs Debian's "
                    "chromium), 'sudo apt-get install chromium', or set TOKENSIEVE_CHROMIUM", pytrace=False)
    return path


def render(report: Path, user_data: Path) -> Rendered:
    errors: list[str] = []
    with sync_playwright() as playwright:
        # A fresh profile per launch: nothing cached from an earlier run can hide a broken report.
        browser = playwright.chromium.launch_persistent_context(
            str(user_data), executable_path=chromium_path(), args=FLAGS, headless=True)
        try:
            page = browser.new_page()
            page.on("console", lambda message: message.type == "error" and errors.append(f"console: {message.text}"))
            page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
            page.on("requestfailed", lambda request: errors.append(f"request failed: {request.url[:200]}"))
            page.goto(report.resolve().as_uri(), wait_until="load")  # "load" waits for every image
            widths = page.eval_on_selector_all(
                "img", "images => images.map((img, i) => [img.alt + ' #' + i, img.complete ? img.naturalWidth : 0])")
            rows = page.eval_on_selector_all("#summary tbody tr", "rows => rows.map(row => row.dataset.config)")
            return Rendered(page.title(), dict(widths), rows, errors)
        finally:
            browser.close()


def built_report(tmp_path: Path) -> Path:
    sweep = write_fake_sweep(tmp_path / "sweep")
    write_outputs(sweep, Console(file=io.StringIO()))
    return sweep / "report.html"


def test_report_renders_offline_with_every_image_and_row(tmp_path):
    rendered = render(built_report(tmp_path), tmp_path / "profile")
    assert rendered.errors == []
    assert rendered.title == "tokensieve bench report"
    assert len(rendered.image_widths) == EXPECTED_IMAGES
    assert all(width > 0 for width in rendered.image_widths.values()), rendered.image_widths
    assert rendered.summary_rows == list(CONFIGS)


def test_a_broken_image_is_caught(tmp_path):
    """The check above must fail on a broken report: one gallery image pointed at a missing file."""
    report = built_report(tmp_path)
    page = report.read_text()
    start = page.index('alt="fastervlm-k4" src="') + len('alt="fastervlm-k4" src="')
    report.write_text(page[:start] + "missing.png" + page[page.index('"', start):])
    rendered = render(report, tmp_path / "profile")
    assert [name for name, width in rendered.image_widths.items() if width == 0] == ["fastervlm-k4 #5"]
    assert any("missing.png" in error for error in rendered.errors), rendered.errors
