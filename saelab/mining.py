"""Streaming feature statistics for the analysis pass: vectorised per-batch merges, bounded memory.

The non-zero latents of a batch come as a sparse list ``(token, feature, value)`` (:class:`Batch`) and feed

- running stats per feature: count, sum (→ density, mean activation over firing tokens), max, and a
  log-spaced histogram with fixed global bins (10 per decade over 1e-6 … 1e6; values outside go to the
  end bins), so no first pass is needed and counts are exact;
- three streaming selections merged with torch ops (:class:`Slots`): the top-K contexts (at most one
  per sequence, its max token), reservoir samples in ``n_quantiles`` activation bands per feature, and
  a few uniformly random firing tokens. Reservoirs are "keep the R largest random keys", which is exactly
  uniform sampling and merges like a top-K. Bands are equal fractions of a per-feature ``band_max``,
  fixed once: from ``feature_max_act`` in the SAE's provenance when present, else from the running max
  after a warm-up (the caller's ``sample_bands``; a feature first seen later gets its bands from the max
  of the batch it first fires in). Tokens before that are not sampled into bands. Activations above
  ``band_max`` go to the top band, so the top band's upper edge is the larger of ``band_max`` and the
  final max (:func:`band_rows` writes exactly these edges, and how many firing tokens fell in each band
  out of the tokens seen while that feature was being banded);
- a shared pool of uniformly random corpus windows with all their latents (:class:`RandomPool`): for each
  feature, mostly windows where it does not fire (the negatives of detection scoring);
- co-activation counts and sums of activation products among each token's strongest latents
  (:class:`CoactCounter`), in a sparse pair table pruned to every feature's top partners when it outgrows
  its cap (counts of pruned pairs are lost: an approximation that only affects rare pairs); with the
  per-feature sums of squares they give feature-feature Pearson and cosine (:func:`correlation_rows`);
- sums of products of each feature's activation with each input dimension (:class:`NeuronSums`), for the
  feature-neuron Pearson and cosine that SAEDashboard's "correlated neurons" table shows.

Memory is bounded by ``d_sae × slots × window``: each selection keeps the window of token ids and the
feature's activations around the chosen token, cut from the batch's sparse latents when the token enters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from saelab.stage_config import AnalyzeConfig

HIST_LO, HIST_HI, HIST_PER_DECADE = -6, 6, 10
N_BINS = (HIST_HI - HIST_LO) * HIST_PER_DECADE

class Slots:
    """Per group, the ``n`` entries with the highest score, with their token windows.

    State: ``score/act [G, n]``, ``seq/pos [G, n]`` (where the token came from), ``ids/acts [G, n, W]``
    (window token ids, -1 outside the sequence, and the feature's activation on each window token).
    """

    def __init__(self, groups: int, n: int, width: int, device):
        self.n = n
        self.score = torch.full((groups, n), -math.inf, device=device)
        self.act = torch.zeros(groups, n, device=device)
        self.seq = torch.full((groups, n), -1, dtype=torch.long, device=device)
        self.pos = torch.zeros(groups, n, dtype=torch.long, device=device)
        self.ids = torch.full((groups, n, width), -1, dtype=torch.int32, device=device)
        self.acts = torch.zeros(groups, n, width, device=device)

    def update(self, group: torch.Tensor, score: torch.Tensor, entries: torch.Tensor, batch: "Batch") -> None:
        """Offer candidates ``entries`` (indices into the batch's sparse list) under ``group`` / ``score`` ≥ 0."""
        beats = score > self.score[:, -1][group]  # slots are sorted: only a candidate above the last can enter
        group, score, entries = group[beats], score[beats], entries[beats]
        keep, rank = best_in_group(group, score, self.n)
        entries, g = entries[keep], group[keep]
        G, n = self.score.shape
        cand = torch.full((G, n), -math.inf, device=score.device)
        cand[g, rank] = score[keep]
        src = torch.zeros(G, n, dtype=torch.long, device=score.device)
        src[g, rank] = entries
        rows = torch.unique(g)  # only groups with candidates can change
        top, idx = torch.cat([self.score[rows], cand[rows]], 1).topk(n, dim=1)  # (rows, n)
        new = (idx >= n) & torch.isfinite(top)
        old = idx.clamp(max=n - 1)
        self.score[rows] = top
        for t in (self.act, self.seq, self.pos):
            t[rows] = t[rows].gather(1, old)
        W = self.ids.shape[2]
        self.ids[rows] = self.ids[rows].gather(1, old[..., None].expand(-1, -1, W))
        self.acts[rows] = self.acts[rows].gather(1, old[..., None].expand(-1, -1, W))
        ri, si = new.nonzero(as_tuple=True)
        gi = rows[ri]
        e = src[gi, idx[ri, si] - n]  # (n_new,) sparse entries that entered
        self.act[gi, si] = batch.val[e]
        self.seq[gi, si] = batch.seq0 + batch.tok[e] // batch.T
        self.pos[gi, si] = batch.tok[e] % batch.T
        self.ids[gi, si], self.acts[gi, si] = batch.windows(batch.tok[e], batch.feat[e])


def best_in_group(group: torch.Tensor, score: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the entries among the ``n`` best-scoring of their group, and their rank (0 = best).

    ``score`` must be ≥ 0 (activations, random keys, counts): the bits of a non-negative float32 sort like
    the number, so one integer sort on ``group · 2³¹ + (2³¹ − 1 − bits)`` groups entries, best first.
    """
    bits = score.float().contiguous().view(torch.int32).long()
    order = (group * 2**31 + (2**31 - 1 - bits)).argsort()
    g = group[order]
    _, counts = torch.unique_consecutive(g, return_counts=True)
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    rank = torch.arange(len(g), device=g.device) - starts
    keep = rank < n
    return order[keep], rank[keep]


class Batch(NamedTuple):
    """One batch's sparse latents: entry e is (token ``tok[e]``, feature ``feat[e]``, value ``val[e]``)."""

    tok: torch.Tensor
    """``[nnz]`` flat token index b·T + p."""
    feat: torch.Tensor
    val: torch.Tensor
    ids: torch.Tensor
    """``[B·T]`` token ids."""
    T: int
    seq0: int
    """Global index of the batch's first sequence."""
    d_sae: int
    left: int
    right: int
    keys: torch.Tensor
    """Sorted ``tok·d_sae + feat`` (for window lookups) and ``vals`` in the same order."""
    vals: torch.Tensor

    def windows(self, tok: torch.Tensor, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[m, W]`` (-1 outside the sequence) and activations ``[m, W]`` of ``feat`` around ``tok``."""
        offs = torch.arange(-self.left, self.right + 1, device=tok.device)
        pos = (tok % self.T)[:, None] + offs  # (m, W)
        valid = (pos >= 0) & (pos < self.T)
        flat = (tok[:, None] + offs).clamp(0, self.ids.numel() - 1)
        ids = torch.where(valid, self.ids[flat], torch.full_like(flat, -1)).to(torch.int32)
        if len(self.keys) == 0:
            return ids, torch.zeros(ids.shape, device=tok.device)
        key = flat * self.d_sae + feat[:, None]
        at = torch.searchsorted(self.keys, key).clamp(max=len(self.keys) - 1)
        hit = valid & (self.keys[at] == key)
        return ids, torch.where(hit, self.vals[at], torch.zeros((), device=tok.device))


def sparse_latents(sae, x: torch.Tensor, keep: torch.Tensor, m: int):
    """``x [N, d_in]`` → (tok, feat, val) of the non-zero latents of kept tokens (sorted by tok, then feat),
    and each token's top-``m`` latents ``(values [N, m], indices [N, m])`` for co-activation.
    ``sae``: any :class:`saelab.basis.Basis` (TopK SAEs never build dense latents)."""
    v, i = sae.encode_sparse(x)  # (N, k), or (N, most firing latents of a token)
    i, perm = i.sort(dim=1)  # feature order within each token: the flat entries come out sorted by key
    v = v.gather(1, perm) * keep[:, None]
    tok, slot = (v > 0).nonzero(as_tuple=True)
    mv, mi = v.topk(min(m, v.shape[1]), dim=1)
    return tok, i[tok, slot], v[tok, slot], (mv, i.gather(1, mi))


class Stats:
    """Running per-feature statistics, histograms, selections and co-activation counts."""

    def __init__(self, d_sae: int, cfg: AnalyzeConfig, max_hint: torch.Tensor | None, device, seed: int):
        W = cfg.window_left + cfg.window_right + 1
        self.cfg, self.d_sae = cfg, d_sae
        self.count = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max = torch.zeros(d_sae, device=device)
        self.hist = torch.zeros(d_sae * N_BINS, dtype=torch.long, device=device)
        self.band_max = max_hint.to(device).clone() if max_hint is not None else torch.zeros(d_sae, device=device)
        self.hinted = max_hint is not None
        self.band_count = torch.zeros(d_sae * cfg.n_quantiles, dtype=torch.long, device=device)
        self.band_tokens = torch.zeros(d_sae, dtype=torch.long, device=device)  # tokens seen while banding
        self.neurons: NeuronSums | None = None  # made by add_neurons, which knows d_in
        self.top = Slots(d_sae, cfg.k_top, W, device)
        self.quant = Slots(d_sae * cfg.n_quantiles, cfg.per_quantile, W, device)
        self.rand = Slots(d_sae, cfg.n_random, W, device)
        self.coact = CoactCounter(d_sae, cfg.coact_max_pairs, cfg.coact_partners)
        self.pool = RandomPool(cfg.pool, device)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.tokens = 0

    def add(self, b: Batch, top_m: tuple[torch.Tensor, torch.Tensor], keep_tok: torch.Tensor,
            sample_bands: bool) -> None:
        """``keep_tok [B·T]``: tokens that count (not BOS)."""
        f, v = b.feat, b.val
        self.tokens += int(keep_tok.sum())
        self.count.index_add_(0, f, torch.ones_like(f))
        self.sum.index_add_(0, f, v.double())
        self.sumsq.index_add_(0, f, v.double() ** 2)
        self.max.scatter_reduce_(0, f, v, reduce="amax")
        bins = ((v.log10() - HIST_LO) * HIST_PER_DECADE).floor().long().clamp(0, N_BINS - 1)
        self.hist.index_add_(0, f * N_BINS + bins, torch.ones_like(bins))
        entries = torch.arange(len(f), device=f.device)
        seq = b.tok // b.T
        cand = (v > self.top.score[:, -1][f]).nonzero().squeeze(1)  # could enter the top-K
        first, _ = best_in_group(f[cand] * (b.ids.numel() // b.T) + seq[cand], v[cand], 1)
        first = cand[first]  # the max token of each (feature, sequence)
        self.top.update(f[first], v[first], entries[first], b)
        self.rand.update(f, torch.rand(len(f), generator=self.gen, device=f.device), entries, b)
        if sample_bands:
            unset = self.band_max <= 0
            self.band_max[unset] = self.max[unset]
            nq = self.cfg.n_quantiles
            band = (v / self.band_max[f] * nq).floor().long().clamp(0, nq - 1)
            self.band_tokens[self.band_max > 0] += int(keep_tok.sum())
            self.band_count.index_add_(0, f * nq + band, torch.ones_like(band))
            self.quant.update(f * nq + band, torch.rand(len(f), generator=self.gen, device=f.device), entries, b)
        self.coact.add(*top_m)
        self.pool.add(b, keep_tok, self.gen)

    def add_neurons(self, b: Batch, x: torch.Tensor, keep_tok: torch.Tensor) -> None:
        """``x [B·T, d_in]``: the batch's SAE inputs (the "neurons"), ``keep_tok [B·T]`` as in :meth:`add`."""
        if self.neurons is None:
            self.neurons = NeuronSums(self.d_sae, x.shape[1], x.device)
        self.neurons.add(b, x, keep_tok)


class NeuronSums:
    """Running sums for the Pearson correlation and cosine of each feature's activation with each input
    dimension over the analysed tokens: ``zx [d_sae, d_in] = Σ_t z_t xᵀ_t``, ``x_sum/x2_sum [d_in]``."""

    def __init__(self, d_sae: int, d_in: int, device):
        self.zx = torch.zeros(d_sae, d_in, dtype=torch.float64, device=device)
        self.x_sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.x2_sum = torch.zeros(d_in, dtype=torch.float64, device=device)

    def add(self, b: Batch, x: torch.Tensor, keep_tok: torch.Tensor) -> None:
        x = x * keep_tok[:, None]  # (B·T, d_in): left-out tokens (BOS) count in no sum
        z = torch.sparse_coo_tensor(torch.stack([b.feat, b.tok]), b.val, (self.zx.shape[0], x.shape[0]),
                                    check_invariants=False)  # (d_sae, B·T); indices are in range by construction
        self.zx += torch.sparse.mm(z, x).double()  # (d_sae, d_in): only the firing entries cost anything
        self.x_sum += x.sum(0).double()
        self.x2_sum += x.double().pow(2).sum(0)


class RandomPool:
    """A uniform reservoir of ``n`` corpus windows (any token, firing or not) with all their latents."""

    def __init__(self, n: int, device):
        self.score = torch.full((n,), -math.inf, device=device)
        self.seq = [-1] * n
        self.pos = [0] * n
        self.ids: list[torch.Tensor | None] = [None] * n
        self.latents: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * n  # offset, feat, val

    def add(self, b: Batch, keep_tok: torch.Tensor, gen: torch.Generator) -> None:
        n = len(self.score)
        cand = keep_tok.nonzero().squeeze(1)  # (m,) flat token indices
        score = torch.rand(len(cand), generator=gen, device=cand.device)
        top, idx = torch.cat([self.score, score]).topk(n)
        old = idx < n
        keep_old = idx[old].tolist()
        self.seq, self.pos, self.ids, self.latents = ([lst[i] for i in keep_old] for lst in
                                                      (self.seq, self.pos, self.ids, self.latents))
        self.score = torch.cat([top[old], top[~old]])
        t_new = cand[idx[~old] - n]  # (m,) tokens that entered
        ids, _ = b.windows(t_new, torch.zeros_like(t_new))
        lo = torch.searchsorted(b.keys, (t_new - b.left) * b.d_sae).tolist()
        hi = torch.searchsorted(b.keys, (t_new + b.right + 1) * b.d_sae).tolist()
        for j, t in enumerate(t_new.tolist()):
            keys, vals = b.keys[lo[j]:hi[j]], b.vals[lo[j]:hi[j]]
            tok = keys // b.d_sae
            same_seq = tok // b.T == t // b.T
            self.seq.append(b.seq0 + t // b.T)
            self.pos.append(t % b.T)
            self.ids.append(ids[j])
            self.latents.append(((tok - t + b.left)[same_seq], (keys % b.d_sae)[same_seq], vals[same_seq]))

    def windows(self) -> list[tuple[int, int, torch.Tensor, dict[int, list[tuple[int, float]]]]]:
        """Filled windows: ``(seq, pos, ids [W], {feature: [(offset, act)]})``."""
        out = []
        for seq, pos, ids, lat in zip(self.seq, self.pos, self.ids, self.latents):
            if ids is None:
                continue
            by_feat: dict[int, list[tuple[int, float]]] = {}
            for o, f, v in zip(*(t.tolist() for t in lat)):
                by_feat.setdefault(f, []).append((o, v))
            out.append((seq, pos, ids, by_feat))
        return out


class CoactCounter:
    """Counts and activation-product sums of (a, b) latents active on the same token, as a sparse table of
    int64 keys a·d + b (a < b)."""

    def __init__(self, d_sae: int, max_pairs: int, partners: int):
        self.d, self.max_pairs, self.partners = d_sae, max_pairs, partners
        self.keys = torch.zeros(0, dtype=torch.long)
        self.counts = torch.zeros(0, dtype=torch.long)
        self.prods = torch.zeros(0, dtype=torch.float64)  # Σ z_a z_b over the tokens counted
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.n_pending = 0

    def add(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """``values/indices [N, m]``: each token's strongest latents (zeros are ignored)."""
        a, b = indices[:, :, None], indices[:, None, :]
        ok = (values[:, :, None] > 0) & (values[:, None, :] > 0) & (a < b)
        keys = (a * self.d + b)[ok].cpu()
        prods = (values[:, :, None] * values[:, None, :])[ok].double().cpu()
        self.pending.append((keys, prods))
        self.n_pending += len(keys)
        if self.n_pending > 2_000_000:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        new = torch.cat([k for k, _ in self.pending])
        new_prods = torch.cat([p for _, p in self.pending])
        self.pending, self.n_pending = [], 0
        keys, inv = torch.unique(torch.cat([self.keys, new]), return_inverse=True)
        weights = torch.cat([self.counts, torch.ones_like(new)])
        prods = torch.cat([self.prods, new_prods])
        self.keys, self.counts = keys, torch.zeros_like(keys).index_add_(0, inv, weights)
        self.prods = torch.zeros(len(keys), dtype=torch.float64).index_add_(0, inv, prods)
        if len(self.keys) > self.max_pairs:
            self.prune(self.partners)

    def prune(self, partners: int) -> None:
        """Keep a pair only if it is among the ``partners`` most frequent of either of its features."""
        a, b = self.keys // self.d, self.keys % self.d
        keep = torch.zeros(len(self.keys), dtype=torch.bool)
        for g in (a, b):
            idx, _ = best_in_group(g, self.counts.double(), partners)
            keep[idx] = True
        self.keys, self.counts, self.prods = self.keys[keep], self.counts[keep], self.prods[keep]

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both directions: ``(feature, other, count, Σ z_feature z_other)``."""
        self.flush()
        a, b = self.keys // self.d, self.keys % self.d
        return (torch.cat([a, b]), torch.cat([b, a]), torch.cat([self.counts, self.counts]),
                torch.cat([self.prods, self.prods]))


def _trim(ids: list[int], acts: list[float], center: int, bos: int) -> tuple[int, int]:
    """Window bounds: drop the padding outside the sequence and everything before the document's BOS."""
    lo = next(i for i, t in enumerate(ids) if t >= 0)
    hi = max(i for i, t in enumerate(ids) if t >= 0) + 1
    for i in range(center, lo - 1, -1):
        if ids[i] == bos:
            lo = i
            break
    return lo, hi


def example_rows(slots: Slots, kind: str, strings: list[str], bos: int, left: int, n_bands: int = 1):
    """features.db rows for every filled slot (rank = strongest band first, then slot order)."""
    gi, si = torch.isfinite(slots.score).nonzero(as_tuple=True)
    cols = [t[gi, si].tolist() for t in (slots.act, slots.seq, slots.pos, slots.ids, slots.acts)]
    per = slots.score.shape[1]
    for g, s, act, seq, pos, ids, acts in zip(gi.tolist(), si.tolist(), *cols):
        feature, band = divmod(g, n_bands)
        lo, hi = _trim(ids, acts, left, bos)
        yield {"feature": feature, "kind": kind, "rank": (n_bands - 1 - band) * per + s,
               "quantile": band / n_bands if kind == "quantile" else None, "max_act": act,
               "token_ids": ids[lo:hi], "tokens": [strings[t] for t in ids[lo:hi]], "acts": acts[lo:hi],
               "max_pos": left - lo, "seq": seq, "pos": pos}


def pool_rows(pool: RandomPool, d_sae: int, n: int, strings: list[str], bos: int, left: int, offset: int, seed: int):
    """``n`` random windows of the shared pool per feature, with that feature's (mostly zero) activations."""
    windows = pool.windows()
    if not windows:
        return
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(windows), (d_sae, min(n, len(windows))), generator=g).tolist()
    for f, chosen in enumerate(picks):
        for r, w in enumerate(chosen):
            seq, pos, ids_t, by_feat = windows[w]
            ids = ids_t.tolist()
            acts = [0.0] * len(ids)
            for o, v in by_feat.get(f, ()):
                acts[o] = v
            lo, hi = _trim(ids, acts, left, bos)
            yield {"feature": f, "kind": "random", "rank": offset + r, "quantile": None, "max_act": max(acts[lo:hi]),
                   "token_ids": ids[lo:hi], "tokens": [strings[t] for t in ids[lo:hi]], "acts": acts[lo:hi],
                   "max_pos": left - lo, "seq": seq, "pos": pos}


def histogram_rows(stats: Stats):
    """Per feature: zeros and the trimmed range of non-empty log bins with their edges."""
    hist = stats.hist.view(stats.d_sae, N_BINS).cpu()
    edges = [10 ** (HIST_LO + i / HIST_PER_DECADE) for i in range(N_BINS + 1)]
    nonzero = hist > 0
    for f, (row, nz) in enumerate(zip(hist.tolist(), nonzero)):
        idx = nz.nonzero().squeeze(1)
        zeros = stats.tokens - int(stats.count[f])
        if len(idx) == 0:
            yield f, zeros, [], []
            continue
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        yield f, zeros, edges[lo:hi + 1], row[lo:hi]


@torch.no_grad()
def coact_rows(stats: Stats, n_neighbours: int, partners: int):
    """(neighbour rows by Jaccard of firing, coactivation rows by count)."""
    f, o, c, _ = stats.coact.pairs()
    if len(f) == 0:
        return [], []
    count = stats.count.cpu()
    jacc = c.double() / (count[f] + count[o] - c).clamp_min(1).double()
    neigh, raw = [], []
    for score, rows, n, value in ((jacc, neigh, n_neighbours, jacc), (c.double(), raw, partners, c)):
        idx, rank = best_in_group(f, score, n)
        for i, r in zip(idx.tolist(), rank.tolist()):
            rows.append((int(f[i]), "coact", r, int(o[i]), float(value[i])) if rows is neigh
                        else (int(f[i]), int(o[i]), int(c[i])))
    return neigh, raw

