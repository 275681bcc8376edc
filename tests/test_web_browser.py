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


def plot_text(text: str) -> str:
    """``text`` as the pages hand it to Plotly (saelab.plotText): markup characters as entities."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


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
    expect(page.locator("#dials .dial .expl")).to_have_text(PAYLOAD)  # explanation set as text, not markup
    page.locator("#add-dial").click()
    dial = page.locator("#dials .dial").nth(1)
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


# -- pages that explain themselves (issue 16) ---------------------------------------------------------

def test_map_names_clusters_labels_by_zoom_and_lists_neighbours(tab, base_url):
    import httpx

    page = tab.page
    data = httpx.get(base_url + "/api/map", timeout=30).json()
    named = [c for c in data["clusters"] if c["name"]]
    assert named, "the test run's features have explanations, so its clusters have names"
    page.goto(base_url + "/map", wait_until="networkidle")
    expect(page.locator("#map-status")).to_contain_text("64 features")
    legend = page.locator("#map-legend tr[data-cluster]")
    expect(legend).to_have_count(len(data["clusters"]))
    expect(legend.first).to_contain_text(data["clusters"][0]["name"] or f"cluster {data['clusters'][0]['id']}")
    labels = page.evaluate("document.getElementById('map-plot').layout.annotations.map(a => a.text)")
    assert labels and set(labels) <= {plot_text(c["name"][:39] + "…" if len(c["name"]) > 40 else c["name"]) for c in named}
    # zoomed in on one point, the points in view carry their own explanations
    i = 0
    page.evaluate(f"""() => {{ const gd = document.getElementById('map-plot'), x = {data['x'][i]}, y = {data['y'][i]};
        return Plotly.relayout(gd, {{'xaxis.range': [x - 1e-4, x + 1e-4], 'yaxis.range': [y - 1e-4, y + 1e-4]}}); }}""")
    expect(page.locator("#map-status")).to_contain_text("64 features")
    page.wait_for_function("document.getElementById('map-plot').layout.annotations.map(a => a.text).some(t => t.startsWith('#'))")
    assert f"#{data['ids'][i]} " in " ".join(page.evaluate("document.getElementById('map-plot').layout.annotations.map(a => a.text)")) + " "
    # colour by density: dead features are not painted as the rarest live ones
    page.locator("#color-by").select_option("density")
    live = sum(d > 0 for d in data["density"])
    assert page.evaluate("document.getElementById('map-plot').data[0].x.length") == live
    expect(page.locator("#legend-title")).to_have_text("Density")
    page.locator("#focus-id").fill(str(data["ids"][0]))
    page.locator("#show-neighbourhood").click()
    expect(page.locator("#map-status")).to_contain_text(f"nearest #{data['ids'][0]}")
    rows = page.locator("#map-legend tr")
    expect(rows).to_have_count(41)
    nb = httpx.get(f"{base_url}/api/map/neighbourhood/{data['ids'][0]}?n=40", timeout=30).json()
    assert rows.locator("td.expl").all_text_contents() == [e or "no explanation" for e in nb["explanations"]]
    shot(page, "map-neighbourhood-list")
    assert not tab.errors and not tab.dialogs


def test_feature_page_shows_values_legend_and_runs_your_text(tab, base_url, run_dir):
    import httpx

    from saelab.featuredb import FeatureDB

    with FeatureDB.open(run_dir / "features.db") as db:
        fid = max(db.live_features(), key=lambda i: db.feature(i)["count"])  # fires on the text tried below
        top = db.examples(fid, "top")
    page = tab.page
    page.goto(f"{base_url}/features/{fid}", wait_until="networkidle")
    acts = page.locator(".examples[data-kind=top] .ex-act").all_text_contents()
    assert acts == [f"{e['max_act']:.2f}" for e in top]  # each example's value on the page, not in a tooltip
    expect(page.locator("#feature-stats")).to_contain_text("denser than")
    for term in ("score", "q0.80", "J"):
        expect(page.locator(f"#feature-legend dt:text-is('{term}')")).to_have_count(1)
    text = "import os\ndef run(cmd):\n    os.system(cmd)\n"
    page.locator("#try-text").fill(text)
    page.locator("#try-run").click()
    expect(page.locator("#try-status")).to_contain_text("tokens")
    api = httpx.post(f"{base_url}/api/features/{fid}/activations", json={"text": text}, timeout=60).json()
    toks = page.locator("#try-tokens .tok")
    expect(toks).to_have_count(len(api["tokens"]))
    values = page.locator("#try-tokens sub.v").all_text_contents()
    assert values == [f"{t['act']:.2f}" for t in api["tokens"] if t["act"] > 0]
    shown = page.evaluate("""() => Array.from(document.querySelectorAll('#try-tokens .tok'))
        .map(n => n.firstChild.textContent).join('')""")
    assert shown == text
    shot(page, "feature-try")
    assert not tab.errors and not tab.dialogs


def test_inspect_follows_a_feature_over_the_whole_text(tab, base_url):
    import httpx

    page = tab.page
    page.goto(base_url + "/inspect", wait_until="networkidle")
    page.locator("#inspect-run").click()
    expect(page.locator("#inspect-status")).to_contain_text("tokens")
    n_tokens = page.locator("#inspect-tokens .tok").count()
    row = page.locator("#token-features tbody tr").first
    fid = int(row.locator("a").text_content().lstrip("#"))
    assert row.locator("td.expl").text_content() == httpx.get(f"{base_url}/api/features/{fid}/summary").json()["explanation"]
    row.locator("td").nth(1).click()  # the row, not its link
    expect(page.locator("#follow")).to_be_visible()
    expect(page.locator("#follow-title")).to_contain_text(f"#{fid}")
    expect(page.locator("#follow-tokens .tok")).to_have_count(n_tokens)
    assert page.locator("#follow-tokens sub.v").count() >= 1  # it fires where it was listed, at least
    shot(page, "inspect-follow")
    assert not tab.errors and not tab.dialogs


def test_overview_in_words_and_features_list_readable_first(tab, base_url, run_dir):
    import json

    page = tab.page
    page.goto(base_url + "/", wait_until="networkidle")
    report = json.loads((run_dir / "sae" / "eval.json").read_text())
    rows = page.locator("#eval-words tr")
    assert rows.locator("th").all_text_contents()[:1] == ["FVU"]
    assert rows.first.locator("b").text_content() == f"{report['reconstruction']['fvu']:.3f}"
    words = page.locator("#eval-words").text_content()
    assert "variance unexplained" in words and "features active per token" in words
    dead = rows.filter(has_text="never fired")
    assert dead.locator("b").text_content() == str(report["sparsity"]["dead"])
    assert f"of {report['sparsity']['d_sae']} features" in dead.text_content()
    page.goto(base_url + "/features", wait_until="networkidle")
    expect(page.locator("#feature-count")).to_contain_text("64 features, highest explanation score first")
    scores = [float(s) if s != "–" else -1.0
              for s in page.locator("#feature-table tbody tr td:nth-child(3)").all_text_contents()]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert not tab.errors and not tab.dialogs


def test_steer_ablate_option_default_strength_and_degenerate_notice(tab, base_url, payload_id):
    from saelab.web.live import degenerate

    page = tab.page
    page.goto(f"{base_url}/steer?feature={payload_id}", wait_until="networkidle")
    dial = page.locator(".dial").first
    assert float(dial.locator("input[type=range]").input_value()) == DEFAULT_DIAL
    dial.locator("select").select_option("ablate")
    expect(dial.locator(".value")).to_have_text("off")
    expect(dial.locator("input[type=range]")).to_be_disabled()
    dial.locator("select").select_option("clamp")
    dial.locator("input[type=range]").fill("20")
    page.locator("#steer-tokens").fill("12")
    page.locator("#steer-run").click()
    expect(page.locator("#steer-status")).to_have_text("done")
    texts = {side: page.locator(f"#out-{side} .continuation").text_content() for side in ("default", "steered")}
    notes = {side: degenerate(t) for side, t in texts.items()}
    assert notes["steered"], f"precondition: 20x on the tiny model gives degenerate text, got {texts['steered']!r}"
    notice = page.locator("#steer-notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text(f"The steered continuation is {notes['steered']}.")
    assert ("The default continuation" in notice.text_content()) == bool(notes["default"])
    shot(page, "steer-notice")
    assert not tab.errors and not tab.dialogs


# -- Plotly markup in explanations (issue 28, security 1) ---------------------------------------------

LINK = '<a href="https://ev.il/">click</a>'
STYLE = '<b style="font-size:90px">X</b>'

# What Plotly made of the strings drawn in the plot's SVG: links, elements with a style of their own
# (Plotly writes <b style=…> as a tspan with that style), the largest font and the text itself.
DRAWN = """() => {
    const texts = [...document.querySelectorAll('#map-plot svg text')];
    const inner = texts.flatMap((t) => [...t.querySelectorAll('*')]);
    return {
        links: inner.filter((n) => n.tagName.toLowerCase() === 'a' || n.hasAttribute('href')
                                   || n.hasAttribute('xlink:href')).length,
        styled: inner.filter((n) => /font-size/.test(n.getAttribute('style') || '')).length,
        biggest: Math.max(...texts.concat(inner).map((n) => parseFloat(getComputedStyle(n).fontSize) || 0)),
        text: texts.map((t) => t.textContent).join('\\n'),
    };
}"""


@pytest.fixture(scope="module")
def markup_run(run_dir, tmp_path_factory):
    """A copy of the web run where a feature and its nearest neighbour are explained by Plotly markup."""
    import shutil

    from saelab.featuredb import FeatureDB
    from saelab.fmap import neighbourhood_map

    run = tmp_path_factory.mktemp("markup") / "run"
    shutil.copytree(run_dir, run)
    with FeatureDB.open(run / "features.db", writable=True) as db:
        mapped = [p[0] for p in db.map_points()]
        link = mapped[0]
        style = next(i for i, *_ in neighbourhood_map(db, link, 8)[1:] if i in mapped)
        db.set_explanations([(link, LINK, "test", 0.5), (style, STYLE, "test", 0.5)])
    return run, link, style


def test_map_draws_plotly_markup_in_explanations_as_text(tab, markup_run):
    run, link, style = markup_run
    page = tab.page
    with served(run, max_new_tokens=4) as (url, _):
        page.goto(url + "/map", wait_until="networkidle")
        expect(page.locator("#map-status")).to_contain_text("features")
        data = page.evaluate("fetch('/api/map').then((r) => r.json())")
        for fid, payload in ((link, LINK), (style, STYLE)):  # label zoom: each point carries its explanation
            i = data["ids"].index(fid)
            page.evaluate(f"""() => Plotly.relayout(document.getElementById('map-plot'),
                {{'xaxis.range': [{data['x'][i]} - 1e-4, {data['x'][i]} + 1e-4],
                  'yaxis.range': [{data['y'][i]} - 1e-4, {data['y'][i]} + 1e-4]}})""")
            page.wait_for_function(f"[...document.querySelectorAll('#map-plot svg text')]"
                                   f".some((t) => t.textContent.startsWith('#{fid} '))")
            drawn = page.evaluate(DRAWN)
            shot(page, f"map-markup-{fid}")
            assert drawn["links"] == 0 and drawn["styled"] == 0 and drawn["biggest"] < 30, drawn
            assert f"#{fid} {payload}" in drawn["text"]  # the characters themselves, shown verbatim
        page.goto(f"{url}/map?around={link}", wait_until="networkidle")
        expect(page.locator("#map-status")).to_contain_text(f"nearest #{link}")
        drawn = page.evaluate(DRAWN)
        shot(page, "map-markup-around")
        assert drawn["links"] == 0 and drawn["styled"] == 0 and drawn["biggest"] < 30, drawn
        assert f"#{link} {LINK[:27]}…" in drawn["text"] and f"#{style} {STYLE[:27]}…" in drawn["text"]
        assert page.evaluate("document.querySelectorAll('#map-plot a[href*=\"ev.il\"]').length") == 0
    assert not tab.errors and not tab.dialogs
