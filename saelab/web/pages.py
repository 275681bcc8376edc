"""HTML pages. Jinja2 autoescapes every value; template names are constants, never from a request."""

from __future__ import annotations

import math
from pathlib import Path
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from saelab.conceptfile import load_concept
from saelab.featuredb import ORDER_BY
from saelab.web.api import feature_detail, feature_list, overview_info
from saelab.web.apidoc import operations, schemas

TEMPLATES = Path(__file__).parent / "templates"
PAGE_SIZE = 50
DEFAULT_TEXT = "import subprocess\n\ndef run(cmd):\n    return subprocess.call(cmd, shell=True)\n"
DIAL_MIN, DIAL_MAX = -10, 20
# A dial's starting strength (× max activation). 10× usually wrecks a small model's text (empty or repeated
# output); 1.5× clamps the feature a little above anything seen in the corpus and keeps the text readable.
DEFAULT_DIAL = 1.5
CHAT_PROMPTS = ["What is a good way to spend a rainy afternoon?", "What are you?", "Can you suggest a name for my cat?",
                "I wrote my first poem today. What do you think I should write about next?"]
"""Example user messages of the steer page for a chat model (its default prompt is the first)."""

env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                         undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
env.filters["visible"] = lambda t: str(t).replace(" ", "·").replace("\n", "↵").replace("\t", "⇥") or "∅"
router = APIRouter(include_in_schema=False)


def render(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    state = request.app.state.run
    html = env.get_template(name).render(run_label=state.label, active=context.pop("active", ""),
                                         page_title=context.pop("page_title", ""), **context)
    return HTMLResponse(html, status_code=status)


def fmt(value, spec: str = ".4g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


# -- overview --------------------------------------------------------------------------------------

def _flat_rows(section: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in section.items():
        if isinstance(value, dict):
            continue
        if isinstance(value, (int, float, str, bool)) or value is None:
            rows.append((prefix + key, fmt(value)))
    return rows


def eval_rows(report: dict | None) -> list[tuple[str, str]]:
    """The headline metrics of eval.json first, then every other scalar, section by section."""
    if not report:
        return []
    rows = []
    for section in ("reconstruction", "sparsity", "downstream", "self_check"):
        if isinstance(report.get(section), dict):
            rows += _flat_rows(report[section], f"{section}.")
    skip = {"reconstruction", "sparsity", "downstream", "self_check", "definitions"}
    return rows + _flat_rows({k: v for k, v in report.items() if k not in skip})


def _num(report: dict, section: str, key: str):
    value = (report.get(section) or {}).get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def eval_summary(report: dict | None) -> list[tuple[str, str, str]]:
    """The headline metrics of eval.json in words: (name, value, what it means here)."""
    if not report:
        return []
    out = []
    tokens = _num(report, "reconstruction", "tokens")
    over = f" over {tokens:,} held-out tokens" if tokens else ""
    fvu = _num(report, "reconstruction", "fvu")
    if fvu is not None:
        out.append(("FVU", f"{fvu:.3f}", f"the reconstruction leaves {fvu:.1%} of the activations' variance "
                                         f"unexplained{over} (0 is perfect)"))
    rec, clean, spliced = (_num(report, "downstream", k) for k in ("ce_recovered_zero", "ce_clean", "ce_spliced"))
    if rec is not None:
        loss = f" (loss {clean:.3f} → {spliced:.3f} nats)" if clean is not None and spliced is not None else ""
        said = (f"recovers {rec:.1%} of that rise" if rec >= 0 else "raises it even more (worse than zeroing)")
        out.append(("CE recovered", f"{rec:.3f}", f"zeroing this activation would raise the next-token loss; "
                                                  f"splicing in the SAE's reconstruction instead {said}{loss}"))
    l0, d_sae = _num(report, "sparsity", "l0"), _num(report, "sparsity", "d_sae")
    if l0 is not None:
        of = f" (of {d_sae:,})" if d_sae else ""
        out.append(("L0", f"{l0:.1f}", f"features active per token on average{of}"))
    dead = _num(report, "sparsity", "dead")
    if dead is not None and d_sae:
        out.append(("dead", f"{dead:,}", f"of {d_sae:,} features ({dead / d_sae:.1%}) never fired{over}"))
    return out


@router.get("/", response_class=HTMLResponse)
def overview(request: Request):
    info = overview_info(request.app.state.run)
    model_rows = [(k, fmt(info["model"].get(k))) for k in ("model_name", "family", "hook_name", "hook_io",
                                                            "context_size") if info["model"].get(k) is not None]
    sae_rows = [(k, fmt(v)) for k, v in info["sae"].items() if not isinstance(v, (dict, list))]
    hist = info["density_histogram"]
    return render(request, "overview.html", active="Overview", page_title="Overview", model_rows=model_rows,
                  sae_rows=sae_rows, eval_rows=eval_rows(info["eval"]),
                  eval_words=eval_summary(info["eval"]), has_train_log=info["train_curve"] is not None,
                  n_features=info["sae"].get("d_sae"), n_dead=hist["dead"],
                  plot_data={"train": info["train_curve"], "density": hist})


# -- features ------------------------------------------------------------------------------------

def _row(f: dict) -> dict:
    return {**f, "score_text": fmt(f.get("score"), ".2f"), "density_text": fmt(f.get("density"), ".3g"),
            "max_act_text": fmt(f.get("max_act"), ".3g")}


ORDER_LABELS = {"score": "explanation score", "density": "density", "max_act": "max activation",
                "mean_act": "mean activation", "id": "id"}
DEFAULT_ORDER = "score"  # readable features first: by density, "fires on diverse tokens" would lead


@router.get("/features", response_class=HTMLResponse)
def features_page(request: Request, q: str = Query("", max_length=200), order_by: str = DEFAULT_ORDER,
                  cluster: str = "", min_density: str = "", max_density: str = "",
                  offset: int = Query(0, ge=0, le=10_000_000)):
    # Empty form fields arrive as "", so the optional numbers are parsed here (422 on junk).
    filters = {"cluster": _opt(cluster, int, "cluster"), "min_density": _opt(min_density, float, "min_density"),
               "max_density": _opt(max_density, float, "max_density")}
    order_by = order_by if order_by in ORDER_BY else DEFAULT_ORDER
    state = request.app.state.run
    rows = feature_list(state, q=q, order_by=order_by, offset=offset, limit=PAGE_SIZE + 1, **filters)
    more = len(rows) > PAGE_SIZE
    if q.strip():
        total = len(feature_list(state, q=q, limit=10_000, **filters))
    else:
        total = state.db.count(**filters)
    params = {"q": q, "order_by": order_by, "cluster": cluster, "min_density": min_density, "max_density": max_density}
    params = {k: v for k, v in params.items() if v not in ("", None)}
    page = lambda o: "/features?" + urlencode({**params, "offset": o})  # noqa: E731
    return render(request, "features.html", active="Features", page_title="Features", q=q,
                  orders=[(o, ORDER_LABELS.get(o, o)) for o in ORDER_BY], order_by=order_by, total=total,
                  order_label=ORDER_LABELS.get(order_by, order_by), offset=offset,
                  rows=[_row(f) for f in rows[:PAGE_SIZE]], **filters,
                  prev_url=page(max(0, offset - PAGE_SIZE)) if offset > 0 else None,
                  next_url=page(offset + PAGE_SIZE) if more else None)


def _opt(value: str, cast, name: str):
    from fastapi import HTTPException

    if value.strip() == "":
        return None
    try:
        return cast(value)
    except ValueError:
        raise HTTPException(422, f"{name} must be a number, got {value!r}") from None


def _tokens(ex: dict, max_act: float) -> list[dict]:
    peak = ex.get("max_pos")
    return [{"lines": t.split("\n"), "alpha": f"{min(1.0, max(0.0, a / max_act)) if max_act > 0 else 0.0:.3f}",
             "title": f"{a:.3f}" if a > 0 else "", "peak": i == peak}
            for i, (t, a) in enumerate(zip(ex["tokens"], ex["acts"]))]


def _examples(examples: list[dict], kind: str, max_act: float) -> list[dict]:
    out = []
    for ex in examples:
        label = f"q{ex['quantile']:.2f}" if kind == "quantile" and ex.get("quantile") is not None else ""
        out.append({"label": label, "act": f"{ex['max_act']:.2f}", "tokens": _tokens(ex, max_act)})
    return out


def density_percentile(densities, density: float) -> float | None:
    """Percent of the features that fired whose density is below ``density`` (None for a dead feature)."""
    live = densities[densities > 0]
    if density <= 0 or live.size == 0:
        return None
    return 100.0 * float((live < density).sum()) / live.size


@router.get("/features/{feature_id}", response_class=HTMLResponse)
def feature_page(request: Request, feature_id: int):
    state = request.app.state.run
    d = feature_detail(state, feature_id)
    f, ex = d["feature"], d["examples"]
    pct = density_percentile(state.stats()["density"], f["density"])
    stats = [("density", fmt(f["density"], ".3g")),
             ("density percentile", f"denser than {pct:.0f}% of live features" if pct is not None else "never fired"),
             ("max act", fmt(f["max_act"], ".3g")), ("mean act", fmt(f["mean_act"], ".3g")),
             ("fired on", f"{f['count']:,} tokens"), ("score", fmt(f.get("score"), ".2f")),
             ("cluster", fmt(f.get("cluster"))), ("explained by", f.get("explanation_source") or "–")]
    max_act = float(f["max_act"] or 0)
    example_sets = [("Top activations", "top", _examples(ex["top"], "top", max_act)),
                    ("Across the activation range", "quantile", _examples(ex["quantile"], "quantile", max_act)),
                    ("Random firings", "random", _examples(ex["random"], "random", max_act))]
    neighbour_sets = [("Nearest by decoder direction", [{**n, "value_text": f"cos {n['value']:.3f}"}
                                                        for n in d["neighbours"]["decoder"]]),
                      ("Fire together", [{**n, "value_text": f"J {n['value']:.3f}"} for n in d["neighbours"]["coact"]])]
    return render(request, "feature.html", active="Features", page_title=f"Feature {feature_id}", f=f, stats=stats,
                  example_sets=example_sets, logits=d["logit_effects"], logit_note=state.db.logit_effects_note(),
                  neighbour_sets=neighbour_sets,
                  family=family_rows(d["family"]),
                  can_run=state.has_sae, max_chars=request.app.state.config.max_prompt_chars,
                  plot_data={"histogram": d["histogram"], "feature": f["id"], "max_act": max_act})


RELATION_WORDS = {"persist": "persists", "split": "splits", "new": "is new", "vanished": "vanishes"}


def _match(m: dict) -> dict:
    text = f"cos {fmt(m['cos'], '.2f')} · ρ {fmt(m['co'], '.2f')} · s {fmt(m['score'], '.2f')}"
    return {"id": m["id"], "text": text}


def family_rows(fam: dict | None) -> dict | None:
    """The feature page's family box: its parent in the next-smaller SAE, its children in the next-larger."""
    if fam is None:
        return None
    out = {"size": fam["size"], "up": None, "down": None}
    if fam["smaller"] is not None:
        rel = fam["relation"]
        said = {"persist": "persists from", "split": "split off from", "new": "has no parent in"}[rel]
        out["up"] = {"size": fam["smaller"]["name"], "relation": rel, "words": said, "coverage": "",
                     "matches": [_match(fam["parent"])] if fam["parent"] else []}
    if fam["larger"] is not None:
        rel = fam["child_relation"]
        said = {"persist": "persists into", "split": "splits into", "vanished": "has no child in"}[rel]
        cover = fam.get("coverage")
        out["down"] = {"size": fam["larger"]["name"], "relation": rel, "words": said,
                       "coverage": f"children fire under {cover:.0%} of its activation" if cover is not None and
                       fam["children"] else "", "matches": [_match(c) for c in fam["children"]]}
    return out


# -- interactive pages ---------------------------------------------------------------------------

@router.get("/map", response_class=HTMLResponse)
def map_page(request: Request, feature: int | None = Query(None, ge=0), around: int | None = Query(None, ge=0)):
    return render(request, "map.html", active="Map", page_title="Map", focus=feature if around is None else around,
                  around=around)


@router.get("/inspect", response_class=HTMLResponse)
def inspect_page(request: Request):
    cfg = request.app.state.config
    return render(request, "inspect.html", active="Inspect", page_title="Inspect", max_chars=cfg.max_prompt_chars,
                  max_top=32, default_text=DEFAULT_TEXT)


@router.get("/steer", response_class=HTMLResponse)
def steer_page(request: Request, feature: list[int] = Query([]), concept: str = "", strength: float = 1.5,
               concept_file: str = ""):
    cfg, state = request.app.state.config, request.app.state.run
    concept_ids = ",".join(c for c in (x.strip() for x in concept.split(",")) if c.isdigit())
    start = [{"id": f, "value": DEFAULT_DIAL, "mode": "clamp"} for f in feature[: cfg.max_steer_features] if f >= 0]
    loaded, notice = concept_from_file(state, concept_file)
    mode, unit, calibrated = "clamp", "max", None
    if loaded is not None:
        concept_ids, mode, unit = ",".join(map(str, loaded.features)), loaded.mode, loaded.unit
        strength = calibrated = loaded.strength
    chat = is_chat_model(state)
    return render(request, "steer.html", active="Steer", page_title="Steer", max_chars=cfg.max_prompt_chars,
                  default_prompt=CHAT_PROMPTS[0] if chat else "def run(cmd):\n", chat_default=chat,
                  example_prompts=CHAT_PROMPTS if chat else [], default_tokens=min(40, cfg.max_new_tokens),
                  max_new_tokens=cfg.max_new_tokens, start_features=start, dial_min=DIAL_MIN, dial_max=DIAL_MAX,
                  dial_default=DEFAULT_DIAL, concept_features=concept_ids, concept_mode=mode, concept_unit=unit,
                  concept_value=min(max(strength, DIAL_MIN), DIAL_MAX), calibrated=calibrated,
                  concept_name=loaded.name if loaded else "", concept_notice=notice)


def is_chat_model(state) -> bool:
    """Whether the run's model has a chat template (its tokenizer is loaded at server start)."""
    try:
        return bool(getattr(state.model().tokenizer, "chat_template", None))
    except Exception:  # no model (browse-only server): the plain-text page
        return False


def concept_from_file(state, name: str):
    """(concept file RUN/concepts/NAME.json or None, a notice for the page): refused when made for another SAE or
    when its dial is a plain vector (the page turns SAE features)."""
    if not name:
        return None, ""
    if not name.replace("-", "").replace("_", "").isalnum():
        return None, f"concept {name!r}: a concept name is letters, digits, - and _"
    path = state.db_path.parent / "concepts" / f"{name}.json"
    try:
        concept = load_concept(path, state.sae())
    except (OSError, ValueError) as e:
        return None, str(e)
    if concept.mode == "vector":
        return None, f"{path.name} is a plain direction (difference of means): use 'saelab chat' or 'saelab steer'"
    return concept, ""


@router.get("/monitor", response_class=HTMLResponse)
def monitor_page(request: Request):
    cfg = request.app.state.config
    return render(request, "monitor.html", active="Monitor", page_title="Monitor", max_chars=cfg.max_prompt_chars,
                  default_text=DEFAULT_TEXT)


@router.get("/docs", response_class=HTMLResponse)
def docs_page(request: Request):
    """The OpenAPI schema as a plain page (FastAPI's Swagger UI loads its assets from a CDN)."""
    spec = request.app.openapi()
    return render(request, "docs.html", active="API", page_title="API", openapi_version=spec.get("openapi", ""),
                  operations=operations(spec), schemas=schemas(spec))
