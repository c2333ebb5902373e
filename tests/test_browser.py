"""report.html and sweep.html in a real browser: Debian's Chromium, headless, driven by
Playwright. No console errors, every plot decodes and shows, every link to a file of the
run directory resolves, and the page reads at 1280 px and at 390 px wide (nothing wider
than the window). A screenshot at each width is kept in the run directory.

The run: the stub over real HTTP with py-spy on the stub's process and NVIDIA telemetry
from the stand-in (tests/fakegpu), so the page has every kind of figure and link.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from conftest import HAVE_PYSPY

from cputax.analysis.sweep import analyse_sweep
from cputax.commands.run import run
from cputax.report.sweep import write_sweep_report
from cputax.sampling.pyspy_monitor import Discovery, PyspyOptions
from cputax.session import RunOptions
from cputax.targets.stub import StubConfig, StubServer
from cputax.telemetry.runner import TelemetryConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the [test] extra has it
    sync_playwright = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)"
    ),
    pytest.mark.skipif(sync_playwright is None, reason="needs playwright (the [test] extra)"),
]
# As root, Chromium needs --no-sandbox; the rest keeps it off a network this machine does not have.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WIDTHS = (1280, 390)
FAKES = Path(__file__).parent / "fakegpu"
PROFILE = """
[defaults]
max_tokens = 16
batches = 3
warmup = 1
context_tokens = 600
[[scenario]]
name = "single"
concurrency = 1
[[scenario]]
name = "conc4"
concurrency = 4
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    (tmp / "p.toml").write_text(PROFILE)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(FAKES)  # the telemetry child imports the stand-in pynvml
    try:
        config = StubConfig(headers_delay_ms=20, first_token_delay_ms=60, inter_token_delay_ms=10)
        with StubServer(config, process=True) as stub:
            port = int(stub.url.rsplit(":", 1)[1])
            pyspy = PyspyOptions(discovery=Discovery(port=port)) if HAVE_PYSPY else None
            run(
                RunOptions(
                    endpoint=stub.url,
                    profile=tmp / "p.toml",
                    out=tmp / "run",
                    pyspy=pyspy,
                    telemetry=TelemetryConfig(gpu="nvidia", host_interval_ms=50),
                )
            )
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    return tmp / "run"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def check_page(browser, page_path: Path) -> dict[int, dict]:
    """Open the page at each width; what a reader would trip over, and a screenshot beside it."""
    found = {}
    for width in WIDTHS:
        page = browser.new_page(viewport={"width": width, "height": 900})
        errors: list[str] = []
        page.on(
            "console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None
        )
        page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
        page.goto(page_path.resolve().as_uri())
        images = page.evaluate(
            "Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,\n"
            "            natural: i.naturalWidth, shown: i.getBoundingClientRect().width,\n"
            "            visible: getComputedStyle(i).display !== 'none' && "
            "getComputedStyle(i).visibility !== 'hidden'}))"
        )
        links = page.evaluate("Array.from(document.links).map(a => a.getAttribute('href'))")
        found[width] = {
            "errors": errors,
            "images": images,
            "links": links,
            "page_width": page.evaluate("document.documentElement.scrollWidth"),
            "title_first": page.evaluate("document.body.firstElementChild.tagName"),
            "font_px": page.evaluate("parseFloat(getComputedStyle(document.body).fontSize)"),
        }
        page.screenshot(
            path=str(page_path.parent / f"{page_path.stem}-{width}.png"), full_page=False
        )
        page.close()
    return found


def _assert_reads_well(found: dict[int, dict], page_path: Path, figures: int) -> None:
    for width, seen in found.items():
        assert seen["errors"] == [], (width, seen["errors"])
        assert len(seen["images"]) == figures
        for img in seen["images"]:
            assert img["complete"] and img["natural"] > 0, img  # it decoded
            assert img["visible"] and 0 < img["shown"] <= width, (
                width,
                img,
            )  # it shows, inside the window
        assert seen["page_width"] <= width, (
            f"at {width} px the page is {seen['page_width']} px wide"
        )
        assert seen["title_first"] == "H1" and seen["font_px"] >= 14
        for href in seen["links"]:
            target = urlsplit(href)
            if not target.scheme:
                assert (page_path.parent / unquote(target.path)).is_file(), href
    assert (page_path.parent / f"{page_path.stem}-1280.png").stat().st_size > 10_000


def test_report_html_in_chromium(run_dir, browser):
    page = run_dir / "report.html"
    found = check_page(browser, page)
    # decomposition, HTTP overhead vs concurrency, one timeline per scenario
    _assert_reads_well(found, page, figures=4)
    if HAVE_PYSPY:
        assert any(h.endswith(".svg") for h in found[1280]["links"])  # the flamegraphs are linked
    text = page.read_text()
    assert (
        text.index("<h1>") < text.index("In short") < text.index("<img")
    )  # title, the answer, then figures


def test_sweep_html_in_chromium(browser, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_sweep import make_hand_made_sweep  # the sweep tests' hand-made sweep

    sweep = make_hand_made_sweep(tmp_path / "sweep")
    write_sweep_report(sweep, analyse_sweep(sweep))
    found = check_page(browser, sweep.report_html)
    _assert_reads_well(found, sweep.report_html, figures=1)  # the knob's plot
