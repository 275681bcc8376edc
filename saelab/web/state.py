"""The artifacts one server shows: features.db, the SAE folder, eval.json, the training log, the model.

Every path is settled once, when the server starts, from the command line; requests only ever name
features by integer id, never files.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path

import numpy as np

from saelab.family_io import feature_family, read_families
from saelab.featuredb import FeatureDB
from saelab.fmap import cluster_names
from saelab.provenance import Provenance
from saelab.session import FEATURES_DB, SAE_DIR, features_db_beside, open_run
from saelab.models import load_model

log = logging.getLogger(__name__)

TRAIN_LOG_NAMES = ("train_log.jsonl", "train.jsonl", "log.jsonl", "metrics.jsonl")
TRAIN_METRICS = ("fvu", "l0", "dead_fraction", "loss", "mse", "aux")
LOG_SCALE_METRICS = ("loss", "mse", "fvu")


def locate(run_dir=None, db=None, sae=None) -> tuple[Path, Path | None]:
    """(features.db, SAE folder or None) from a run folder and/or explicit paths; clear errors if missing."""
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir}: no such run folder (expected sae/, features.db, eval.json)")
        db = db or features_db_beside(run_dir / SAE_DIR)
        if sae is None and (run_dir / SAE_DIR).is_dir():
            sae = run_dir / SAE_DIR
    if db is None:
        raise ValueError("give a run folder, or --db FEATURES_DB (and --sae SAE_DIR for inspect/steer/monitor)")
    db = Path(db)
    if not db.is_file():
        raise FileNotFoundError(f"{db}: no feature database here; make one with 'saelab analyze SAE_DIR'")
    if sae is not None and not isinstance(sae, (str, Path)):
        return db, None
    if sae is not None and not Path(sae).is_dir():
        raise FileNotFoundError(f"{sae}: no SAE folder here")
    return db, (Path(sae) if sae is not None else None)


def read_train_log(folder: Path | None) -> list[dict]:
    """The training log's JSON lines (metrics per step), or [] when there is none."""
    if folder is None:
        return []
    for name in TRAIN_LOG_NAMES:
        path = folder / name
        if path.is_file():
            rows = []
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash mid-write; the rest of the log is still good
                if isinstance(row, dict):
                    rows.append(row)
            return rows
    return []


def train_curve(rows: list[dict]) -> dict | None:
    """Plot data for the overview: x (tokens or step) and each known metric logged in ``rows``."""
    xkey = next((k for k in ("tokens", "step") if any(k in r for r in rows)), None)
    if xkey is None:
        return None
    rows = [r for r in rows if isinstance(r.get(xkey), (int, float))]
    series = {}
    for name in TRAIN_METRICS:
        values = [r.get(name) for r in rows]
        if any(isinstance(v, (int, float)) for v in values):
            series[name] = [v if isinstance(v, (int, float)) and math.isfinite(v) else None for v in values]
    if not series:
        return None
    return {"x": [r[xkey] for r in rows], "xlabel": xkey, "series": dict(list(series.items())[:4]),
            "log": [m for m in LOG_SCALE_METRICS if m in series]}


class RunState:
    """Opened artifacts of one run; the SAE and the model load on first use (once, under a lock)."""

    def __init__(self, db_path: Path, sae_path: Path | None = None, *, sae=None, model=None,
                 eval_path: Path | None = None):
        self.db = FeatureDB.open(db_path, check=True)   # a damaged database stops the server at start
        self.db_path = db_path
        self.sae_path = sae_path
        self._sae = sae
        self._sae_checked = False
        self._model = model if not isinstance(model, str) else None
        self._model_name = model if isinstance(model, str) else None
        self._load_lock = threading.Lock()
        self.eval = self._read_eval(eval_path)
        self.train_rows = read_train_log(sae_path)
        self._stats: dict[str, np.ndarray] | None = None
        self._map_json: bytes | None = None
        self._family = self._read_family()

    @classmethod
    def open(cls, run_dir=None, *, db=None, sae=None, model=None) -> "RunState":
        db_path, sae_path = locate(run_dir, db, sae)
        eval_path = None
        for folder in (Path(run_dir) if run_dir is not None else None, sae_path):
            if folder is not None and (folder / "eval.json").is_file():
                eval_path = folder / "eval.json"
                break
        return cls(db_path, sae_path, sae=None if isinstance(sae, (str, Path)) else sae, model=model,
                   eval_path=eval_path)

    @staticmethod
    def _read_eval(path: Path | None) -> dict | None:
        if path is None:
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable eval.json ({e}); re-run 'saelab eval' or delete it") from None

    def _read_family(self) -> tuple[dict, int] | None:
        """(families.json, this SAE's size index) when the SAE folder (else features.db's folder) is a member
        of a sweep with families.json beside sweep.json and the member has this database's feature count."""
        folder = self.sae_path if self.sae_path is not None else self.db_path.parent
        try:
            found = read_families(folder)
            if found is None:
                return None
            doc, t = found
            if doc["sizes"][t].get("d_sae") != self.db.count():
                return None
            self._family = found
            self.family_relations()       # every part the pages read, read once here
            return found
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            # families.json is an extra: a damaged one costs the family colours, not the server
            log.warning("ignoring the families.json of %s (%s: %s); re-run 'saelab families'", folder.parent,
                        type(e).__name__, e)
            return None
        finally:
            self._family = None

    def family(self, feature: int) -> dict | None:
        """The feature's parent in the next-smaller SAE and children in the next-larger (None outside a sweep)."""
        return feature_family(*self._family, feature) if self._family is not None else None

    def family_relations(self) -> dict | None:
        """Per feature id: its relation from the next-smaller SAE (persist | split | new) and into the next-larger
        (persist | split | vanished), each None at the ends of the sweep; None outside a sweep."""
        if self._family is None:
            return None
        doc, t = self._family
        up = doc["steps"][t - 1]["large_features"]["relation"] if t > 0 else None
        down = doc["steps"][t]["small_features"]["relation"] if t < len(doc["steps"]) else None
        sizes = doc["sizes"]
        return {"size": sizes[t]["name"], "smaller": sizes[t - 1]["name"] if t > 0 else None,
                "larger": sizes[t + 1]["name"] if t + 1 < len(sizes) else None, "up": up, "down": down}

    @property
    def label(self) -> str:
        return str(self.db_path.parent if self.db_path.name == FEATURES_DB else self.db_path)

    # -- lazy model and SAE --------------------------------------------------------------------------

    @property
    def has_sae(self) -> bool:
        return self._sae is not None or self.sae_path is not None

    def sae(self):
        with self._load_lock:
            if self._sae is None:
                if self.sae_path is None:
                    raise LookupError("this server has no SAE folder (start it with a run folder or --sae SAE_DIR); "
                                      "inspect, steer and monitor need one")
                self._sae = open_run(self.sae_path, db=self.db_path).sae   # another SAE's features.db: refused
            elif not self._sae_checked:
                open_run(self._sae, db=self.db_path)
            self._sae_checked = True
            return self._sae

    def model_name(self) -> str:
        if self._model_name:
            return self._model_name
        info = self.db.sae_info()
        name = (Provenance.of(self._sae).model_name if self._sae is not None else None) or info.get("model_name")
        if not name:
            raise LookupError("cannot tell which model this SAE reads (no model_name in saelab.json or features.db); "
                              "start the server with --model NAME")
        return name

    def model(self):
        self.sae()
        with self._load_lock:
            if self._model is None:
                self._model = load_model(self.model_name())
            return self._model

    def warm(self) -> str | None:
        """Load the SAE and the model now; returns why not (None when both loaded or there is no SAE)."""
        if not self.has_sae:
            return "no SAE folder"
        self.sae()   # a features.db of another SAE is refused here, before the server starts
        try:
            self.model()
        except (OSError, ValueError, LookupError) as e:
            return str(e)
        return None

    # -- whole-dictionary data, computed once ---------------------------------------------------------

    def stats(self) -> dict[str, np.ndarray]:
        """density and max_act of every feature, by id."""
        if self._stats is None:
            # a value that is not a number (a damaged row) counts as NaN here; its feature page names it
            rows = self.db.query("SELECT " + ", ".join(f"CASE WHEN typeof({c}) IN ('real', 'integer') THEN {c} END"
                                                       for c in ("density", "max_act")) + " FROM features ORDER BY id")
            arr = np.array([tuple(r) for r in rows], dtype=np.float64).reshape(-1, 2)
            self._stats = {"density": arr[:, 0], "max_act": arr[:, 1]}
        return self._stats

    def density_histogram(self, bins: int = 40) -> dict:
        """log10-density histogram of the features that fired (dead ones are counted apart)."""
        density = self.stats()["density"]
        live = density[density > 0]
        if live.size == 0:
            return {"centers": [], "counts": [], "width": 0, "dead": int(density.size)}
        logs = np.log10(live)
        lo, hi = float(logs.min()), float(logs.max())
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges = np.histogram(logs, bins=bins, range=(lo, hi))
        return {"centers": ((edges[:-1] + edges[1:]) / 2).tolist(), "counts": counts.tolist(),
                "width": float(edges[1] - edges[0]), "dead": int(density.size - live.size)}

    def map_json(self) -> bytes:
        """Every mapped feature as columns (ids, x, y, cluster, density, label: its explanation cut to
        ``LABEL_CHARS``) and each cluster's name, size and centre (the members' median x, y), serialised once."""
        if self._map_json is None:
            pts = self.db.map_points()
            cols = list(zip(*pts)) if pts else [[], [], [], [], []]
            expl = dict(self.db.conn.execute("SELECT id, explanation FROM features WHERE x IS NOT NULL"))
            texts = [expl.get(i) or "" for i in cols[0]]
            data = {"ids": list(cols[0]), "x": [round(v, 5) for v in cols[1]], "y": [round(v, 5) for v in cols[2]],
                    "cluster": list(cols[3]), "density": [float(f"{v:.4g}") for v in cols[4]],
                    "label": [_short(t) for t in texts], "clusters": _clusters(cols[3], cols[1], cols[2], texts)}
            fam = self.family_relations()
            if fam is not None:   # per mapped point, like the other columns
                data["family"] = {**fam, **{k: [fam[k][i] for i in cols[0]] if fam[k] else None
                                            for k in ("up", "down")}}
            self._map_json = json.dumps(data, separators=(",", ":")).encode()
        return self._map_json


LABEL_CHARS = 60


def _short(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "…"


def _clusters(cluster, x, y, texts) -> list[dict]:
    """Clusters, largest first: id, name (from the members' explanations; "" when none is explained), size,
    and the median position of the members (where the map writes the name)."""

    names = cluster_names(cluster, texts)
    members: dict[int, list[int]] = {}
    for i, c in enumerate(cluster):
        if c is not None and c >= 0:
            members.setdefault(int(c), []).append(i)
    out = [{"id": c, "name": names.get(c, ""), "size": len(idx), "x": round(float(np.median([x[i] for i in idx])), 5),
            "y": round(float(np.median([y[i] for i in idx])), 5)} for c, idx in members.items()]
    return sorted(out, key=lambda r: (-r["size"], r["id"]))
