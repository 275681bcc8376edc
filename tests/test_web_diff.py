"""The diff view of the web app (``saelab serve RUN --diff DIR``): sorted rows, links, escaping, errors."""

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from saelab.errors import SaelabError  # noqa: E402

BASE = "http://127.0.0.1:8765"
XSS = "<script>alert('diff')</script>"


def row(f: int, score: float) -> dict:
    return {"feature": f, "rate_base": 0.01, "rate_tuned": 0.02, "d_rate": 0.01, "d_rate_ci": [0.0, 0.02],
            "mean_base": 0.1, "mean_tuned": 0.2, "score": score, "score_ci": [score / 2, score * 2]}


@pytest.fixture(scope="module")
def diff_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    res = {"base": "base", "tuned": XSS, "hook": "blocks.0.hook_resid_pre", "corpus": "c", "texts": 4, "positions": 100,
           "interval": "bootstrap", "n_rising": 2, "n_falling": 1, "rising": [row(3, 0.5), row(7, 0.2)],
           "falling": [row(9, -0.3)], "appear": [7], "vanish": [], "labels": {"3": XSS},
           "concepts": [{"name": XSS, "features": [3], "base": 0.1, "tuned": 0.5, "rise": 5.0, "rise_ci": [3.0, 7.0],
                         "top_texts": []}]}
    (d / "results.json").write_text(json.dumps(res))
    return d


@pytest.fixture(scope="module")
def client(web_run_dir, diff_dir) -> TestClient:
    from saelab.web.app import create_app
    from saelab.web.guard import ServerConfig

    return TestClient(create_app(web_run_dir, config=ServerConfig(port=8765), diff=diff_dir), base_url=BASE)


def test_diff_page_sorts_links_and_escapes(client):
    page = client.get("/diff").text
    assert page.index('href="/features/3"') < page.index('href="/features/7"')
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    assert 'href="/features/9"' in client.get("/diff?order=falling").text
    assert client.get("/api/diff?order=appear").json()["features"][0]["feature"] == 7
    assert client.get("/diff?order=nonsense").status_code == 422


def test_no_diff_and_bad_diff(web_run_dir, tmp_path):
    from saelab.web.app import create_app
    from saelab.web.guard import ServerConfig

    plain = TestClient(create_app(web_run_dir, config=ServerConfig(port=8765)), base_url=BASE)
    assert plain.get("/diff").status_code == 404
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SaelabError, match="not the results.json of 'saelab diff'"):
        create_app(web_run_dir, config=ServerConfig(port=8765), diff=tmp_path)
