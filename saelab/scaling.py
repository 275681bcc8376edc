"""Scaling laws of a sweep: held-out FVU (and CE recovered) against latents, training compute and k, with
fitted power laws L(N) = a·N^(-b) + c and their standard errors, as a report (HTML, PNG, JSON).

Each member's numbers are what earlier stages recorded: the held-out FVU that training measured
(saelab.json ``held_out``) and CE recovered from the member's ``eval.json`` (``saelab eval``); only what
is missing is computed (``ce=True`` runs :func:`saelab.evaluate.evaluate` and saves eval.json as ``saelab
eval`` does).

Training compute (FLOPs, multiply-add = 2) per member, counted per token trained:

- topk/batchtopk: 2·d_in·d_sae (the dense encoder product, the only dense one) + 6·d_in·k (decoder forward,
  decoder and encoder gradients on the k kept latents) + 4·d_in·k_aux (AuxK decode and its gradient);
  the sparse step never forms a dense (batch, d_sae) gradient, so this is what it computes.
- relu/jumprelu: 12·d_in·d_sae (6 × the 2·d_in·d_sae weights: forward, and a backward of twice its cost).
- matryoshka_batchtopk: the dense 12·d_in·d_sae plus AuxK's 4·d_in·k_aux.

Each count is its architecture's ``flops_per_token`` (:mod:`saelab.arch`).

Adam's per-step update (about 10 FLOPs per weight, divided by the batch) and the sort of TopK are left
out: both are below 1% at the batch sizes used.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from saelab import arch as architectures
from saelab.evaluate import evaluate
from saelab.formats import load_sae
from saelab.models import load_model
from saelab.provenance import Provenance, stage_inputs
from saelab.report import Series, Table, plot_png, write_report
from saelab.session import check_members
from saelab.stage_config import EvalConfig
from saelab.store import ActivationStore
from saelab.sweep import load_sweep
from saelab.trainer import heldout_stats


class Fit(NamedTuple):
    """L(N) = a·N^(-b) + c fitted by least squares, with standard errors (None when not estimable)."""

    a: float
    b: float
    c: float
    a_se: float | None
    b_se: float | None
    c_se: float | None
    rmse: float
    """Root mean squared residual."""
    n: int
    """Points fitted."""
    at_bound: bool = False
    """b ended at the edge of its search range (0 or b_max): the points do not follow a decreasing power law."""

    def __call__(self, x) -> np.ndarray:
        return self.a * np.asarray(x, dtype=np.float64) ** (-self.b) + self.c

    def to_json(self) -> dict:
        return {k: (None if v is None or not math.isfinite(v) else v) for k, v in self._asdict().items()}


def _linear(x: np.ndarray, y: np.ndarray, b: float) -> tuple[float, float, float]:
    """Best (a, c) for a fixed ``b`` (linear least squares) and the sum of squared residuals."""
    A = np.stack([x ** (-b), np.ones_like(x)], 1)
    (a, c), *_ = np.linalg.lstsq(A, y, rcond=None)
    r = A @ np.array([a, c]) - y
    return float(a), float(c), float(r @ r)


def fit_power_law(x: Sequence[float], y: Sequence[float], b_max: float = 4.0) -> Fit:
    """Fit y = a·x^(-b) + c: b by a profile search (a and c by linear least squares for each b: a 1-d problem
    with no starting guess to get wrong), then standard errors from the Jacobian at the optimum,
    s²·(JᵀJ)⁻¹ with s² = SSE/(n−3). With 3 points the fit is exact and the errors are None; with 4 or 5 they
    rest on 1-2 degrees of freedom and are rough. x is scaled by its geometric mean for conditioning."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(f"a power law a·N^(-b) + c needs at least 3 points (N, L); got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0)):
        raise ValueError("power-law fit: every N must be positive and every L finite")
    if len(set(x.tolist())) < 3:
        raise ValueError("power-law fit: needs at least 3 distinct N")
    x0 = float(np.exp(np.log(x).mean()))
    u = x / x0
    grid = np.linspace(1e-4, b_max, 400)
    sse = np.array([_linear(u, y, b)[2] for b in grid])
    i = int(np.argmin(sse))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for _ in range(60):                          # golden-section search inside the bracketing grid cells
        m1, m2 = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if _linear(u, y, m1)[2] < _linear(u, y, m2)[2]:
            hi = m2
        else:
            lo = m1
    b = 0.5 * (lo + hi)
    a_u, c, sse_b = _linear(u, y, b)
    n = len(x)
    ses: list[float | None] = [None, None, None]
    if n > 3:
        ub = u ** (-b)
        J = np.stack([ub, -a_u * ub * np.log(u), np.ones_like(u)], 1)      # d/d(a_u, b, c)
        cov_u = sse_b / (n - 3) * np.linalg.pinv(J.T @ J)
        # a = a_u·x0^b: carry the covariance over by the delta method
        G = np.array([[x0 ** b, a_u * x0 ** b * math.log(x0), 0.0], [0, 1, 0], [0, 0, 1]])
        cov = G @ cov_u @ G.T
        ses = [float(math.sqrt(max(v, 0.0))) for v in np.diag(cov)]
    at_bound = not grid[1] < b < grid[-2]
    return Fit(a_u * x0 ** b, b, c, *ses, rmse=math.sqrt(sse_b / n), n=n, at_bound=bool(at_bound))


# -- a sweep's members -------------------------------------------------------------------------------

def training_flops(arch: str, d_in: int, d_sae: int, k: int | None, k_aux: int | None, tokens: int) -> float:
    """Training FLOPs of one SAE (its architecture's count per token, :mod:`saelab.arch`)."""
    return architectures.get(arch).flops_per_token(d_in, d_sae, k, k_aux) * tokens


def member_rows(folder: str | Path, ce: bool = False, ce_tokens: int = 16_384, acts: str | None = None,
                device: str = "cpu") -> list[dict]:
    """One row per member of the sweep in ``folder``, smallest first: name, d_sae, k, fvu, flops and
    (when recorded, or computed with ``ce``) ce_recovered."""
    folder = Path(folder).expanduser()
    _, members = load_sweep(folder)
    saes = [load_sae(folder / m.path) for m in members]
    check_members([(m.name, folder / m.path) for m in members], saes, folder, "scaling laws")
    rows, models = [], {}
    for m, sae in zip(members, saes):
        path = folder / m.path
        prov = Provenance.of(sae)
        held = prov.held_out or (_heldout_from_store(sae, acts) if acts else None)
        if not held:
            raise ValueError(f"{path} records no held-out FVU (saelab.json 'held_out'): its store had no held-out "
                             "split; pass --acts STORE to evaluate it on that store's held-out rows")
        cfg = prov.train_config or {}
        tokens = int(prov.tokens_trained or cfg.get("tokens") or 0)
        row = {"name": m.name, "d_sae": sae.d_sae, "k": m.k, "fvu": float(held["fvu"]), "l0": held.get("l0"),
               "dead_fraction": held.get("dead_fraction"), "tokens": tokens,
               "flops": training_flops(m.arch, sae.d_in, sae.d_sae, m.k, cfg.get("k_aux"), tokens)}
        recovered = _recorded_ce(path)
        if recovered is None and ce:
            recovered = _evaluate_ce(sae, path, ce_tokens, device, models)
        if recovered is not None:
            row["ce_recovered"] = recovered
        rows.append(row)
    return rows


def _heldout_from_store(sae, acts: str) -> dict | None:
    cfg = Provenance.of(sae).train_config or {}
    store = ActivationStore.open(acts)
    frac, batch = cfg.get("heldout_fraction", 0.05), cfg.get("batch_size", 4096)
    if frac <= 0 or store.n_rows_in("heldout", frac) == 0:
        return None
    batches = store.batches(batch, split="heldout", heldout_fraction=frac, shuffle=False, epochs=1)
    try:
        return heldout_stats(sae, batches, cfg.get("eval_tokens", 262_144))
    finally:
        batches.close()


def _recorded_ce(path: Path) -> float | None:
    report = path / "eval.json"
    if not report.is_file():
        return None
    down = json.loads(report.read_text(encoding="utf-8")).get("downstream") or {}
    return down.get("ce_recovered_zero")


def _evaluate_ce(sae, path: Path, tokens: int, device: str, models: dict) -> float | None:
    """CE recovered as ``saelab eval`` computes it (and its eval.json saved the same way)."""
    run = stage_inputs(sae, split="validation")
    if run.model_name not in models:
        models[run.model_name] = load_model(run.model_name, device=device)
    report = evaluate(sae.to(device), models[run.model_name], run.corpus, config=EvalConfig(tokens=tokens),
                      name=str(path), progress=False)
    report.save(path)
    return report.downstream.ce_recovered_zero if report.downstream else None


# -- fits and report ---------------------------------------------------------------------------------

def fits(rows: list[dict]) -> dict[str, dict]:
    """Every fit the members allow: FVU vs latents and vs compute (a latents scan at each k), FVU vs k (a k
    scan at each width), and 1 − CE recovered on the same axes where every member has it."""
    out = {}
    for axis, fixed in (("d_sae", "k"), ("k", "d_sae")):
        for value in sorted({r[fixed] for r in rows}, key=lambda v: v or 0):
            group = [r for r in rows if r[fixed] == value]
            if len({r[axis] for r in group}) < 3:
                continue
            suffix = f"{fixed}={value}" if len({r[fixed] for r in rows}) > 1 else ""
            xs_names = [("latents", "d_sae"), ("compute", "flops")] if axis == "d_sae" else [("k", "k")]
            for label, key in xs_names:
                name = f"fvu_vs_{label}" + (f"@{suffix}" if suffix else "")
                out[name] = _fit(group, key, "fvu", [r["fvu"] for r in group])
                if all(r.get("ce_recovered") is not None for r in group):
                    name = f"ce_loss_vs_{label}" + (f"@{suffix}" if suffix else "")
                    out[name] = _fit(group, key, "1 - ce_recovered", [1 - r["ce_recovered"] for r in group])
    return out


def _fit(group: list[dict], key: str, y_name: str, ys: list) -> dict:
    """One power-law fit of ``ys`` against the members' ``key``; members without a usable value are named."""
    bad = [f"{r['name']} ({key} {r[key]}, {y_name} {y})" for r, y in zip(group, ys)
           if not (isinstance(r[key], (int, float)) and r[key] > 0 and isinstance(y, (int, float))
                   and math.isfinite(y) and math.isfinite(r[key]))]
    if bad:
        raise ValueError(f"cannot fit {y_name} against {key}: {', '.join(bad)} — {key} must be positive and "
                         f"{y_name} finite; re-evaluate or re-train those members (their held-out evaluation "
                         "gave no number)")
    return {"x": key, "y": y_name, "members": [r["name"] for r in group],
            **fit_power_law([r[key] for r in group], ys).to_json()}


def scaling(folder: str | Path, ce: bool = False, ce_tokens: int = 16_384, acts: str | None = None,
            device: str = "cpu", out: str | Path | None = None) -> dict:
    """Members, fits and the report (in ``out``, default ``folder/scaling``) of the sweep in ``folder``.

    Returns ``{"fit": the main fit (FVU vs latents, else vs k) or None, "fits": every fit, "members": rows,
    "report": the HTML path}``.
    """
    folder = Path(folder).expanduser()
    rows = member_rows(folder, ce=ce, ce_tokens=ce_tokens, acts=acts, device=device)
    all_fits = fits(rows)
    main_name = next((n for n in all_fits if n.startswith("fvu_vs_latents")), None) or \
        next((n for n in all_fits if n.startswith("fvu_vs_k")), None)
    main = {k: all_fits[main_name][k] for k in ("a", "b", "c", "a_se", "b_se", "c_se")} if main_name else None
    result = {"sweep": str(folder), "fit": main, "fit_name": main_name, "fits": all_fits, "members": rows}
    result["report"] = str(_report(folder, Path(out) if out else folder / "scaling", rows, all_fits, main_name, result))
    return result


def _report(folder: Path, out: Path, rows: list[dict], all_fits: dict, main_name: str | None, result: dict) -> Path:
    headers = ["member", "latents", "k", "held-out FVU", "L0", "dead", "tokens", "training FLOPs", "CE recovered"]
    table = Table("Members (smallest first)", headers,
                  [[r["name"], r["d_sae"], r["k"], r["fvu"], r["l0"], r["dead_fraction"], r["tokens"], r["flops"],
                    r.get("ce_recovered")] for r in rows])
    fit_rows = [[n, f["y"], f["x"], f["n"], _pm(f["a"], f["a_se"]), _pm(f["b"], f["b_se"]), _pm(f["c"], f["c_se"]),
                 f["rmse"]] for n, f in all_fits.items()]
    fit_table = Table("Fits L(N) = a·N^(-b) + c (± one standard error)", ["fit", "L", "N", "points", "a", "b", "c",
                                                                          "rms residual"], fit_rows)
    n = len(rows)
    summary = [f"{n} SAEs of the sweep {folder}. FVU is the held-out FVU recorded by training; training FLOPs "
               "follow the formula in saelab/scaling.py."]
    if main_name:
        f = all_fits[main_name]
        summary.append(f"Main fit ({main_name}): L(N) = {f['a']:.4g}·N^(-{f['b']:.4g}) + {f['c']:.4g}.")
        if f["at_bound"]:
            summary.append(f"The exponent ended at the edge of its search range (b = {f['b']:.3g}): these points "
                           "do not follow a power law that falls with N; read the fit with care.")
        if f["n"] <= 5:
            summary.append(f"Only {f['n']} points for 3 parameters: " + ("the fit is exact and has no error "
                           "estimate." if f["n"] == 3 else f"the standard errors rest on {f['n'] - 3} degree(s) of "
                           "freedom and are rough."))
    else:
        summary.append("No fit: a power law needs at least 3 members that differ in latents (or in k).")
    png = None
    if main_name:
        f = all_fits[main_name]
        pts = [r for r in rows if r["name"] in f["members"]]
        xs = [float(r[f["x"]]) for r in pts]
        grid = np.geomspace(min(xs), max(xs), 60)
        model = Fit(**{k: f[k] for k in Fit._fields})
        series = [Series("held-out FVU", xs, [r["fvu"] for r in pts], style="points"),
                  Series(f"fit {f['a']:.3g}·N^-{f['b']:.3g} + {f['c']:.3g}", grid.tolist(), model(grid).tolist(),
                         style="curve")]
        png = plot_png(series, "latents" if f["x"] == "d_sae" else f["x"], "held-out FVU",
                       title=f"{folder.parent.name}/{folder.name}: {main_name}", log=True)
    command = "saelab scaling " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["scaling"] \
        else f"saelab scaling {shlex.quote(str(folder))}"
    return write_report(out, f"Scaling: {folder.parent.name}/{folder.name}", summary, [table, fit_table], png,
                        {k: v for k, v in result.items() if k != "report"}, command)


def _pm(v: float, se: float | None) -> str:
    return f"{v:.4g}" if se is None else f"{v:.4g} ± {se:.2g}"
