"""The JSON API under /api/: the data behind every page, for scripts as much as for the browser.

Read-only queries go straight to features.db. Anything that runs the model (inspect, steer, monitor)
goes through the app's :class:`~saelab.web.guard.ModelGate`: one call at a time, a bounded queue,
503 when busy. Feature ids are the only thing a request can point at.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from saelab.generation import MIN_TEMPERATURE
from saelab.fmap import neighbourhood_map
from saelab.web.state import RunState, train_curve

router = APIRouter(prefix="/api")
MAX_TOP = 32
MAX_WATCH = 64
DIAL_RANGE = (-10.0, 20.0)
# Every number a request carries is bounded, so none reaches SQLite (64-bit integers) or sampling out of range.
MAX_ID = 2**31 - 1             # feature ids and clusters
MAX_OFFSET = 10_000_000


class _Body(BaseModel):
    """Request bodies: NaN and ±inf are refused (Python's JSON reader accepts them)."""

    model_config = ConfigDict(allow_inf_nan=False)


class InspectRequest(_Body):
    text: str = Field(min_length=1, description="text to run through the model (capped by the server's limit)")
    top: int = Field(8, ge=1, le=MAX_TOP, description="features listed per token")
    chat: bool = Field(False, description="read the text as a user message in the model's chat template "
                                          "(its BOS is not doubled)")


class ActivationsRequest(_Body):
    text: str = Field(min_length=1, description="text to run through the model (capped by the server's limit)")
    chat: bool = Field(False, description="read the text as a user message in the model's chat template "
                                          "(its BOS is not doubled)")


class SteerFeature(_Body):
    id: int = Field(ge=0, le=MAX_ID, description="feature id")
    value: float = Field(10.0, ge=DIAL_RANGE[0], le=DIAL_RANGE[1], description="dial: multiple of the max activation")
    mode: Literal["clamp", "add", "ablate"] = Field("clamp", description="clamp z_f := v·max, add v·max·W_dec[f], or ablate")


class SteerConcept(_Body):
    features: list[int] = Field(min_length=1, description="the concept's feature ids (e.g. from `saelab concept`)")
    value: float = Field(1.5, ge=DIAL_RANGE[0], le=DIAL_RANGE[1], description="one dial for all: × each one's max act")
    mode: Literal["clamp", "add", "ablate"] = Field("clamp", description="how the dial is applied to every feature")
    unit: Literal["max", "norm"] = Field("max", description="add: × each feature's max activation, or × the residual "
                                                            "norm along the set's normalised direction")


class SteerRequest(_Body):
    prompt: str = Field(min_length=1, description="prompt to continue")
    features: list[SteerFeature] = Field(default_factory=list, description="the dials")
    concept: SteerConcept | None = Field(None, description="a feature set turned by one dial, beside the dials")
    chat: bool = Field(False, description="read the text as a user message in the model's chat template "
                                          "(its BOS is not doubled)")
    max_new_tokens: int = Field(40, ge=1, le=MAX_ID, description="tokens to generate (capped by the server's limit)")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description=f"0 is greedy; else at least {MIN_TEMPERATURE}")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="sampling seed, the same for both continuations")

    @field_validator("temperature")
    @classmethod
    def _not_underflowing(cls, t: float) -> float:
        if 0.0 < t < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return t


class WatchItem(_Body):
    feature: int = Field(ge=0, le=MAX_ID, description="feature id")
    threshold: float | None = Field(None, description="alert above this activation; null for the feature's default")


class ScanRequest(_Body):
    text: str = Field(min_length=1, description="text to scan")
    watch: list[WatchItem] = Field(min_length=1, max_length=MAX_WATCH, description="the watchlist")


def check_text(request: Request, text: str, what: str = "text") -> None:
    limit = request.app.state.config.max_prompt_chars
    if len(text) > limit:
        raise HTTPException(422, f"the {what} is {len(text)} characters; this server accepts at most {limit}")


# -- overview and features -------------------------------------------------------------------------

SAE_KEYS = ("architecture", "d_in", "d_sae", "k", "tokens_trained", "trained_architecture", "input_scale")
MODEL_KEYS = ("model_name", "hook_name", "hf_hook_name", "hook_io", "context_size")


def overview_info(state: RunState) -> dict:
    """Model, hook, SAE config, eval report, training curve and density histogram in one dict."""
    info = state.db.sae_info()
    sae_desc = {"d_sae": info.get("d_sae", state.db.n_features), "d_in": info.get("d_in")}
    model = {k: info.get(k) for k in MODEL_KEYS if info.get(k) is not None}
    if state.has_sae:
        sae = state.sae()
        prov = sae.provenance   # the whole training record (saelab.json): shown, not interpreted
        sae_desc.update({"architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                         "k": sae.cfg.k})
        sae_desc.update({k: prov[k] for k in SAE_KEYS if k in prov and k not in sae_desc})
        model.update({k: v for k, v in {**sae.cfg.metadata, **prov}.items() if k in MODEL_KEYS})
    sae_desc.update({"tokens_analysed": info.get("tokens_analysed")})
    return {"model": model, "sae": {k: v for k, v in sae_desc.items() if v is not None}, "eval": state.eval,
            "train_curve": train_curve(state.train_rows), "density_histogram": state.density_histogram()}


def feature_list(state: RunState, *, q: str = "", order_by: str = "density", cluster=None, min_density=None,
                 max_density=None, offset: int = 0, limit: int = 50) -> list[dict]:
    """A page of features; with ``q``, full-text matches (best first) filtered the same way."""
    if not q.strip():
        return state.db.features(order_by=order_by, cluster=cluster, offset=offset, limit=limit,
                                 min_density=min_density, max_density=max_density)
    hits = state.db.search(q, limit=offset + limit + 500)
    keep = [h for h in hits if (cluster is None or h["cluster"] == cluster)
            and (min_density is None or h["density"] >= min_density)
            and (max_density is None or h["density"] <= max_density)]
    return keep[offset: offset + limit]


def _histogram(h: dict) -> dict:
    edges, counts = h["edges"], h["counts"]
    if not counts:
        return {"centers": [], "widths": [], "counts": [], "zeros": h["zeros"], "log_x": False}
    log_x = edges[0] > 0
    centers = [(a * b) ** 0.5 if log_x else (a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    return {"centers": centers, "widths": [b - a for a, b in zip(edges[:-1], edges[1:])], "counts": counts,
            "zeros": h["zeros"], "log_x": log_x}


def explanations(state: RunState, ids) -> dict[int, str]:
    return state.db.explanations(ids)


def feature_detail(state: RunState, i: int) -> dict:
    page = state.db.page(i)  # KeyError → 404
    return {**page, "histogram": _histogram(page["histogram"]), "family": state.family(i)}


@router.get("/info", summary="Model, hook, SAE, eval metrics, training curve, density histogram")
def api_info(request: Request):
    return overview_info(request.app.state.run)


@router.get("/features", summary="Search (full text), sort, filter and page features")
def api_features(request: Request, q: str = Query("", max_length=200),
                 order_by: Literal["density", "max_act", "mean_act", "score", "id"] = "density",
                 cluster: int | None = Query(None, ge=-MAX_ID, le=MAX_ID),
                 min_density: float | None = Query(None, ge=0, le=1), max_density: float | None = Query(None, ge=0, le=1),
                 offset: int = Query(0, ge=0, le=MAX_OFFSET), limit: int = Query(50, ge=1, le=500)):
    state = request.app.state.run
    rows = feature_list(state, q=q, order_by=order_by, cluster=cluster, min_density=min_density,
                        max_density=max_density, offset=offset, limit=limit)
    total = None if q.strip() else state.db.count(cluster, min_density, max_density)
    return {"features": rows, "offset": offset, "total": total}


@router.get("/features/{feature_id}", summary="A feature's page: examples, histogram, logit effects, neighbours")
def api_feature(request: Request, feature_id: int = Path(ge=0, le=MAX_ID)):
    return feature_detail(request.app.state.run, feature_id)


@router.get("/features/{feature_id}/summary", summary="A feature's row (explanation, density, max act, ...)")
def api_feature_summary(request: Request, feature_id: int = Path(ge=0, le=MAX_ID)):
    return request.app.state.run.db.feature(feature_id)


@router.get("/map", summary="Every feature's map position as columns: ids, x, y, cluster, density "
                            "(and family relations when the SAE is a member of a sweep with families.json)")
def api_map(request: Request):
    return Response(request.app.state.run.map_json(), media_type="application/json")


@router.get("/map/neighbourhood/{feature_id}", summary="A feature and its nearest features, laid out locally")
def api_neighbourhood(request: Request, feature_id: int = Path(ge=0, le=MAX_ID), n: int = Query(30, ge=1, le=200)):
    state = request.app.state.run
    state.db.feature(feature_id)  # 404 for unknown ids before any work
    pts = neighbourhood_map(state.sae() if state.has_sae else state.db, feature_id, n)
    ids = [p[0] for p in pts]
    names = explanations(state, ids)
    return {"center": feature_id, "ids": ids, "x": [p[1] for p in pts], "y": [p[2] for p in pts],
            "similarity": [p[3] for p in pts], "explanations": [names[i] for i in ids]}
