"""Building a features.db: bulk inserts into a temporary sibling, renamed into place when complete."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from saelab.atomic import atomic_path, remove_stale_temps, storage_errors
from saelab.featuredb.schema import INDEXES, SCHEMA, SCHEMA_VERSION, rebuild_fts
from saelab.locks import exclusive


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

    def bands(self, rows: Iterable[tuple]) -> None:
        """Rows ``(feature, band, lo, hi, count, tokens)``."""
        self.conn.executemany("INSERT INTO bands VALUES (?, ?, ?, ?, ?, ?)", rows)

    def correlations(self, rows: Iterable[tuple]) -> None:
        """Rows ``(feature, kind, rank, other, pearson, cosine)``."""
        self.conn.executemany("INSERT INTO correlations VALUES (?, ?, ?, ?, ?, ?)", rows)

    def logit_histograms(self, rows: Iterable[tuple]) -> None:
        """Rows ``(feature, lo, hi, counts list)``."""
        self.conn.executemany("INSERT INTO logit_histograms VALUES (?, ?, ?, ?)",
                              ((f, lo, hi, json.dumps(c)) for f, lo, hi, c in rows))

    def map(self, rows: Iterable[tuple]) -> None:
        """Rows ``(id, x, y, cluster)``."""
        self.conn.executemany("UPDATE features SET x = ?, y = ?, cluster = ? WHERE id = ?",
                              ((x, y, c, i) for i, x, y, c in rows))


IDENTITY_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


def sae_identity(sae) -> dict:
    """What ties a features.db to its SAE: ``{"sae_weights_sha256", "d_sae"}``.

    The hash covers the float32 bytes (and shapes) of W_enc, b_enc, W_dec and b_dec as loaded, so the
    SAE read back from its folder hashes the same as the one that was analysed.
    """
    h = hashlib.sha256()
    for name in IDENTITY_TENSORS:
        t = getattr(sae, name).detach().float().cpu().contiguous()
        h.update(f"{name}:{list(t.shape)};".encode())
        h.update(memoryview(t.numpy()).cast("B"))
    return {"sae_weights_sha256": h.hexdigest(), "d_sae": int(sae.d_sae)}


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
    with exclusive(path, "analysis"), atomic_path(path) as tmp, storage_errors(path):
        remove_stale_temps(path)   # .features.db.tmp-PID of a killed analysis
        tmp.write_bytes(b"")   # fails here, as an OSError, on a read-only folder (SQLite only says "unable to open")
        conn = sqlite3.connect(tmp)
        try:
            conn.execute("PRAGMA journal_mode = OFF")
            conn.execute("PRAGMA synchronous = OFF")
            conn.executescript(SCHEMA)
            writer = Writer(conn)
            writer.meta(schema_version=SCHEMA_VERSION)
            yield writer
            conn.executescript(INDEXES)
            rebuild_fts(conn)
            conn.commit()
        finally:
            conn.close()
