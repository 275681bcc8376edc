"""features.db: round trip, FTS search, explanations update, atomic build, 100k-feature speed, export, CLI."""

import json
import sqlite3
import time

import pytest

from saelab.cli import main
from saelab.featuredb import SCHEMA_VERSION, FeatureDB, build, fts_query


def feature_rows(n, explain=lambda i: ""):
    return [{"id": i, "count": i % 50, "density": (i % 50) / 1000, "max_act": float(i % 97), "mean_act": 0.5,
             "explanation": explain(i), "top_tokens": f"tok{i % 7} self", "cluster": i % 11,
             "x": float(i), "y": -float(i)} for i in range(n)]


def example(f, kind, rank, tokens, acts, max_pos):
    return {"feature": f, "kind": kind, "rank": rank, "quantile": 0.5 if kind == "quantile" else None,
            "max_act": acts[max_pos], "token_ids": list(range(len(tokens))), "tokens": tokens, "acts": acts,
            "max_pos": max_pos, "seq": 3, "pos": 7}


@pytest.fixture
def small_db(tmp_path):
    path = tmp_path / "features.db"
    with build(path) as w:
        w.meta(model_name="builtin", hook_name="blocks.2.hook_resid_post", d_sae=20, tokens_analysed=1000,
               context=16, corpus="stdlib", tokens_read=1000, config={"n_quantiles": 5})
        w.features(feature_rows(20, lambda i: "fires on `assert` in unittest code" if i == 4 else ""))
        # raw model text with newlines, quotes and markup stays exactly as written
        w.examples([example(4, "top", 0, ["<b>", " self", ".", "assert", "Equal", "\n"], [0, 0.1, 0, 2.5, 1.0, 0], 3),
                    example(4, "top", 1, ["x", "assert"], [0.0, 1.5], 1),
                    example(4, "quantile", 0, ["'", "\t"], [0.3, 0.0], 0)])
        w.logit_effects([(4, 1, 0, 9, "Equal", 1.5), (4, 1, 1, 8, "True", 1.0), (4, -1, 0, 7, "def", -2.0)])
        w.neighbours([(4, "decoder", 0, 5, 0.9), (4, "decoder", 1, 6, 0.8), (4, "coact", 0, 7, 0.3)])
        w.histograms([(4, 900, [0.1, 1.0, 10.0], [60, 40])])
        w.coactivation([(4, 7, 12), (4, 5, 30)])
    return path


def test_round_trip(small_db):
    with FeatureDB.open(small_db) as db:
        assert db.sae_info()["schema_version"] == SCHEMA_VERSION
        assert db.sae_info()["hook_name"] == "blocks.2.hook_resid_post"
        assert db.n_features == 20
        assert db.feature(4)["explanation"].startswith("fires on")
        top = db.examples(4, "top")
        assert [e["rank"] for e in top] == [0, 1]
        assert top[0]["tokens"] == ["<b>", " self", ".", "assert", "Equal", "\n"]
        assert top[0]["acts"][top[0]["max_pos"]] == 2.5
        assert db.examples(4, "quantile")[0]["tokens"] == ["'", "\t"]
        assert db.examples(4, "random") == []
        assert db.logit_effects(4) == {"positive": [("Equal", 1.5), ("True", 1.0)], "negative": [("def", -2.0)]}
        assert [n["other"] for n in db.neighbours(4)] == [5, 6, 7]
        assert [n["other"] for n in db.neighbours(4, "coact")] == [7]
        assert db.histogram(4) == {"zeros": 900, "edges": [0.1, 1.0, 10.0], "counts": [60, 40]}
        assert db.coactivation(4) == [(5, 30), (7, 12)]
        assert db.map_points()[3] == (3, 3.0, -3.0, 3, 0.003)
        assert db.clusters()[0] == (0, 2)
        assert [r["id"] for r in db.features("max_act", limit=3)] == [19, 18, 17]
        assert [r["id"] for r in db.features("density", cluster=2, descending=False)] == [2, 13]
        assert db.count(min_density=0.015) == 5
        assert len(db.live_features()) == 19


def test_search_and_explanation_update(small_db):
    with FeatureDB.open(small_db) as db:
        assert [h["id"] for h in db.search("unittest assert")] == [4]
        assert [h["id"] for h in db.search("asser")] == [4]  # last word is a prefix
        assert db.search("tok3")[0]["id"] == 3
        assert db.search('"; DROP TABLE features; --') == []  # quoted, never interpreted
        with pytest.raises(PermissionError, match="read-only"):
            db.set_explanations([(2, "fires on `yield`", "offline", 0.8)])
    with FeatureDB.open(small_db, writable=True) as db:
        db.set_explanations([(2, "fires on `yield` in generators", "llm", 0.8), (4, "", "", None)])
    with FeatureDB.open(small_db) as db:
        assert [h["id"] for h in db.search("generators")] == [2]
        assert db.search("unittest") == []
        assert db.feature(2)["score"] == 0.8 and db.feature(2)["explanation_source"] == "llm"


def test_user_errors(small_db, tmp_path):
    with pytest.raises(FileNotFoundError, match="saelab analyze"):
        FeatureDB.open(tmp_path / "missing.db")
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(ValueError, match="not a saelab feature database"):
        FeatureDB.open(tmp_path / "junk.db")
    conn = sqlite3.connect(small_db)
    conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="schema version 999"):
        FeatureDB.open(small_db)
    with pytest.raises(ValueError, match="no words"):
        fts_query("  ...  ")


def test_feature_range_and_kinds(small_db):
    with FeatureDB.open(small_db) as db:
        with pytest.raises(KeyError, match="features 0-19"):
            db.feature(20)
        with pytest.raises(ValueError, match="top, quantile, random"):
            db.examples(1, "best")
        with pytest.raises(ValueError, match="cannot order"):
            db.features("name")


def test_failed_build_keeps_the_old_database(small_db):
    with pytest.raises(RuntimeError):
        with build(small_db) as w:
            w.features(feature_rows(3))
            raise RuntimeError("crash mid-build")
    with FeatureDB.open(small_db) as db:
        assert db.n_features == 20
    assert [p.name for p in small_db.parent.iterdir()] == ["features.db"]


def test_100k_features_answer_in_milliseconds(tmp_path):
    path = tmp_path / "big.db"
    words = ["assert", "self", "import", "yield", "lambda", "return", "class", "print"]
    with build(path) as w:
        w.features(feature_rows(100_000, lambda i: f"fires on {words[i % 8]} number{i}"))
    with FeatureDB.open(path) as db:
        queries = {
            "by id": lambda: db.feature(76_543),
            "by density": lambda: db.features("density", limit=50),
            "by density, deep page": lambda: db.features("density", offset=50_000, limit=50),
            "by max_act": lambda: db.features("max_act", descending=False, limit=50),
            "by cluster": lambda: db.features("density", cluster=7, limit=50),
            "text search": lambda: db.search("yield number7", limit=20),
            "count in cluster": lambda: db.count(cluster=7),
        }
        for name, q in queries.items():
            assert q(), name
            start = time.perf_counter()
            for _ in range(5):
                q()
            ms = (time.perf_counter() - start) / 5 * 1000
            assert ms < 50, f"{name}: {ms:.1f} ms"  # typically < 5 ms; generous for a loaded CI machine
        plans = " ".join(r[-1] for r in db.conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM features WHERE cluster = 7 ORDER BY density DESC LIMIT 5"))
        assert "features_cluster" in plans


def test_cli_feature_search_export(small_db, tmp_path, capsys):
    assert main(["feature", str(small_db), "4"]) == 0
    out = capsys.readouterr().out
    assert "«assert»" in out and "<b> self." in out and "\\n" in out and "promotes" in out
    assert main(["feature", str(small_db), "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top"][0]["tokens"][-1] == "\n"
    assert main(["search", str(small_db), "unittest"]) == 0
    assert capsys.readouterr().out.split()[0] == "4"
    assert main(["feature", str(small_db), "99"]) == 2
    assert "features 0-19" in capsys.readouterr().err
    assert main(["search", str(small_db)]) == 2
    assert "give words" in capsys.readouterr().err


def test_one_page_for_the_cli_and_the_web(small_db, capsys):
    """FeatureDB.page is what both `saelab feature` and /api/features/{id} show."""
    with FeatureDB.open(small_db) as db:
        page = db.page(4)
        assert page["feature"] == db.feature(4) and page["examples"]["top"] == db.examples(4, "top")
        flat = db.neighbours(4)
        for kind, rows in page["neighbours"].items():
            assert [(r["id"], r["value"]) for r in rows] == [(n["other"], n["value"]) for n in flat if n["kind"] == kind]
            assert all(r["explanation"] == db.feature(r["id"])["explanation"] for r in rows)
    assert main(["feature", str(small_db), "4", "--json", "--examples", "2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["top"] == page["examples"]["top"][:2] and shown["neighbours"] == page["neighbours"]
