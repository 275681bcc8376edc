"""The web app's JSON API and pages through FastAPI's TestClient: every endpoint, the limits
(413 / 422 / 503), the Host check against DNS rebinding, escaping, and the `serve` command.

The run folder is real: a tiny random llama, a tiny TopK SAE saved with save_sae, features.db from
saelab.analyze over a small corpus folder, eval.json from saelab.evaluate. One feature's explanation
is replaced by an HTML/script payload to check escaping. conftest's ``web_run_dir`` builds it once per
session (the browser tests reuse it; the builder is in factories.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from factories import HOOK, PAYLOAD, XSS, served  # noqa: E402

PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def run_dir(web_run_dir) -> Path:
    return web_run_dir


def make_client(run_dir, **config) -> TestClient:
    from saelab.web.app import create_app
    from saelab.web.guard import ServerConfig

    app = create_app(run_dir, config=ServerConfig(port=PORT, **config))
    return TestClient(app, base_url=BASE)


@pytest.fixture(scope="module")
def client(run_dir) -> TestClient:
    return make_client(run_dir, max_body_bytes=4096, max_prompt_chars=300, max_new_tokens=12)


@pytest.fixture(scope="module")
def payload_id(run_dir) -> int:
    from saelab.featuredb import FeatureDB

    with FeatureDB.open(run_dir / "features.db") as db:
        return next(f["id"] for f in db.features(limit=100) if f["explanation"] == PAYLOAD)


# -- the Host check (DNS rebinding) -------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1:8765", "localhost:8765", "[::1]:8765"])
def test_loopback_host_headers_are_accepted(client, host):
    assert client.get("/api/info", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["attacker.example:8765", "attacker.example", "127.0.0.1:9999", "127.0.0.1",
                                  "127.0.0.1.attacker.example:8765", ""])
def test_foreign_host_headers_are_rejected(client, host):
    r = client.get("/api/info", headers={"host": host})
    assert r.status_code == 400
    assert "Host header" in r.json()["detail"]


def test_exposed_host_needs_its_own_name(run_dir):
    from saelab.web.guard import ServerConfig

    c = make_client(run_dir, host="10.1.2.3", allowed_hosts=["lab.example"])
    assert c.get("/api/info", headers={"host": "10.1.2.3:8765"}).status_code == 200
    assert c.get("/api/info", headers={"host": "lab.example:8765"}).status_code == 200
    assert c.get("/api/info", headers={"host": "localhost:8765"}).status_code == 400
    assert ServerConfig(host="10.1.2.3").exposure_warning() is not None
    assert ServerConfig().exposure_warning() is None


# -- size limits -------------------------------------------------------------------------------------

def test_body_over_the_cap_is_413(client):
    r = client.post("/api/inspect", content=json.dumps({"text": "x" * 5000}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_chunked_body_over_the_cap_is_413(client):
    def chunks():  # no Content-Length: the middleware counts the bytes as they arrive
        yield b'{"text": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = client.post("/api/inspect", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_prompt_and_generation_caps_are_422(client):
    r = client.post("/api/inspect", json={"text": "x" * 301})
    assert r.status_code == 422 and "at most 300" in r.json()["detail"]
    r = client.post("/api/steer", json={"prompt": "def f", "max_new_tokens": 13})
    assert r.status_code == 422 and "at most 12" in r.json()["detail"]
    r = client.post("/api/steer/stream", json={"prompt": "p" * 301})
    assert r.status_code == 422


@pytest.mark.parametrize("body", [
    {"prompt": "def f", "features": [{"id": 1, "value": 25}]},                       # dial beyond 20×
    {"prompt": "def f", "features": [{"id": 1, "value": "ten"}]},                    # not a number
    {"prompt": "def f", "features": [{"id": 1, "mode": "boost"}]},                   # unknown mode
    {"prompt": "def f", "features": [{"id": 1}, {"id": 1, "mode": "add"}]},          # two dials, one feature
    {"prompt": "def f", "features": [{"id": 9999, "value": 2}]},                     # no such feature
    {"prompt": "def f", "features": [{"id": i} for i in range(9)]},                  # too many dials
    {"prompt": ""},
])
def test_bad_steering_requests_are_422(client, body):
    r = client.post("/api/steer", json=body)
    assert r.status_code == 422, r.text


def test_unknown_feature_is_404(client):
    assert client.get("/api/features/9999").status_code == 404
    r = client.get("/features/9999")
    assert r.status_code == 404 and "does not exist" in r.text


def test_db_without_sae_browses_but_cannot_run_the_model(run_dir):
    from saelab.web.app import create_app
    from saelab.web.guard import ServerConfig

    c = TestClient(create_app(db=run_dir / "features.db", config=ServerConfig(port=PORT)), base_url=BASE)
    assert c.get("/features/0").status_code == 200 and c.get("/").status_code == 200
    r = c.post("/api/inspect", json={"text": "def f"})
    assert r.status_code == 409 and "--sae" in r.json()["detail"]


# -- one model call at a time -----------------------------------------------------------------------

def test_busy_model_answers_503(run_dir):
    c = make_client(run_dir, queue_limit=0, queue_timeout_s=0.1)
    gate = c.app.state.gate
    gate.acquire()  # another request holds the model
    try:
        for path, body in [("/api/inspect", {"text": "def f"}), ("/api/steer", {"prompt": "def f"}),
                           ("/api/steer/stream", {"prompt": "def f"}),
                           ("/api/monitor/scan", {"text": "def f", "watch": [{"feature": 0}]})]:
            r = c.post(path, json=body)
            assert r.status_code == 503, path
            assert "busy" in r.json()["detail"]
        assert c.get("/api/info").status_code == 200  # browsing does not wait for the model
    finally:
        gate.release()
    assert c.post("/api/inspect", json={"text": "def f"}).status_code == 200


def test_waiting_request_times_out_with_503(run_dir):
    c = make_client(run_dir, queue_limit=1, queue_timeout_s=0.2)
    gate = c.app.state.gate
    gate.acquire()
    try:
        r = c.post("/api/inspect", json={"text": "def f"})
        assert r.status_code == 503 and "stayed busy" in r.json()["detail"]
    finally:
        gate.release()


def test_gate_admits_one_at_a_time_and_bounds_the_queue():
    from saelab.web.guard import Busy, ModelGate

    gate = ModelGate(queue_limit=1, timeout_s=5)
    gate.acquire()
    waiter_got_in = threading.Event()

    def waiter():
        with gate.held():
            waiter_got_in.set()

    t = threading.Thread(target=waiter)
    t.start()
    while gate._waiting == 0:
        pass
    with pytest.raises(Busy, match="already waiting"):
        gate.acquire()  # the one queue slot is taken
    assert not waiter_got_in.is_set()
    gate.release()
    t.join(5)
    assert waiter_got_in.is_set()


# -- happy paths -------------------------------------------------------------------------------------

def test_info_has_model_sae_eval_curve_and_density(client):
    info = client.get("/api/info").json()
    assert info["model"]["hook_name"] == HOOK
    assert info["sae"]["d_sae"] == 64 and info["sae"]["architecture"] == "topk" and info["sae"]["k"] == 4
    assert info["eval"]["reconstruction"]["fvu"] is not None
    assert info["train_curve"]["xlabel"] == "step" and info["train_curve"]["x"] == [0, 10, 20, 30, 40]
    hist = info["density_histogram"]
    assert sum(hist["counts"]) + hist["dead"] == 64


def test_features_sort_filter_search_and_page(client, payload_id):
    page = client.get("/api/features", params={"order_by": "max_act", "limit": 10}).json()
    acts = [f["max_act"] for f in page["features"]]
    assert acts == sorted(acts, reverse=True) and page["total"] == 64
    second = client.get("/api/features", params={"order_by": "max_act", "limit": 10, "offset": 10}).json()
    assert not {f["id"] for f in page["features"]} & {f["id"] for f in second["features"]}
    cluster = page["features"][0]["cluster"]
    in_cluster = client.get("/api/features", params={"cluster": cluster, "limit": 500}).json()
    assert in_cluster["features"] and all(f["cluster"] == cluster for f in in_cluster["features"])
    dense = client.get("/api/features", params={"min_density": 0.01, "limit": 500}).json()["features"]
    assert all(f["density"] >= 0.01 for f in dense)
    hits = client.get("/api/features", params={"q": "onerror"}).json()["features"]
    # others quote the payload in their examples' context, and name it as their contexts' theme
    assert payload_id in [h["id"] for h in hits[:3]]
    assert client.get("/api/features", params={"order_by": "bogus"}).status_code == 422


def test_feature_detail_and_summary(client, payload_id):
    d = client.get(f"/api/features/{payload_id}").json()
    assert d["feature"]["explanation"] == PAYLOAD
    top = d["examples"]["top"]
    assert top and all(len(e["tokens"]) == len(e["acts"]) for e in top)
    assert any(XSS in "".join(e["tokens"]) for e in top) and any("</script>" in "".join(e["tokens"]) for e in top)
    assert set(d["logit_effects"]) == {"positive", "negative"} and d["logit_effects"]["positive"]
    assert d["neighbours"]["decoder"] and all("explanation" in n for n in d["neighbours"]["decoder"])
    assert sum(d["histogram"]["counts"]) > 0
    assert client.get(f"/api/features/{payload_id}/summary").json()["id"] == payload_id


def test_map_and_neighbourhood(client):
    m = client.get("/api/map").json()
    assert len(m["ids"]) == len(m["x"]) == len(m["y"]) == len(m["cluster"]) == 64
    nb = client.get("/api/map/neighbourhood/5", params={"n": 8}).json()
    assert nb["center"] == 5 and nb["ids"][0] == 5 and len(nb["ids"]) == 9
    assert nb["similarity"][0] == pytest.approx(1.0)
    assert client.get("/api/map/neighbourhood/9999").status_code == 404


def test_inspect_returns_tokens_with_features(client):
    text = "def run(cmd):\n    os.system(cmd)\n"
    r = client.post("/api/inspect", json={"text": text, "top": 3}).json()
    assert "".join(t["text"] for t in r["tokens"]) == text
    assert any(t["features"] for t in r["tokens"])
    for t in r["tokens"]:
        acts = [f["act"] for f in t["features"]]
        assert len(acts) <= 3 and acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
    assert r["max_act"] == max(t["features"][0]["act"] for t in r["tokens"] if t["features"])


def test_feature_activations_follow_one_feature_over_every_token(client):
    text = "def run(cmd):\n    os.system(cmd)\n"
    top = client.post("/api/inspect", json={"text": text, "top": 3}).json()["tokens"]
    fid = next(t["features"][0]["id"] for t in top if t["features"])
    r = client.post(f"/api/features/{fid}/activations", json={"text": text}).json()
    assert r["feature"] == fid and "".join(t["text"] for t in r["tokens"]) == text
    for mine, listed in zip(r["tokens"], top):  # where inspect lists the feature, the value is the same
        for f in listed["features"]:
            if f["id"] == fid:
                assert abs(mine["act"] - f["act"]) < 1e-5
    assert client.post("/api/features/99999/activations", json={"text": text}).status_code == 404
    assert client.post(f"/api/features/{fid}/activations", json={"text": ""}).status_code == 422


def test_steer_checks_feature_ids_before_the_model(client):
    r = client.post("/api/steer", json={"prompt": "x", "max_new_tokens": 4, "features": [{"id": 64, "value": 1}]})
    assert r.status_code == 422 and "features 0-63" in r.json()["detail"]


def _live_feature(client) -> int:
    return client.get("/api/features", params={"order_by": "max_act", "limit": 1}).json()["features"][0]["id"]


def test_steer_returns_default_and_steered(client):
    f = _live_feature(client)
    body = {"prompt": "def run(cmd):", "features": [{"id": f, "value": 20}], "max_new_tokens": 8}
    r = client.post("/api/steer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out["default"], str) and isinstance(out["steered"], str)
    assert len(out["steered_acts"][str(f)]) == len(out["steered_tokens"])
    again = client.post("/api/steer", json={**body, "features": []}).json()
    assert again["default"] == again["steered"] == out["default"]  # no dial: the same greedy text


def test_steer_concept_is_one_dial_for_a_feature_set(client):
    ids = [f["id"] for f in client.get("/api/features", params={"order_by": "max_act", "limit": 2}).json()["features"]]
    body = {"prompt": "def run(cmd):", "max_new_tokens": 8}
    concept = client.post("/api/steer", json={**body, "concept": {"features": ids, "value": 3}}).json()
    dials = client.post("/api/steer", json={**body, "features": [{"id": f, "value": 3} for f in ids]}).json()
    assert concept["steered"] == dials["steered"] and set(concept["steered_acts"]) == {str(f) for f in ids}
    clash = client.post("/api/steer", json={**body, "features": [{"id": ids[0]}], "concept": {"features": ids}})
    assert clash.status_code == 422 and "one dial" in clash.text
    page = client.get("/steer", params={"concept": f"{ids[0]},{ids[1]},x", "strength": 1.5}).text
    assert f'value="{ids[0]},{ids[1]}"' in page and 'id="concept-value"' in page


def test_steer_page_reads_a_concept_file_and_marks_its_calibrated_point(client, run_dir):
    import shutil

    from saelab import SAE, SAEConfig
    from saelab.conceptfile import make_concept, save_concept
    from saelab.formats import load_sae
    from saelab.steer import DialSpec

    ids = [f["id"] for f in client.get("/api/features", params={"order_by": "max_act", "limit": 2}).json()["features"]]
    sae = load_sae(run_dir / "sae")
    folder = run_dir / "concepts"
    try:
        save_concept(folder / "mine.json", make_concept(sae, "mine", DialSpec(tuple(ids), "add", "norm"), 0.5))
        page = client.get("/steer", params={"concept_file": "mine"}).text
        assert f'value="{ids[0]},{ids[1]}"' in page and "calibrated: 0.5" in page and 'list="calibrated-mark"' in page
        other = SAE(SAEConfig(sae.cfg.d_in, sae.cfg.d_sae, "relu"))
        other.reset_parameters(5)
        other.provenance = dict(sae.provenance)
        save_concept(folder / "theirs.json", make_concept(other, "theirs", DialSpec(tuple(ids)), 2.0))
        assert "made for another SAE" in client.get("/steer", params={"concept_file": "theirs"}).text
        assert "a concept name is" in client.get("/steer", params={"concept_file": "../x"}).text
        body = {"prompt": "def run(cmd):", "max_new_tokens": 4,
                "concept": {"features": ids, "value": 0.5, "mode": "add", "unit": "norm"}}
        r = client.post("/api/steer", json=body)
        assert r.status_code == 200, r.text
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _events(text: str) -> list[dict]:
    return [json.loads(block[len("data: "):]) for block in text.split("\n\n") if block.startswith("data: ")]


def test_steer_stream_sends_both_sides_token_by_token(client):
    f = _live_feature(client)
    body = {"prompt": "def run(cmd):", "features": [{"id": f, "value": 20, "mode": "add"}], "max_new_tokens": 8}
    with client.stream("POST", "/api/steer/stream", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.read().decode())
    assert events[-1]["type"] == "done" and set(events[-1]["notes"]) <= {"default", "steered"}
    tokens = [e for e in events if e["type"] == "token"]
    sides = [e["side"] for e in tokens]
    assert sides == sorted(sides)  # all default pieces, then all steered ones
    whole = client.post("/api/steer", json=body).json()
    assert "".join(e["text"] for e in tokens if e["side"] == "default") == whole["default"]
    assert "".join(e["text"] for e in tokens if e["side"] == "steered") == whole["steered"]
    assert client.post("/api/inspect", json={"text": "def"}).status_code == 200  # the gate was released


def test_stream_stops_and_frees_the_model_when_the_client_leaves(run_dir):
    import httpx

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append                       # straight on the logger: no global logging setup needed
    log = logging.getLogger("saelab.web.live")
    level, disabled = log.level, log.disabled
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.disabled = False
    try:
        with served(run_dir) as (url, app):
            # 20 ms per forward: the 2 × 100 tokens take >= 4 s, far longer than a cancelled stream needs
            slow = app.state.run.model().model.register_forward_hook(lambda *a: time.sleep(0.02))
            body = {"prompt": "def f", "max_new_tokens": 100}
            with httpx.stream("POST", f"{url}/api/steer/stream", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if '"type": "token"' in line:
                        break  # the first piece of text has arrived: hang up
            left = time.monotonic()
            while app.state.gate._lock.locked():  # the generation thread stops at its next token
                assert time.monotonic() - left < 3, "the model stayed taken after the client left"
                time.sleep(0.05)
            slow.remove()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.disabled = disabled
    assert any("cancelled by the client" in r.getMessage() for r in records)


def test_monitor_scan_alerts(client):
    text = "import os\nos.system(cmd)\n"
    f = _live_feature(client)
    r = client.post("/api/monitor/scan", json={"text": text, "watch": [{"feature": f, "threshold": 0.0}]}).json()
    assert "".join(r["tokens"]) == text
    assert r["thresholds"] == {str(f): 0.0}
    for a in r["alerts"]:
        assert a["feature"] == f and a["activation"] > 0 and r["tokens"][a["token_index"]].startswith(a["token"][:1])
    default = client.post("/api/monitor/scan", json={"text": text, "watch": [{"feature": f}]}).json()
    assert default["thresholds"][str(f)] >= 0
    assert client.post("/api/monitor/scan", json={"text": text, "watch": []}).status_code == 422


# -- pages, escaping, static files, docs ----------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/features", "/features?q=def&order_by=max_act", "/features?cluster=0",
                                  "/features/0", "/map", "/map?feature=3", "/inspect", "/steer?feature=2",
                                  "/monitor", "/docs"])
def test_pages_render(client, path):
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"


def test_model_text_is_escaped_in_pages(client, payload_id):
    for path in (f"/features/{payload_id}", "/features?q=onerror"):
        html = client.get(path).text
        assert "&lt;img src=x onerror=alert(1)&gt;" in html
        assert XSS not in html and "<script>alert(2)" not in html
    # features.db token text inside a <script type="application/json"> block stays inert
    assert "</script><script>" not in client.get(f"/features/{payload_id}").text


def test_static_files_come_from_memory_only(client):
    js = client.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000 and "javascript" in js.headers["content-type"]
    for bad in ("/static/..%2Fapp.py", "/static/%2e%2e%2fapp.py", "/static/../app.py", "/static/guard.py",
                "/static/templates"):
        assert client.get(bad).status_code == 404, bad


def test_openapi_and_offline_docs(client):
    spec = client.get("/openapi.json").json()
    for path in ("/api/info", "/api/features", "/api/features/{feature_id}", "/api/map", "/api/inspect",
                 "/api/steer", "/api/steer/stream", "/api/monitor/scan"):
        assert path in spec["paths"], path
    docs = client.get("/docs").text
    assert "/api/steer/stream" in docs and "cdn" not in docs.lower()


# -- the serve command --------------------------------------------------------------------------------

def test_serve_command_binds_loopback_and_warns_when_exposed(run_dir, monkeypatch, capsys):
    import uvicorn

    from saelab.cli import main

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert main(["serve", str(run_dir), "--port", "8799"]) == 0
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8799
    assert "warning" not in capsys.readouterr().err
    assert main(["serve", "--db", str(run_dir / "features.db"), "--sae", str(run_dir / "sae"),
                 "--host", "0.0.0.0"]) == 0
    assert calls[-1]["host"] == "0.0.0.0" and "exposes the model" in capsys.readouterr().err


def test_serve_command_user_errors(tmp_path, capsys):
    from saelab.cli import main

    assert main(["serve"]) == 2
    assert "give a run folder" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert main(["serve", str(tmp_path)]) == 2
    assert "no feature database" in capsys.readouterr().err


def test_degenerate_continuations_are_named():
    from saelab.web.live import degenerate

    assert degenerate("") and degenerate("\n\n   \n")
    assert "repeats" in degenerate(" foo bar baz foo bar baz foo bar baz foo bar baz")
    assert "repeats 'f'" in degenerate("ffffffffffffff") and "repeats 'fhtml'" in degenerate("fhtml" * 6)
    assert "ends up repeating '\\n'" in degenerate("import subprocess\n" + "\n" * 40)
    assert "one character" in degenerate("a=b a=b a==c aaaaaa d aaaaaaa")
    assert degenerate("\n    return subprocess.call(cmd, shell=True)\n") is None


def test_chat_needs_a_chat_template(client):
    """The tiny model has no chat template: asking for one is a clear 422, not a crash; plain text still works."""
    for path, body in (("/api/inspect", {"text": "import os", "chat": True}),
                       ("/api/steer", {"prompt": "import os", "chat": True, "max_new_tokens": 2})):
        r = client.post(path, json=body)
        assert r.status_code == 422 and "no chat template" in r.json()["detail"]
    assert client.post("/api/inspect", json={"text": "import os", "chat": False}).status_code == 200
