"""The sparse TopK / BatchTopK training step, under its former name: it lives in :mod:`saelab.arch.sparse`."""

from saelab.arch.sparse import (SparseCode, SparseGrads, batchtopk_code, index_sum, sparse_decode, sparse_grads,
                                topk_code)

__all__ = ["SparseCode", "SparseGrads", "batchtopk_code", "index_sum", "sparse_decode", "sparse_grads", "topk_code"]
