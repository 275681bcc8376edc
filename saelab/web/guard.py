"""What keeps the local server safe: Host checks, body caps, security headers, one model call at a time.

The app is meant for one person on one machine. The threats it guards against are a web page in the
same browser talking to it (DNS rebinding: a hostile name that resolves to 127.0.0.1 — stopped by
checking the ``Host`` header), injected model or corpus text (stopped by escaping everywhere and a
Content-Security-Policy without inline scripts), and a request that would tie the CPU up for long
(stopped by size caps and a bounded queue in front of the model).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")

# plotly's WebGL traces (regl) compile shader glue with `new Function`, hence 'unsafe-eval'. Inline
# scripts stay forbidden: that is what stops injected markup from running.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


@dataclass
class ServerConfig:
    """How the server binds and what it accepts."""

    host: str = "127.0.0.1"
    """Interface to bind. Anything but loopback exposes the model to the network."""
    port: int = 8765
    """TCP port to bind."""
    allowed_hosts: list[str] = field(default_factory=list)
    """Extra names accepted in the Host header (e.g. this machine's name when exposed with --host)."""
    max_body_bytes: int = 64 * 1024
    """Largest request body accepted (413 above)."""
    max_prompt_chars: int = 4000
    """Longest prompt / inspected or scanned text, in characters (422 above)."""
    max_new_tokens: int = 200
    """Most tokens one steering request may generate (422 above)."""
    max_steer_features: int = 8
    """Most features one steering request may turn."""
    queue_limit: int = 4
    """Requests allowed to wait for the model while one runs; more are turned away with 503."""
    queue_timeout_s: float = 30.0
    """How long a request waits for the model before 503."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_body_bytes < 1024 or self.max_new_tokens < 1 or self.max_prompt_chars < 1:
            raise ValueError("max_body_bytes must be >= 1024, max_new_tokens and max_prompt_chars >= 1")

    @property
    def is_loopback(self) -> bool:
        return _is_loopback(self.host)

    def host_names(self) -> set[str]:
        """Host-header names (without port) this server answers to."""
        names = {self.host.lower(), *(h.lower() for h in self.allowed_hosts)}
        if self.is_loopback or self.host in ("0.0.0.0", "::"):
            names.update(LOOPBACK_NAMES)
        if ":" in self.host and not self.host.startswith("["):
            names.add(f"[{self.host.lower()}]")
        if self.host in ("0.0.0.0", "::"):
            names.add(socket.gethostname().lower())
        return names

    def exposure_warning(self) -> str | None:
        """A warning to print when the bind address is reachable from other machines."""
        if self.is_loopback:
            return None
        return (f"warning: serving on {self.host}:{self.port} exposes the model and its feature data to your "
                f"network without authentication; use --host 127.0.0.1 unless you mean it")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_allowed(header: str | None, config: ServerConfig) -> bool:
    """True when a Host header names this server: one of its names, with its port (or none for 80)."""
    if not header:
        return False
    header = header.strip().lower()
    if header.startswith("["):
        name, _, rest = header.partition("]")
        name += "]"
        port = rest[1:] if rest.startswith(":") else None
    elif header.count(":") == 1:
        name, port = header.split(":")
    else:
        name, port = header, None
    if name not in config.host_names():
        return False
    return port == str(config.port) or (port is None and config.port == 80)


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """ASGI middleware: Host check (400), body cap (413, also for chunked bodies), security headers."""

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.config = config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if not host_allowed(host, self.config):
            return await _send_error(send, 400, f"unexpected Host header {host!r}: this server answers only to "
                                                f"{self.config.host}:{self.config.port}")
        limit = self.config.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _send_error(send, 413, f"request body over the {limit}-byte limit")
        received = 0
        started = responded = False

        async def limited_receive():
            # A chunked body has no Content-Length: count it as it arrives. Past the cap, answer 413
            # here and tell the app the client left (FastAPI would turn an exception into a 400).
            nonlocal received, responded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not started and not responded:
                        responded = True
                        await _send_error(send, 413, f"request body over the {limit}-byte limit")
                    return {"type": "http.disconnect"}
            return message

        async def send_with_headers(message):
            nonlocal started
            if responded:
                return  # the 413 is already out; drop the app's own reply to the cut-off body
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, limited_receive, send_with_headers)


class Busy(Exception):
    """The model is taken and the queue is full, or the wait ran out (the app answers 503)."""


class ModelGate:
    """One model call at a time; at most ``queue_limit`` callers waiting, each for at most ``timeout_s``."""

    def __init__(self, queue_limit: int, timeout_s: float):
        self.queue_limit = queue_limit
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._count = threading.Lock()
        self._waiting = 0

    def acquire(self) -> None:
        """Take the model or raise :class:`Busy`; pair with :meth:`release`."""
        with self._count:
            if self._lock.acquire(blocking=False):
                return
            if self._waiting >= self.queue_limit:
                raise Busy(f"the model is busy and {self._waiting} request(s) are already waiting; try again shortly")
            self._waiting += 1
        try:
            if not self._lock.acquire(timeout=self.timeout_s):
                raise Busy(f"the model stayed busy for {self.timeout_s:.0f} s; try again shortly")
        finally:
            with self._count:
                self._waiting -= 1

    def release(self) -> None:
        self._lock.release()

    @contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()
