"""The LLM client's promises about where its credentials go: it follows no redirect, so the API key is
never sent to an address the user did not name, and no reply from such an address is taken."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saelab.llm import LLMClient, LLMError


class _Recorder(BaseHTTPRequestHandler):
    """Answers every request with ``server.answer(handler)`` and records its path and Authorization."""

    def _any(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.server.seen.append((self.command, self.path, self.headers.get("Authorization")))
        self.server.answer(self)

    do_GET = do_POST = _any

    def log_message(self, *args):
        return


def _serve(answer):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    srv.daemon_threads, srv.seen, srv.answer = True, [], answer
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


def _explanation_reply(h):
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Explanation: stolen"}}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode()
    h.send_response(200)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _redirect_to(location, code):
    def answer(h):
        h.send_response(code)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return answer


@pytest.fixture
def thief():
    srv = _serve(_explanation_reply)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_one_clear_error_and_the_key_never_leaves(thief, monkeypatch, code):
    """The red team's payload (issue 28): the endpoint answers ``302 Location: http://localhost:OTHER/steal``
    with SAELAB_LLM_API_KEY set; the other server must see no request at all, let alone the key."""
    monkeypatch.setenv("SAELAB_LLM_API_KEY", "sk-secret")
    steal = f"http://localhost:{thief.server_address[1]}/steal"
    endpoint = _serve(_redirect_to(steal, code))
    try:
        url = f"http://127.0.0.1:{endpoint.server_address[1]}/v1"
        client = LLMClient(url, "m", max_retries=2, backoff=0.01, timeout=5)
        with pytest.raises(LLMError, match=rf"{url}/chat/completions answered HTTP {code}, a redirect to "
                                           rf"'{steal}': saelab follows no redirect"):
            client.chat([{"role": "user", "content": "hi"}])
    finally:
        endpoint.shutdown()
        endpoint.server_close()
    assert endpoint.seen == [("POST", "/v1/chat/completions", "Bearer sk-secret")]  # asked once, not retried
    assert thief.seen == []
    assert client.tally.replies == 0


def test_a_redirect_on_the_same_host_is_refused_too(monkeypatch):
    """Same origin or not, a redirect is not followed: the user names the endpoint saelab talks to."""
    monkeypatch.delenv("SAELAB_LLM_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    endpoint = _serve(_redirect_to("/v2/chat/completions", 302))
    try:
        client = LLMClient(f"http://127.0.0.1:{endpoint.server_address[1]}/v1", "m", max_retries=0)
        with pytest.raises(LLMError, match="HTTP 302, a redirect to '/v2/chat/completions'.*give it as the endpoint"):
            client.chat([{"role": "user", "content": "hi"}])
    finally:
        endpoint.shutdown()
        endpoint.server_close()
    assert [path for _, path, _ in endpoint.seen] == ["/v1/chat/completions"]
