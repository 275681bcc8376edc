"""Feature families across dictionary sizes: which features persist, split, vanish or are new.

For each adjacent pair of SAEs in a sweep, a smaller S (``d_S`` latents) and a larger L (``d_L``), every
pair of features (i ∈ S, j ∈ L) gets two similarities, both computed on the same sample of ``n`` tokens
that both SAEs encode:

    cos_ij = ⟨d_i, d_j⟩ / (‖d_i‖ ‖d_j‖)                       decoder directions (rows of W_dec)
    ρ_ij   = (E[z_i z_j] − E[z_i] E[z_j]) / (σ_i σ_j)          Pearson correlation of the activations

(ρ = 0 where a feature never fires in the sample), and one score ``s_ij = ½ (cos⁺_ij + ρ⁺_ij)`` that needs
both: the same direction *and* firing on the same tokens. When a parent P firing on the union of m
disjoint, equally common token sets splits into m children, each child has ρ ≈ 1/√m with P (and its
direction is one of P's components, cos ≈ 1/√m when they are orthogonal), so s ≈ 0.71 for a split in two
and ≈ 0.58 in three; an unrelated pair has s ≈ 0.

**Match rule.** j's *parent* is ``p(j) = argmax_i s_ij`` when ``s_{p(j) j} ≥ tau``; otherwise j is **new**.
The *children* of i are ``C(i) = {j : p(j) = i}``. With ``F_i`` the tokens where i fires, the children's
*coverage* of i is the share of its activation on tokens where one of them fires,
``Σ_{t ∈ U} z_i(t) / Σ_t z_i(t)`` with ``U = ⋃_{j ∈ C(i)} F_j`` (weighted by activation, so the faint
firings a TopK SAE spends on noise barely count). Then i

- **vanishes** when ``C(i)`` is empty;
- **persists** when it has one child;
- **splits** when it has two or more children whose coverage is at least ``cover`` (the parent's
  activation is mostly where its children fire, so together they stand for it); with two or more
  children that do not cover it, i persists as its best child (highest s) and the others become new.

Every L feature is thus a persisting child, a split child or new, and chaining the parent links across
all sizes gives a family tree whose roots are the smallest SAE's features and each size's new features.

Cost: the ``[d_S, d_L]`` matrices are never held whole. S features go in blocks of ``block`` rows; a
block holds ``block × d_L`` cosines, co-activation sums and scores. The sums E[z_i z_j] come from each
token's active pairs (n·m_S·m_L of them whatever the sizes: 16.7M for n = 16384 and k = 32), binned by
pair: no dense ``[n, d]`` activations and no ``n × d_S × d_L`` product. 16k × 16k: 16 blocks of 16M.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import torch
from torch.nn import functional as F

FORMAT, VERSION = "saelab-families", 1


@dataclass
class FamilyConfig:
    """How features are matched across sizes (see the module docstring for the rule)."""

    tau: float = 0.45
    """Minimum score s = ½(cos⁺ + ρ⁺) for a feature of the larger SAE to have a parent."""
    cover: float = 0.5
    """Share of a parent's activation its children must fire under for two or more children to be a split."""
    block: int = 1024
    """Features of the smaller SAE per block of the score matrices (memory ∝ block × d_L)."""
    batch: int = 4096
    """Tokens encoded per SAE call."""

    def __post_init__(self):
        # NaN compares false with every score and a negative bound matches everything: refused before
        # families.json is overwritten with a meaningless result (above 1: nothing matches, a test's tool)
        for name in ("tau", "cover"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ValueError(f"--{name} must be a finite number from 0 (1 at most for a useful result), "
                                 f"got {value!r}")
        if self.block < 1 or self.batch < 1:
            raise ValueError(f"block and batch must be positive, got {self.block}, {self.batch}")


class Codes(NamedTuple):
    """One SAE's encoding of the token sample, kept sparse."""

    values: torch.Tensor
    """Activations ``[n, m]`` (0 = padding)."""
    indices: torch.Tensor
    """Feature ids ``[n, m]``."""
    mean: torch.Tensor
    """E[z_i] over the sample ``[d_sae]``."""
    std: torch.Tensor
    """Standard deviation of z_i ``[d_sae]``."""
    fires: torch.Tensor
    """Tokens where z_i > 0 ``[d_sae]`` (int64)."""


class Step(NamedTuple):
    """The match between one smaller SAE and the next larger one."""

    parent: torch.Tensor
    """Per L feature, its parent in S, -1 for none ``[d_L]`` (int64)."""
    cos: torch.Tensor
    """Decoder cosine with the best-scoring S feature ``[d_L]``."""
    co: torch.Tensor
    """Activation correlation with it ``[d_L]``."""
    score: torch.Tensor
    """Its score s ``[d_L]`` (kept for new features too: how close the nearest was)."""
    relation_large: list[str]
    """persist | split | new, per L feature."""
    relation_small: list[str]
    """persist | split | vanished, per S feature."""
    children: list[list[int]]
    """Per S feature, its children in L (best score first)."""
    coverage: torch.Tensor
    """Per S feature, the share of its activation where one of its children fires ``[d_S]`` (NaN: never fired)."""
    counts: dict
    """S features that persist / split / vanish, L features that are new, and L children of splits."""


@torch.no_grad()
def encode_sample(sae, x: torch.Tensor, batch: int = 4096) -> Codes:
    """Encode ``x [n, d_in]`` with ``sae`` in batches; sparse codes and per-feature moments."""
    vals, idx = [], []
    for start in range(0, x.shape[0], batch):
        v, i = sae.encode_sparse(x[start:start + batch].to(sae.W_dec.device, torch.float32))  # (b, m)
        vals.append(v.float().cpu())
        idx.append(i.cpu())
    m = max(v.shape[1] for v in vals)
    values = torch.cat([F.pad(v, (0, m - v.shape[1])) for v in vals])      # (n, m)
    indices = torch.cat([F.pad(i, (0, m - i.shape[1])) for i in idx])      # (n, m)
    n, d = x.shape[0], sae.cfg.d_sae
    on = values > 0
    s1 = torch.zeros(d, dtype=torch.float64).index_add_(0, indices[on], values[on].double())
    s2 = torch.zeros(d, dtype=torch.float64).index_add_(0, indices[on], values[on].double() ** 2)
    mean = s1 / n
    std = (s2 / n - mean ** 2).clamp_min(0).sqrt()
    fires = torch.bincount(indices[on], minlength=d)
    return Codes(values, indices, mean.float(), std.float(), fires)


def pair_products(small: Codes, large: Codes, d_l: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token's active pairs: key ``i·d_L + j`` and z_i(t) z_j(t), each ``[p]`` with p ≤ n·m_S·m_L."""
    prod = (small.values[:, :, None] * large.values[:, None, :]).reshape(-1)          # (n·m_S·m_L,)
    key = (small.indices[:, :, None] * d_l + large.indices[:, None, :]).reshape(-1)
    on = prod > 0
    return key[on], prod[on]


@torch.no_grad()
def best_parents(w_small: torch.Tensor, small: Codes, w_large: torch.Tensor, large: Codes,
                 block: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per L feature: argmax_i s_ij, and cos, ρ, s there. ``w_*`` are decoder matrices ``[d, d_in]``.

    S features go in blocks; a block's E[z_i z_j] ``[block, d_L]`` is a weighted histogram of the pairs'
    keys (:func:`pair_products`), its cosines a ``[block, d_in] @ [d_in, d_L]`` product.
    """
    d_s, d_l, n = w_small.shape[0], w_large.shape[0], small.values.shape[0]
    ws, wl = F.normalize(w_small.float(), dim=1), F.normalize(w_large.float(), dim=1)
    key, prod = pair_products(small, large, d_l)                                  # (p,), (p,)
    best = torch.full((d_l,), -1.0)
    parent = torch.full((d_l,), -1, dtype=torch.long)
    cos_at, co_at = torch.zeros(d_l), torch.zeros(d_l)
    for lo in range(0, d_s, block):
        hi = min(lo + block, d_s)
        cos = ws[lo:hi] @ wl.T                                                    # (b, d_L)
        inside = (key >= lo * d_l) & (key < hi * d_l)
        e = torch.bincount(key[inside] - lo * d_l, weights=prod[inside].double(),
                           minlength=(hi - lo) * d_l).view(hi - lo, d_l) / n       # (b, d_L): E[z_i z_j]
        cov = e - small.mean[lo:hi, None].double() * large.mean[None, :].double()
        sd = small.std[lo:hi, None].double() * large.std[None, :].double()
        rho = torch.where(sd > 0, cov / sd.clamp_min(1e-30), torch.zeros_like(cov)).clamp(-1, 1).float()
        score = (cos.clamp_min(0) + rho.clamp_min(0)) / 2
        top, arg = score.max(0)                                                   # (d_L,)
        better = top > best
        best[better] = top[better]
        parent[better] = arg[better] + lo
        cols = better.nonzero().squeeze(1)
        cos_at[cols] = cos[arg[cols], cols]
        co_at[cols] = rho[arg[cols], cols]
    return parent, cos_at, co_at, best


def coverage(small: Codes, large: Codes, parent: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per S feature i: Σ_{t ∈ U_i} z_i(t) / Σ_t z_i(t) with U_i = ⋃_{j: parent(j) = i} F_j, the share of i's
    activation on tokens where one of its children fires (NaN where i never fires)."""
    d_s = small.mean.shape[0]
    hits = torch.zeros(d_s, dtype=torch.float64)
    for a in range(0, small.values.shape[0], chunk):
        vs, is_ = small.values[a:a + chunk], small.indices[a:a + chunk]           # (c, m_S)
        pl = torch.where(large.values[a:a + chunk] > 0, parent[large.indices[a:a + chunk]], -1)  # (c, m_L)
        hit = (is_[:, :, None] == pl[:, None, :]).any(-1) & (vs > 0)              # (c, m_S)
        hits.index_add_(0, is_[hit], vs[hit].double())
    total = small.mean.double() * small.values.shape[0]                          # Σ_t z_i(t)
    return torch.where(total > 0, hits / total.clamp_min(1e-30), torch.full_like(total, float("nan"))).float()


def classify(parent: torch.Tensor, score: torch.Tensor, small: Codes, large: Codes, cfg: FamilyConfig) -> Step:
    """Apply the match rule to the best parents (``parent`` already -1 below ``tau``)."""
    d_s = small.mean.shape[0]
    cover = coverage(small, large, parent)
    kids: list[list[int]] = [[] for _ in range(d_s)]
    for j in (parent >= 0).nonzero().squeeze(1).tolist():
        kids[int(parent[j])].append(j)
    parent = parent.clone()
    rel_s = ["vanished"] * d_s
    for i, c in enumerate(kids):
        c.sort(key=lambda j: -float(score[j]))
        if len(c) == 1:
            rel_s[i] = "persist"
        elif len(c) >= 2 and float(cover[i]) >= cfg.cover:   # NaN (never fired) is not >=: no split
            rel_s[i] = "split"
        elif len(c) >= 2:
            parent[c[1:]] = -1                                # the best child persists; the rest are new
            kids[i] = c[:1]
            rel_s[i] = "persist"
    rel_l = ["new" if int(p) < 0 else rel_s[int(p)] for p in parent]
    counts = {r: rel_s.count(r) for r in ("persist", "split", "vanished")}
    counts["new"] = rel_l.count("new")
    counts["split_children"] = rel_l.count("split")
    return Step(parent, torch.zeros(0), torch.zeros(0), score, rel_l, rel_s, kids, cover, counts)


def match(sae_small, small: Codes, sae_large, large: Codes, cfg: FamilyConfig) -> Step:
    """One size step: best parents, the threshold, then :func:`classify`."""
    parent, cos, co, score = best_parents(sae_small.W_dec, small, sae_large.W_dec, large, cfg.block)
    parent = torch.where(score >= cfg.tau, parent, torch.full_like(parent, -1))
    return classify(parent, score, small, large, cfg)._replace(cos=cos, co=co)


def families(saes: Sequence, x: torch.Tensor, cfg: FamilyConfig | None = None) -> list[Step]:
    """Match every adjacent pair of ``saes`` (smallest first) on the tokens ``x [n, d_in]``."""
    cfg = cfg or FamilyConfig()
    if len(saes) < 2:
        raise ValueError(f"feature families need at least two SAE sizes, got {len(saes)}")
    codes = [encode_sample(s, x, cfg.batch) for s in saes]
    return [match(saes[t], codes[t], saes[t + 1], codes[t + 1], cfg) for t in range(len(saes) - 1)]


def roots(steps: Sequence[Step], sizes: int) -> list[list[tuple[int, int]]]:
    """Per size, per feature: the (size index, feature) its parent chain starts from."""
    out: list[list[tuple[int, int]]] = []
    for t in range(sizes):
        if t == 0:
            n = len(steps[0].relation_small) if steps else 0
            out.append([(0, i) for i in range(n)])
            continue
        parent = steps[t - 1].parent.tolist()
        out.append([out[t - 1][p] if p >= 0 else (t, j) for j, p in enumerate(parent)])
    return out


def _r(t: torch.Tensor) -> list:
    return [None if v != v else round(v, 4) for v in t.tolist()]   # NaN → null (JSON has no NaN)


def families_json(steps: Sequence[Step], members: Sequence[dict], cfg: FamilyConfig, sample: dict) -> dict:
    """The ``families.json`` document: format tag, rule and thresholds, sample, sizes and, per step,
    counts and each feature's parent or children with their scores (lists indexed by feature id)."""
    tree = roots(steps, len(members))
    return {
        "format": FORMAT, "version": VERSION,
        "rule": {**asdict(cfg), "score": "0.5*(max(cos,0)+max(corr,0))", "parent": "argmax score if >= tau",
                 "split": ">= 2 children covering >= cover of the parent's firing tokens"},
        "sample": sample, "sizes": list(members),
        "steps": [{"small": members[t]["name"], "large": members[t + 1]["name"], "counts": s.counts,
                   "small_features": {"relation": s.relation_small, "children": s.children, "coverage": _r(s.coverage)},
                   "large_features": {"relation": s.relation_large, "parent": [p if p >= 0 else None
                                                                               for p in s.parent.tolist()],
                                      "cos": _r(s.cos), "co": _r(s.co), "score": _r(s.score)}}
                  for t, s in enumerate(steps)],
        "roots": [[list(r) for r in size] for size in tree],
    }
