"""report.html in headless Chromium (Debian's `chromium`, driven by playwright): it renders offline,
every image decodes, nothing is logged as an error, the summary table has a row per configuration,
and the first screen (a screenshot of the viewport) shows the headline table, drawn, not the settings.

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
from PIL import Image, ImageChops, ImageStat
from playwright.sync_api import sync_playwright
from rich.console import Console

from test_bench_outputs import CONFIGS, write_fake_sweep
from tokensieve.bench.outputs import write_outputs

CHROMIUM = os.environ.get("TOKENSIEVE_CHROMIUM", "chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# 4 plots; per gallery sample the baseline and each configuration that answered it (s0 5, s1 5, s2 4).
EXPECTED_IMAGES = 4 + 5 + 5 + 4
VIEWPORT = {"width": 1280, "height": 720}  # a laptop's browser window


@dataclass
class Rendered:
    """What the browser saw."""

    title: str
    image_widths: dict[str, int]  # alt text (plot name or configuration) with a counter -> naturalWidth
    summary_rows: list[str]  # data-config of each row of the summary table
    headline_rows: list[str]  # data-config of each row of the headline table
    headline_box: dict  # the headline table's bounding box in the first viewport: x, y, width, height
    first_screen: Image.Image  # a screenshot of the viewport as the page opens
    headline_shot: Image.Image  # a screenshot of the headline table alone
    settings_visible: bool  # whether sweep.json's table shows before its <details> is opened
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
            str(user_data), executable_path=chromium_path(), args=FLAGS, headless=True, viewport=VIEWPORT)
        try:
            page = browser.new_page()
            page.on("console", lambda message: message.type == "error" and errors.append(f"console: {message.text}"))
            page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
            page.on("requestfailed", lambda request: errors.append(f"request failed: {request.url[:200]}"))
            page.goto(report.resolve().as_uri(), wait_until="load")  # "load" waits for every image
            widths = page.eval_on_selector_all(
                "img", "images => images.map((img, i) => [img.alt + ' #' + i, img.complete ? img.naturalWidth : 0])")
            rows = {table: page.eval_on_selector_all(f"#{table} tbody tr", "rows => rows.map(row => row.dataset.config)")
                    for table in ("summary", "headline")}
            first_screen = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
            headline = page.locator("#headline")
            return Rendered(page.title(), dict(widths), rows["summary"], rows["headline"], headline.bounding_box(),
                            first_screen, Image.open(io.BytesIO(headline.screenshot())).convert("RGB"),
                            page.is_visible("#sweep"), errors)
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


def test_the_first_screen_shows_the_headline(tmp_path):
    """The headline table lies wholly inside the first viewport, the screenshot there is that table as drawn
    (not blank, not covered), and the sweep's settings wait, collapsed, below."""
    rendered = render(built_report(tmp_path), tmp_path / "profile")
    # the baseline, then the budgets from the most tokens kept: 8 (0.5 and 8), then 4 (0.25 and 4)
    assert rendered.headline_rows == ["baseline", "pool-k0.5", "fastervlm-k8", "pool-k0.25", "fastervlm-k4"]
    box = rendered.headline_box
    assert box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"] and box["x"] + box["width"] <= VIEWPORT["width"]
    assert rendered.first_screen.size == (VIEWPORT["width"], VIEWPORT["height"])
    region = rendered.first_screen.crop((round(box["x"]), round(box["y"]), round(box["x"]) + rendered.headline_shot.width,
                                         round(box["y"]) + rendered.headline_shot.height))
    difference = ImageStat.Stat(ImageChops.difference(region, rendered.headline_shot).convert("L")).mean[0]
    assert difference < 2.0, difference  # the same pixels: nothing covers the table on the first screen
    grey = region.convert("L")
    ink = sum(count for level, count in enumerate(grey.histogram()) if level < 128) / (grey.width * grey.height)
    assert 0.01 < ink < 0.5, ink  # text on a light table: neither blank nor a solid block
    assert ImageStat.Stat(grey).stddev[0] > 20
    assert not rendered.settings_visible


def test_a_broken_image_is_caught(tmp_path):
    """The check above must fail on a broken report: one gallery image pointed at a missing file."""
    report = built_report(tmp_path)
    page = report.read_text()
    start = page.index('alt="fastervlm-k4" src="') + len('alt="fastervlm-k4" src="')
    report.write_text(page[:start] + "missing.png" + page[page.index('"', start):])
    rendered = render(report, tmp_path / "profile")
    assert [name for name, width in rendered.image_widths.items() if width == 0] == ["fastervlm-k4 #5"]
    assert any("missing.png" in error for error in rendered.errors), rendered.errors
