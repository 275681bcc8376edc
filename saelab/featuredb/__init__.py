"""features.db: one SQLite file per SAE with every feature's story (ARCHITECTURE.md §3).

Tables (schema version :data:`SCHEMA_VERSION`, stored in ``meta``)::

    meta          key TEXT PRIMARY KEY, value TEXT (JSON)      schema_version, model_name, hook_name, sae_path,
                                                               d_sae, d_in, tokens_analysed, corpus, context, ...
    features      id, count, density, max_act, mean_act,       one row per feature; mean_act is the mean over the
                  explanation, explanation_source, score,      tokens where the feature fires; top_tokens is a
                  x, y, cluster, top_tokens                    space-free summary for search and lists
    examples      feature, kind (top|quantile|random), rank,   token windows: token ids and exact per-token strings
                  quantile, max_act, token_ids, tokens, acts,  (JSON lists, raw model text, escaped only at display),
                  max_pos, seq, pos                            the feature's activation on each token, the index of
                                                               the qualifying token in the window, its source
    logit_effects feature, sign (+1|-1), rank, token_id,       direct-path logit effects, largest |value| first
                  token, value
    neighbours    feature, kind (decoder|coact), rank, other,  decoder-cosine and co-activation neighbours
                  value
    histograms    feature, zeros, edges, counts                log-spaced histogram of the non-zero activations;
                                                               zeros + sum(counts) = tokens analysed
    coactivation  feature, other, count                        raw co-firing counts among top partners
    bands         feature, band, lo, hi, count, tokens         quantile bands as sampled: edges, firing tokens in
                                                               the band out of the tokens seen while banding
    correlations  feature, kind (feature|neuron), rank, other, Pearson and cosine of the feature's activation with
                  pearson, cosine                              another feature's / an input dimension's
    logit_histograms feature, lo, hi, counts                   direct logit effects over the vocabulary, equal bins
    features_fts  FTS5(explanation, top_tokens), rowid = id    full-text search

The file is built into a temporary sibling and renamed into place (:func:`build`), so readers see
the old complete database or the new one. :class:`FeatureDB` is the read API (read-only by default)
used by the CLI, the web app, steering, monitoring and the explainers.

The parts: :mod:`~saelab.featuredb.schema` (tables, indexes, full-text index), :mod:`~saelab.featuredb.writing`
(:func:`build`, :class:`Writer`, :func:`sae_identity`), :mod:`~saelab.featuredb.reading` (:class:`FeatureDB`,
:func:`fts_query`). Everything is importable from ``saelab.featuredb``.
"""

from saelab.featuredb.reading import FeatureDB, fts_query
from saelab.featuredb.schema import (CORRELATION_KINDS, EXAMPLE_KINDS, NEIGHBOUR_KINDS, ORDER_BY, SCHEMA,
                                     SCHEMA_VERSION)
from saelab.featuredb.writing import Writer, build, sae_identity

__all__ = ["CORRELATION_KINDS", "EXAMPLE_KINDS", "FeatureDB", "NEIGHBOUR_KINDS", "ORDER_BY", "SCHEMA", "SCHEMA_VERSION",
           "Writer", "build", "fts_query", "sae_identity"]
