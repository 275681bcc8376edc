"""harvest: parity with direct capture, kill -9 + resume == uninterrupted, refusals, NaN, outliers, CLI."""

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from saelab import store as st
from saelab.cli import main as cli_main
from saelab.token_cache import sequences
from saelab.harvest import NonFiniteActivation, harvest, store_dir, stream_activations
from saelab.hooks import HookError, intervene, run_to_hooks
from saelab.models import load_model
from saelab.store import ActivationStore

HOOK = "blocks.1.hook_resid_post"
HOOK2 = "blocks.0.mlp.hook_post"
# 32 seqs, 4 shards; BOS rows kept so that rows map 1:1 to positions (the default leaves them out)
ARGS = dict(tokens=1000, context=32, batch_size=4, shard_rows=256, progress=False, exclude_bos=False, sink_factor=None)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("harvest")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for i in range(12):
        lines = [f"def f{j}(x):\n    return x + {rng.randint(0, 99)}\nimport os\nos.system(cmd{j})\n"
                 for j in range(rng.randint(5, 30))]
        (corpus / f"m{i}.py").write_text("".join(lines))
    model_dir = save_tiny_model("llama", root / "llama")
    lm = load_model(str(model_dir))
    ref = harvest(lm, HOOK, str(corpus), out=root / "ref", **ARGS)
    return {"root": root, "corpus": str(corpus), "model_dir": model_dir, "lm": lm, "ref": ref}


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).glob("shard-*.safetensors"))}


def test_round_trip_matches_direct_capture(env):
    store, lm = env["ref"], env["lm"]
    m = store.manifest
    assert m["complete"] and len(m["shards"]) == 4 and store.n_rows == 32 * 32 and store.d_in == 32
    assert m["model_weights_sha256"] == lm.weights_hash and m["hf_hook_name"] == "model.layers.1"
    assert m["hook_io"] == "output" and m["corpus"] == {"source": env["corpus"], "split": "train", "seed": 0}
    assert m["dtype"] == "float32" and m["context"] == 32 and m["bos"]["excluded"] is False
    seqs = torch.stack(list(sequences(env["corpus"], lm.tokenizer, 32, 0))[:32])
    direct = torch.cat([run_to_hooks(lm.model, seqs[i:i + 4], [HOOK])[HOOK] for i in range(0, 32, 4)])
    shards = [store.read_shard(i) for i in range(4)]
    acts = torch.cat([s["acts"] for s in shards])
    assert torch.equal(acts, direct.reshape(-1, 32))
    assert torch.equal(torch.cat([s["tokens"] for s in shards]).long(), seqs.reshape(-1))
    assert torch.equal(torch.cat([s["seq"] for s in shards]), torch.arange(32).repeat_interleave(32))
    assert torch.equal(torch.cat([s["pos"] for s in shards]).long(), torch.arange(32).repeat(32))
    stats = m["stats"]
    assert torch.allclose(torch.tensor(stats["mean"], dtype=torch.float64), acts.double().mean(0), atol=1e-6)
    var = torch.tensor(stats["var"], dtype=torch.float64)
    assert torch.allclose(var, acts.double().var(0, unbiased=False), atol=1e-6)
    assert stats["norm"]["mean"] == pytest.approx(float(acts.norm(dim=1).mean()), rel=1e-5)
    assert store.verify() == []


KILLER = textwrap.dedent("""
    import os, signal, sys
    from saelab.harvest import harvest
    kill_at, out, corpus, model, hooks = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    real, calls = os.replace, [0]
    def replace(src, dst):
        if str(dst).startswith(out):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
    os.replace = replace
    harvest(model, hooks, corpus, out=out, **ARGS)
    sys.exit(3)  # kill_at was past the end
""").replace("**ARGS", "**" + repr(ARGS))


def run_killed(env, out: Path, kill_at: int, hooks: list[str]) -> None:
    code = subprocess.run([sys.executable, "-c", KILLER, str(kill_at), str(out), env["corpus"], str(env["model_dir"]),
                           *hooks], capture_output=True, text=True, timeout=300)
    assert code.returncode == -9, code.stderr[-2000:]


# os.replace calls into the store: 1 = first manifest, then per shard (shard file, manifest), last = "complete"
@pytest.mark.parametrize("kill_at", [pytest.param(at, marks=pytest.mark.slow(ci=at in (1, 5))) for at in (1, 2, 5, 10)])
def test_kill_9_then_resume_is_byte_identical(env, kill_at):
    out = env["root"] / f"killed-{kill_at}"
    run_killed(env, out, kill_at, [HOOK])
    if kill_at > 1:
        with pytest.raises(ValueError, match="unfinished harvest"):
            ActivationStore.open(out)
    store = harvest(env["lm"], HOOK, env["corpus"], out=out, resume=True, **ARGS)
    assert shard_bytes(out) == shard_bytes(env["ref"].path)
    assert store.manifest == {**env["ref"].manifest}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in env["ref"].path.iterdir())


@pytest.mark.slow(ci=True)
def test_kill_between_hooks_then_resume(env):
    out = env["root"] / "killed-multi"
    run_killed(env, out, 8, [HOOK, HOOK2])  # 2 first manifests, then shard 0 of hook 1 + 2, shard 1 of hook 1
    stores = harvest(env["lm"], [HOOK, HOOK2], env["corpus"], out=out, resume=True, **ARGS)
    assert shard_bytes(store_dir(out, HOOK)) == shard_bytes(env["ref"].path)
    separate = harvest(env["lm"], HOOK2, env["corpus"], out=env["root"] / "sep2", **ARGS)
    assert shard_bytes(stores[HOOK2].path) == shard_bytes(separate.path)
    assert stores[HOOK2].manifest["stats"] == separate.manifest["stats"]


def test_multi_hook_single_pass_equals_separate_passes(env):
    stores = harvest(env["lm"], [HOOK, HOOK2], env["corpus"], out=env["root"] / "multi", **ARGS)
    assert set(stores) == {HOOK, HOOK2} and stores[HOOK].path == env["root"] / "multi" / HOOK
    assert shard_bytes(stores[HOOK].path) == shard_bytes(env["ref"].path)
    assert stores[HOOK2].d_in == 64 and stores[HOOK2].n_rows == env["ref"].n_rows


def test_mismatched_resume_refused_and_store_untouched(env):
    out = env["root"] / "mismatch"
    harvest(env["lm"], HOOK, env["corpus"], out=out, **ARGS)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=r"different harvest \(context: store has 32, now 16.*corpus.seed"):
        harvest(env["lm"], HOOK, env["corpus"], out=out, resume=True, **{**ARGS, "context": 16}, seed=1)
    with pytest.raises(ValueError, match="hook_name: store has 'blocks.1.hook_resid_post', now 'blocks.0"):
        harvest(env["lm"], HOOK2, env["corpus"], out=out, **ARGS)
    with pytest.raises(FileExistsError, match="already holds this harvest"):
        harvest(env["lm"], HOOK, env["corpus"], out=out, **ARGS)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_inputs(env, tmp_path):
    with pytest.raises(HookError, match="blocks.7.hook_resid_post"):
        harvest(env["lm"], "blocks.7.hook_resid_post", env["corpus"], out=tmp_path / "a", **ARGS)
    with pytest.raises(FileNotFoundError, match="no such file"):
        harvest(env["lm"], HOOK, str(tmp_path / "missing"), out=tmp_path / "b", **ARGS)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        harvest(env["lm"], HOOK, env["corpus"], out=tmp_path / "c", **ARGS)
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["keep.txt"]
    with pytest.raises(FileExistsError, match="one folder per hook.*manifest.json"):
        harvest(env["lm"], [HOOK, HOOK2], env["corpus"], out=env["ref"].path, **ARGS)
    with pytest.raises(ValueError, match="unknown dtype"):
        harvest(env["lm"], HOOK, env["corpus"], out=tmp_path / "d", **ARGS, dtype="int8")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot create the (store )?folder"):
        harvest(env["lm"], HOOK, env["corpus"], out=blocker / "sub", **ARGS)


@pytest.mark.parametrize("background", [False, True])
def test_writer_thread_or_inline_give_identical_stores(env, monkeypatch, background):
    monkeypatch.setattr(sys.modules["saelab.harvest"], "spare_core", lambda device: background)
    stores = harvest(env["lm"], [HOOK, HOOK2], env["corpus"], out=env["root"] / f"writer-{background}", **ARGS)
    assert shard_bytes(stores[HOOK].path) == shard_bytes(env["ref"].path)
    assert stores[HOOK].manifest["stats"] == env["ref"].manifest["stats"]


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("phase", ["write", "commit"])
def test_disk_full_keeps_complete_shards_then_resumes(env, monkeypatch, background, phase):
    """A full disk while writing shard 2 (in the CPU half, or at its fsync/rename) loses nothing."""
    monkeypatch.setattr(sys.modules["saelab.harvest"], "spare_core", lambda device: background)
    out = env["root"] / f"full-{background}-{phase}"
    real_save, real_commit, calls = st.writing.save_file, st.atomic.commit, [0]

    def save_file(tensors, filename):
        calls[0] += 1
        if calls[0] == 3:
            Path(filename).write_bytes(b"partial")   # a torn write, as a full disk leaves it
            raise OSError(28, "No space left on device")
        real_save(tensors, filename)

    def commit(tmp, target):
        if Path(target).name.startswith("shard-"):
            calls[0] += 1
            if calls[0] == 3:
                raise OSError(28, "No space left on device")
        real_commit(tmp, target)

    if phase == "write":
        monkeypatch.setattr(st.writing, "save_file", save_file)
    else:
        monkeypatch.setattr(st.atomic, "commit", commit)
    with pytest.raises(OSError, match="(?i)could not write shard 2 .*no space left on device.*keeps its 2 complete"):
        harvest(env["lm"], HOOK, env["corpus"], out=out, **ARGS)
    partial = ActivationStore.open(out, allow_incomplete=True)
    assert len(partial.shards) == 2 and partial.verify() == []
    assert not any(p.name.startswith(".") for p in out.iterdir())
    monkeypatch.setattr(st.writing, "save_file", real_save)
    monkeypatch.setattr(st.atomic, "commit", real_commit)
    harvest(env["lm"], HOOK, env["corpus"], out=out, resume=True, **ARGS)
    assert shard_bytes(out) == shard_bytes(env["ref"].path)


def nan_at(seq_in_batch: int, pos: int):
    def fn(x):
        if x.shape[0] <= seq_in_batch:  # harvest's one-sequence probe of the hook widths
            return x
        x = x.clone()
        x[seq_in_batch, pos] = float("nan")
        return x
    return fn


def test_nan_fail_reports_sequence_and_position(env, tmp_path):
    with intervene(env["lm"], {HOOK: nan_at(1, 5)}):
        with pytest.raises(NonFiniteActivation, match=f"hook {HOOK}, corpus sequence 1, position 5"):
            harvest(env["lm"], HOOK, env["corpus"], out=tmp_path / "s", **ARGS)


def test_nan_skip_drops_whole_sequences(env, tmp_path):
    with intervene(env["lm"], {HOOK: nan_at(2, 7)}):
        store = harvest(env["lm"], HOOK, env["corpus"], out=tmp_path / "s", nan_policy="skip", **ARGS)
    bad = list(range(2, 32, 4))  # sequence 2 of every batch of 4
    assert store.manifest["skipped_sequences"] == bad
    seq = torch.cat([store.read_shard(i)["seq"] for i in range(len(store.shards))])
    assert set(seq.tolist()) == set(range(32)) - set(bad) and store.n_rows == (32 - len(bad)) * 32
    ref = torch.cat([env["ref"].read_shard(i)["acts"] for i in range(4)])
    keep = torch.cat([env["ref"].read_shard(i)["seq"] for i in range(4)])
    assert torch.equal(torch.cat([store.read_shard(i)["acts"] for i in range(4)]),
                       ref[~torch.isin(keep, torch.tensor(bad))])


def test_exclude_bos_and_norm_outliers(env, tmp_path):
    bos = env["ref"].manifest["bos"]["token_id"]

    def sink(x):
        x = x.clone()
        x[:, 3:4] *= 1000.0  # an attention-sink-like outlier at position 3 of every sequence
        return x

    with intervene(env["lm"], {HOOK: sink}):
        store = harvest(env["lm"], HOOK, env["corpus"], out=tmp_path / "s",
                        **{**ARGS, "exclude_bos": True, "sink_factor": 50})
    tok = torch.cat([store.read_shard(i)["tokens"] for i in range(len(store.shards))])
    pos = torch.cat([store.read_shard(i)["pos"] for i in range(len(store.shards))])
    n_bos = int((torch.cat([env["ref"].read_shard(i)["tokens"] for i in range(4)]) == bos).sum())
    assert n_bos > 0 and not (tok == bos).any() and not (pos == 3).any()
    assert store.manifest["excluded"]["bos"] == n_bos
    assert store.manifest["excluded"]["sink"] == 32                 # position 3 of each of the 32 windows
    assert store.n_rows == 32 * 32 - n_bos - 32
    assert store.manifest["positions"] == {"bos_token_id": bos, "exclude_bos": True, "sink_factor": 50}
    assert store.manifest["stats"]["norm"]["max"] < 50 * store.manifest["stats"]["norm"]["median"]


def test_default_leaves_out_window_starts_and_separators(env, tmp_path):
    """The sink rule: every window starts with one BOS, and by default no BOS position is stored."""
    store = harvest(env["lm"], HOOK, env["corpus"], out=tmp_path / "s",
                    **{k: v for k, v in ARGS.items() if k not in ("exclude_bos", "sink_factor")})
    bos = store.manifest["bos"]
    assert bos["excluded"] is True and bos["window_start"] == "one_bos"
    ref_tokens = torch.cat([env["ref"].read_shard(i)["tokens"] for i in range(4)]).view(32, 32)
    assert (ref_tokens[:, 0] == bos["token_id"]).all() and not (ref_tokens[:, 1] == bos["token_id"]).any()
    pos = torch.cat([store.read_shard(i)["pos"] for i in range(len(store.shards))])
    tok = torch.cat([store.read_shard(i)["tokens"] for i in range(len(store.shards))])
    assert not (pos == 0).any() and not (tok == bos["token_id"]).any()
    n_bos = int((ref_tokens == bos["token_id"]).sum())
    assert n_bos > 32 and store.manifest["excluded"]["bos"] == n_bos
    assert store.n_rows == 32 * 32 - n_bos - store.manifest["excluded"]["sink"]


def test_half_precision_store(env, tmp_path):
    store = harvest(env["lm"], HOOK, env["corpus"], out=tmp_path / "s", dtype="float16", **ARGS)
    assert store.read_shard(0)["acts"].dtype == torch.float16
    batch = next(store.batches(64, shuffle=False, split="all"))
    ref = env["ref"].read_shard(0)["acts"][:64]
    assert batch.dtype == torch.float32 and torch.allclose(batch, ref, atol=1e-3, rtol=1e-3)


def test_stream_activations_rows_come_from_the_model(env):
    ref = torch.cat([env["ref"].read_shard(i)["acts"] for i in range(4)])
    lm = env["lm"]
    corpus_rows = sum(1 for _ in sequences(env["corpus"], lm.tokenizer, 32, 0)) * 32
    got = list(stream_activations(lm, HOOK, env["corpus"], context=32, batch_size=50, buffer_rows=400,
                                  exclude_bos=False, sink_factor=None))
    assert all(b.shape == (50, 32) and b.dtype == torch.float32 for b in got)
    assert len(got) == corpus_rows // 50
    first = torch.cat(got[:4])
    assert torch.cdist(first, ref).min(dim=1).values.max() < 1e-4  # every row is a real activation
    assert not torch.equal(first[:50], ref[:50])                     # and they are shuffled


def test_cli_harvest_info_verify(env, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["harvest", "--model", str(env["model_dir"]), "--hook", HOOK, "--corpus", env["corpus"], "--tokens", "1000",
            "--context", "32", "--batch-size", "4", "--shard-rows", "256", "--no-exclude-bos", "--sink-factor", "0",
            "--out", str(out)]
    assert cli_main(argv) == 0
    capsys.readouterr()
    assert shard_bytes(out) == shard_bytes(env["ref"].path)
    assert cli_main(["store", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 1024 and info["shards"] == 4 and info["hook"] == HOOK and info["complete"]
    assert cli_main(["store", "verify", str(out)]) == 0
    f = out / "shard-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[200] ^= 1
    f.write_bytes(bytes(data))
    assert cli_main(["store", "verify", str(out)]) == 2
    assert "shard-00001.safetensors is corrupt" in capsys.readouterr().err
    assert cli_main(argv[:-1] + [str(out), "--context", "16", "--resume"]) == 2
    assert "different harvest" in capsys.readouterr().err


def test_float16_overflow_refused(env, tmp_path):
    def huge(x):
        return x * 1e6

    with intervene(env["lm"], {HOOK: huge}):
        with pytest.raises(ValueError, match="exceed the float16 range.*bfloat16"):
            harvest(env["lm"], HOOK, env["corpus"], out=tmp_path / "s", dtype="float16", **ARGS)


def test_config_recorded_whole_in_the_manifest(env, tmp_path):
    from saelab.stage_config import HarvestConfig

    cfg = HarvestConfig(**ARGS_CONFIG)
    store = harvest(env["lm"], HOOK, env["corpus"], out=tmp_path / "s", config=cfg, progress=False)
    recorded = store.manifest["harvest"]
    assert {k: recorded[k] for k in ARGS_CONFIG} == ARGS_CONFIG and recorded["seqs_per_shard"] == 8
    assert shard_bytes(tmp_path / "s") == shard_bytes(env["ref"].path)     # the same harvest as by keywords
    with pytest.raises(ValueError, match="sink_factor"):
        HarvestConfig(tokens=10, sink_factor=0.5)
    with pytest.raises(TypeError, match="needs tokens"):
        harvest(env["lm"], HOOK, env["corpus"], out=tmp_path / "t")


ARGS_CONFIG = {k: v for k, v in ARGS.items() if k != "progress"}


def test_comma_hooks_and_prefix_store(env, tmp_path, capsys):
    """``--hook A,B`` is one pass; a prefix of its stores equals a harvest of those tokens."""
    out = tmp_path / "multi"
    argv = ["harvest", "--model", str(env["model_dir"]), "--hook", f"{HOOK},{HOOK2}", "--corpus", env["corpus"],
            "--tokens", "1000", "--context", "32", "--batch-size", "4", "--shard-rows", "256", "--no-exclude-bos",
            "--sink-factor", "0", "--out", str(out)]
    assert cli_main(argv) == 0
    assert shard_bytes(store_dir(out, HOOK)) == shard_bytes(env["ref"].path)
    assert cli_main(["store", "prefix", str(out), "--tokens", "500", "--out", str(tmp_path / "pre")]) == 0
    short = harvest(env["lm"], HOOK, env["corpus"], out=tmp_path / "short", **{**ARGS, "tokens": 512})
    pre = ActivationStore.open(tmp_path / "pre" / store_dir(out, HOOK).name)
    assert shard_bytes(pre.path) == shard_bytes(short.path) and pre.n_rows == short.n_rows
    assert pre.manifest["prefix_of"]["shards"] == 2 and pre.manifest["complete"]
    a, b = pre.manifest["stats"], short.manifest["stats"]
    assert a["count"] == b["count"] and a["mean"] == pytest.approx(b["mean"], rel=1e-5, abs=1e-6)
    assert a["norm"]["max"] == pytest.approx(b["norm"]["max"], rel=1e-5)
    capsys.readouterr()
    assert cli_main(["store", "prefix", str(out / store_dir(out, HOOK).name), "--tokens", "99999999",
                     "--out", str(tmp_path / "pre")]) == 2          # not empty: refused
    assert "not empty" in capsys.readouterr().err
