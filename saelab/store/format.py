"""The activation store's names, constants, manifest reading and running statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from saelab.atomic import regular_file
from saelab.errors import SaelabError


FORMAT = "saelab-activation-store"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SPLITS = ("train", "heldout", "all")
# log10(norm) histogram of stored rows: 0.025 dex bins from 1e-3 to 1e5 (quantiles to ~±3%).
HIST_LO, HIST_HI, HIST_BINS = -3.0, 5.0, 320
REQUIRED = ("format", "version", "model_name", "hook_name", "d_in", "dtype", "context", "shards")


class StoreError(SaelabError, ValueError):
    """A store folder or shard that is missing, truncated, corrupt or inconsistent with its manifest."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# -- running statistics ----------------------------------------------------------------------------

class RunningStats:
    """Per-dimension mean/var (Chan et al. parallel merge of Welford states) and row-norm summary."""

    def __init__(self, d_in: int):
        self.count = 0
        self.mean = torch.zeros(d_in, dtype=torch.float64)
        self.m2 = torch.zeros(d_in, dtype=torch.float64)
        self.norm_mean = 0.0
        self.norm_m2 = 0.0
        self.norm_min = math.inf
        self.norm_max = 0.0
        self.hist = torch.zeros(HIST_BINS + 2, dtype=torch.int64)  # [underflow, bins..., overflow]

    def update(self, x: torch.Tensor, norms: torch.Tensor) -> None:
        """Merge a batch ``x [n, d_in]`` with its row norms ``[n]``."""
        n = x.shape[0]
        if n == 0:
            return
        # Chunk moments in float32 (callers pass chunks of ~1e4 rows), merged in float64.
        x = x.float()
        b_mean32 = x.mean(0)                                         # (d_in,)
        b_m2 = ((x - b_mean32) ** 2).sum(0).double()                 # (d_in,)
        b_mean = b_mean32.double()
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += b_m2 + delta ** 2 * (self.count * n / total)
        nd = norms.double()
        nb_mean = float(nd.mean())
        nb_m2 = float(((nd - nb_mean) ** 2).sum())
        nd_delta = nb_mean - self.norm_mean
        self.norm_mean += nd_delta * n / total
        self.norm_m2 += nb_m2 + nd_delta ** 2 * self.count * n / total
        self.norm_min = min(self.norm_min, float(nd.min()))
        self.norm_max = max(self.norm_max, float(nd.max()))
        logs = torch.log10(nd.clamp_min(1e-30))
        idx = ((logs - HIST_LO) / (HIST_HI - HIST_LO) * HIST_BINS).floor().clamp(-1, HIST_BINS).long() + 1
        self.hist += torch.bincount(idx, minlength=HIST_BINS + 2)
        self.count = total

    def norm_quantile(self, q: float) -> float:
        """Approximate quantile of the row norms from the log histogram (bin centre)."""
        if self.count == 0:
            return float("nan")
        cum = torch.cumsum(self.hist, 0)
        i = int(torch.searchsorted(cum, torch.tensor(q * self.count, dtype=torch.float64).long().clamp_min(1)))
        if i == 0:
            return self.norm_min
        if i == HIST_BINS + 1:
            return self.norm_max
        return 10 ** (HIST_LO + (i - 0.5) * (HIST_HI - HIST_LO) / HIST_BINS)

    def to_json(self) -> dict:
        var = (self.m2 / max(self.count, 1)).tolist()
        return {
            "count": self.count, "mean": self.mean.tolist(), "var": var, "m2": self.m2.tolist(),
            "norm": {"mean": self.norm_mean, "m2": self.norm_m2, "std": math.sqrt(self.norm_m2 / max(self.count, 1)),
                     "min": self.norm_min if self.count else None, "max": self.norm_max,
                     "median": self.norm_quantile(0.5) if self.count else None,
                     "p99": self.norm_quantile(0.99) if self.count else None,
                     "log10_hist": {"lo": HIST_LO, "hi": HIST_HI, "counts": self.hist.tolist()}},
        }

    @classmethod
    def from_json(cls, obj: dict) -> "RunningStats":
        s = cls(len(obj["mean"]))
        s.count = int(obj["count"])
        s.mean = torch.tensor(obj["mean"], dtype=torch.float64)
        s.m2 = torch.tensor(obj["m2"], dtype=torch.float64)
        norm = obj["norm"]
        s.norm_mean, s.norm_m2, s.norm_max = norm["mean"], norm["m2"], norm["max"]
        s.norm_min = math.inf if norm["min"] is None else norm["min"]
        s.hist = torch.tensor(norm["log10_hist"]["counts"], dtype=torch.int64)
        return s


def read_manifest(path: Path) -> dict:
    """Parse and minimally validate ``path/manifest.json``."""
    file = regular_file(Path(path) / MANIFEST, "store manifest")
    if not file.exists():
        raise FileNotFoundError(f"{path} is not an activation store: no {MANIFEST} in it "
                                "(make one with 'saelab harvest')")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{file}: not valid JSON ({e}); the store is damaged") from None
    missing = [k for k in REQUIRED if k not in manifest] if isinstance(manifest, dict) else list(REQUIRED)
    if missing or manifest.get("format") != FORMAT:
        raise StoreError(f"{file}: not a saelab activation store manifest (missing {', '.join(missing) or 'format'})")
    if manifest["version"] > VERSION:
        raise StoreError(f"{file}: store format version {manifest['version']} is newer than this saelab "
                         f"understands ({VERSION}); upgrade saelab")
    if manifest["dtype"] not in DTYPES:
        raise StoreError(f"{file}: unknown dtype {manifest['dtype']!r}")
    _check_shard_entries(manifest["shards"], file)
    return manifest


SHARD_KEYS = {"file": str, "rows": int, "bytes": int, "sha256": str}


def _check_shard_entries(shards, file: Path) -> None:
    """Every shard entry names a plain file inside the store, with its row count, size and checksum.

    A name such as ``/etc/passwd`` or ``../other/shard.safetensors`` would make reading and ``verify``
    open a file outside the store, so it is refused before anything is opened.
    """
    if not isinstance(shards, list):
        raise StoreError(f"{file}: 'shards' must be a list, found {type(shards).__name__}; the store is damaged")
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise StoreError(f"{file}: shard entry {i} is not an object; the store is damaged")
        for key, kind in SHARD_KEYS.items():
            value = entry.get(key)
            if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
                raise StoreError(f"{file}: shard entry {i} has no valid {key!r} (found {value!r}); the store is damaged")
        name = entry["file"]
        if (name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith(".")
                or Path(name).is_absolute() or Path(name).name != name):
            raise StoreError(f"{file}: shard entry {i} names {name!r}, which is not a plain file name inside the "
                             "store; refusing to read it (shards are files like shard-00000.safetensors)")
