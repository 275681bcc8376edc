"""A concept is a file: the dial (features or a direction, mode, strength and unit, positions), its measures and
the identity of the SAE it belongs to (``saelab concept ... --save concepts/NAME.json``).

Schema (JSON, version ``saelab_concept: 1``; documented in docs/measures.md)::

    {"saelab_concept": 1, "name": "golden-gate", "method": "sae" | "difference-of-means",
     "features": [3737, 3594], "mode": "clamp" | "add" | "vector", "strength": 2.0, "unit": "max" | "norm",
     "positions": "all" | "generated", "direction": null | [d_in floats],
     "sae": {"hook": "...", "d_in": 576, "d_sae": 9216, "weights_sha256": "..."},
     "keywords": [...], "measures": {...}}

A concept file of another SAE (another hook, width or weights) is refused with one line (:class:`SAEMismatch`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from saelab.atomic import write_json
from saelab.errors import SAEMismatch
from saelab.featuredb.writing import sae_identity
from saelab.steer import MODES, UNITS, DialSpec, sae_hook_name

VERSION = 1
METHODS = ("sae", "difference-of-means")


@dataclass
class ConceptFile:
    """A saved dial and what it was measured to do."""

    name: str
    """The concept's name (for people)."""
    features: list[int]
    """SAE features the dial turns (empty for a difference-of-means dial)."""
    mode: str
    """clamp, add or vector (:class:`saelab.steer.DialSpec`)."""
    strength: float
    """The calibrated strength, in ``unit``."""
    unit: str = "max"
    """max (× each feature's max activation) or norm (× the residual norm at the edited position)."""
    positions: str = "all"
    """all or generated."""
    method: str = "sae"
    """sae or difference-of-means."""
    direction: list[float] | None = None
    """The added direction ``[d_in]`` of a difference-of-means dial."""
    sae: dict = field(default_factory=dict)
    """The SAE it belongs to: hook, d_in, d_sae, weights_sha256."""
    keywords: list[str] = field(default_factory=list)
    """Words that mark an answer on concept, if known."""
    measures: dict = field(default_factory=dict)
    """What calibration measured (concept rate, fluency, relevance ...), free-form."""

    def spec(self) -> DialSpec:
        return DialSpec(tuple(self.features), self.mode, self.unit, self.positions,
                        tuple(self.direction) if self.direction is not None else None)


def sae_id(sae) -> dict:
    ident = sae_identity(sae)
    return {"hook": sae_hook_name(sae), "d_in": int(sae.cfg.d_in), "d_sae": ident["d_sae"],
            "weights_sha256": ident["sae_weights_sha256"]}


def make_concept(sae, name: str, spec: DialSpec, strength: float, method: str = "sae", keywords=(),
                 measures: dict | None = None) -> ConceptFile:
    return ConceptFile(name, list(spec.features), spec.mode, float(strength), spec.unit, spec.positions, method,
                       list(spec.direction) if spec.direction is not None else None, sae_id(sae), list(keywords),
                       measures or {})


def save_concept(path: Path | str, concept: ConceptFile) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"saelab_concept": VERSION, **asdict(concept)})
    return path


def _bad(path, what: str) -> ValueError:
    return ValueError(f"{path}: not a saelab concept file ({what}); make one with 'saelab concept ... --save FILE'")


def load_concept(path: Path | str, sae=None) -> ConceptFile:
    """Read a concept file; with ``sae``, refuse it unless it was made for that SAE (hook, widths, weights)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such concept file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(path, f"invalid JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("saelab_concept") != VERSION:
        raise _bad(path, f"expected 'saelab_concept': {VERSION}")
    fields = ConceptFile.__dataclass_fields__
    try:
        concept = ConceptFile(**{k: v for k, v in obj.items() if k in fields})
    except TypeError as e:
        raise _bad(path, str(e)) from None
    check(concept, path)
    if sae is not None:
        check_sae(concept, sae, path)
    return concept


def check(c: ConceptFile, path) -> None:
    if c.mode not in MODES or c.unit not in UNITS or c.method not in METHODS:
        raise _bad(path, f"mode {c.mode!r}, unit {c.unit!r}, method {c.method!r}")
    if not isinstance(c.strength, (int, float)) or isinstance(c.strength, bool) or not math.isfinite(c.strength):
        raise _bad(path, f"strength {c.strength!r} is not a finite number")
    if not all(isinstance(f, int) and not isinstance(f, bool) for f in c.features):
        raise _bad(path, "features must be integer ids")
    try:
        c.spec()
    except ValueError as e:
        raise _bad(path, str(e)) from None


def check_sae(c: ConceptFile, sae, path) -> None:
    """One line when ``c`` belongs to another SAE: which property differs, and what to do."""
    mine = sae_id(sae)
    diff = [k for k in ("hook", "d_in", "d_sae", "weights_sha256") if c.sae.get(k) is not None and c.sae[k] != mine[k]]
    if diff or not c.sae:
        what = ", ".join(f"{k} {str(c.sae.get(k))[:12]} ≠ {str(mine[k])[:12]}" for k in diff) or "no SAE recorded"
        raise SAEMismatch(f"{path} was made for another SAE ({what}): make the concept again for this SAE with "
                          "'saelab concept ... --save FILE'")
    bad = [f for f in c.features if not 0 <= f < mine["d_sae"]]
    if bad:
        raise _bad(path, f"feature {bad[0]} does not exist in an SAE of {mine['d_sae']} features")


def parse_concept_arg(text: str) -> tuple[str, float | None]:
    """``FILE`` or ``FILE=STRENGTH`` → (path, strength or None for the calibrated one)."""
    path, sep, value = text.rpartition("=")
    if not sep or not path:
        return text, None
    try:
        v = float(value.rstrip("x×"))
    except ValueError:
        return text, None  # a file name with '=' in it
    if not math.isfinite(v):
        raise ValueError(f"--concept {text!r}: the strength must be a finite number")
    return path, v
