"""The feature page and ``saelab feature`` say what logit effects are: the direct path, a weak guide mid-model."""

import pytest

from saelab.cli import main
from saelab.featuredb import FeatureDB


def test_saelab_feature_says_logit_effects_are_a_weak_guide(web_run_dir, capsys):
    with FeatureDB.open(web_run_dir / "features.db") as db:
        note = db.logit_effects_note()
        hook = db.sae_info()["hook_name"]
        live = db.live_features()[0]
    assert note and "weak guide" in note and hook in note
    assert main(["feature", str(web_run_dir / "features.db"), str(live)]) == 0
    out = capsys.readouterr().out
    assert "promotes:" in out and f"({note})" in out


def test_the_web_feature_page_says_it_too(web_run_dir):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from saelab.web.app import create_app
    from saelab.web.guard import ServerConfig

    client = TestClient(create_app(web_run_dir, config=ServerConfig(port=8765)), base_url="http://127.0.0.1:8765")
    page = client.get("/features/0")
    assert page.status_code == 200
    assert 'id="logit-note"' in page.text and "weak guide" in page.text
