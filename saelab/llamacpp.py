"""llama.cpp's ``llama-server`` from saelab: find the binary, run it on a local port, stop it.

``scripts/install_llamacpp.sh`` builds the binary into the saelab cache; :func:`find_llama_server` looks
at ``$SAELAB_LLAMA_SERVER``, then ``PATH``, then that cache. :class:`LlamaServer` starts it on
127.0.0.1 with a GGUF model and optional control vectors, waits until ``/health`` answers, and stops it
on exit (also on errors and Ctrl-C). The server speaks the OpenAI chat API at ``server.base_url``
(``/v1``), which :class:`saelab.llm.LLMClient` talks to.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from saelab.errors import SaelabError
from saelab.runtime import cache_root

SERVER_ENV = "SAELAB_LLAMA_SERVER"
INSTALL_HINT = "build it with scripts/install_llamacpp.sh (10-30 min on 2 cores), or set SAELAB_LLAMA_SERVER"


def find_llama_server() -> Path | None:
    """The llama-server binary: ``$SAELAB_LLAMA_SERVER``, ``llama-server`` on PATH, or the newest build in
    ``<cache>/llama.cpp/<version>/bin``; None when there is none."""
    named = os.environ.get(SERVER_ENV)
    if named:
        path = Path(named).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SaelabError(f"{SERVER_ENV}={named} is not an executable file; {INSTALL_HINT}")
        return path
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    builds = sorted(cache_root().glob("llama.cpp/*/bin/llama-server"), key=lambda p: p.stat().st_mtime)
    return builds[-1] if builds else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerConfig:
    """How to run llama-server."""

    model: Path
    """The GGUF model file."""
    control_vectors: list[tuple[Path, float]] = field(default_factory=list)
    """Control-vector GGUFs and the scale llama.cpp multiplies each by (``--control-vector-scaled``)."""
    context: int = 2048
    """Context length in tokens (``-c``)."""
    threads: int = 1
    """CPU threads (``-t``): 1 on a shared 2-core machine."""
    start_timeout: float = 180.0
    """Seconds to wait for the model to load before giving up."""
    log: Path | None = None
    """File for the server's output (default: discarded)."""


class LlamaServer:
    """``with LlamaServer(ServerConfig(model)) as s: LLMClient(s.base_url, "m").chat(...)``."""

    def __init__(self, cfg: ServerConfig, binary: Path | None = None):
        self.cfg = cfg
        self.binary = binary or find_llama_server()
        if self.binary is None:
            raise SaelabError(f"llama-server is not installed; {INSTALL_HINT}")
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API base, for :class:`saelab.llm.LLMClient`."""
        return self.url + "/v1"

    def command(self) -> list[str]:
        cmd = [str(self.binary), "-m", str(self.cfg.model), "--host", "127.0.0.1", "--port", str(self.port),
               "-c", str(self.cfg.context), "-t", str(self.cfg.threads), "-np", "1", "--no-webui"]
        for path, scale in self.cfg.control_vectors:
            cmd += ["--control-vector-scaled", f"{path}:{scale:g}"]
        return cmd

    def __enter__(self) -> "LlamaServer":
        out = open(self.cfg.log, "ab") if self.cfg.log else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        finally:
            if self.cfg.log:
                out.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                where = f" (its output: {self.cfg.log})" if self.cfg.log else ""
                raise SaelabError(f"llama-server exited with code {self.process.returncode} while loading "
                                  f"{self.cfg.model}{where}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # still loading (503) or not listening yet
            time.sleep(0.25)
        raise SaelabError(f"llama-server did not answer /health within {self.cfg.start_timeout:g} s "
                          f"(model {self.cfg.model})")

    def complete(self, ids: list[int], max_new_tokens: int, n_probs: int = 0) -> dict:
        """Greedy continuation of the token ids ``ids`` (no template, no BOS added: the ids are the prompt)
        by ``POST /completion``: its JSON reply (``content``, and ``completion_probabilities`` with
        ``n_probs``: each generated token's top log-probabilities before sampling)."""
        body = {"prompt": [int(i) for i in ids], "n_predict": int(max_new_tokens), "temperature": 0.0, "top_k": 1,
                "n_probs": int(n_probs), "cache_prompt": False, "seed": 0}
        request = urllib.request.Request(self.url + "/completion", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=300) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise SaelabError(f"llama-server at {self.url} answered HTTP {e.code}: "
                              f"{e.read()[:300].decode('utf-8', 'replace')}") from e

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
