"""Training: every recipe learns, the sparse TopK gradients are exact, runs resume bitwise after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from factories import D_IN, make_synthetic_store, synthetic_rows
from saelab import store as st
from saelab.distributed import World
from saelab.formats import load_sae
from saelab.sae import SAE, ARCHITECTURES
from saelab.sparse_topk import batchtopk_code, sparse_grads, topk_code
from saelab.train import CHECKPOINT, LOG, TrainConfig, train
from saelab.trainer import NonFiniteLoss, Trainer
from saelab.train_config import lr_at

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> st.ActivationStore:
    return make_synthetic_store(tmp_path_factory.mktemp("store") / "acts")


def small_config(arch: str, **kw) -> TrainConfig:
    base = dict(architecture=arch, d_sae=96, k=4, batch_size=256, tokens=256 * 250, lr=3e-3, l1_coefficient=1.0,
                l0_coefficient=0.5, checkpoint_every=0, eval_tokens=4096, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow(ci=a == "topk")) for a in ARCHITECTURES])
def test_each_architecture_learns(store, tmp_path, arch):
    records = []
    sae = train(store, small_config(arch), out=tmp_path / "sae", progress=False, log=records.append)
    held = sae.provenance["held_out"]
    assert held["fvu"] < 0.45, held                     # random init: FVU ≈ 1 or more
    assert records[0]["fvu"] > held["fvu"]
    if arch == "topk":
        assert held["l0"] <= 4.0
    loaded = load_sae(tmp_path / "sae")                  # saved in raw units: same outputs as returned
    x = store.read_shard(0)["acts"][:64]
    assert torch.allclose(loaded(x).x_hat, sae(x).x_hat, atol=1e-4)
    assert loaded.provenance["trained_architecture"] == arch
    assert loaded.provenance["hook_name"] == "blocks.0.hook_x"
    assert len(loaded.provenance["feature_max_act"]) == 96
    assert (tmp_path / "sae" / LOG).exists() and not (tmp_path / "sae" / CHECKPOINT).exists()


def _dense_reference(sae: SAE, x, arch, k, dead, k_aux, alpha):
    """Autograd through the dense forward: mse + α·AuxK, to check the hand-made sparse gradients."""
    pre = sae.pre_acts(x)
    sae.train()
    z = sae.activate(pre)
    x_hat = z @ sae.W_dec + sae.b_dec
    loss = (x_hat - x).pow(2).sum(-1).mean()
    if dead is not None:
        masked = pre.masked_fill(~dead, float("-inf"))
        vals, idx = masked.topk(min(k_aux, int(dead.sum())), dim=-1)
        z_aux = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        e = (x - x_hat).detach()
        loss = loss + alpha * (z_aux @ sae.W_dec - e).pow(2).sum(-1).mean()
    loss.backward()
    return {n: getattr(sae, n).grad for n in ("W_enc", "b_enc", "W_dec", "b_dec")}


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_dead,k_aux", [(False, 8), (True, 8), (True, 1000)])
def test_sparse_grads_equal_dense_autograd(arch, with_dead, k_aux):
    torch.manual_seed(0)
    from saelab.sae import SAEConfig

    sae = SAE(SAEConfig(D_IN, 64, arch, 4))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(32, D_IN)
    dead = (torch.arange(64) % 3 == 0) if with_dead else None
    pre = sae.pre_acts(x).detach()
    code = (topk_code if arch == "topk" else batchtopk_code)(pre, 4)
    ours = sparse_grads(sae, x, code, dead, k_aux, 1 / 32).grads
    ref = _dense_reference(sae, x, arch, 4, dead, k_aux, 1 / 32)
    for name in ref:
        assert torch.allclose(ours[name], ref[name], atol=1e-5, rtol=1e-4), name


def test_dead_latents_tracked_and_auxk_used():
    cfg = small_config("topk", d_sae=256, k=1, tokens=256 * 40, dead_tokens=256 * 5).resolved(D_IN)
    trainer = Trainer(cfg, D_IN, World(torch.device("cpu")), torch.device("cpu"))
    trainer.initialize(synthetic_rows(256))
    metrics = [trainer.train_step(synthetic_rows(256, seed=s)) for s in range(1, 12)]
    assert metrics[3]["dead_fraction"] == 0.0          # nothing can be dead before dead_tokens
    assert metrics[-1]["dead_fraction"] > 0.1          # k=1 over 256 latents: many never fire
    assert metrics[3]["aux"] == 0.0 and metrics[-1]["aux"] > 0.0
    fired_now = trainer.since_fired == 0
    assert fired_now.any() and (trainer.since_fired[~fired_now] >= 256).all()


def test_relu_resampling_reinitialises_dead_latents():
    cfg = small_config("relu", d_sae=32, dead_tokens=256).resolved(D_IN)
    trainer = Trainer(cfg, D_IN, World(torch.device("cpu")), torch.device("cpu"))
    trainer.initialize(synthetic_rows(256))
    trainer.train_step(synthetic_rows(256, seed=1))
    trainer.since_fired[:5] = 10_000                    # latents 0..4 dead
    before = trainer.sae.W_dec.detach().clone()
    assert trainer.resample_dead(synthetic_rows(256, seed=2) * trainer.input_scale) == 5
    W = trainer.sae.W_dec.detach()
    assert not torch.allclose(W[:5], before[:5]) and torch.equal(W[5:], before[5:])
    state = trainer.opt.state[trainer.sae.W_dec]
    assert (state["exp_avg"][:5] == 0).all() and (state["exp_avg_sq"][:5] == 0).all()
    assert (trainer.sae.b_enc[:5] == 0).all() and not trainer.dead.any()


def test_lr_schedule_warms_up_and_decays_to_zero():
    cfg = small_config("topk", tokens=256 * 100, lr_warmup_steps=10).resolved(D_IN)
    assert lr_at(cfg, 0) == pytest.approx(cfg.lr / 10)
    assert lr_at(cfg, 50) == pytest.approx(cfg.lr)
    assert lr_at(cfg, 90) == pytest.approx(cfg.lr * 0.5)
    assert lr_at(cfg, 99) == pytest.approx(cfg.lr * 0.05)
    cos = replace(cfg, lr_decay="cosine")
    assert lr_at(cos, 90) == pytest.approx(cfg.lr * 0.5) and lr_at(cos, 85) > lr_at(cfg, 85)


def _cli_train(store_path, out, tokens, extra=()):
    cmd = [sys.executable, "-m", "saelab", "train", "--acts", str(store_path), "--arch", "topk", "--latents", "64",
           "--k", "4", "--tokens", str(tokens), "--batch-size", "64", "--lr", "2e-3", "--out", str(out),
           "--checkpoint-every", "25", "--deterministic", "--json", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow(ci=True)
def test_kill9_and_resume_is_bitwise_equal(store, tmp_path):
    tokens = 64 * 1500
    ref = _cli_train(store.path, tmp_path / "ref", tokens)
    run = _cli_train(store.path, tmp_path / "run", tokens)
    state = tmp_path / "run" / CHECKPOINT / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and run.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 100:
            break
        time.sleep(0.05)
    assert run.poll() is None, "the run finished before it could be killed; make it longer"
    run.send_signal(signal.SIGKILL)
    run.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 100 <= killed_at < 1500
    resumed = _cli_train(store.path, tmp_path / "run", tokens, ["--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()
    a = load_file(str(tmp_path / "ref" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "run" / "sae_weights.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / LOG).read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 1500   # no record lost or doubled


class _Poisoned:
    """Store-like batches where global batch ``bad`` is replaced by ``value``."""

    def __init__(self, store, bad: int, value: float):
        self.store, self.bad, self.value = store, bad, value
        self.manifest, self.n_rows, self.d_in = store.manifest, store.n_rows, store.d_in

    def batches(self, batch_size, *, start_batch=0, **kw):
        for i, x in enumerate(self.store.batches(batch_size, start_batch=start_batch, **kw), start=start_batch):
            yield torch.full_like(x, self.value) if i == self.bad else x

    def n_rows_in(self, *a, **kw):
        return self.store.n_rows_in(*a, **kw)


@pytest.mark.parametrize("value,match", [(1e30, "loss became inf"), (float("nan"), "contain NaN")])
def test_non_finite_stops_and_is_never_checkpointed(store, tmp_path, value, match):
    cfg = small_config("topk", checkpoint_every=1, tokens=256 * 20)
    with pytest.raises(NonFiniteLoss, match=match):
        train(_Poisoned(store, 7, value), cfg, out=tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / CHECKPOINT / "state.json").read_text())
    assert meta["step"] == 7
    weights = load_file(str(tmp_path / "run" / CHECKPOINT / "state.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


def test_resume_with_another_config_is_refused(store, tmp_path):
    cfg = small_config("topk", checkpoint_every=5, tokens=256 * 20)
    with pytest.raises(NonFiniteLoss):
        train(_Poisoned(store, 12, float("nan")), cfg, out=tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"different configuration \(lr: checkpoint 0.003, now 0.001"):
        train(store, replace(cfg, lr=1e-3), out=tmp_path / "run", resume=True, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(store, cfg, out=tmp_path / "run", progress=False)
    sae = train(store, replace(cfg, log_every=3), out=tmp_path / "run", resume=True, progress=False)
    assert sae.provenance["tokens_trained"] == 256 * 20


def test_cli_train_on_store_reports_held_out(store, tmp_path):
    from saelab.cli import main

    assert main(["train", "--acts", str(store.path), "--arch", "batchtopk", "--latents", "64", "--k", "4",
                 "--tokens", str(256 * 30), "--batch-size", "256", "--out", str(tmp_path / "sae"), "--json"]) == 0
    sae = load_sae(tmp_path / "sae")
    assert sae.cfg.architecture == "jumprelu" and sae.provenance["trained_architecture"] == "batchtopk"
    assert (sae.threshold > 0).all() and sae.provenance["held_out"]["tokens"] > 0
    assert main(["train", "--out", str(tmp_path / "x"), "--tokens", "100"]) == 2     # no data given


@pytest.mark.parametrize("exclude_bos", [True, False])
def test_saved_sae_records_bos_exclusion_of_its_store(tmp_path, exclude_bos):
    from saelab.evaluate import trained_without_bos
    from saelab.harvest import harvest
    from saelab.models import load_model
    from tiny_models import save_tiny_model

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"m{i}.py").write_text("".join(f"def f{j}(x):\n    return x + {i * j}\n" for j in range(20)))
    lm = load_model(str(save_tiny_model("llama", tmp_path / "llama")))
    store = harvest(lm, "blocks.1.hook_resid_post", str(corpus), out=tmp_path / "acts", tokens=1024, context=32,
                    batch_size=8, exclude_bos=exclude_bos, progress=False)
    bos = store.manifest["bos"]["token_id"]
    cfg = TrainConfig(architecture="topk", d_sae=64, k=4, batch_size=64, tokens=64 * 8, checkpoint_every=0,
                      eval_tokens=256)
    train(store, cfg, out=tmp_path / "sae", progress=False)
    recorded = [bos] if exclude_bos else False
    saved_cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert saved_cfg["metadata"]["exclude_special_tokens"] == recorded     # where a SAELens user looks
    assert saved_cfg["metadata"]["prepend_bos"] is True
    sae = load_sae(tmp_path / "sae")
    assert sae.provenance["exclude_special_tokens"] == recorded            # saelab.json
    assert trained_without_bos(sae) is exclude_bos                        # evaluate leaves BOS out likewise
