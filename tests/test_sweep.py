"""Sweeps and scaling laws: a sweep's SAEs equal SAEs trained alone, resume, bad lists; the power-law fit
recovers known parameters; ``saelab scaling`` writes its report and JSON."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from factories import make_synthetic_store
from saelab import store as st
from saelab.cli import main
from saelab.formats import load_sae
from saelab.scaling import fit_power_law, training_flops
from saelab.sweep import INDEX, load_sweep, member_init_seed, plan, sweep
from saelab.train import CHECKPOINT, TrainConfig, train


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> st.ActivationStore:
    return make_synthetic_store(tmp_path_factory.mktemp("store") / "acts")


BASE = TrainConfig(architecture="topk", k=4, batch_size=256, tokens=256 * 24, lr=3e-3, checkpoint_every=0,
                   eval_tokens=2048, seed=3)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae_weights.safetensors"))


def assert_same(a, b) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), (n, (a[n] - b[n]).abs().max())


def test_sweep_members_equal_solo_runs(store, tmp_path):
    saes = sweep(store, BASE, tmp_path / "sweep", latents=[64, 32], ks=[2, 4], progress=False)
    index, members = load_sweep(tmp_path / "sweep")
    assert index["format"] == "saelab-sweep" and index["version"] == 1 and index["train_config"]["seed"] == 3
    assert index["acts"] == str(store.path.resolve()) and "d_sae" not in index["train_config"]
    assert [m.name for m in members] == ["latents-00032-k-002", "latents-00032-k-004", "latents-00064-k-002",
                                         "latents-00064-k-004"]
    assert [(m.d_sae, m.k, m.arch, m.path) for m in members][1] == (32, 4, "topk", "latents-00032-k-004")
    assert [s.d_sae for s in saes] == [32, 32, 64, 64]
    for m in members:
        init = member_init_seed(BASE, m.d_sae, m.k)
        solo = train(store, replace(BASE, d_sae=m.d_sae, k=m.k, init_seed=init), out=tmp_path / "solo" / m.name,
                     progress=False)
        folder = tmp_path / "sweep" / m.path
        assert_same(weights(folder), weights(tmp_path / "solo" / m.name))
        mine = load_sae(folder).provenance
        assert mine["held_out"] == solo.provenance["held_out"]
        assert {p.name for p in folder.iterdir()} == {p.name for p in (tmp_path / "solo" / m.name).iterdir()}
        assert mine["train_config"]["init_seed"] == init
        logs = [(tmp_path / d / "train_log.jsonl").read_text().splitlines() for d in ("sweep/" + m.path, "solo/" + m.name)]
        assert [json.loads(r)["fvu"] for r in logs[0]] == [json.loads(r)["fvu"] for r in logs[1]]


class _Interrupted:
    """The store, but the batch iterator raises KeyboardInterrupt (a Ctrl-C) before global batch ``at``."""

    def __init__(self, store, at: int):
        self.store, self.at = store, at
        self.manifest, self.n_rows, self.d_in = store.manifest, store.n_rows, store.d_in

    def batches(self, batch_size, *, start_batch=0, **kw):
        for i, x in enumerate(self.store.batches(batch_size, start_batch=start_batch, **kw), start=start_batch):
            if i == self.at and kw.get("split") == "train":
                raise KeyboardInterrupt
            yield x

    def n_rows_in(self, *a, **kw):
        return self.store.n_rows_in(*a, **kw)


def test_interrupted_sweep_resumes_to_the_uninterrupted_result(store, tmp_path):
    cfg = replace(BASE, checkpoint_every=5)
    sweep(store, cfg, tmp_path / "ref", latents=[32, 48, 64], progress=False)
    with pytest.raises(KeyboardInterrupt):
        sweep(_Interrupted(store, 13), cfg, tmp_path / "run", latents=[32, 48, 64], progress=False)
    assert not (tmp_path / "run" / INDEX).exists()           # written only once every member is saved
    states = [json.loads((tmp_path / "run" / m / CHECKPOINT / "state.json").read_text())["step"]
              for m in ("latents-00032", "latents-00048", "latents-00064")]
    assert states == [10, 10, 10]
    # a kill between checkpoint writes: one member is behind the others; the pass restarts there
    (tmp_path / "run" / "latents-00048" / CHECKPOINT / "state.json").unlink()
    with pytest.raises(FileExistsError, match="--resume"):
        sweep(store, cfg, tmp_path / "run", latents=[32, 48, 64], progress=False)
    sweep(store, cfg, tmp_path / "run", latents=[32, 48, 64], resume=True, progress=False)
    for m in ("latents-00032", "latents-00048", "latents-00064"):
        assert_same(weights(tmp_path / "run" / m), weights(tmp_path / "ref" / m))
        steps = [json.loads(r)["step"] for r in (tmp_path / "run" / m / "train_log.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)) and steps[-1] == 24
    assert json.loads((tmp_path / "run" / INDEX).read_text()) == json.loads((tmp_path / "ref" / INDEX).read_text())
    with pytest.raises(FileExistsError, match="finished sweep"):
        sweep(store, cfg, tmp_path / "run", latents=[32, 48, 64], progress=False)


@pytest.mark.parametrize("flag,value,match", [("--latents", "0,abc", "'0', 'abc' is not one"),
                                              ("--latents", "64", "at least two values"),
                                              ("--k", "4,4", "lists a value twice")])
def test_sweep_rejects_bad_lists(store, tmp_path, capsys, flag, value, match):
    args = ["sweep", "--acts", str(store.path), "--out", str(tmp_path / "s"), "--latents", "32,64", flag, value]
    assert main(args) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_cli_sweep_then_scaling_json_and_report(store, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--acts", str(store.path), "--latents", "24,48,96,192", "--k", "4", "--tokens",
                 str(256 * 40), "--batch-size", "256", "--lr", "3e-3", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [m["d_sae"] for m in printed["members"]] == [24, 48, 96, 192]
    assert main(["scaling", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["fit"]) == {"a", "b", "c", "a_se", "b_se", "c_se"}
    rows = result["members"]
    assert [r["d_sae"] for r in rows] == [24, 48, 96, 192] and [r["name"] for r in rows][0] == "latents-00024"
    for r in rows:          # the FVU training recorded, not a new measurement
        assert r["fvu"] == load_sae(out / r["name"]).provenance["held_out"]["fvu"]
        assert r["flops"] == training_flops("topk", 16, r["d_sae"], 4, 8, 256 * 40)
    assert rows[0]["fvu"] > rows[-1]["fvu"]                  # more latents, lower loss on this data
    assert {"fvu_vs_latents", "fvu_vs_compute"} <= set(result["fits"])
    assert result["fit"]["b"] > 0 and result["fit"]["b_se"] is not None
    for name in ("report.html", "report.png", "results.json"):
        assert (out / "scaling" / name).stat().st_size > 0
    assert "fvu_vs_latents" in (out / "scaling" / "report.html").read_text()
    assert main(["scaling", str(tmp_path)]) == 2             # not a sweep folder
    # CE recovered that 'saelab eval' recorded (eval.json) is used as recorded, and fitted as 1 - CE recovered
    for i, r in enumerate(rows):
        (out / r["name"] / "eval.json").write_text(json.dumps({"downstream": {"ce_recovered_zero": 0.5 + 0.1 * i}}))
    assert main(["scaling", str(out), "--json", "--out", str(tmp_path / "report")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["ce_recovered"] for r in result["members"]] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert result["fits"]["ce_loss_vs_latents"]["y"] == "1 - ce_recovered"
    assert (tmp_path / "report" / "report.html").exists()


def test_power_law_fit_recovers_known_parameters():
    n = np.array([1024, 2048, 4096, 8192, 16384, 32768], dtype=float)
    a, b, c = 3.0, 0.45, 0.08
    exact = fit_power_law(n, a * n ** -b + c)
    assert exact.a == pytest.approx(a, rel=1e-4) and exact.b == pytest.approx(b, rel=1e-4)
    assert exact.c == pytest.approx(c, abs=1e-6) and exact.rmse < 1e-8 and not exact.at_bound
    rng = np.random.default_rng(0)
    y = a * n ** -b + c
    noisy = fit_power_law(n, y * (1 + 0.002 * rng.standard_normal(len(n))))
    assert noisy.b == pytest.approx(b, abs=0.05) and noisy.c == pytest.approx(c, abs=0.01)
    assert noisy.a == pytest.approx(a, rel=0.3)
    # the standard errors cover the truth (a few sigma) and shrink with the noise
    assert abs(noisy.b - b) < 4 * noisy.b_se and abs(noisy.c - c) < 4 * noisy.c_se
    louder = fit_power_law(n, y * (1 + 0.02 * rng.standard_normal(len(n))))
    assert louder.b_se > noisy.b_se
    three = fit_power_law(n[:3], y[:3])
    assert three.b == pytest.approx(b, rel=1e-3) and three.b_se is None
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_power_law(n[:2], y[:2])


def test_members_do_not_share_their_initial_weights():
    """Same seed (same data order), but each size starts from its own decoder rows: with one seed, a larger
    SAE's first rows would start equal to the smaller's, and families would read that as persistence."""
    from saelab.sae import SAE, SAEConfig

    configs = [c for _, c in plan(BASE, [32, 64], [4])]
    assert configs[0].seed == configs[1].seed == BASE.seed and configs[0].init_seed != configs[1].init_seed
    rows = []
    for c in configs:
        sae = SAE(SAEConfig(8, c.d_sae, "topk", c.k))
        sae.reset_parameters(seed=c.init_seed)
        rows.append(sae.W_dec.detach()[:32])
    assert (rows[0] * rows[1]).sum(1).abs().max() < 0.99           # no shared row
    assert member_init_seed(replace(BASE, init_seed=7), 32, 4) == 7    # an explicit init seed is kept
