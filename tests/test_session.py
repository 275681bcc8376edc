"""Opening a run (saelab.session): one place resolves the folders, finds the features.db beside the SAE,
and refuses another SAE's features.db, in the library, `saelab inspect` and `export neuronpedia`."""

from __future__ import annotations

from pathlib import Path

import pytest

from factories import make_features_db
from saelab.errors import SAEMismatch
from saelab.formats import load_sae, save_sae
from saelab.provenance import Provenance
from saelab.sae import SAE, SAEConfig
from saelab.session import FEATURES_DB, features_db_beside, open_run, sae_folder

D_IN = 8


def _sae(seed: int, d_sae: int = 12) -> SAE:
    sae = SAE(SAEConfig(D_IN, d_sae, "relu"))
    sae.reset_parameters(seed=seed)
    return sae


@pytest.fixture
def runs(tmp_path) -> Path:
    """run/sae with its own features.db beside it, and other/sae (same width) with run's features.db copied
    beside it: the foreign pair that `inspect` used to accept."""
    for name, seed in (("run", 0), ("other", 1)):
        save_sae(_sae(seed), tmp_path / name / "sae", model_name="builtin", hook_name="blocks.0.hook_resid_post")
    make_features_db(tmp_path / "run" / FEATURES_DB, load_sae(tmp_path / "run" / "sae"), tmp_path / "run" / "sae")
    (tmp_path / "other" / FEATURES_DB).write_bytes((tmp_path / "run" / FEATURES_DB).read_bytes())
    return tmp_path


def test_open_run_finds_the_sae_and_its_features_db(runs):
    run = open_run(runs / "run")                                   # a run folder: its sae/ is the SAE
    assert run.sae_path == (runs / "run" / "sae").resolve() and run.db_path == runs / "run" / FEATURES_DB
    assert sae_folder(runs / "run" / "sae") == runs / "run" / "sae"
    assert features_db_beside(runs / "run" / "sae") == (runs / "run" / FEATURES_DB).resolve()
    assert open_run(runs / "run" / "sae", db=False).db_path is None
    with run.db() as db:
        assert db.n_features == 12
    assert run.provenance == Provenance.of(run.sae) and run.provenance.hook_read == "blocks.0.hook_resid_post"


def test_open_run_refuses_another_saes_features_db(runs):
    with pytest.raises(SAEMismatch, match=rf"belongs to the SAE at {runs / 'run' / 'sae'} .*not to the SAE at "
                                          rf"{(runs / 'other' / 'sae').resolve()}"):
        open_run(runs / "other" / "sae")
    with pytest.raises(SAEMismatch, match=r"not to the SAE \(d_sae 12"):
        open_run(_sae(1), db=runs / "run" / FEATURES_DB)
    with pytest.raises(FileNotFoundError, match="no such features.db"):
        open_run(runs / "run" / "sae", db=runs / "nothing.db")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_inspect_refuses_a_foreign_features_db_beside_the_sae(runs, capsys):
    from saelab.cli import main

    assert main(["inspect", str(runs / "other" / "sae"), "--text", "hello"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("saelab: error: ") and "belongs to the SAE at" in line and "run 'saelab analyze'" in line


def test_cli_inspect_refuses_a_foreign_db_given_with_db(runs, capsys):
    from saelab.cli import main

    (runs / "other" / FEATURES_DB).unlink()
    assert main(["inspect", str(runs / "other" / "sae"), "--db", str(runs / "run" / FEATURES_DB),
                 "--text", "hello"]) == 2
    assert "belongs to the SAE at" in _one_error_line(capsys)


def test_cli_export_neuronpedia_refuses_another_sae(runs, tmp_path, capsys):
    from saelab.cli import main

    assert main(["export", "neuronpedia", str(runs / "run" / FEATURES_DB), "--sae", str(runs / "other" / "sae"),
                 "--out", str(tmp_path / "np")]) == 2
    assert "belongs to the SAE at" in _one_error_line(capsys)


# -- members of one sweep (families, scaling) ----------------------------------------------------------

def _member(seed: int, d_sae: int, **prov) -> SAE:
    sae = _sae(seed, d_sae)
    sae.provenance = {"model_name": "builtin", "model_weights_sha256": "a" * 64,
                      "hook_name": "blocks.0.hook_resid_post", **prov}
    return sae


def test_members_of_one_sweep_are_checked(tmp_path):
    from saelab.session import check_members

    folder = tmp_path / "sweep"
    small, large = folder / "latents-00012", folder / "latents-00024"
    saes = [_member(0, 12), _member(1, 24)]
    check_members([("s", small), ("l", large)], saes, folder, "scaling laws")
    cases = [
        ([("s", small), ("l", tmp_path / "elsewhere")], saes, "lies outside the sweep folder"),
        ([("s", small), ("l", folder / "x" / ".." / "latents-00012")], saes, "is member 's' again"),
        ([("s", small), ("l", large)], [saes[0], _member(1, 24, model_weights_sha256="b" * 64)],
         "scaling laws compare SAEs of one model"),
        ([("s", small), ("l", large)], [saes[0], _member(1, 24, model_name="smollm2", model_weights_sha256=None)],
         "trained on smollm2"),
        ([("s", small), ("l", large)], [saes[0], _member(1, 24, hook_name="blocks.1.hook_resid_post")],
         "scaling laws compare SAEs of one hook"),
    ]
    for members, pair, message in cases:
        with pytest.raises(ValueError, match=message):
            check_members(members, pair, folder, "scaling laws")
    check_members([("s", small), ("l", tmp_path / "elsewhere")], saes, None, "families")   # a plain list of folders


def test_cli_scaling_refuses_a_member_outside_the_sweep(tmp_path, capsys):
    import json

    from saelab.cli import main
    from saelab.sweep import FORMAT, INDEX, VERSION

    folder = tmp_path / "sweep"
    for name, sae in (("sweep/latents-00012", _member(0, 12)), ("outside", _member(1, 24))):
        save_sae(sae, tmp_path / name, held_out={"fvu": 0.5, "l0": 4.0, "dead_fraction": 0.0, "tokens": 100})
    members = [{"name": "a", "d_sae": 12, "k": None, "arch": "relu", "path": "latents-00012"},
               {"name": "b", "d_sae": 24, "k": None, "arch": "relu", "path": "../outside"}]
    (folder / INDEX).write_text(json.dumps({"format": FORMAT, "version": VERSION, "members": members}))
    assert main(["scaling", str(folder)]) == 2
    assert "lies outside the sweep folder" in _one_error_line(capsys)
