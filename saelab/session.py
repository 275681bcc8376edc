"""Opening a run: an SAE, the features.db made for it and the model it reads, checked against each other once.

A run folder (``runs/NAME``) holds ``sae/``, ``features.db`` and ``eval.json``; the features.db of an SAE
folder is the one beside it (``<sae>/../features.db``, where ``saelab analyze`` writes it).
:func:`open_run` resolves either, loads the SAE, and refuses a features.db of another SAE (or a model
other than the one the SAE was trained on) with one line that names both. Every stage, the CLI and the
web server open runs here; this is the only code that looks for the features.db beside an SAE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from saelab.errors import SAEMismatch
from saelab.featuredb import FeatureDB
from saelab.formats import load_sae
from saelab.models import LoadedModel, load_model
from saelab.positions import PositionRule
from saelab.provenance import Provenance, StageInputs, stage_inputs
from saelab.sae import SAE

FEATURES_DB = "features.db"
SAE_DIR = "sae"


def sae_folder(path: Path | str) -> Path:
    """The SAE folder of ``path``: ``path/sae`` for a run folder that holds one, else ``path``."""
    path = Path(path).expanduser()
    inner = path / SAE_DIR
    return inner if not (path / "cfg.json").exists() and (inner / "cfg.json").exists() else path


def features_db_beside(sae_path: Path | str) -> Path:
    """Where the features.db of the SAE folder ``sae_path`` lives (whether or not it exists yet)."""
    return Path(sae_path).expanduser().resolve().parent / FEATURES_DB


@dataclass
class RunFolder:
    """One opened run: the SAE, where it came from, its features.db (checked to be its own) and its model."""

    sae: SAE
    """The SAE, loaded (eval mode)."""
    sae_path: Path | None
    """Its folder (None for an SAE given in memory)."""
    db_path: Path | None
    """Its features.db (None when there is none)."""
    provenance: Provenance
    """Where the SAE comes from."""
    model_arg: LoadedModel | str | None = None
    """The model the caller named (None: the SAE's own)."""
    device: str | torch.device = "cpu"
    """Where an SAE loaded from its folder is put, and where the model loads."""
    _model: LoadedModel | None = field(default=None, repr=False)
    """The model once loaded."""

    def db(self, writable: bool = False) -> FeatureDB:
        """The features.db, opened (its identity was checked when the run was opened)."""
        if self.db_path is None:
            raise FileNotFoundError(f"{self.sae_path or 'this SAE'} has no features.db beside it; make one with "
                                    "'saelab analyze SAE_DIR' (or pass --db)")
        return FeatureDB.open(self.db_path, writable=writable)

    def inputs(self, **overrides) -> StageInputs:
        """Model name, hook, corpus, context and BOS rule of a stage on this SAE (overrides win)."""
        given = self.model_arg.name if isinstance(self.model_arg, LoadedModel) else self.model_arg
        return stage_inputs(self.sae, model=given, **overrides)

    def model(self) -> LoadedModel:
        """The model, loaded once. The SAE's own model (none named) is refused when its weights are not those
        the SAE records; a model the caller names is theirs to choose (``saelab eval`` warns about it)."""
        if self._model is None:
            lm = self.model_arg if isinstance(self.model_arg, LoadedModel) else \
                load_model(self.inputs().model_name, device=self.device)
            if self.model_arg is None:
                check_model(self.provenance, lm, self.sae_path)
            self._model = lm
        return self._model

    def position_rule(self, exclude_bos: bool | None = None) -> PositionRule:
        """The one rule for which positions count with this SAE (what its training data left out)."""
        return self.provenance.position_rule(self.model().tokenizer, exclude_bos)


def check_model(prov: Provenance, lm: LoadedModel, where: Path | str | None = None) -> None:
    """Refuse a model whose weights differ from those the SAE records (SAEMismatch, one line)."""
    if prov.model_weights_sha256 and lm.weights_hash and prov.model_weights_sha256 != lm.weights_hash:
        raise SAEMismatch(f"the SAE {('at ' + str(where) + ' ') if where else ''}was trained on {prov.model_name} "
                          f"(weights sha256 {prov.model_weights_sha256[:12]}…), not on {lm.name} "
                          f"(sha256 {lm.weights_hash[:12]}…); pass the model it was trained on (--model)")


def open_run(sae: SAE | Path | str, model: LoadedModel | str | None = None, db: Path | str | bool | None = None,
             device: str | torch.device = "cpu") -> RunFolder:
    """Open a run: ``sae`` (a run folder, an SAE folder, or an SAE), ``model`` (default: the SAE's own,
    loaded on first use), ``db`` (a features.db; None: the one beside the SAE folder when there is one;
    False: none). A features.db built for another SAE is refused here (SAEMismatch), before any model loads."""
    sae_path = None
    if isinstance(sae, (str, Path)):
        sae_path = sae_folder(sae)
        if not sae_path.exists():
            raise FileNotFoundError(f"{sae}: no such SAE folder")
        sae = load_sae(sae_path, device=device)
        sae_path = sae_path.resolve()
    db_path = None
    if db not in (None, False):
        db_path = Path(db).expanduser()
        if not db_path.is_file():
            raise FileNotFoundError(f"{db}: no such features.db")
    elif db is None and sae_path is not None and features_db_beside(sae_path).is_file():
        db_path = features_db_beside(sae_path)
    if db_path is not None:
        with FeatureDB.open(db_path) as opened:
            opened.check_sae(sae, sae_path)
    return RunFolder(sae.eval(), sae_path, db_path, Provenance.of(sae), model, device)


def check_members(members: Sequence[tuple[str, Path | str | None]], saes: Sequence[SAE], folder: Path | str | None,
                  purpose: str) -> None:
    """SAEs compared as one sweep (``purpose``: "families", "scaling laws"): one model, one hook, one input width,
    each member's folder inside the sweep ``folder`` (when there is one) and none listed twice. ``members``:
    (name, folder) per SAE. ValueError naming the member and what differs otherwise."""
    first, first_path = Provenance.of(saes[0]), members[0][1]
    seen: dict[Path, str] = {}
    for (name, path), sae in zip(members, saes):
        if path is not None:
            real = Path(path).expanduser().resolve()
            if folder is not None and not real.is_relative_to(Path(folder).expanduser().resolve()):
                raise ValueError(f"{path}: sweep member {name!r} lies outside the sweep folder {folder}; "
                                 f"{purpose} compare the sweep's own SAEs (re-run 'saelab sweep')")
            if real in seen:
                raise ValueError(f"{path}: the SAE of member {name!r} is member {seen[real]!r} again; "
                                 f"{purpose} compare different SAEs")
            seen[real] = name
        prov = Provenance.of(sae)
        if _other_model(first, prov):
            raise ValueError(f"{path}: trained on {prov.model_name} (weights sha256 "
                             f"{str(prov.model_weights_sha256)[:12]}), but {first_path} on {first.model_name} "
                             f"(sha256 {str(first.model_weights_sha256)[:12]}); {purpose} compare SAEs of one model")
        if sae.cfg.d_in != saes[0].cfg.d_in or prov.hook_read != first.hook_read:
            raise ValueError(f"{path}: reads {prov.hook_read} with d_in={sae.cfg.d_in}, but {first_path} reads "
                             f"{first.hook_read} with d_in={saes[0].cfg.d_in}; {purpose} compare SAEs of one hook")


def _other_model(a: Provenance, b: Provenance) -> bool:
    """Whether two SAEs record different models: by weights hash when both have one, else by name."""
    if a.model_weights_sha256 and b.model_weights_sha256:
        return a.model_weights_sha256 != b.model_weights_sha256
    return bool(a.model_name and b.model_name and a.model_name != b.model_name)
