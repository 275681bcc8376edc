"""Explanations and detection scores: the offline explainer and judge on hand-built records, and the
LLM client, explainer and judge against a local server that speaks the chat-completions protocol."""

import json
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saelab.cli import main
from saelab.explain import (Example, FeatureRecord, OfflineJudge, detection_score, explain_and_score,
                            offline_explanation, parse_explanation, parse_feature_selection, quote_token,
                            token_patterns)
from saelab.llm import LLMClient, LLMError, LLMJudge, LLMReplyError, llm_explanation, parse_judgements

# -- a local chat-completions server ------------------------------------------------------------------


def _send(handler, code: int, payload: bytes, headers: dict | None = None) -> None:
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(payload)


def reply(text, prompt_tokens=11, completion_tokens=5):
    body = {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
    return lambda h, req: _send(h, 200, json.dumps(body).encode())


def status(code, body=b'{"error": {"message": "boom"}}', headers=None):
    return lambda h, req: _send(h, code, body, headers)


def raw(payload: bytes):
    return lambda h, req: _send(h, 200, payload)


def sleep_then(seconds, then):
    def act(h, req):
        time.sleep(seconds)
        then(h, req)
    return act


def fake_llm(h, req):
    """Explains every feature as ` self`; as a judge, says yes exactly when an excerpt contains ` self`."""
    system, user = req["messages"][0]["content"], req["messages"][-1]["content"]
    if system.startswith("A feature inside a language model"):
        lines = re.findall(r"^(\d+)\. (.*)$", user, re.M)
        text = "\n".join(f"{n}: {'yes' if ' self' in json.loads(t) else 'no'}" for n, t in lines)
    else:
        text = "Explanation: fires on ` self`"
    reply(text)(h, req)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "json": req})
        action = self.server.script.pop(0) if self.server.script else fake_llm
        action(self, req)

    def log_message(self, *args):
        return  # keep pytest output clean


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A handler that slept past the client's timeout finds the socket closed: expected here.
        self.errors += 1


@pytest.fixture
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.seen, srv.script, srv.errors = [], [], 0
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def client_for(srv, **kw):
    return LLMClient(srv.url, "test-model", **{"backoff": 0.01, "timeout": 5.0, "max_retries": 2, **kw})


# -- LLM client ----------------------------------------------------------------------------------------

def test_chat_reply_and_usage_tally(server):
    server.script = [reply("hello", 100, 20), reply("again", 50, 10)]
    c = client_for(server, api_key="sk-test", price_prompt=2.0, price_completion=10.0)
    assert c.chat([{"role": "user", "content": "hi"}]) == "hello"
    assert c.chat([{"role": "user", "content": "hi"}]) == "again"
    assert server.seen[0]["path"] == "/v1/chat/completions"
    assert server.seen[0]["auth"] == "Bearer sk-test"
    assert server.seen[0]["json"]["model"] == "test-model"
    assert server.seen[0]["json"]["messages"] == [{"role": "user", "content": "hi"}]
    t = c.tally
    assert (t.requests, t.retries, t.replies, t.prompt_tokens, t.completion_tokens) == (2, 0, 2, 150, 30)
    assert t.cost_usd == pytest.approx((150 * 2.0 + 30 * 10.0) / 1e6)
    assert "150 prompt + 30 completion tokens" in t.summary()


def test_api_key_from_environment(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("SAELAB_LLM_API_KEY", "from-env")
    client_for(server).chat([{"role": "user", "content": "x"}])
    assert server.seen[-1]["auth"] == "Bearer from-env"
    monkeypatch.setenv("MY_KEY", "mine")
    client_for(server, api_key_env="MY_KEY").chat([{"role": "user", "content": "x"}])
    assert server.seen[-1]["auth"] == "Bearer mine"
    with pytest.raises(ValueError, match="NOT_SET_VAR"):
        client_for(server, api_key_env="NOT_SET_VAR")


def test_retry_after_500_then_success(server):
    server.script = [status(500), status(503), reply("ok")]
    c = client_for(server)
    assert c.chat([{"role": "user", "content": "x"}]) == "ok"
    assert (c.tally.requests, c.tally.retries, c.tally.replies) == (3, 2, 1)


def test_429_honours_retry_after(server):
    server.script = [status(429, headers={"Retry-After": "0.3"}), reply("ok")]
    c = client_for(server)
    start = time.monotonic()
    assert c.chat([{"role": "user", "content": "x"}]) == "ok"
    assert time.monotonic() - start >= 0.3


def test_gives_up_after_retries_on_persistent_5xx(server):
    server.script = [status(502)] * 3
    with pytest.raises(LLMError, match="gave up after 3 attempts.*HTTP 502: boom"):
        client_for(server).chat([{"role": "user", "content": "x"}])


def test_timeout_is_a_clear_error_bounded_in_time(server):
    server.script = [sleep_then(2.0, reply("late"))] * 2
    c = client_for(server, timeout=0.3, max_retries=1)
    start = time.monotonic()
    with pytest.raises(LLMError, match=r"gave up after 2 attempts; last error: no reply within 0.3 s"):
        c.chat([{"role": "user", "content": "x"}])
    assert time.monotonic() - start < 1.8  # two 0.3 s attempts, not the server's 2 s sleeps
    assert c.tally.requests == 2


@pytest.mark.parametrize("action, message", [
    (raw(b"<html>oops</html>"), "not JSON"),
    (raw(b"[1, 2]"), "expected a JSON object"),
    (raw(b'{"id": "x", "usage": {}}'), "no 'choices' list"),
    (raw(b'{"choices": []}'), "no 'choices' list"),
    (raw(b'{"choices": [{"message": {"role": "assistant", "content": null}, "finish_reason": "length"}]}'),
     "content is missing.*length"),
    (raw(b'{"error": {"message": "model not loaded"}}'), "returned an error: model not loaded"),
])
def test_malformed_replies_are_clear_errors_without_retry(server, action, message):
    server.script = [action]
    c = client_for(server)
    with pytest.raises(LLMError, match=message):
        c.chat([{"role": "user", "content": "x"}])
    assert c.tally.requests == 1


@pytest.mark.parametrize("code, hint", [(401, "API key"), (404, "including /v1"), (400, "boom")])
def test_client_errors_are_not_retried(server, code, hint):
    server.script = [status(code)]
    c = client_for(server)
    with pytest.raises(LLMError, match=f"HTTP {code}.*{hint}"):
        c.chat([{"role": "user", "content": "x"}])
    assert c.tally.requests == 1


def test_unreachable_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = LLMClient(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff=0.01, timeout=2)
    with pytest.raises(LLMError, match="gave up after 2 attempts; last error: connection failed"):
        c.chat([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="http"):
        LLMClient("localhost:8000", "m")


# -- records used below ----------------------------------------------------------------------------------

def window(tokens, fire):
    """An Example whose activations are ``fire[i]`` at index i and 0 elsewhere."""
    return Example(list(tokens), [float(fire.get(i, 0.0)) for i in range(len(tokens))])


SELF = ["def", " f", "(", "self", "):", "\n", "   ", " self", ".", "x", " =", " self", "\n"]
PRINT = ["x", " =", " 1", "\n", "print", "(", "x", ")", "\n", "len", "(", "x", ")"]
IMPORT_A = ["x", " =", " 1", "\n", "import", " os", "\n", "    ", "import", " re"]
IMPORT_B = ["\n", "from", " os", " import", " path", "\n"]
COMMENT = ["x", " =", " 1", "  #", " see", " the", " docs", "\n", "y", " =", ' "', "the", " docs", '"', "\n"]


def self_record(rng: random.Random, n_random: int = 40) -> FeatureRecord:
    """A planted feature: ` self` at the start of an indented line; random windows never contain ` self`."""
    filler = ["x", " =", " 1", "(", ")", "\n", "    ", " return", " y", ".", " cls", "cls"]
    negatives = [window([rng.choice(filler) for _ in range(12)], {}) for _ in range(n_random)]
    firing = [window(SELF, {7: 1.0 + rng.random()}) for _ in range(10)]
    return FeatureRecord(7, 0.01, 3.0, top=[window(SELF, {7: 3.0})] * 3, quantile=firing,
                         random=negatives, positive_logits=[(".", 2.0), ("_", 1.0)])


# -- offline explainer --------------------------------------------------------------------------------------

@pytest.mark.parametrize("record, expected", [
    (FeatureRecord(0, top=[window(SELF, {7: 3.0}), window(SELF, {7: 2.5})], quantile=[window(SELF, {7: 1.0})],
                   positive_logits=[(".", 2.0), ("_", 1.0)]),
     "fires on ` self` (100%), at the start of an indented line; promotes `.`, `_`; e.g. “(self):⏎   [ self].x”"),
    (FeatureRecord(1, top=[window(PRINT, {5: 1.5})] * 3),
     "fires on `(` (opening parenthesis, 100%) after `print`; e.g. “x = 1⏎print[(]x)”"),
    (FeatureRecord(2, top=[window(IMPORT_A, {4: 7.0}), window(IMPORT_B, {1: 3.0})]),
     "fires on `import` (70%), `from` (30%), at the start of a line; e.g. “x = 1⏎[import] os⏎”"),
    (FeatureRecord(3, top=[window(COMMENT, {5: 2.0, 6: 1.0})]),
     "fires on ` the` (67%), ` docs` (33%) after ` see` or ` the`, inside a comment; e.g. “x = 1  # see[ the] docs⏎”"),
    (FeatureRecord(4, top=[window("abcdefghij", {i: 1.0 for i in range(10)})], positive_logits=[("<", 1.0)]),
     "fires on diverse tokens, e.g. `a`, `b`, `c`; promotes `<`; e.g. “[a]bc”"),
    (FeatureRecord(5, top=[window(SELF, {})]), "never fires in the analysed tokens"),
])
def test_offline_explanation_on_hand_built_records(record, expected):
    assert offline_explanation(record) == expected
    # the words and the example snippet add no tokens or patterns for the offline judge
    bare = expected.split("; e.g. “")[0].replace("opening parenthesis, ", "")
    assert parse_explanation(expected) == parse_explanation(bare)


def test_token_words_name_whitespace_and_symbols():
    from saelab.explain import token_words

    assert [token_words(t) for t in ["\n", "\n    ", "  ", "\n\n", "\t", " (", ":", "x", " self"]] == \
        ["line break", "line break + 4 spaces", "2 spaces", "blank line", "tab", "opening parenthesis", "colon",
         None, None]


def test_token_patterns():
    toks = ["x", " =", ' "', "a b", '"', "  #", " note", "\n", "    ", "return", " y", "\n", "z"]
    pats = token_patterns(toks)
    assert pats[3] == {"string"} and pats[6] == {"comment"}
    assert pats[9] == {"indented"} and pats[12] == {"line_start"}
    assert pats[0] == set() and pats[10] == set() and pats[2] == set()  # the opening quote is code


def test_parse_explanation_round_trips_awkward_tokens():
    toks = [" after", "`", "\\", "\n", "; promotes"]
    text = f"fires on {', '.join(quote_token(t) for t in toks)} after {quote_token(' x')}, inside a string; " \
           f"promotes {quote_token('.')}"
    parsed = parse_explanation(text)
    assert parsed.tokens == set(toks) and parsed.after == {" x"} and parsed.patterns == {"string"}


# -- detection scoring ----------------------------------------------------------------------------------------

def test_offline_judge_scores_planted_feature_perfectly():
    rng = random.Random(0)
    record = self_record(rng)
    explanation = offline_explanation(record)
    pos = [window(SELF, {7: 1.0})] * 20
    # Hard negatives: ` self` that is not at the start of an indented line, and ` self` in a string.
    neg = [record.random[i] for i in range(20)] + [window(["x", " =", " self", "\n"], {})] * 5
    neg += [window(["\n", "   ", ' "', " self", '"'], {})] * 5
    assert detection_score(explanation, pos, neg, OfflineJudge()) == 1.0
    assert detection_score(explanation, [e.tokens for e in pos], neg, OfflineJudge()) == 1.0


def test_offline_judge_on_noise_is_near_chance():
    rng = random.Random(1)
    vocab = [f" w{i}" for i in range(30)]

    def noise():
        toks = [rng.choice(vocab) for _ in range(12)]
        return window(toks, {i: rng.random() for i in range(12) if rng.random() < 0.2})
    record = FeatureRecord(0, top=[noise() for _ in range(20)], quantile=[noise() for _ in range(20)])
    explanation = offline_explanation(record)
    pos, neg = [noise() for _ in range(300)], [noise() for _ in range(300)]
    assert abs(detection_score(explanation, pos, neg, OfflineJudge()) - 0.5) < 0.1


def test_detection_score_errors():
    with pytest.raises(ValueError, match="0 negative"):
        detection_score("fires on `a`", [["a"]], [], OfflineJudge())
    with pytest.raises(ValueError, match="1 predictions for 2 contexts"):
        detection_score("fires on `a`", [["a"]], [["b"]], lambda e, ctxs: [True])


def test_explain_and_score_holds_out_and_reports_missing_negatives():
    record = self_record(random.Random(2))
    result = explain_and_score(record)
    assert result.explanation.startswith("fires on ` self`")
    assert (result.score, result.n_pos, result.n_neg) == (1.0, 5, 40)
    no_neg = FeatureRecord(7, top=record.top, quantile=record.quantile)
    assert explain_and_score(no_neg).score is None


def test_parse_feature_selection():
    assert parse_feature_selection("all", 4) == [0, 1, 2, 3]
    assert parse_feature_selection("0-2, 7,5", 10) == [0, 1, 2, 5, 7]
    with pytest.raises(ValueError, match="outside 0-9"):
        parse_feature_selection("5-12", 10)
    with pytest.raises(ValueError, match="bad feature selection"):
        parse_feature_selection("a-b", 10)


# -- LLM explainer and judge -----------------------------------------------------------------------------------

def test_llm_explanation_prompt_marks_activations(server):
    server.script = [reply("<think>hmm, `.`?</think>\nExplanation: \"` self` at the start of indented lines\"")]
    record = self_record(random.Random(3))
    assert llm_explanation(client_for(server), record) == "` self` at the start of indented lines"
    user = server.seen[0]["json"]["messages"][1]["content"]
    assert "\n   << self>>.x = self\n" in user and "Activations: ` self` 10" in user
    assert "makes more likely next: `.`, `_`" in user


def test_llm_judge_batches_and_scores(server):
    record = self_record(random.Random(4))
    client = client_for(server)
    pos, neg = [window(SELF, {7: 1.0})] * 7, list(record.random[:10])
    assert detection_score("fires on ` self`", pos, neg, LLMJudge(client, batch_size=4)) == 1.0
    assert client.tally.replies == 5  # ceil(17 / 4) batches


def test_parse_judgements():
    assert parse_judgements("1: yes\n2. No\n3) **yes**", 3) == [True, False, True]
    assert parse_judgements("yes\nno", 2) == [True, False]
    with pytest.raises(LLMReplyError, match=r"excerpts \[2\] of 2"):
        parse_judgements("1: yes\nmaybe", 2)


# -- features.db and the CLI --------------------------------------------------------------------------------

def make_db(path, record: FeatureRecord):
    """A features.db with feature 0 = ``record``, feature 1 dead, feature 2 = a `print(` feature."""
    from saelab.featuredb import build

    def rows(feature, kind, examples):
        return [{"feature": feature, "kind": kind, "rank": r, "max_act": max(e.acts), "token_ids": [0] * len(e.tokens),
                 "tokens": e.tokens, "acts": e.acts, "max_pos": 0, "seq": r, "pos": 0} for r, e in enumerate(examples)]
    printer = FeatureRecord(2, top=[window(PRINT, {5: 1.5})] * 3, quantile=[window(PRINT, {5: 0.5})] * 4,
                            random=[window(SELF, {})] * 6)
    with build(path) as w:
        w.meta(d_sae=3)
        w.features([{"id": i, "count": c, "density": 0.01 * c, "max_act": 3.0 * c, "mean_act": 1.0}
                    for i, c in ((0, 1), (1, 0), (2, 1))])
        for i, r in ((0, record), (2, printer)):
            w.examples(rows(i, "top", r.top) + rows(i, "quantile", r.quantile) + rows(i, "random", r.random))
        w.logit_effects([(0, 1, 0, 5, ".", 2.0)])


def test_cli_explain_offline_writes_db(tmp_path, capsys):
    from saelab.featuredb import FeatureDB

    db_path = tmp_path / "features.db"
    make_db(db_path, self_record(random.Random(5)))
    assert main(["explain", str(db_path)]) == 0
    assert "explained 2 of 2 selected live features" in capsys.readouterr().out
    with FeatureDB.open(db_path) as db:
        f0, f1, f2 = db.feature(0), db.feature(1), db.feature(2)
        assert f0["explanation"].startswith("fires on ` self` (100%), at the start of an indented line; promotes `.`; e.g. “")
        assert (f0["explanation_source"], f0["score"]) == ("offline", 1.0)
        assert f1["explanation"] == "" and f1["score"] is None
        assert f2["explanation"].startswith("fires on `(` (opening parenthesis, 100%) after `print`; e.g. “")
        assert f2["score"] == 1.0
        assert [h["id"] for h in db.search("print")] == [2]


def test_cli_explain_with_llm(tmp_path, server, capsys):
    from saelab.featuredb import FeatureDB

    db_path = tmp_path / "features.db"
    make_db(db_path, self_record(random.Random(6)))
    rc = main(["explain", str(db_path), "--llm", server.url, "--model", "test-model", "--features", "0-1",
               "--price-prompt", "1", "--timeout", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and "LLM: 6 replies, 6 requests (0 retries)" in out and "est. $" in out
    with FeatureDB.open(db_path) as db:
        f0 = db.feature(0)
        assert (f0["explanation"], f0["explanation_source"], f0["score"]) == ("fires on ` self`", "llm:test-model", 1.0)
        assert db.feature(2)["explanation"] == ""  # not selected


@pytest.mark.parametrize("argv, message", [
    (["--llm", "http://127.0.0.1:9/v1"], "--llm needs --model"),
    (["--judge", "llm"], "need an endpoint"),
    (["--features", "5-9"], "outside 0-2"),
])
def test_cli_explain_user_errors(tmp_path, capsys, argv, message):
    db_path = tmp_path / "features.db"
    make_db(db_path, self_record(random.Random(7)))
    assert main(["explain", str(db_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_explain_db_skips_unparsable_replies_and_keeps_work_on_failure(tmp_path, server):
    from saelab.explain import explain_db
    from saelab.featuredb import FeatureDB

    db_path = tmp_path / "features.db"
    make_db(db_path, self_record(random.Random(8)))
    server.script = [reply("Explanation:   ")]  # feature 0: no explanation in the reply → skipped
    with FeatureDB.open(db_path, writable=True) as db:
        results = explain_db(db, [0, 2], client=client_for(server), judge=OfflineJudge())
        assert list(results) == [2] and db.feature(0)["explanation"] == ""
    # The endpoint starts refusing after feature 0: what was done is stored, the error reaches the caller.
    server.script = [reply("Explanation: fires on ` self`"), status(401)]
    with FeatureDB.open(db_path, writable=True) as db:
        with pytest.raises(LLMError, match="HTTP 401"):
            explain_db(db, [0, 2], client=client_for(server), judge=OfflineJudge(), flush_every=1)
        assert db.feature(0)["explanation"] == "fires on ` self`"
