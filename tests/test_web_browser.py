"""The web app in a real browser: Playwright drives Debian's Chromium against the app served by
uvicorn on loopback, over the shared web run folder (conftest's ``web_run_dir``: tiny model, SAE, features.db, eval.json).

Screenshots go to test-artifacts/ (gitignored) for a person to look at. Chromium comes from
scripts/install_browser.sh (apt); without /usr/bin/chromium these tests are skipped.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import NamedTuple

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("browser tests need Debian's chromium at /usr/bin/chromium (run scripts/install_browser.sh)",
                allow_module_level=True)
pytest.importorskip("playwright", reason="browser tests need the playwright package (pip install 'saelab[test]')")
pytest.importorskip("uvicorn")

from playwright.sync_api import expect, sync_playwright  # noqa: E402
from factories import PAYLOAD, XSS, served  # noqa: E402

from saelab.web.pages import DEFAULT_DIAL  # noqa: E402


pytestmark = pytest.mark.slow(ci=True)  # heavy (a browser); a plain run and CI run every one of them
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 60_000
expect.set_options(timeout=TIMEOUT_MS)  # the model runs on a shared CPU: be patient, not flaky


@pytest.fixture(scope="module")
def run_dir(web_run_dir) -> Path:
    return web_run_dir


@pytest.fixture(scope="module")
def base_url(run_dir):
    with served(run_dir, max_new_tokens=16) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


class Tab(NamedTuple):
    page: object
    errors: list
    """Console errors, uncaught exceptions and failed requests."""
    dialogs: list
    """Messages of any alert/confirm/prompt (none may ever open)."""


@pytest.fixture
def tab(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    t = Tab(page, [], [])
    page.on("console", lambda m: t.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: t.errors.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: t.errors.append(f"request failed: {r.url} ({r.failure})"))
    page.on("dialog", lambda d: (t.dialogs.append(d.message), d.dismiss()))
    yield t
    context.close()


@pytest.fixture(scope="module")
def payload_id(run_dir) -> int:
    from saelab.featuredb import FeatureDB

    with FeatureDB.open(run_dir / "features.db") as db:
        return next(f["id"] for f in db.features(limit=100) if f["explanation"] == PAYLOAD)


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"web-{name}.png"), full_page=True)


def test_every_page_loads_without_errors(tab, base_url, payload_id):
    page = tab.page
    pages = {"overview": "/", "features": "/features", "feature": f"/features/{payload_id}", "map": "/map",
             "inspect": "/inspect", "steer": f"/steer?feature={payload_id}", "monitor": "/monitor", "docs": "/docs"}
    for name, path in pages.items():
        page.goto(base_url + path, wait_until="networkidle")
        assert page.locator("header.top nav a").count() == 7, name
        if name in ("overview", "feature", "map"):
            expect(page.locator(".js-plotly-plot").first).to_be_visible()
        shot(page, name)
        assert not tab.errors, f"{name}: {tab.errors}"
    page.goto(base_url + "/")
    expect(page.locator("#train-plot.js-plotly-plot")).to_have_count(1)  # plotly marks the div it drew into
    expect(page.locator("#density-plot.js-plotly-plot")).to_have_count(1)


def _isolated_point(page) -> tuple[int, float, float]:
    """(feature id, x, y in page pixels) of the drawn point farthest from its nearest neighbour."""
    pts = page.evaluate("""() => {
        const gd = document.getElementById('map-plot'), L = gd._fullLayout, box = gd.getBoundingClientRect();
        const tr = gd.data[0];
        return tr.x.map((x, i) => [tr.customdata[i], box.left + L._size.l + L.xaxis.l2p(x),
                                   box.top + L._size.t + L.yaxis.l2p(tr.y[i])]);
    }""")
    def gap(p):
        return min(math.dist(p[1:], q[1:]) for q in pts if q is not p)
    return tuple(max(pts, key=gap))


def test_map_renders_points_and_click_opens_feature(tab, base_url):
    page = tab.page
    page.goto(base_url + "/map", wait_until="networkidle")
    expect(page.locator("#map-status")).to_contain_text("64 features")
    assert page.evaluate("document.getElementById('map-plot').data[0].x.length") == 64
    assert page.evaluate("document.getElementById('map-plot')._fullData[0].type") in ("scattergl", "scatter")
    fid, x, y = _isolated_point(page)
    page.mouse.move(x, y)
    expect(page.locator("#hover-card")).to_contain_text(f"#{fid}")
    shot(page, "map-hover")
    page.mouse.click(x, y)
    page.wait_for_url(re.compile(rf"/features/{fid}$"))
    expect(page.locator("h1")).to_have_text(f"Feature #{fid}")
    page.locator("#map-link").click()  # back to its place on the map, marked
    page.wait_for_url(re.compile(rf"/map\?feature={fid}$"))
    expect(page.locator("#map-status")).to_contain_text("64 features")
    assert page.evaluate("document.getElementById('map-plot').data.find(t => t.name === 'selected').customdata[0]") == fid
    page.locator("#show-neighbourhood").click()
    expect(page.locator("#map-status")).to_contain_text(f"nearest #{fid}")
    assert page.evaluate("document.getElementById('map-plot').data[0].x.length") == 41
    shot(page, "map-neighbourhood")
    assert not tab.errors and not tab.dialogs


def test_inspect_highlights_tokens_and_links_features(tab, base_url):
    page = tab.page
    page.goto(base_url + "/inspect", wait_until="networkidle")
    page.locator("#inspect-run").click()
    expect(page.locator("#inspect-status")).to_contain_text("tokens")
    tokens = page.locator("#inspect-tokens .tok")
    assert tokens.count() > 5
    text = page.locator("#inspect-text").input_value()
    assert page.locator("#inspect-tokens").text_content() == text
    alphas = [float(a or 0) for a in tokens.evaluate_all("ns => ns.map(n => n.style.getPropertyValue('--a'))")]
    assert max(alphas) == 1.0 and sum(a > 0 for a in alphas) > 1  # coloured by activation
    tokens.nth(2).click()
    expect(page.locator("#token-features tbody tr").first).to_be_visible()
    shot(page, "inspect")
    link = page.locator("#token-features a").first
    fid = int(link.text_content().lstrip("#"))
    link.click()
    page.wait_for_url(re.compile(rf"/features/{fid}$"))
    assert not tab.errors and not tab.dialogs


def test_steering_streams_default_and_steered(tab, base_url, payload_id):
    import httpx

    page = tab.page
    page.goto(f"{base_url}/steer?feature={payload_id}", wait_until="networkidle")
    expect(page.locator(".dial .expl")).to_have_text(PAYLOAD)  # explanation set as text, not markup
    page.locator("#add-dial").click()
    dial = page.locator(".dial").nth(1)
    dial.locator(".feature-id").fill("1")
    dial.locator("select").select_option("add")
    dial.locator("input[type=range]").fill("-4")
    page.locator("#steer-tokens").fill("10")
    page.locator("#steer-run").click()
    expect(page.locator("#steer-status")).to_have_text("done")
    shot(page, "steer")
    default = page.locator("#out-default .continuation").text_content()
    steered = page.locator("#out-steered .continuation").text_content()
    body = {"prompt": page.locator("#steer-prompt").input_value(), "max_new_tokens": 10, "temperature": 0, "seed": 0,
            "features": [{"id": payload_id, "value": DEFAULT_DIAL, "mode": "clamp"}, {"id": 1, "value": -4, "mode": "add"}]}
    whole = httpx.post(f"{base_url}/api/steer", json=body, timeout=60).json()
    assert default == whole["default"] and default  # the streamed texts are the whole continuations
    assert steered == whole["steered"]
    assert not tab.errors and not tab.dialogs


def test_payload_in_model_text_renders_as_text(tab, base_url, payload_id):
    page = tab.page
    injected = """() => ({
        imgs: document.querySelectorAll('img').length,
        inline: document.querySelectorAll('script:not([src]):not([type="application/json"])').length,
    })"""
    for path in (f"/features/{payload_id}", "/features?q=onerror", f"/steer?feature={payload_id}"):
        page.goto(base_url + path, wait_until="networkidle")
        assert page.evaluate(injected) == {"imgs": 0, "inline": 0}, path
    page.goto(f"{base_url}/features/{payload_id}", wait_until="networkidle")
    expect(page.locator("#explanation")).to_have_text(PAYLOAD)
    examples = page.locator(".examples[data-kind=top] .example").all_text_contents()
    # the corpus lines, split over token spans, shown verbatim
    assert any(XSS in e for e in examples) and any("</script>" in e for e in examples)
    shot(page, "payload")
    page.goto(base_url + "/monitor", wait_until="networkidle")
    page.locator("#watch-id").fill(str(payload_id))
    page.locator("#watch-threshold").fill("0")
    page.locator("#watch-add").click()
    page.locator("#scan-text").fill(f"x = '{XSS}'\n")
    page.locator("#scan-run").click()
    expect(page.locator("#scan-status")).to_contain_text("alert(s)")
    assert page.locator("#scan-tokens").text_content() == f"x = '{XSS}'\n"
    assert page.evaluate(injected) == {"imgs": 0, "inline": 0}
    shot(page, "monitor-scan")
    assert not tab.dialogs and not tab.errors
