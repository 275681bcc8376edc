"""The reconstruction and sparsity statistics every stage reports, from streaming sums, in one place:
training's log and held-out summary (:mod:`saelab.trainer`) and ``saelab eval`` (:mod:`saelab.evaluate`)."""

from __future__ import annotations

import torch


def fvu(err_sq: float, x_sq: float, x_sum: torch.Tensor, n: int) -> float:
    """Fraction of variance unexplained, Σ‖x − x̂‖² / Σ‖x − x̄‖², from the sums Σ‖x − x̂‖² (``err_sq``),
    Σ‖x‖² (``x_sq``) and Σx (``x_sum [d_in]``) over ``n`` rows: Σ‖x − x̄‖² = Σ‖x‖² − ‖Σx‖²/n. NaN when the
    inputs do not vary (or there are none). Any fixed shift of x (e.g. its first batch's mean) may be taken out
    of ``x_sq`` and ``x_sum`` first: the variance is the same, and the subtraction loses less precision."""
    variance = x_sq - float(x_sum.double().pow(2).sum()) / n if n else 0.0
    return err_sq / variance if variance > 0 else float("nan")


def dead_fraction(fired: torch.Tensor) -> float:
    """Fraction of latents that never fired, from per-latent firing counts ``[d_sae]``."""
    return float((fired == 0).float().mean())
