"""The llama-server runner without llama.cpp: a stand-in executable that speaks /health and /completion
checks how saelab finds, starts, talks to and stops the server, and its errors."""

import os
import stat
import sys
import textwrap

import pytest

from saelab.errors import SaelabError
from saelab.llamacpp import LlamaServer, ServerConfig, find_llama_server

FAKE = textwrap.dedent('''\
    #!{python}
    """A stand-in llama-server: records its argv, then serves /health and echoes /completion."""
    import json, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    args = sys.argv[1:]
    open({argv!r}, "w").write(json.dumps(args))
    if {mode!r} == "crash":
        sys.exit(3)
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" and {mode!r} == "ok" else 503)
            self.end_headers()
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = json.dumps({{"content": "echo " + " ".join(map(str, body["prompt"]))}}).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
            self.wfile.write(data)
        def log_message(self, *a):
            pass
    HTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), H).serve_forever()
    ''')


def fake_server(tmp_path, mode="ok"):
    path = tmp_path / f"llama-server-{mode}"
    path.write_text(FAKE.format(python=sys.executable, argv=str(tmp_path / "argv.json"), mode=mode))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_server_starts_answers_and_stops(tmp_path):
    import json

    binary = fake_server(tmp_path)
    cfg = ServerConfig(tmp_path / "m.gguf", [(tmp_path / "gg.gguf", 0.5)], context=256)
    with LlamaServer(cfg, binary=binary) as s:
        assert s.complete([1, 2, 3], 4)["content"] == "echo 1 2 3"
        process = s.process
    assert process.poll() is not None  # stopped on exit
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:2] == ["-m", str(tmp_path / "m.gguf")] and "127.0.0.1" in argv
    assert argv[argv.index("--control-vector-scaled") + 1] == f"{tmp_path / 'gg.gguf'}:0.5"


def test_a_server_that_exits_while_loading_is_one_clear_error(tmp_path):
    cfg = ServerConfig(tmp_path / "m.gguf", log=tmp_path / "server.log")
    with pytest.raises(SaelabError, match=r"llama-server exited with code 3 while loading .*m.gguf.*server.log"):
        LlamaServer(cfg, binary=fake_server(tmp_path, "crash")).__enter__()


def test_a_server_that_never_gets_ready_is_stopped(tmp_path):
    s = LlamaServer(ServerConfig(tmp_path / "m.gguf", start_timeout=2), binary=fake_server(tmp_path, "loading"))
    with pytest.raises(SaelabError, match="did not answer /health within 2 s"):
        s.__enter__()
    assert s.process.poll() is not None


def test_find_llama_server_prefers_the_environment(tmp_path, monkeypatch):
    binary = fake_server(tmp_path)
    monkeypatch.setenv("SAELAB_LLAMA_SERVER", str(binary))
    assert find_llama_server() == binary
    monkeypatch.setenv("SAELAB_LLAMA_SERVER", str(tmp_path / "nothing"))
    with pytest.raises(SaelabError, match="is not an executable file; build it with scripts/install_llamacpp.sh"):
        find_llama_server()


def test_find_llama_server_looks_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SAELAB_LLAMA_SERVER", raising=False)
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_llama_server() is None
    with pytest.raises(SaelabError, match="llama-server is not installed; build it with scripts/install_llamacpp.sh"):
        LlamaServer(ServerConfig(tmp_path / "m.gguf"))
    built = tmp_path / "cache" / "llama.cpp" / "1.0" / "bin" / "llama-server"
    built.parent.mkdir(parents=True)
    built.write_text("")
    os.chmod(built, 0o755)
    assert find_llama_server() == built
