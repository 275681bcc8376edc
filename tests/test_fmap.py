"""Feature map: decoder neighbours vs brute force, layouts, clusters, neighbourhood maps."""

import numpy as np
import pytest
import torch

from saelab.fmap import decoder_neighbours, layout, neighbourhood_map, spherical_kmeans, unit_rows
from saelab.sae import SAE, SAEConfig


def test_decoder_neighbours_match_brute_force():
    W = torch.randn(300, 16)
    cos, idx = decoder_neighbours(W, k=10, block=64)
    U = W / W.norm(dim=1, keepdim=True)
    full = U @ U.T
    full.fill_diagonal_(-2)
    want = full.topk(10, dim=1)
    assert torch.equal(idx, want.indices) and torch.allclose(cos, want.values, atol=1e-6)


def planted_clusters(n_per=40, k=3, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = unit_rows(torch.randn(k, d, generator=g))
    W = torch.cat([centres[c] + 0.05 * torch.randn(n_per, d, generator=g) for c in range(k)])
    return W, np.repeat(np.arange(k), n_per)


def test_spherical_kmeans_recovers_planted_clusters():
    W, truth = planted_clusters()
    labels = spherical_kmeans(unit_rows(W), 3)
    for c in range(3):  # every true cluster maps to exactly one label, and labels are not shared
        assert len(set(labels[truth == c])) == 1
    assert len(set(labels)) == 3


def test_pca_layout_separates_clusters():
    W, truth = planted_clusters()
    m = layout(W, method="pca", n_clusters=3)
    assert m.method == "pca" and m.x.shape == (120,) and m.y.shape == (120,) and m.cluster.shape == (120,)
    xy = np.stack([m.x, m.y], 1)
    centres = np.stack([xy[truth == c].mean(0) for c in range(3)])
    spread = max(np.linalg.norm(xy[truth == c] - centres[c], axis=1).mean() for c in range(3))
    gaps = min(np.linalg.norm(centres[a] - centres[b]) for a in range(3) for b in range(a + 1, 3))
    assert gaps > spread  # clusters stay apart in 2-D


@pytest.mark.slow
def test_umap_layout():
    pytest.importorskip("umap")
    W, truth = planted_clusters()
    m = layout(W, method="umap", n_clusters=3)
    assert m.method == "umap" and np.isfinite(m.x).all()


def test_layout_errors():
    with pytest.raises(ValueError, match="unknown map method"):
        layout(torch.randn(10, 4), method="tsne")


def test_neighbourhood_map():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=200, architecture="topk", k=4))
    points = neighbourhood_map(sae, 7, n=30)
    assert len(points) == 31 and points[0] == (7, 0.0, 0.0, 1.0)
    U = unit_rows(sae.W_dec)
    cos = U @ U[7]
    cos[7] = -2
    assert [p[0] for p in points[1:]] == cos.topk(30).indices.tolist()
    # MDS keeps the most similar direction closer to the centre than the least similar one
    d = [np.hypot(x, y) for _, x, y, _ in points[1:]]
    assert d[0] < d[-1]
    with pytest.raises(KeyError, match="does not exist"):
        neighbourhood_map(sae, 500)


def test_cluster_names_come_from_what_members_share():
    from saelab.fmap import cluster_names, explanation_terms

    assert explanation_terms("fires on `self` (92%), at the start of an indented line; promotes `.`") == {
        "`self`", "start", "indented", "line"}
    clusters = [0, 0, 0, 1, 1, 2, -1]
    texts = ["fires on `self` (90%); promotes `.`", "fires on `self` (60%), `cls` (30%)", "fires on `self` after `(`",
             "Python import statements", "import of a module", "", "fires on `self`"]
    names = cluster_names(clusters, texts, n_terms=2)
    assert names[0].startswith("`self`") and "`.`" not in names[0]  # shared by all three; promotes left out
    assert names[1].startswith("import")
    assert 2 not in names  # no explained member: no name rather than a made-up one
