"""The feature browser: a FastAPI app over one run (features.db, SAE folder, eval.json, the model).

``create_app(run_dir)`` builds it; ``serve(app, config)`` runs it with uvicorn on 127.0.0.1 by default.
Pages are Jinja2 templates (autoescaped) with small vanilla scripts; plots use the plotly.js bundle
that ships inside the ``plotly`` Python package, so nothing is fetched from the internet. Static files
are read into memory at start-up: a request names a key in that table, never a path on disk.
"""

from __future__ import annotations

import logging
import mimetypes
import sqlite3
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from saelab.errors import SaelabError
from saelab.web import api, diffview, live, pages
from saelab.web.guard import Busy, GuardMiddleware, ModelGate, ServerConfig
from saelab.web.pages import render
from saelab.web.state import RunState

STATIC = Path(__file__).parent / "static"
log = logging.getLogger(__name__)


def _plotly_bundle() -> Path:
    try:
        import plotly
    except ImportError:
        raise ImportError("the web app needs plotly (for its bundled plotly.min.js): pip install 'saelab[web]'") from None
    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: this plotly installation has no plotly.min.js; reinstall plotly")
    return path


def load_static() -> dict[str, tuple[bytes, str]]:
    """name → (bytes, content type) for every file the app serves."""
    files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
    files["plotly.min.js"] = _plotly_bundle()
    out = {}
    for name, path in files.items():
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        out[name] = (path.read_bytes(), ctype)
    return out


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path == "/openapi.json"


def _error(request: Request, status: int, message: str) -> Response:
    """JSON for the API, a small HTML page for the browser pages."""
    if _is_api(request) or request.method != "GET":
        return JSONResponse({"detail": message}, status_code=status)

    return render(request, "error.html", status=status, page_title=str(status), code=status, message=message)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(Busy)
    def busy(request: Request, exc: Busy):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"retry-after": "5"})

    @app.exception_handler(SaelabError)
    def user_error(request: Request, exc: SaelabError):  # saelab's own: mismatch, damaged db, busy folder, ...
        return _error(request, exc.http_status, str(exc))

    @app.exception_handler(sqlite3.DatabaseError)
    def damaged(request: Request, exc: sqlite3.DatabaseError):  # a query outside FeatureDB's checked ones
        log.error("features.db query failed: %s", exc)
        return _error(request, 500, f"the feature database cannot be read ({exc}); it is damaged: rebuild it "
                                    "with 'saelab analyze SAE_DIR' and restart the server")

    @app.exception_handler(KeyError)
    def missing(request: Request, exc: KeyError):  # unknown feature ids
        return _error(request, 404, str(exc.args[0]) if exc.args else "not found")

    @app.exception_handler(LookupError)
    def unavailable(request: Request, exc: LookupError):  # no SAE / no model for this server
        return _error(request, 409, str(exc))

    @app.exception_handler(ValueError)
    def invalid(request: Request, exc: ValueError):  # the library's user errors (too long, dead feature, ...)
        return _error(request, 422, str(exc))

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException):
        return _error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    def validation(request: Request, exc: RequestValidationError):
        if _is_api(request) or request.method != "GET":
            # type/loc/msg only: the offending input is not echoed back
            errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
            return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)
        return _error(request, 422, "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors()))


def create_app(run_dir=None, *, db=None, sae=None, model=None, config: ServerConfig | None = None,
               diff=None) -> FastAPI:
    """The app for one run folder (``sae/``, ``features.db``, ``eval.json``), or for ``db`` (+ ``sae``).

    ``sae`` and ``model`` may be paths/names or already-loaded objects (an :class:`saelab.SAE`, a
    :class:`saelab.LoadedModel`); the model defaults to the one named in the SAE's provenance and is
    loaded on first use. ``config`` sets the bound host/port (checked against the Host header) and limits.
    ``diff``: a ``saelab diff`` report folder, shown at ``/diff`` (:mod:`saelab.web.diffview`).
    """
    config = config or ServerConfig()
    state = RunState.open(run_dir, db=db, sae=sae, model=model)
    static = load_static()
    app = FastAPI(title="saelab", version="0.1.0", docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  description="Feature browser and JSON API for one SAE: features, map, inspect, steer, monitor.")
    app.state.run = state
    app.state.config = config
    app.state.gate = ModelGate(config.queue_limit, config.queue_timeout_s)
    app.state.diff = diffview.load_diff(diff) if diff is not None else None
    app.add_middleware(GuardMiddleware, config=config)
    _install_errors(app)
    app.include_router(api.router)
    app.include_router(live.router)
    app.include_router(pages.router)
    app.include_router(diffview.router)

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str):
        if name not in static:
            raise HTTPException(404, f"no static file {name!r}")
        body, ctype = static[name]
        return Response(body, media_type=ctype, headers={"cache-control": "public, max-age=3600"})

    return app


def serve(app: FastAPI, config: ServerConfig) -> None:
    """Run ``app`` with uvicorn on ``config.host:config.port`` until Ctrl-C (warns when not on loopback).

    The SAE and model are loaded first, so that the first inspect or steer request is not the slow one.
    """
    import sys

    import uvicorn

    warning = config.exposure_warning()
    if warning:
        print(f"saelab: {warning}", file=sys.stderr)
    problem = app.state.run.warm()
    if problem:
        print(f"saelab: warning: {problem}; browsing works, inspect/steer/monitor will not", file=sys.stderr)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", server_header=False,
                proxy_headers=False, limit_concurrency=64, timeout_keep_alive=5)
