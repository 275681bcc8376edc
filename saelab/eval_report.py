"""What an evaluation reports: the report's parts, ``eval.json``, and a side-by-side table.

:class:`EvalReport` and its sections are plain dataclasses; ``to_json`` writes them with the metric
:data:`DEFINITIONS` (NaN/inf as null), :func:`compare` lays several reports out as one text table.
Nothing here runs a model: the pass that fills a report is :func:`saelab.evaluate.evaluate`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from saelab.atomic import write_json

if TYPE_CHECKING:
    import torch

DEFINITIONS = {
    "mse": "mean over evaluated tokens and dimensions of (x - x_hat)^2",
    "fvu": "sum_t |x_t - x_hat_t|^2 / sum_t |x_t - x_mean|^2, x_mean = mean of x over the evaluated tokens",
    "cosine": "mean over tokens of cos(x_t, x_hat_t)",
    "relative_norm": "mean over tokens of |x_hat_t| / |x_t| (below 1: shrinkage)",
    "l0": "number of non-zero latents per token",
    "density": "fraction of evaluated tokens on which a feature is non-zero; dead: never, dense: > 10%",
    "ce": "mean next-token cross-entropy (nats) over every position but the last of each sequence",
    "mean_ablation": "the hook's activation replaced by x_mean (exact, from a first pass to the hook)",
    "ce_recovered": "(CE_ablated - CE_spliced) / (CE_ablated - CE_clean)",
    "delta_loss": "CE_spliced - CE_clean",
    "kl": "mean over positions of KL(p_clean || p_spliced) of next-token distributions (nats)",
    "error_splice": "x_hat + (x - x_hat) spliced in: must equal the clean run up to float error",
}


@dataclass
class Reconstruction:
    mse: float
    fvu: float
    explained_variance: float
    """1 − FVU."""
    cosine: float
    relative_norm: float
    tokens: int
    """Tokens the reconstruction and sparsity metrics are over (BOS excluded when trained without)."""


@dataclass
class Sparsity:
    l0: float
    """Mean L0 per token."""
    l0_std: float
    l0_quantiles: dict[str, int]
    """``p1``, ``p10``, ..., ``p99``, ``max`` of L0 per token."""
    d_sae: int
    dead: int
    dense: int
    dead_fraction: float
    dense_fraction: float
    log10_density_histogram: list[dict]
    """``{"lo", "hi", "count"}`` bins of log10(density) over the features that fired."""


@dataclass
class Downstream:
    ce_clean: float
    ce_spliced: float
    ce_zero_ablated: float
    ce_mean_ablated: float | None
    """None unless mean-ablation was asked for (``ablations=("zero", "mean")``, CLI ``--mean-ablation``)."""
    ce_recovered_zero: float | None
    """None when zero-ablation does not change CE (the ratio is undefined)."""
    ce_recovered_mean: float | None
    delta_loss: float
    kl_spliced: float
    predictions: int
    """Next-token predictions the CE and KL are averaged over."""


@dataclass
class SelfCheck:
    output: str
    """Which model output was compared: ``logits`` or ``last_hidden_state``."""
    max_abs_diff: float
    """max |output(error splice) − output(clean)|."""
    relative_diff: float
    """max_abs_diff / max |output(clean)|."""
    kl: float | None
    """KL(clean ‖ error splice); None without an LM head."""
    tolerance: float
    ok: bool


@dataclass
class EvalReport:
    """What :func:`saelab.evaluate.evaluate` found; ``to_json()`` is what ``eval.json`` holds."""

    sae: str
    model: str
    hook: str
    corpus: dict
    context: int
    tokens: int
    """Tokens run through the model."""
    seed: int
    exclude_bos: bool
    positions: dict
    """The positions left out (:class:`saelab.positions.PositionRule` and counts of BOS and sink positions)."""
    config: dict
    """The :class:`saelab.stage_config.EvalConfig` it ran with, whole."""
    reconstruction: Reconstruction
    sparsity: Sparsity
    downstream: Downstream | None
    self_check: SelfCheck
    unavailable: dict[str, str] = field(default_factory=dict)
    """Metric → why it could not be computed (e.g. no LM head)."""
    warnings: list[str] = field(default_factory=list)
    feature_density: torch.Tensor | None = field(default=None, repr=False)
    """``[d_sae]`` firing frequency per feature (not in the JSON: analysis stores it per feature)."""

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "feature_density"}
        out["definitions"] = dict(DEFINITIONS)
        return _finite(out)

    def save(self, folder: Path | str) -> Path:
        """Write ``eval.json`` into the SAE folder (atomically); returns its path."""
        path = Path(folder) / "eval.json"
        write_json(path, self.to_json())
        return path


def _finite(obj):
    """NaN/inf → None, so the JSON stays standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# -- the comparison table --------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _down(key: str, spec: str) -> Callable[[EvalReport], str]:
    return lambda r: _fmt(getattr(r.downstream, key), spec) if r.downstream else "n/a"


_ROWS: list[tuple[str, Callable[[EvalReport], str]]] = [
    ("model", lambda r: r.model),
    ("hook", lambda r: r.hook),
    ("d_sae", lambda r: f"{r.sparsity.d_sae:,}"),
    ("tokens (recon./sparsity)", lambda r: f"{r.reconstruction.tokens:,}"),
    ("left out: BOS / sinks", lambda r: f"{r.positions.get('excluded_bos', 0):,} / {r.positions.get('excluded_sinks', 0):,}"),
    ("FVU", lambda r: _fmt(r.reconstruction.fvu, ".4f")),
    ("MSE (per element)", lambda r: _fmt(r.reconstruction.mse, ".4g")),
    ("cosine(x, x_hat)", lambda r: _fmt(r.reconstruction.cosine, ".4f")),
    ("|x_hat| / |x|", lambda r: _fmt(r.reconstruction.relative_norm, ".4f")),
    ("L0 mean", lambda r: _fmt(r.sparsity.l0, ".2f")),
    ("L0 p10 / p50 / p90", lambda r: "{p10} / {p50} / {p90}".format(**r.sparsity.l0_quantiles)),
    ("dead (never fired)", lambda r: f"{r.sparsity.dead:,} ({r.sparsity.dead_fraction:.1%})"),
    ("dense (> 10% of tokens)", lambda r: f"{r.sparsity.dense:,} ({r.sparsity.dense_fraction:.1%})"),
    ("CE clean", _down("ce_clean", ".4f")),
    ("CE spliced", _down("ce_spliced", ".4f")),
    ("CE zero-ablated", _down("ce_zero_ablated", ".4f")),
    ("CE mean-ablated", _down("ce_mean_ablated", ".4f")),
    ("CE recovered (zero abl.)", _down("ce_recovered_zero", ".4f")),
    ("CE recovered (mean abl.)", _down("ce_recovered_mean", ".4f")),
    ("delta loss (spliced-clean)", _down("delta_loss", "+.4f")),
    ("KL(clean || spliced)", _down("kl_spliced", ".4g")),
    ("error-term splice", lambda r: f"{'ok' if r.self_check.ok else 'FAILED'} ({r.self_check.relative_diff:.1e})"),
]


def compare(reports: list[EvalReport]) -> str:
    """One table, a column per report, then each report's warnings and unavailable metrics."""
    reports = list(reports)
    if not reports:
        raise ValueError("compare needs at least one report")
    cells = [[label] + [row(r) for r in reports] for label, row in _ROWS]
    header = ["metric"] + [r.sae for r in reports]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in [header, *cells]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in reports:
        prefix = f"[{r.sae}] " if len(reports) > 1 else ""
        if r.unavailable:
            reasons = sorted(set(r.unavailable.values()))
            lines.append(f"{prefix}unavailable: {', '.join(r.unavailable)}: {'; '.join(reasons)}")
        lines.extend(f"{prefix}warning: {w}" for w in r.warnings)
    return "\n".join(lines)
