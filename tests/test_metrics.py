"""One home for FVU and dead-latent statistics (saelab.metrics), checked against direct computations."""

import math

import torch

from saelab.metrics import dead_fraction, fvu


def test_fvu_from_sums_equals_the_direct_ratio():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64) * 3 + 10
    x_hat = x + 0.5 * torch.randn(50, 6, generator=g, dtype=torch.float64)
    err = float((x - x_hat).pow(2).sum())
    direct = err / float((x - x.mean(0)).pow(2).sum())
    assert math.isclose(fvu(err, float(x.pow(2).sum()), x.sum(0), 50), direct, rel_tol=1e-9)
    shifted = x - x[:10].mean(0)           # a fixed shift leaves the variance alone
    assert math.isclose(fvu(err, float(shifted.pow(2).sum()), shifted.sum(0), 50), direct, rel_tol=1e-9)
    assert math.isnan(fvu(1.0, 12.0, torch.full((3,), 6.0), 3))   # constant rows (2, 2, 2): no variance
    assert math.isnan(fvu(0.0, 0.0, torch.zeros(3), 0))


def test_dead_fraction_counts_latents_that_never_fired():
    assert dead_fraction(torch.tensor([0, 3, 0, 1])) == 0.5
