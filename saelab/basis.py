"""A *basis*: a set of directions that read a hook's activations, each giving one activation per token.

SAE latents are one basis; a transcoder's latents and the raw neurons of an MLP are others. Analysis,
steering and monitoring ask a basis three things, and nothing about how it computes them:

    encode(x)               x [..., d_in] → activations [..., d_sae] (dense; 0 = not firing)
    encode_sparse(x)        x [..., d_in] → SparseActs(values [..., m], indices [..., m]): the firing
                            directions of each token, padded with zeros to the same m for every token
    subset_encoder(feats)   a callable x [..., d_in] → [..., len(feats)] equal to encode(x)[..., feats],
                            prepared once (e.g. per generation) so that each call touches only ``feats``

so the architecture switch lives in the basis (:class:`saelab.sae.SAE`), not in every caller.
:class:`NeuronBasis` is the smallest other implementation: unit i of the activations is feature i.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol, Sequence, runtime_checkable

import torch
from torch.nn import functional as F


class SparseActs(NamedTuple):
    """The firing directions of each token; entries with value 0 are padding."""

    values: torch.Tensor
    """Activations ``[..., m]`` (≥ 0 for every basis here; 0 where a token has fewer than m firing)."""
    indices: torch.Tensor
    """Direction (feature) ids ``[..., m]``, in no particular order within a token."""


@runtime_checkable
class Basis(Protocol):
    """What analysis, steering and monitoring need from a set of directions (see the module docstring)."""

    @property
    def d_in(self) -> int: ...

    @property
    def d_sae(self) -> int: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def encode_sparse(self, x: torch.Tensor) -> SparseActs: ...

    def subset_encoder(self, features: Sequence[int],
                       device: torch.device | None = None) -> Callable[[torch.Tensor], torch.Tensor]: ...


def sparse_from_dense(z: torch.Tensor) -> SparseActs:
    """``z [..., d]`` → its non-zero entries per token, padded to the most any token has (at least 1)."""
    m = int((z != 0).sum(-1).max().clamp_min(1)) if z.numel() else 1
    values, indices = z.topk(min(m, z.shape[-1]), dim=-1)  # (..., m)
    return SparseActs(values, indices)


class NeuronBasis:
    """The raw units of a hook as a basis: feature i is unit i, its activation the positive part ``x_i⁺``.

    For MLP neurons (``blocks.L.mlp.hook_post``) this is the neuron's output above zero, the part that
    "fires" (GELU/SiLU neurons go slightly negative; analysis counts a feature as firing when > 0).
    """

    def __init__(self, d_in: int):
        if d_in < 1:
            raise ValueError(f"a neuron basis needs a positive width, got d_in={d_in}")
        self._d = d_in

    @property
    def d_in(self) -> int:
        return self._d

    @property
    def d_sae(self) -> int:
        return self._d

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x.float())  # (..., d_in)

    def encode_sparse(self, x: torch.Tensor) -> SparseActs:
        return sparse_from_dense(self.encode(x))

    def subset_encoder(self, features: Sequence[int],
                       device: torch.device | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        idx = torch.tensor(list(features), dtype=torch.long, device=device)
        return lambda x: F.relu(x.float().index_select(-1, idx.to(x.device)))  # (..., n)
