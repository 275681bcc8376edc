"""features.db's tables (see :mod:`saelab.featuredb`), its indexes and the full-text index."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 2
EXAMPLE_KINDS = ("top", "quantile", "random")
NEIGHBOUR_KINDS = ("decoder", "coact")
CORRELATION_KINDS = ("feature", "neuron")
ORDER_BY = {"id": "id", "density": "density", "max_act": "max_act", "mean_act": "mean_act", "score": "score"}

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE features (
    id INTEGER PRIMARY KEY, count INTEGER NOT NULL, density REAL NOT NULL, max_act REAL NOT NULL,
    mean_act REAL NOT NULL, explanation TEXT NOT NULL DEFAULT '', explanation_source TEXT NOT NULL DEFAULT '',
    score REAL, x REAL, y REAL, cluster INTEGER, top_tokens TEXT NOT NULL DEFAULT '');
CREATE TABLE examples (
    feature INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL, quantile REAL, max_act REAL NOT NULL,
    token_ids TEXT NOT NULL, tokens TEXT NOT NULL, acts TEXT NOT NULL, max_pos INTEGER NOT NULL,
    seq INTEGER NOT NULL, pos INTEGER NOT NULL, PRIMARY KEY (feature, kind, rank)) WITHOUT ROWID;
CREATE TABLE logit_effects (
    feature INTEGER NOT NULL, sign INTEGER NOT NULL, rank INTEGER NOT NULL, token_id INTEGER NOT NULL,
    token TEXT NOT NULL, value REAL NOT NULL, PRIMARY KEY (feature, sign, rank)) WITHOUT ROWID;
CREATE TABLE neighbours (
    feature INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL, other INTEGER NOT NULL,
    value REAL NOT NULL, PRIMARY KEY (feature, kind, rank)) WITHOUT ROWID;
CREATE TABLE histograms (feature INTEGER PRIMARY KEY, zeros INTEGER NOT NULL, edges TEXT NOT NULL,
    counts TEXT NOT NULL);
CREATE TABLE coactivation (feature INTEGER NOT NULL, other INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (feature, other)) WITHOUT ROWID;
CREATE TABLE bands (feature INTEGER NOT NULL, band INTEGER NOT NULL, lo REAL NOT NULL, hi REAL NOT NULL,
    count INTEGER NOT NULL, tokens INTEGER NOT NULL, PRIMARY KEY (feature, band)) WITHOUT ROWID;
CREATE TABLE correlations (feature INTEGER NOT NULL, kind TEXT NOT NULL, rank INTEGER NOT NULL,
    other INTEGER NOT NULL, pearson REAL NOT NULL, cosine REAL NOT NULL, PRIMARY KEY (feature, kind, rank))
    WITHOUT ROWID;
CREATE TABLE logit_histograms (feature INTEGER PRIMARY KEY, lo REAL NOT NULL, hi REAL NOT NULL, counts TEXT NOT NULL);
CREATE VIRTUAL TABLE features_fts USING fts5(explanation, top_tokens);
"""
# Built after the bulk inserts (faster than maintaining them row by row).
INDEXES = """
CREATE INDEX features_density ON features(density);
CREATE INDEX features_max_act ON features(max_act);
CREATE INDEX features_cluster ON features(cluster, density);
"""



TABLES = ("meta", "features", "examples", "logit_effects", "neighbours", "histograms", "coactivation",
          "features_fts")


def expected_columns() -> dict[str, list[str]]:
    """Column names of every table of :data:`SCHEMA`, read from an in-memory database built with it."""
    mem = sqlite3.connect(":memory:")
    try:
        mem.executescript(SCHEMA)
        return {t: [r[1] for r in mem.execute(f"PRAGMA table_info({t})")] for t in TABLES}
    finally:
        mem.close()


def rebuild_fts(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM features_fts")
    conn.execute("INSERT INTO features_fts(rowid, explanation, top_tokens) "
                 "SELECT id, explanation, top_tokens FROM features")
