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
    features_fts  FTS5(explanation, top_tokens), rowid = id    full-text search

The file is built into a temporary sibling and renamed into place (:func:`build`), so readers see
the old complete database or the new one. :class:`FeatureDB` is the read API (read-only by default)
used by the CLI, the web app, steering, monitoring and the explainers.
"""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from saelab.atomic import atomic_path, write_json

SCHEMA_VERSION = 1
EXAMPLE_KINDS = ("top", "quantile", "random")
NEIGHBOUR_KINDS = ("decoder", "coact")
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
CREATE VIRTUAL TABLE features_fts USING fts5(explanation, top_tokens);
"""
# Built after the bulk inserts (faster than maintaining them row by row).
INDEXES = """
CREATE INDEX features_density ON features(density);
CREATE INDEX features_max_act ON features(max_act);
CREATE INDEX features_cluster ON features(cluster, density);
"""


class Writer:
    """Bulk inserts into a database under construction (see :func:`build`)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def meta(self, **values) -> None:
        self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                              [(k, json.dumps(v)) for k, v in values.items()])

    def features(self, rows: Iterable[dict]) -> None:
        """Rows with id, count, density, max_act, mean_act and optionally the other feature columns."""
        cols = ("id", "count", "density", "max_act", "mean_act", "explanation", "explanation_source", "score",
                "x", "y", "cluster", "top_tokens")
        defaults = {"explanation": "", "explanation_source": "", "score": None, "x": None, "y": None,
                    "cluster": None, "top_tokens": ""}
        self.conn.executemany(f"INSERT INTO features VALUES ({', '.join('?' * len(cols))})",
                              ([{**defaults, **r}[c] for c in cols] for r in rows))

    def examples(self, rows: Iterable[dict]) -> None:
        """Rows: feature, kind, rank, quantile, max_act, token_ids, tokens, acts (lists), max_pos, seq, pos."""
        self.conn.executemany(
            "INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ((r["feature"], r["kind"], r["rank"], r.get("quantile"), r["max_act"], json.dumps(r["token_ids"]),
              json.dumps(r["tokens"], ensure_ascii=False), json.dumps(r["acts"]), r["max_pos"], r["seq"], r["pos"])
             for r in rows))

    def logit_effects(self, rows: Iterable[tuple]) -> None:
        """Rows ``(feature, sign, rank, token_id, token, value)``."""
        self.conn.executemany("INSERT INTO logit_effects VALUES (?, ?, ?, ?, ?, ?)", rows)

    def neighbours(self, rows: Iterable[tuple]) -> None:
        """Rows ``(feature, kind, rank, other, value)``."""
        self.conn.executemany("INSERT INTO neighbours VALUES (?, ?, ?, ?, ?)", rows)

    def histograms(self, rows: Iterable[tuple]) -> None:
        """Rows ``(feature, zeros, edges list, counts list)``."""
        self.conn.executemany("INSERT INTO histograms VALUES (?, ?, ?, ?)",
                              ((f, z, json.dumps(e), json.dumps(c)) for f, z, e, c in rows))

    def coactivation(self, rows: Iterable[tuple]) -> None:
        """Rows ``(feature, other, count)``."""
        self.conn.executemany("INSERT INTO coactivation VALUES (?, ?, ?)", rows)

    def map(self, rows: Iterable[tuple]) -> None:
        """Rows ``(id, x, y, cluster)``."""
        self.conn.executemany("UPDATE features SET x = ?, y = ?, cluster = ? WHERE id = ?",
                              ((x, y, c, i) for i, x, y, c in rows))


@contextmanager
def build(path: Path | str) -> Iterator[Writer]:
    """Create a new features.db at ``path`` atomically: ``with build(p) as w: w.features(...)``.

    Everything goes into a temporary sibling file (journal off: a crash just leaves the temp file,
    which is deleted); on success the indexes and the FTS table are built, the file is fsynced and
    renamed over ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path for the feature database")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if tmp.exists():
            tmp.unlink()
        conn = sqlite3.connect(tmp)
        try:
            conn.execute("PRAGMA journal_mode = OFF")
            conn.execute("PRAGMA synchronous = OFF")
            conn.executescript(SCHEMA)
            writer = Writer(conn)
            writer.meta(schema_version=SCHEMA_VERSION)
            yield writer
            conn.executescript(INDEXES)
            _rebuild_fts(conn)
            conn.commit()
        finally:
            conn.close()


def _rebuild_fts(conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM features_fts")
    conn.execute("INSERT INTO features_fts(rowid, explanation, top_tokens) "
                 "SELECT id, explanation, top_tokens FROM features")


def fts_query(text: str) -> str:
    """Turn free text into a safe FTS5 query: every word quoted (all must match), the last one a prefix."""
    words = re.findall(r"\w+", text)
    if not words:
        raise ValueError(f"search text {text!r} has no words to look for")
    quoted = [f'"{w}"' for w in words]
    quoted[-1] += "*"
    return " ".join(quoted)


def _filters(cluster, min_density, max_density) -> tuple[str, list]:
    where, args = [], []
    for clause, value in (("cluster = ?", cluster), ("density >= ?", min_density), ("density <= ?", max_density)):
        if value is not None:
            where.append(clause)
            args.append(value)
    return (f" WHERE {' AND '.join(where)}" if where else ""), args


class FeatureDB:
    """Read access to a features.db (read-only unless ``writable``; safe to share across threads)."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path
        self.conn.row_factory = sqlite3.Row
        self._info = {r["key"]: json.loads(r["value"]) for r in conn.execute("SELECT key, value FROM meta")}
        version = self._info.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"{path}: feature database schema version {version}, this saelab reads version "
                             f"{SCHEMA_VERSION}; re-run 'saelab analyze' to rebuild it")
        self.n_features = int(conn.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    @classmethod
    def open(cls, path: Path | str, writable: bool = False) -> "FeatureDB":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no feature database here (make one with 'saelab analyze SAE_DIR')")
        mode = "rw" if writable else "ro"
        try:
            conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True, check_same_thread=False)
            return cls(conn, path)
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{path}: not a saelab feature database ({e})") from None

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

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.n_features:
            raise KeyError(f"feature {i} does not exist in {self.path} (features 0-{self.n_features - 1})")
        return i

    def feature(self, i: int) -> dict:
        """One row of ``features`` as a dict (id, count, density, max_act, mean_act, explanation, ...)."""
        row = self.conn.execute("SELECT * FROM features WHERE id = ?", (self._check(i),)).fetchone()
        return dict(row)

    def features(self, order_by: str = "density", cluster: int | None = None, offset: int = 0, limit: int = 100,
                 min_density: float | None = None, max_density: float | None = None,
                 descending: bool = True) -> list[dict]:
        """A page of features, filtered by cluster and density range, ordered by ``order_by`` (ties by id, in
        the same direction)."""
        if order_by not in ORDER_BY:
            raise ValueError(f"cannot order features by {order_by!r}; choose one of {', '.join(ORDER_BY)}")
        where, args = _filters(cluster, min_density, max_density)
        direction = "DESC" if descending else "ASC"
        # ties go by id in the same direction, so the (column, rowid) index order answers without a sort
        sql = (f"SELECT * FROM features{where} ORDER BY {ORDER_BY[order_by]} {direction}, id {direction} "
               "LIMIT ? OFFSET ?")
        return [dict(r) for r in self.conn.execute(sql, (*args, int(limit), int(offset)))]

    def count(self, cluster: int | None = None, min_density: float | None = None,
              max_density: float | None = None) -> int:
        """How many features match the same filters as :meth:`features` (for paging)."""
        where, args = _filters(cluster, min_density, max_density)
        return int(self.conn.execute(f"SELECT COUNT(*) FROM features{where}", args).fetchone()[0])

    def examples(self, i: int, kind: str = "top") -> list[dict]:
        """Token windows of ``kind`` (top | quantile | random), by rank: dicts with tokens (exact strings),
        token_ids, acts, max_pos (index of the qualifying token in the window), max_act, quantile, seq, pos."""
        if kind not in EXAMPLE_KINDS:
            raise ValueError(f"unknown example kind {kind!r}; choose one of {', '.join(EXAMPLE_KINDS)}")
        rows = self.conn.execute("SELECT * FROM examples WHERE feature = ? AND kind = ? ORDER BY rank",
                                 (self._check(i), kind))
        out = []
        for r in rows:
            d = dict(r)
            for key in ("token_ids", "tokens", "acts"):
                d[key] = json.loads(d[key])
            out.append(d)
        return out

    def logit_effects(self, i: int) -> dict:
        """``{"positive": [(token, value)], "negative": [...]}``, strongest first (empty if not computed)."""
        out: dict[str, list] = {"positive": [], "negative": []}
        for r in self.conn.execute("SELECT sign, token, value FROM logit_effects WHERE feature = ? "
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
        return [dict(r) for r in self.conn.execute(sql + " ORDER BY kind DESC, rank", args)]

    def coactivation(self, i: int, limit: int = 50) -> list[tuple[int, int]]:
        """``(other, count)``: how often ``other`` fired on the same token, most frequent first."""
        return [(r[0], r[1]) for r in self.conn.execute(
            "SELECT other, count FROM coactivation WHERE feature = ? ORDER BY count DESC LIMIT ?",
            (self._check(i), limit))]

    def histogram(self, i: int) -> dict:
        """``{"zeros": n, "edges": [n_bins + 1], "counts": [n_bins]}``: log-spaced bins of non-zero activations."""
        r = self.conn.execute("SELECT zeros, edges, counts FROM histograms WHERE feature = ?",
                              (self._check(i),)).fetchone()
        if r is None:
            return {"zeros": 0, "edges": [], "counts": []}
        return {"zeros": r["zeros"], "edges": json.loads(r["edges"]), "counts": json.loads(r["counts"])}

    # -- whole database ------------------------------------------------------------------------------

    def search(self, text: str, limit: int = 20) -> list[dict]:
        """Full-text search over explanations and top tokens (all words must match, last one as a prefix);
        best matches first (BM25). Each hit is a features row plus ``rank`` (lower is better)."""
        rows = self.conn.execute(
            "SELECT f.*, bm25(features_fts) AS rank FROM features_fts JOIN features f ON f.id = features_fts.rowid "
            "WHERE features_fts MATCH ? ORDER BY rank LIMIT ?", (fts_query(text), int(limit)))
        return [dict(r) for r in rows]

    def map_points(self) -> list[tuple[int, float, float, int, float]]:
        """``(id, x, y, cluster, density)`` of every feature with a map position."""
        return [tuple(r) for r in self.conn.execute(
            "SELECT id, x, y, cluster, density FROM features WHERE x IS NOT NULL ORDER BY id")]

    def clusters(self) -> list[tuple[int, int]]:
        """``(cluster, n_features)`` for every cluster on the map."""
        return [tuple(r) for r in self.conn.execute(
            "SELECT cluster, COUNT(*) FROM features WHERE cluster IS NOT NULL GROUP BY cluster ORDER BY cluster")]

    def live_features(self) -> list[int]:
        """Ids of the features that fired at least once in the analysis pass."""
        return [r[0] for r in self.conn.execute("SELECT id FROM features WHERE count > 0 ORDER BY id")]

    # -- updates -----------------------------------------------------------------------------------

    def set_explanations(self, rows: Sequence[tuple[int, str, str, float | None]]) -> None:
        """Store ``(feature, explanation, source, score)`` rows in one transaction (FTS kept in step).

        Needs ``FeatureDB.open(path, writable=True)``. Readers see all of the update or none of it.
        """
        rows = [(self._check(i), str(text), str(source), None if score is None else float(score))
                for i, text, source, score in rows]
        try:
            with self.conn:
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


# -- export ---------------------------------------------------------------------------------------------


def export_neuronpedia(db: "FeatureDB | Path | str", out: Path | str, *, model_id: str | None = None,
                       sae_set: str | None = None, batch_size: int = 128) -> list[Path]:
    """Write Neuronpedia's upload layout (SAEDashboard's ``NeuronpediaDashboardBatch``) into folder ``out``.

    ``batch-N.json``: ``{model_id, layer, sae_set, features: [...]}``, each feature with ``feature_index``,
    ``pos_str/pos_values`` and ``neg_str/neg_values`` (logit effects), ``frac_nonzero``,
    ``freq_hist_data_bar_values/heights`` (activation histogram: bin centres and counts) and
    ``activations`` (top examples, ``bin_min = -1`` as SAEDashboard marks its top group, then the quantile
    bands; each with ``tokens``, ``values`` and ``qualifying_token_index``). ``explanations.json``: a list
    of ``{modelId, layer, index, description, explanationModelName, typeName}``. Returns the files written.
    """
    db = db if isinstance(db, FeatureDB) else FeatureDB.open(db)
    info = db.sae_info()
    model_id = model_id or re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(info.get("model_name", "model"))).name)
    m = re.match(r"blocks\.(\d+)\.", str(info.get("hook_name", "")))
    layer = int(m.group(1)) if m else 0
    sae_set = sae_set or f"saelab-{re.sub(r'[^A-Za-z0-9]+', '-', str(info.get('hook_name', 'sae'))).strip('-')}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, explanations = [], []
    for start in range(0, db.n_features, batch_size):
        features = [_neuronpedia_feature(db, i, info) for i in range(start, min(start + batch_size, db.n_features))]
        path = out / f"batch-{start // batch_size}.json"
        write_json(path, {"model_id": model_id, "layer": layer, "sae_set": sae_set, "features": features})
        files.append(path)
        for i in range(start, min(start + batch_size, db.n_features)):
            row = db.feature(i)
            if row["explanation"]:
                explanations.append({"modelId": model_id, "layer": f"{layer}-{sae_set}", "index": str(i),
                                     "description": row["explanation"],
                                     "explanationModelName": row["explanation_source"] or "saelab",
                                     "typeName": "saelab-" + (row["explanation_source"] or "offline")})
    write_json(out / "explanations.json", explanations)
    return files + [out / "explanations.json"]


def _neuronpedia_feature(db: FeatureDB, i: int, info: dict) -> dict:
    row, logits, hist = db.feature(i), db.logit_effects(i), db.histogram(i)
    centres = [(a * b) ** 0.5 for a, b in zip(hist["edges"][:-1], hist["edges"][1:])]
    acts, width = [], row["max_act"] / int((info.get("config") or {}).get("n_quantiles", 5))
    for kind in ("top", "quantile"):
        for ex in db.examples(i, kind):
            q = ex["quantile"]
            lo, hi = (-1.0, row["max_act"]) if kind == "top" else (q * row["max_act"], q * row["max_act"] + width)
            acts.append({"bin_min": lo, "bin_max": hi,
                         "bin_contains": 0.0, "tokens": ex["tokens"], "values": ex["acts"],
                         "qualifying_token_index": ex["max_pos"]})
    coact = db.neighbours(i, "coact")
    return {"feature_index": i, "neg_str": [t for t, _ in logits["negative"]],
            "neg_values": [v for _, v in logits["negative"]], "pos_str": [t for t, _ in logits["positive"]],
            "pos_values": [v for _, v in logits["positive"]], "frac_nonzero": row["density"],
            "freq_hist_data_bar_values": centres, "freq_hist_data_bar_heights": hist["counts"],
            "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
            "correlated_features_indices": [n["other"] for n in coact],
            "correlated_features_pearson": [], "correlated_features_l1": [n["value"] for n in coact],
            "n_prompts_total": int(info.get("tokens_read", 0)) // max(int(info.get("context", 1) or 1), 1),
            "n_tokens_in_prompt": int(info.get("context", 0) or 0), "dataset": str(info.get("corpus", "")),
            "activations": acts, "decoder_weights_dist": []}
