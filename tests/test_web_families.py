"""The web app inside a sweep: a feature's family on its page and the map coloured by family.

The web run folder (conftest's ``web_run_dir``) is copied and made the middle size of a three-size sweep:
the smaller SAE is the served SAE's first 32 latents, the larger one its 64 latents and 64 random ones,
and families.json comes from :func:`saelab.families.families` on random activations. What the pages must
show is read from that families.json, never written into the test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from factories import served  # noqa: E402

from saelab.atomic import write_json  # noqa: E402
from saelab.families import FamilyConfig, families, families_json  # noqa: E402
from saelab.family_io import feature_family  # noqa: E402
from saelab.formats import load_sae  # noqa: E402
from saelab.sae import SAE, SAEConfig  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _sub_sae(sae, d_sae: int, extra_seed: int | None = None) -> SAE:
    """The first ``d_sae`` latents of ``sae`` (or all of them and random ones up to ``d_sae``)."""
    out = SAE(SAEConfig(d_in=sae.cfg.d_in, d_sae=d_sae, architecture="topk", k=sae.cfg.k))
    out.reset_parameters(seed=extra_seed or 0)
    n = min(d_sae, sae.cfg.d_sae)
    with torch.no_grad():
        out.W_dec[:n] = sae.W_dec[:n]
        out.W_enc[:, :n] = sae.W_enc[:, :n]
        out.b_enc[:n] = sae.b_enc[:n]
        out.b_dec.copy_(sae.b_dec)
    return out.eval()


@pytest.fixture(scope="module")
def sweep_run(web_run_dir, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("sweep_member") / "run"
    shutil.copytree(web_run_dir, root)
    sae = load_sae(root / "sae").eval()
    saes = [_sub_sae(sae, 32), sae, _sub_sae(sae, 128, extra_seed=5)]
    x = torch.randn(3000, sae.cfg.d_in, generator=torch.Generator().manual_seed(0))
    steps = families(saes, x)
    members = [{"name": n, "path": str(root / n), "d_sae": s.cfg.d_sae}
               for n, s in zip(("small", "sae", "large"), saes)]
    doc = json.loads(json.dumps(families_json(steps, members, FamilyConfig(), {"rows": 3000})))
    (root / "sweep.json").write_text(json.dumps({"format": "saelab-sweep", "version": 1, "config": {},
                                                 "members": [{**m, "path": m["name"]} for m in members]}))
    write_json(root / "families.json", doc)
    return root, doc


def _client(run: Path) -> TestClient:
    from saelab.web.app import create_app
    from saelab.web.guard import ServerConfig

    return TestClient(create_app(run, config=ServerConfig(port=8765)), base_url="http://127.0.0.1:8765")


def test_api_gives_the_family_of_a_sweep_member_and_nothing_outside_a_sweep(sweep_run, web_run_dir):
    run, doc = sweep_run
    client = _client(run)
    relations = doc["steps"][0]["large_features"]["relation"]
    assert {"persist", "new"} <= set(relations)            # the fixture gives both kinds to look at
    for f in (relations.index("persist"), relations.index("new")):
        got = client.get(f"/api/features/{f}").json()["family"]
        assert got == feature_family(doc, 1, f)
    m = client.get("/api/map").json()
    assert m["family"]["smaller"] == "small" and m["family"]["larger"] == "large"
    assert m["family"]["up"] == [relations[i] for i in m["ids"]]
    assert m["family"]["down"] == [doc["steps"][1]["small_features"]["relation"][i] for i in m["ids"]]
    page = client.get(f"/features/{relations.index('persist')}").text
    parent = doc["steps"][0]["large_features"]["parent"][relations.index("persist")]
    assert 'id="family"' in page and f"small #{parent}" in page
    plain = _client(web_run_dir)
    assert plain.get("/api/features/0").json()["family"] is None
    assert "family" not in plain.get("/api/map").json() and 'id="family"' not in plain.get("/features/0").text


@pytest.mark.slow(ci=True)
def test_browser_shows_the_family_and_colours_the_map_by_it(sweep_run):
    if not CHROMIUM.exists():
        pytest.skip("browser tests need Debian's chromium at /usr/bin/chromium (run scripts/install_browser.sh)")
    sync_api = pytest.importorskip("playwright.sync_api")
    run, doc = sweep_run
    up = doc["steps"][0]["large_features"]
    down = doc["steps"][1]["small_features"]
    f = up["relation"].index("persist")
    errors: list[str] = []
    with served(run) as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(f"{url}/features/{f}", wait_until="networkidle")
        box = page.locator("#family")
        sync_api.expect(box.locator(".family-up .relation")).to_have_text("persist")
        sync_api.expect(box.locator(".family-up + table")).to_contain_text(f"small #{up['parent'][f]}")
        sync_api.expect(box.locator(".family-down .relation")).to_have_text(down["relation"][f])
        assert box.locator(".family-down + table tr").count() == len(down["children"][f])
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-feature-family.png"), full_page=True)
        page.goto(f"{url}/map", wait_until="networkidle")
        page.select_option("#color-by", "family-up")
        page.wait_for_function("document.getElementById('legend-title').textContent.startsWith('Family')")
        ids = page.evaluate("document.getElementById('map-plot').data[0].customdata")
        colours = page.evaluate("document.getElementById('map-plot').data[0].marker.color")
        by_relation = {}
        for i, c in zip(ids, colours):
            by_relation.setdefault(up["relation"][i], set()).add(c)
        assert all(len(c) == 1 for c in by_relation.values())              # one colour per relation
        assert len({next(iter(c)) for c in by_relation.values()}) == len(by_relation)
        counts = page.evaluate("[...document.querySelectorAll('#map-legend tr')].map(r => "
                               "[r.dataset.relation, Number(r.cells[1].textContent)])")
        assert dict(counts) == {r: up["relation"].count(r) for r in ("persist", "split", "new")}
        page.screenshot(path=str(ARTIFACTS / "web-map-family.png"), full_page=True)
        browser.close()
    assert not errors, errors
