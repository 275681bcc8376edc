"""Dashboard data beyond features.db's core, from the analysis pass's :class:`~saelab.mining.Stats`: what
SAEDashboard computes and Neuronpedia shows (its batch keys in brackets).

- :func:`band_rows`: each quantile band's edges as sampled and the share of tokens in it (``bin_min``,
  ``bin_max``, ``bin_contains``);
- :func:`correlation_rows`: Pearson correlation and cosine of a feature's activation with other features'
  (``correlated_features_*``) and with the SAE's input dimensions (``correlated_neurons_*``), over the
  analysed tokens, as SAEDashboard's rolling correlation does (it stores the cosine under ``*_l1``);
- :func:`logit_histograms`: the distribution of a feature's direct logit effects over the vocabulary
  (``logits_hist_data_*``, 50 equal bins like SAEDashboard's).

Feature-feature sums of products come from :class:`~saelab.mining.CoactCounter`, which sees each token's
``coact_top`` strongest latents: exact for TopK SAEs with k ≤ coact_top, otherwise the products of weaker
co-firing latents are left out (and pruned rare pairs are lost). Everything else here is exact.
"""

from __future__ import annotations

import torch

from saelab.mining import Stats, best_in_group


def band_rows(stats: Stats):
    """Per banded feature and band: ``(feature, band, lo, hi, count, tokens)``: the edges the band was sampled
    with (the top band reaches up to the final max when that is larger: higher values were put there), how
    many firing tokens fell in it, and out of how many tokens analysed while the feature was being banded."""
    nq = stats.cfg.n_quantiles
    band_max, final_max = stats.band_max.cpu().tolist(), stats.max.cpu().tolist()
    counts, tokens = stats.band_count.view(-1, nq).cpu().tolist(), stats.band_tokens.cpu().tolist()
    for f, (bm, mx, row, n) in enumerate(zip(band_max, final_max, counts, tokens)):
        if bm <= 0:
            continue
        for band, count in enumerate(row):
            hi = max(bm, mx) if band == nq - 1 else (band + 1) * bm / nq
            yield f, band, band * bm / nq, hi, count, n


def _pearson_cosine(n: int, xy, x, y, x2, y2) -> tuple[torch.Tensor, torch.Tensor]:
    """Pearson correlation and cosine of two variables over ``n`` samples from their sums (float64)."""
    var = ((n * x2 - x * x).clamp_min(0) * (n * y2 - y * y).clamp_min(0)).sqrt()
    norms = (x2 * y2).sqrt()
    pearson = torch.where(var > 0, (n * xy - x * y) / var.clamp_min(1e-300), torch.zeros_like(var))
    return pearson, torch.where(norms > 0, xy / norms.clamp_min(1e-300), torch.zeros_like(norms))


@torch.no_grad()
def correlation_rows(stats: Stats, n: int):
    """``(feature, kind, rank, other, pearson, cosine)``, the ``n`` largest Pearson correlations first, of each
    live feature's activation over the analysed tokens with other features' (kind ``feature``: among the
    co-firing pairs that :class:`CoactCounter` kept) and with the SAE's input dimensions (kind ``neuron``)."""
    N = stats.tokens
    s, s2, live = stats.sum.cpu(), stats.sumsq.cpu(), stats.count.cpu() > 0
    f, o, _, prods = stats.coact.pairs()
    rows = []
    if len(f):
        pearson, cosine = _pearson_cosine(N, prods, s[f], s[o], s2[f], s2[o])
        idx, rank = best_in_group(f, (pearson + 1).clamp_min(0), n)  # scores must be ≥ 0
        rows += [(int(f[i]), "feature", r, int(o[i]), float(pearson[i]), float(cosine[i]))
                 for i, r in zip(idx.tolist(), rank.tolist())]
    if stats.neurons is not None:
        nz = stats.neurons
        for start in range(0, stats.d_sae, 1024):
            sl = slice(start, start + 1024)
            pearson, cosine = _pearson_cosine(N, nz.zx[sl].cpu(), s[sl, None], nz.x_sum.cpu()[None],
                                              s2[sl, None], nz.x2_sum.cpu()[None])  # (block, d_in)
            top, idx = pearson.topk(min(n, pearson.shape[1]), dim=1)
            cos = cosine.gather(1, idx)
            for j, (trow, irow, crow) in enumerate(zip(top.tolist(), idx.tolist(), cos.tolist())):
                if live[start + j]:
                    rows += [(start + j, "neuron", r, i, p, c) for r, (p, i, c) in enumerate(zip(trow, irow, crow))]
    return rows


@torch.no_grad()
def logit_histograms(D: torch.Tensor, W_U: torch.Tensor, n_bins: int = 50, block: int = 1024):
    """Per feature, ``(feature, lo, hi, counts [n_bins])``: a histogram of its direct logit effects
    ``D[f] @ W_Uᵀ`` over the whole vocabulary in ``n_bins`` equal bins from their min to their max (the
    value equal to the max goes in the last bin, as ``torch.histc`` counts it)."""
    for start in range(0, D.shape[0], block):
        eff = D[start:start + block] @ W_U.T  # (block, vocab)
        lo, hi = eff.min(1, keepdim=True).values, eff.max(1, keepdim=True).values
        width = (hi - lo) / n_bins
        idx = ((eff - lo) / width.clamp_min(1e-30)).floor().long().clamp(0, n_bins - 1)
        counts = torch.zeros(eff.shape[0], n_bins, dtype=torch.long, device=eff.device)
        counts.scatter_add_(1, idx, torch.ones_like(idx))
        for j, (a, b, c) in enumerate(zip(lo[:, 0].tolist(), hi[:, 0].tolist(), counts.tolist())):
            yield start + j, a, b, c
