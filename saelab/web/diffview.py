"""``saelab serve RUN --diff DIR``: a model diff (the ``results.json`` of ``saelab diff``) in the browser.

``/diff`` lists the features by change (rising, falling, appeared, vanished), each linked to its feature
page; ``/api/diff`` returns the same rows as JSON. The diff is read once at start-up and never written.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse

from saelab.errors import SaelabError
from saelab.web.pages import fmt, render

ORDERS = {"rising": "rose most", "falling": "fell most", "appear": "appeared", "vanish": "vanished"}
router = APIRouter()


def load_diff(folder: Path | str) -> dict:
    """The ``results.json`` of a ``saelab diff`` report folder, checked for the keys the view reads."""
    file = Path(folder) / "results.json"
    try:
        res = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SaelabError(f"{file}: not a readable diff ({e}); make one with 'saelab diff BASE TUNED ... --out "
                          f"{folder}'") from None
    if not isinstance(res, dict) or not all(k in res for k in ("rising", "falling", "base", "tuned")):
        raise SaelabError(f"{file}: not the results.json of 'saelab diff' (no rising/falling features)")
    return res


def diff_rows(res: dict, order: str) -> list[dict]:
    """The features of one list, best first, with what the page shows."""
    if order in ("rising", "falling"):
        rows = res[order]
    else:
        by_id = {r["feature"]: r for r in res["rising"] + res["falling"]}
        rows = [by_id.get(f, {"feature": f}) for f in res.get(order, [])]
    labels = res.get("labels", {})
    return [{**r, "label": labels.get(str(r["feature"]), ""),
             "score_text": fmt(r.get("score"), ".3g"),
             "ci_text": f"{fmt(r['score_ci'][0], '.3g')} – {fmt(r['score_ci'][1], '.3g')}" if "score_ci" in r else "–",
             "rate_text": f"{fmt(r.get('rate_base'), '.3g')} → {fmt(r.get('rate_tuned'), '.3g')}"} for r in rows]


def _diff(request: Request) -> dict:
    res = getattr(request.app.state, "diff", None)
    if res is None:
        raise HTTPException(404, "no diff loaded: start the server with 'saelab serve RUN --diff DIFF_DIR'")
    return res


@router.get("/api/diff")
def diff_api(request: Request, order: str = Query("rising", pattern="^(rising|falling|appear|vanish)$")):
    res = _diff(request)
    return {"base": res["base"], "tuned": res["tuned"], "order": order, "features": diff_rows(res, order),
            "concepts": res.get("concepts", []), "baselines": res.get("baselines", {}), "fit": res.get("fit", {})}


@router.get("/diff", response_class=HTMLResponse, include_in_schema=False)
def diff_page(request: Request, order: str = Query("rising", pattern="^(rising|falling|appear|vanish)$")):
    res = _diff(request)
    return render(request, "diff.html", active="Diff", page_title="Diff", res=res, order=order, orders=ORDERS,
                  rows=diff_rows(res, order))
