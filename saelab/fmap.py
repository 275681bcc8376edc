"""The feature map: where each decoder direction sits among the others.

- :func:`layout`: a 2-D layout of all decoder directions with UMAP (cosine metric; McInnes et al. 2018,
  as in Anthropic's feature maps) when ``umap-learn`` is installed (``pip install 'saelab[map]'``), else
  the first two principal components of the unit directions. Clusters come from spherical k-means on
  the unit directions themselves (not on the 2-D layout), so they mean the same thing under either layout.
- :func:`decoder_neighbours`: exact top-k cosine neighbours by blockwise matmul (never a d_sae² matrix).
- :func:`neighbourhood_map`: one feature's nearest N features laid out locally by classical MDS of their
  cosine distances (exact and deterministic; the local picture Anthropic draws around "Inner Conflict").
- :func:`cluster_names`: a short name per cluster from its members' explanations (the terms that many
  members use and few other features do), so the map can label regions as Anthropic's does.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from saelab.themes import FUNCTION_WORDS
from saelab.featuredb import FeatureDB
from saelab.formats import load_sae

METHODS = ("auto", "umap", "pca")


class MapLayout(NamedTuple):
    x: np.ndarray
    """``[d_sae]`` horizontal coordinate."""
    y: np.ndarray
    """``[d_sae]`` vertical coordinate."""
    cluster: np.ndarray
    """``[d_sae]`` cluster id (int)."""
    method: str
    """``umap`` or ``pca``: what made the layout."""


def unit_rows(W: torch.Tensor) -> torch.Tensor:
    """Rows of ``W [n, d]`` scaled to unit norm (all-zero rows stay zero), float32."""
    W = W.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def umap_available() -> bool:
    """Whether umap-learn is installed (without importing it: its first import JIT-compiles for minutes)."""
    import importlib.util

    return importlib.util.find_spec("umap") is not None


def layout(W_dec: torch.Tensor, *, method: str = "auto", n_clusters: int | None = None, seed: int = 0,
           n_neighbors: int = 15) -> MapLayout:
    """2-D coordinates and clusters for every row of ``W_dec [d_sae, d_in]``.

    ``method``: ``umap`` (needs umap-learn), ``pca``, or ``auto`` (umap when installed, else pca).
    ``n_clusters`` defaults to ≈ √(d_sae / 2), between 2 and 256.
    """
    if method not in METHODS:
        raise ValueError(f"unknown map method {method!r}; choose one of {', '.join(METHODS)}")
    U = unit_rows(W_dec)  # (d_sae, d_in)
    n = U.shape[0]
    if method == "auto":
        method = "umap" if umap_available() and n > n_neighbors + 2 else "pca"
    if method == "umap":
        xy = _umap(U, seed, n_neighbors)
    else:
        xy = _pca2(U)
    k = n_clusters or int(min(256, max(2, round(math.sqrt(n / 2)))))
    labels = spherical_kmeans(U, min(k, n), seed=seed)
    return MapLayout(xy[:, 0], xy[:, 1], labels, method)


def _umap(U: torch.Tensor, seed: int, n_neighbors: int) -> np.ndarray:
    try:
        import umap
    except ImportError:
        raise ImportError("the UMAP map layout needs umap-learn: pip install 'saelab[map]' "
                          "(or use method='pca')") from None
    reducer = umap.UMAP(n_components=2, metric="cosine", n_neighbors=n_neighbors, min_dist=0.1,
                        random_state=seed)
    return np.asarray(reducer.fit_transform(U.numpy()), dtype=np.float32)


def _pca2(U: torch.Tensor) -> np.ndarray:
    """Projection on the top two principal components (zero-padded for tiny inputs)."""
    C = U - U.mean(0, keepdim=True)
    _, _, V = torch.linalg.svd(C, full_matrices=False)  # V: (min(n, d), d)
    xy = C @ V[:2].T  # (n, ≤2)
    if xy.shape[1] < 2:
        xy = torch.cat([xy, torch.zeros(xy.shape[0], 2 - xy.shape[1])], 1)
    return xy.numpy().astype(np.float32)


def spherical_kmeans(U: torch.Tensor, k: int, *, seed: int = 0, iters: int = 30) -> np.ndarray:
    """Cluster unit rows ``U [n, d]`` by cosine (k-means++ seeding, then Lloyd steps on the sphere)."""
    g = torch.Generator().manual_seed(seed)
    n = U.shape[0]
    centers = U[torch.randint(n, (1,), generator=g)]
    for _ in range(1, k):  # k-means++: next center ∝ squared cosine distance to the nearest one
        d = (1 - (U @ centers.T).max(1).values).clamp_min(0) ** 2
        p = d / d.sum() if d.sum() > 0 else torch.full((n,), 1.0 / n)
        centers = torch.cat([centers, U[torch.multinomial(p, 1, generator=g)]])
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = (U @ centers.T).argmax(1)  # (n,)
        if _ and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centers).index_add_(0, labels, U)
        empty = sums.norm(dim=1) < 1e-12
        centers = torch.where(empty[:, None], centers, unit_rows(sums))
    return labels.numpy()


@torch.no_grad()
def decoder_neighbours(W_dec: torch.Tensor, k: int = 10, block: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` cosine neighbours of every decoder row (itself excluded).

    Returns ``(cosines [d_sae, k], indices [d_sae, k])``, most similar first; computed block by block
    so memory is ``block × d_sae``, not ``d_sae²``.
    """
    U = unit_rows(W_dec)
    n = U.shape[0]
    k = min(k, n - 1)
    vals, idxs = [], []
    for start in range(0, n, block):
        sims = U[start:start + block] @ U.T  # (block, d_sae)
        rows = torch.arange(start, min(start + block, n))
        sims[rows - start, rows] = -float("inf")
        v, i = sims.topk(k, dim=1)
        vals.append(v)
        idxs.append(i)
    return torch.cat(vals), torch.cat(idxs)


def _decoder_of(db_or_sae) -> torch.Tensor:
    """W_dec of an SAE, or of the SAE a features.db was made from (its meta ``sae_path``)."""
    if hasattr(db_or_sae, "W_dec"):
        return db_or_sae.W_dec
    db = FeatureDB.open(db_or_sae) if isinstance(db_or_sae, (str, Path)) else db_or_sae
    sae_path = db.sae_info().get("sae_path")
    if not sae_path or not Path(sae_path).exists():
        raise FileNotFoundError(f"{db.path}: the SAE it was made from ({sae_path or 'not recorded'}) is not on disk; "
                                "the neighbourhood map needs its decoder: pass the SAE instead")
    return load_sae(sae_path).W_dec


def neighbourhood_map(db_or_sae, feature: int, n: int = 30) -> list[tuple[int, float, float, float]]:
    """``(id, x, y, cos)`` for ``feature`` (first, cos 1) and its ``n`` nearest features by decoder cosine.

    The layout is classical MDS of the cosine distances ``1 − cos`` among these n + 1 directions, centred
    on ``feature``: nearby points are similar directions, as in a local UMAP, but exact and deterministic.
    """
    U = unit_rows(_decoder_of(db_or_sae))
    if not 0 <= feature < U.shape[0]:
        raise KeyError(f"feature {feature} does not exist (the SAE has {U.shape[0]} features)")
    n = min(n, U.shape[0] - 1)
    sims = U @ U[feature]  # (d_sae,)
    sims[feature] = -float("inf")
    cos, ids = sims.topk(n)
    ids = torch.cat([torch.tensor([feature]), ids])
    cos = torch.cat([torch.tensor([1.0]), cos])
    xy = _classical_mds(1 - U[ids] @ U[ids].T)
    xy = xy - xy[0]
    return [(int(i), float(x), float(y), float(c)) for i, (x, y), c in zip(ids, xy.tolist(), cos.tolist())]


def _classical_mds(D: torch.Tensor) -> torch.Tensor:
    """2-D embedding whose distances best match ``D [m, m]`` (Torgerson: eigenvectors of −½ J D² J)."""
    m = D.shape[0]
    J = torch.eye(m, dtype=torch.float64) - 1.0 / m
    B = -0.5 * J @ (D.double() ** 2) @ J
    evals, evecs = torch.linalg.eigh(B)  # ascending
    top = evals.flip(0)[:2].clamp_min(0)
    coords = evecs.flip(1)[:, :2] * top.sqrt()
    if coords.shape[1] < 2:
        coords = torch.cat([coords, torch.zeros(m, 2 - coords.shape[1], dtype=coords.dtype)], 1)
    return coords.float()


# Words that say how an explanation is phrased, not what the feature is about.
STOPWORDS = frozenset("""a an and are as at be by for from in into is it its of on or that the this to with
fires fire firing activates active tokens token e.g eg diverse mostly often after before contexts""".split())
_TERM = re.compile(r"`([^`]+)`|([A-Za-z][A-Za-z_'-]{2,})")


def explanation_terms(text: str) -> set[str]:
    """The terms of one explanation: each backticked token as written (`self`) unless it is an English function
    word (` of`), and each other word (lower-cased, 3+ letters, neither a stopword nor a function word); the offline explainer's "; promotes ..." and "; e.g. “...”" tails
    are left out (the next token, and one example's context, not what fires)."""
    text = re.split(r";\s*(?:promotes\b|e\.g\.\s*“)", text, maxsplit=1)[0]
    terms = set()
    for quoted, word in _TERM.findall(text):
        if quoted:
            if quoted.strip().lower() in FUNCTION_WORDS:
                continue                 # ` of`, ` the`: how text is built, not what a cluster is about
            terms.add(f"`{quoted}`" if quoted.strip() else f"`{quoted.replace(' ', '␣')}`")  # a space token, visible
        elif word.lower() not in STOPWORDS and word.lower() not in FUNCTION_WORDS:
            terms.add(word.lower())
    return terms


def cluster_names(clusters, explanations, n_terms: int = 3) -> dict[int, str]:
    """``{cluster: name}`` from the members' explanations: the ``n_terms`` terms with the highest
    tf-idf over clusters (share of the cluster's explained members using the term × log of how rare the
    term is among all explained features), joined by " · ". A cluster with no explained member is left out.

    ``clusters [n]`` and ``explanations [n]`` are parallel (one per feature; empty or None: unexplained).
    """
    per_cluster: dict[int, list[set[str]]] = {}
    df: Counter = Counter()
    for c, text in zip(clusters, explanations):
        if c is None or c < 0 or not text:
            continue
        terms = explanation_terms(text)
        per_cluster.setdefault(int(c), []).append(terms)
        df.update(terms)
    n = sum(len(v) for v in per_cluster.values())
    names = {}
    for c, members in per_cluster.items():
        tf = Counter(t for terms in members for t in terms)
        ranked = sorted(tf, key=lambda t: (-tf[t] / len(members) * math.log((n + 1) / df[t]), t))
        if ranked:
            names[c] = " · ".join(ranked[:n_terms])
    return names
