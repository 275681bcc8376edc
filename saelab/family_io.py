"""A sweep on disk for :mod:`saelab.families`: its members, the token sample, families.json, one feature's family.

A sweep folder holds ``sweep.json`` (``{"format": "saelab-sweep", "members": [{"name", "d_sae", "k", "path"},
...]}``, smallest first; :mod:`saelab.sweep`) and one SAE folder per member; ``families.json`` is written
beside it. A sweep that also scans k is matched at one k. A plain list of SAE folders (smallest first)
works too.

**The token sample.** Every SAE encodes the same rows of the activation store it was trained on:
the store's *held-out* split (whole sequences the trainer never trained on, with the training run's
``heldout_fraction``), the first ``tokens`` rows of it in storage order; when the held-out split has
fewer than ``MIN_HELDOUT`` rows, the first ``tokens`` rows of the whole store. families.json records which.
The store is ``--acts``, else sweep.json's ``acts`` (or ``config.acts``), else ``acts/`` beside the sweep folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from saelab.atomic import write_json
from saelab.families import FORMAT, FamilyConfig, families, families_json
from saelab.formats import load_sae
from saelab.progress import stage
from saelab.provenance import Provenance
from saelab.session import check_members
from saelab.store import ActivationStore
from saelab.store.reading import non_finite_rows

SWEEP_FILE, FAMILIES_FILE = "sweep.json", "families.json"
SWEEP_FORMAT = "saelab-sweep"
MIN_HELDOUT = 1024
"""Fewer held-out rows than this and the sample comes from the whole store (a tiny store's split is too thin)."""


class Sweep(NamedTuple):
    folder: Path | None
    """The sweep folder (families.json goes here); None for a bare list of SAE folders."""
    members: list[dict]
    """name, d_sae, k, arch, path (absolute) of each SAE, smallest first."""
    config: dict
    """sweep.json's training config ({} without one)."""
    acts: str | None = None
    """sweep.json's ``acts``: the store the members were trained on (None when streamed, or without sweep.json)."""


def read_sweep(paths: Sequence[str | Path], k: int | None = None) -> Sweep:
    """A sweep folder (with sweep.json) or two or more SAE folders, smallest first; ``k`` picks the members
    with that k from a sweep that scans k too."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        folder = paths[0]
        file = folder / SWEEP_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no sweep.json; give a sweep folder from 'saelab sweep' or two or more "
                                    f"SAE folders, smallest first")
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: unreadable sweep.json ({e}); re-run 'saelab sweep' or list the SAE "
                             f"folders") from None
        members = doc.get("members") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or doc.get("format") != SWEEP_FORMAT or not isinstance(members, list) or not all(
                isinstance(m, dict) and isinstance(m.get("path"), str) for m in members):
            raise ValueError(f"{file}: not a saelab sweep (expected format {SWEEP_FORMAT!r} and members with a path)")
        out = [{**m, "name": str(m.get("name") or m["path"]), "path": str((folder / m["path"]).resolve())}
               for m in members if k is None or m.get("k") == k]
        ks = sorted({m.get("k") for m in members if m.get("k") is not None})
        if k is not None and not out:
            raise ValueError(f"{file}: no member has k={k} (the sweep has k = {', '.join(map(str, ks)) or 'none'})")
        if len({m.get("d_sae") for m in out}) < len(out):
            raise ValueError(f"{file}: the sweep scans k as well as latents (k = {', '.join(map(str, ks))}); "
                             f"families compare sizes at one k: choose it (CLI: --k)")
        config = doc.get("config", doc.get("train_config"))
        acts = doc.get("acts") if isinstance(doc.get("acts"), str) else None
        return Sweep(folder, out, config if isinstance(config, dict) else {}, acts)
    out = [{"name": p.name, "path": str(p.resolve())} for p in paths]
    return Sweep(None, out, {})


def load_members(sweep: Sweep) -> list:
    """Load every member's SAE; the same d_in and hook for all, sizes strictly growing."""
    if len(sweep.members) < 2:
        raise ValueError(f"feature families need at least two SAE sizes; {sweep.folder or 'the list'} has "
                         f"{len(sweep.members)}")
    saes = []
    for m in sweep.members:
        if not Path(m["path"]).is_dir():
            raise FileNotFoundError(f"{m['path']}: SAE folder of sweep member {m['name']!r} is missing")
        saes.append(load_sae(m["path"]).eval())
    check_members([(m["name"], m["path"]) for m in sweep.members], saes, sweep.folder, "families")
    sizes = [s.cfg.d_sae for s in saes]
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"SAE sizes must grow from one member to the next (smallest first); got {sizes}")
    for m, sae in zip(sweep.members, saes):
        m.update(d_sae=sae.cfg.d_sae, k=sae.cfg.k, arch=sae.cfg.architecture)
    return saes


def find_store(sweep: Sweep, acts: str | Path | None) -> Path:
    """``acts``, else sweep.json's ``acts`` (or ``config.acts``), else ``acts/`` beside the sweep folder."""
    if acts is not None:
        return Path(acts)
    named = sweep.acts or sweep.config.get("acts")
    if isinstance(named, str) and Path(named).is_dir():     # recorded as an absolute path: the run may have moved
        return Path(named)
    if sweep.folder is not None and (sweep.folder.parent / "acts" / "manifest.json").is_file():
        return sweep.folder.parent / "acts"
    raise ValueError("cannot tell which activation store the SAEs were trained on; pass it (CLI: --acts STORE)")


def sample_rows(store: ActivationStore, tokens: int, heldout_fraction: float) -> tuple[torch.Tensor, dict]:
    """The first ``tokens`` rows of the held-out split (else of the whole store), float32 ``[n, d_in]``."""
    split = "heldout" if store.n_rows_in("heldout", heldout_fraction) >= MIN_HELDOUT else "all"
    avail = store.n_rows_in(split, heldout_fraction)
    n = min(tokens, avail)
    batch = min(4096, n)
    rows, got = [], 0
    for x in store.batches(batch, split=split, heldout_fraction=heldout_fraction, shuffle=False, epochs=1, prefetch=0):
        rows.append(x[:n - got])
        got += rows[-1].shape[0]
        if got >= n:
            break
    x = torch.cat(rows)                                                   # (n', d_in)
    bad = non_finite_rows(x)
    if bad:   # NaN codes would match nothing and families.json would silently say so
        raise ValueError(f"{store.path}: {len(bad)} of the {x.shape[0]} sampled rows hold NaN/inf values (first rows "
                         f"{bad[:5]}); check the store with 'saelab store verify' and re-harvest it")
    return x, {"store": str(store.path), "split": split, "heldout_fraction": heldout_fraction, "rows": int(x.shape[0])}


def run_families(paths: Sequence[str | Path], acts=None, tokens: int = 16384, cfg: FamilyConfig | None = None,
                 write: bool = True, k: int | None = None) -> dict:
    """Load the sweep, sample the store, match every size step; write families.json into the sweep folder."""
    cfg = cfg or FamilyConfig()
    sweep = read_sweep(paths, k)
    saes = load_members(sweep)
    store = ActivationStore.open(find_store(sweep, acts))
    if store.d_in != saes[0].cfg.d_in:
        raise ValueError(f"{store.path}: rows have d_in={store.d_in}, the SAEs read d_in={saes[0].cfg.d_in}; "
                         f"pass the store they were trained on (--acts)")
    frac = Provenance.of(saes[0]).heldout_fraction
    start = time.perf_counter()
    with stage(f"families: sample {tokens:,} held-out rows, match {len(saes) - 1} size steps"):
        x, sample = sample_rows(store, tokens, frac)
        steps = families(saes, x, cfg)
    doc = families_json(steps, sweep.members, cfg, {**sample, "seconds": round(time.perf_counter() - start, 2)})
    if write and sweep.folder is not None:
        write_json(sweep.folder / FAMILIES_FILE, doc)
        doc["written"] = str(sweep.folder / FAMILIES_FILE)
    return doc


# -- one feature's family, for the web app --------------------------------------------------------

def read_families(sae_dir: Path) -> tuple[dict, int] | None:
    """(families.json, index of ``sae_dir`` among its sizes) when ``sae_dir`` is a member of a sweep with
    families.json in its parent folder; None otherwise (also when the file is not a families document)."""
    file = Path(sae_dir).parent / FAMILIES_FILE
    if not file.is_file() or not (file.parent / SWEEP_FILE).is_file():
        return None
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: unreadable families.json ({e}); re-run 'saelab families {file.parent}'") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    me = Path(sae_dir).resolve()
    for t, m in enumerate(doc.get("sizes") or []):
        if Path(m.get("path", "")).resolve() == me or Path(m.get("path", "")).name == me.name:
            return doc, t
    return None


def feature_family(doc: dict, t: int, feature: int) -> dict:
    """Feature ``feature`` of size ``t``: its parent in size t-1 and its children in size t+1, with scores."""
    sizes, steps = doc["sizes"], doc["steps"]
    out: dict = {"size": sizes[t]["name"], "parent": None, "relation": None, "children": [], "child_relation": None,
                 "smaller": sizes[t - 1] if t > 0 else None, "larger": sizes[t + 1] if t + 1 < len(sizes) else None}
    if t > 0:
        lf = steps[t - 1]["large_features"]
        out["relation"] = lf["relation"][feature]
        if lf["parent"][feature] is not None:
            out["parent"] = {"id": lf["parent"][feature], "cos": lf["cos"][feature], "co": lf["co"][feature],
                             "score": lf["score"][feature]}
    if t + 1 < len(sizes):
        sf, lf = steps[t]["small_features"], steps[t]["large_features"]
        out["child_relation"] = sf["relation"][feature]
        out["coverage"] = sf["coverage"][feature]
        out["children"] = [{"id": j, "cos": lf["cos"][j], "co": lf["co"][j], "score": lf["score"][j]}
                           for j in sf["children"][feature]]
    return out
