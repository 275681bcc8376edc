"""Reading a features.db (:class:`FeatureDB`), and the one update it allows: explanations."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Sequence

from saelab.atomic import regular_file, storage_errors
from saelab.errors import DatabaseDamaged, SAEMismatch
from saelab.featuredb.schema import (CORRELATION_KINDS, EXAMPLE_KINDS, NEIGHBOUR_KINDS, ORDER_BY, SCHEMA_VERSION,
                                     expected_columns)
from saelab.featuredb.writing import sae_identity


def fts_query(text: str) -> str:
    """Turn free text into a safe FTS5 query: every word quoted (all must match), the last one a prefix."""
    words = re.findall(r"\w+", text)
    if not words:
        raise ValueError(f"search text {text!r} has no words to look for")
    quoted = [f'"{w}"' for w in words]
    quoted[-1] += "*"
    return " ".join(quoted)


class _Rows(list):
    """Fetched rows with the cursor methods callers use (``fetchone``, ``fetchall``)."""

    def fetchone(self):
        return self[0] if self else None

    def fetchall(self):
        return list(self)


MAX_SQL_INT = 2**63 - 1   # SQLite's INTEGER range; a larger Python int raises OverflowError


def _filters(cluster, min_density, max_density) -> tuple[str, list]:
    if cluster is not None and not -MAX_SQL_INT <= int(cluster) <= MAX_SQL_INT:
        raise ValueError(f"cluster {cluster} is out of range")
    for name, d in (("min_density", min_density), ("max_density", max_density)):
        if d is not None and not 0.0 <= float(d) <= 1.0:   # NaN fails too
            raise ValueError(f"{name} must be between 0 and 1, got {d}")
    where, args = [], []
    for clause, value in (("cluster = ?", cluster), ("density >= ?", min_density), ("density <= ?", max_density)):
        if value is not None:
            where.append(clause)
            args.append(value)
    return (f" WHERE {' AND '.join(where)}" if where else ""), args


NUMBER_COLUMNS = ("count", "density", "max_act", "mean_act", "score", "x", "y", "cluster")
"""Columns of ``features`` that hold numbers (SQLite would keep the text a damaged or forged row puts there)."""


def _not_numbers(row: dict) -> list[str]:
    return [c for c in NUMBER_COLUMNS if c in row and isinstance(row[c], (str, bytes))]


def _numbers_or_none(row: dict) -> dict:
    """A row for lists: a damaged number shows as missing (the feature's own page names the damage)."""
    for c in _not_numbers(row):
        row[c] = None
    return row


class FeatureDB:
    """Read access to a features.db (read-only unless ``writable``; safe to share across threads).

    Every query that SQLite cannot answer (a damaged page, a missing table) raises
    :class:`~saelab.errors.DatabaseDamaged` naming the file, never a bare ``sqlite3`` error.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path
        self.conn.row_factory = sqlite3.Row
        self._info = {r["key"]: json.loads(r["value"]) for r in self.query("SELECT key, value FROM meta")}
        version = self._info.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"{path}: feature database schema version {version}, this saelab reads version "
                             f"{SCHEMA_VERSION}; re-run 'saelab analyze' to rebuild it")
        self.n_features = int(self.query("SELECT COUNT(*) FROM features").fetchone()[0])

    @classmethod
    def open(cls, path: Path | str, writable: bool = False, check: bool = False) -> "FeatureDB":
        """Open ``path``; ``check`` also runs :meth:`check_integrity` (the web server does, at start)."""
        path = regular_file(path, "feature database")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no feature database here (make one with 'saelab analyze SAE_DIR')")
        mode = "rw" if writable else "ro"
        try:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True, check_same_thread=False)
        except sqlite3.DatabaseError as e:
            raise DatabaseDamaged(f"{path}: not a saelab feature database ({e})") from None
        try:
            db = cls(conn, path)
            if check:
                db.check_integrity()
        except BaseException:
            conn.close()
            raise
        return db

    def _damaged(self, e: sqlite3.DatabaseError) -> DatabaseDamaged:
        return DatabaseDamaged(f"{self.path}: cannot be read ({e}); it is damaged, or not a saelab feature "
                               "database. Rebuild it with 'saelab analyze SAE_DIR'")

    def query(self, sql: str, args: Sequence = ()) -> "_Rows":
        """``conn.execute`` with SQLite's errors turned into :class:`DatabaseDamaged`; rows are fetched
        here, since a damaged page can also fail while iterating."""
        try:
            cur = self.conn.execute(sql, args)
            return _Rows(cur.fetchall())
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and "readonly" in str(e):
                raise
            raise self._damaged(e) from None

    def check_integrity(self) -> None:
        """PRAGMA quick_check plus every table with the columns this saelab expects; raises DatabaseDamaged."""
        problems = [r[0] for r in self.query("PRAGMA quick_check") if r[0] != "ok"]
        if problems:
            raise DatabaseDamaged(f"{self.path}: the feature database is damaged (SQLite quick_check: "
                                  f"{'; '.join(problems[:3])}); rebuild it with 'saelab analyze SAE_DIR'")
        for table, columns in expected_columns().items():
            found = [r[1] for r in self.query(f"PRAGMA table_info({table})")]
            if found != columns:
                what = "is missing" if not found else f"has columns {found}, expected {columns}"
                raise DatabaseDamaged(f"{self.path}: table {table!r} {what}; this is not a complete saelab "
                                      "features.db. Rebuild it with 'saelab analyze SAE_DIR'")

    def check_sae(self, sae, where: Path | str | None = None) -> None:
        """Refuse an SAE other than the one this database was built for (weights hash and d_sae).

        Databases from before the hash was recorded are checked on d_sae only."""
        built_for = self._info.get("sae_path") or "an SAE given in memory"
        mine = {"sae_weights_sha256": self._info.get("sae_weights_sha256"), "d_sae": self._info.get("d_sae")}
        theirs = sae_identity(sae)
        diff = [k for k in ("d_sae", "sae_weights_sha256") if mine[k] is not None and mine[k] != theirs[k]]
        if diff:
            def desc(d: dict) -> str:
                sha = (d["sae_weights_sha256"] or "unrecorded")[:12]
                return f"d_sae {d['d_sae']}, weights sha256 {sha}"
            raise SAEMismatch(f"{self.path} belongs to the SAE at {built_for} ({desc(mine)}), not to the SAE "
                              f"{'at ' + str(where) + ' ' if where else ''}({desc(theirs)}). Use the features.db "
                              "made for this SAE, or run 'saelab analyze' on it")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "FeatureDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- per feature -------------------------------------------------------------------------------

    def sae_info(self) -> dict:
        """The ``meta`` table: schema_version, model_name, hook_name, sae_path, d_sae, tokens_analysed, ..."""
        return dict(self._info)

    def logit_effects_note(self) -> str | None:
        """What the logit effects are and are not (the feature page and ``saelab feature`` show it), or None
        when the database has none."""
        if not self._info.get("logit_effects"):
            return None
        hook = self._info.get("hook_name") or "the hook"
        return (f"Direct path only: the decoder direction read straight through the final norm and unembedding, "
                f"skipping every block after {hook}. At a middle layer that is a weak guide to what the feature "
                "makes the model say; steer with it to see.")

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.n_features:
            raise KeyError(f"feature {i} does not exist in {self.path} (features 0-{self.n_features - 1})")
        return i

    def page(self, i: int) -> dict:
        """Everything a feature's page shows (``saelab feature`` and the web's ``/api/features/{id}``): its row,
        its examples of each kind, logit effects, neighbours of each kind with their explanations, histogram."""
        row = self.feature(i)
        near = self.neighbours(i)
        # only the neighbours' explanation column: a neighbour with a damaged row must not break this page
        names = self.explanations(n["other"] for n in near) if near else {}
        neighbours: dict[str, list[dict]] = {kind: [] for kind in NEIGHBOUR_KINDS}
        for n in near:
            neighbours[n["kind"]].append({"id": n["other"], "value": n["value"], "explanation": names.get(n["other"], "")})
        return {"feature": row, "examples": {kind: self.examples(i, kind) for kind in EXAMPLE_KINDS},
                "logit_effects": self.logit_effects(i), "neighbours": neighbours, "histogram": self.histogram(i)}

    def feature(self, i: int) -> dict:
        """One row of ``features`` as a dict (id, count, density, max_act, mean_act, explanation, ...); a row
        whose numbers are not numbers is :class:`DatabaseDamaged` naming the feature and column."""
        row = dict(self.query("SELECT * FROM features WHERE id = ?", (self._check(i),)).fetchone())
        for col in _not_numbers(row):
            raise DatabaseDamaged(f"{self.path}: feature {row['id']}: {col} holds {str(row[col])[:40]!r}, not a "
                                  "number; this feature's row is damaged (re-run 'saelab analyze' to rebuild it)")
        return row

    def explanations(self, ids) -> dict[int, str]:
        """``{id: explanation}`` of existing features (only that column: a neighbour with a damaged number
        still gets its name on another feature's page)."""
        ids = sorted({self._check(i) for i in ids})
        rows = self.query(f"SELECT id, explanation FROM features WHERE id IN ({','.join('?' * len(ids))})", ids)
        return {r[0]: r[1] if isinstance(r[1], str) else "" for r in rows}

    def _json(self, text, i: int, what: str, kind=list):
        """A JSON column of feature ``i`` parsed and of type ``kind``, else DatabaseDamaged naming it."""
        try:
            value = json.loads(text)
        except (TypeError, ValueError) as e:
            raise DatabaseDamaged(f"{self.path}: feature {i}: {what} is not valid JSON ({e}); this feature's data "
                                  "is damaged (re-run 'saelab analyze' to rebuild it)") from None
        if not isinstance(value, kind):
            raise DatabaseDamaged(f"{self.path}: feature {i}: {what} is not a JSON {kind.__name__}; this feature's "
                                  "data is damaged (re-run 'saelab analyze' to rebuild it)")
        return value

    def features(self, order_by: str = "density", cluster: int | None = None, offset: int = 0, limit: int = 100,
                 min_density: float | None = None, max_density: float | None = None,
                 descending: bool = True) -> list[dict]:
        """A page of features, filtered by cluster and density range, ordered by ``order_by`` (ties by id, in
        the same direction)."""
        if order_by not in ORDER_BY:
            raise ValueError(f"cannot order features by {order_by!r}; choose one of {', '.join(ORDER_BY)}")
        if not (0 <= int(offset) <= MAX_SQL_INT and 0 <= int(limit) <= MAX_SQL_INT):
            raise ValueError(f"offset {offset} and limit {limit} must be between 0 and {MAX_SQL_INT}")
        where, args = _filters(cluster, min_density, max_density)
        direction = "DESC" if descending else "ASC"
        # ties go by id in the same direction, so the (column, rowid) index order answers without a sort
        sql = (f"SELECT * FROM features{where} ORDER BY {ORDER_BY[order_by]} {direction}, id {direction} "
               "LIMIT ? OFFSET ?")
        return [_numbers_or_none(dict(r)) for r in self.query(sql, (*args, int(limit), int(offset)))]

    def count(self, cluster: int | None = None, min_density: float | None = None,
              max_density: float | None = None) -> int:
        """How many features match the same filters as :meth:`features` (for paging)."""
        where, args = _filters(cluster, min_density, max_density)
        return int(self.query(f"SELECT COUNT(*) FROM features{where}", args).fetchone()[0])

    def examples(self, i: int, kind: str = "top") -> list[dict]:
        """Token windows of ``kind`` (top | quantile | random), by rank: dicts with tokens (exact strings),
        token_ids, acts, max_pos (index of the qualifying token in the window), max_act, quantile, seq, pos."""
        if kind not in EXAMPLE_KINDS:
            raise ValueError(f"unknown example kind {kind!r}; choose one of {', '.join(EXAMPLE_KINDS)}")
        rows = self.query("SELECT * FROM examples WHERE feature = ? AND kind = ? ORDER BY rank",
                                 (self._check(i), kind))
        out = []
        for r in rows:
            d = dict(r)
            for key in ("token_ids", "tokens", "acts"):
                d[key] = self._json(d[key], i, f"{kind} example {d.get('rank')}: {key}")
            out.append(d)
        return out

    def logit_effects(self, i: int) -> dict:
        """``{"positive": [(token, value)], "negative": [...]}``, strongest first (empty if not computed)."""
        out: dict[str, list] = {"positive": [], "negative": []}
        for r in self.query("SELECT sign, token, value FROM logit_effects WHERE feature = ? "
                                   "ORDER BY sign DESC, rank", (self._check(i),)):
            out["positive" if r["sign"] > 0 else "negative"].append((r["token"], r["value"]))
        return out

    def neighbours(self, i: int, kind: str | None = None) -> list[dict]:
        """Nearest features: dicts kind (decoder: cosine | coact: Jaccard of firing), rank, other, value."""
        sql = "SELECT kind, rank, other, value FROM neighbours WHERE feature = ?"
        args: list = [self._check(i)]
        if kind is not None:
            if kind not in NEIGHBOUR_KINDS:
                raise ValueError(f"unknown neighbour kind {kind!r}; choose one of {', '.join(NEIGHBOUR_KINDS)}")
            sql += " AND kind = ?"
            args.append(kind)
        return [dict(r) for r in self.query(sql + " ORDER BY kind DESC, rank", args)]

    def coactivation(self, i: int, limit: int = 50) -> list[tuple[int, int]]:
        """``(other, count)``: how often ``other`` fired on the same token, most frequent first."""
        return [(r[0], r[1]) for r in self.query(
            "SELECT other, count FROM coactivation WHERE feature = ? ORDER BY count DESC LIMIT ?",
            (self._check(i), limit))]

    def histogram(self, i: int) -> dict:
        """``{"zeros": n, "edges": [n_bins + 1], "counts": [n_bins]}``: log-spaced bins of non-zero activations."""
        r = self.query("SELECT zeros, edges, counts FROM histograms WHERE feature = ?",
                              (self._check(i),)).fetchone()
        if r is None:
            return {"zeros": 0, "edges": [], "counts": []}
        return {"zeros": r["zeros"], "edges": self._json(r["edges"], i, "histogram edges"),
                "counts": self._json(r["counts"], i, "histogram counts")}

    def bands(self, i: int) -> list[dict]:
        """Quantile bands by band index: dicts band, lo, hi (edges as sampled), count (firing tokens in the
        band), tokens (analysed while the feature was banded). Empty for a feature that never fired."""
        return [dict(r) for r in self.conn.execute(
            "SELECT band, lo, hi, count, tokens FROM bands WHERE feature = ? ORDER BY band", (self._check(i),))]

    def correlations(self, i: int, kind: str) -> list[dict]:
        """Largest Pearson correlations first: dicts rank, other (feature id, or input dimension for kind
        ``neuron``), pearson, cosine."""
        if kind not in CORRELATION_KINDS:
            raise ValueError(f"unknown correlation kind {kind!r}; choose one of {', '.join(CORRELATION_KINDS)}")
        return [dict(r) for r in self.conn.execute(
            "SELECT rank, other, pearson, cosine FROM correlations WHERE feature = ? AND kind = ? ORDER BY rank",
            (self._check(i), kind))]

    def logit_histogram(self, i: int) -> dict:
        """``{"lo", "hi", "counts"}``: equal bins of the feature's direct logit effects over the vocabulary
        (empty counts when the database has no logit effects)."""
        r = self.conn.execute("SELECT lo, hi, counts FROM logit_histograms WHERE feature = ?",
                              (self._check(i),)).fetchone()
        if r is None:
            return {"lo": 0.0, "hi": 0.0, "counts": []}
        return {"lo": r["lo"], "hi": r["hi"], "counts": self._json(r["counts"], i, "logit histogram counts")}

    # -- whole database ------------------------------------------------------------------------------

    def search(self, text: str, limit: int = 20) -> list[dict]:
        """Full-text search over explanations and top tokens (all words must match, last one as a prefix);
        best matches first (BM25). Each hit is a features row plus ``rank`` (lower is better)."""
        rows = self.query(
            "SELECT f.*, bm25(features_fts) AS rank FROM features_fts JOIN features f ON f.id = features_fts.rowid "
            "WHERE features_fts MATCH ? ORDER BY rank LIMIT ?", (fts_query(text), int(limit)))
        return [_numbers_or_none(dict(r)) for r in rows]

    def map_points(self) -> list[tuple[int, float, float, int, float]]:
        """``(id, x, y, cluster, density)`` of every feature with a map position."""
        return [tuple(r) for r in self.query(
            "SELECT id, x, y, cluster, density FROM features WHERE x IS NOT NULL AND "   # damaged rows left out
            + " AND ".join(f"typeof({c}) IN ('real', 'integer')" for c in ("x", "y", "density"))
            + " AND typeof(cluster) IN ('integer', 'null') ORDER BY id")]

    def clusters(self) -> list[tuple[int, int]]:
        """``(cluster, n_features)`` for every cluster on the map."""
        return [tuple(r) for r in self.query(
            "SELECT cluster, COUNT(*) FROM features WHERE cluster IS NOT NULL GROUP BY cluster ORDER BY cluster")]

    def live_features(self) -> list[int]:
        """Ids of the features that fired at least once in the analysis pass."""
        return [r[0] for r in self.query("SELECT id FROM features WHERE count > 0 ORDER BY id")]

    # -- updates -----------------------------------------------------------------------------------

    def set_explanations(self, rows: Sequence[tuple[int, str, str, float | None]]) -> None:
        """Store ``(feature, explanation, source, score)`` rows in one transaction (FTS kept in step).

        Needs ``FeatureDB.open(path, writable=True)``. Readers see all of the update or none of it.
        """
        rows = [(self._check(i), str(text), str(source), None if score is None else float(score))
                for i, text, source, score in rows]
        try:
            with storage_errors(self.path), self.conn:
                self.conn.executemany("UPDATE features SET explanation = ?, explanation_source = ?, score = ? "
                                      "WHERE id = ?", [(t, s, sc, i) for i, t, s, sc in rows])
                self.conn.executemany("DELETE FROM features_fts WHERE rowid = ?", [(i,) for i, *_ in rows])
                self.conn.executemany(
                    "INSERT INTO features_fts(rowid, explanation, top_tokens) "
                    "SELECT id, explanation, top_tokens FROM features WHERE id = ?", [(i,) for i, *_ in rows])
        except sqlite3.OperationalError as e:
            if "readonly" in str(e):
                raise PermissionError(f"{self.path} was opened read-only; use FeatureDB.open(path, "
                                      f"writable=True) to store explanations") from None
            raise
