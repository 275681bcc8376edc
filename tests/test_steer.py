"""Steering on tiny random models with hand-built SAEs: exact formulas, conditions, generation, cleanup."""

import json

import pytest
import torch

from saelab import SAE, SAEConfig, load_model, save_sae
from saelab.hooks import HookError, capture, resolve
from saelab.steer import Ablate, Add, Clamp, DialSpec, VectorAdd, compare_generations, dial_steering, steering
from saelab.generation import generate_ids, prompt_ids

CAUSAL = ["gpt2", "gpt_neox", "llama", "gemma2", "phi3"]
HOOK = "blocks.1.hook_resid_post"
DOWNSTREAM = "blocks.2.hook_resid_pre"  # the next block's input: the same tensor, after the intervention
PROMPT = "def f(x):\n    return x + 1\nimport os\n"
ARCHS = ["relu", "topk", "jumprelu", "batchtopk"]


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    return {fam: load_model(str(tiny_model_dirs[fam])) for fam in CAUSAL}


def make_sae(arch="relu", d_in=32, d_sae=64, hook=HOOK, seed=0, scale=None):
    sae = SAE(SAEConfig(d_in, d_sae, arch, k=8 if arch in ("topk", "batchtopk") else None))
    sae.reset_parameters(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.mul_(scale or 10.0)  # tiny models' residual norms are ~0.1–1: make features fire often
        sae.b_enc.copy_(torch.randn(sae.d_sae, generator=g) * 0.05)
        sae.threshold.fill_(0.05)
        sae.eval()
    sae.provenance = {"hook_name": hook, "feature_max_act": (torch.rand(d_sae, generator=g) + 0.5).tolist()}
    return sae


def forward_with_capture(lm, sae, edits, ids):
    """(x before the intervention at HOOK, x after it at the next block's input, logits)."""
    with capture(lm.model, HOOK) as before, steering(lm, sae, edits), capture(lm.model, [HOOK, DOWNSTREAM]) as after:
        logits = lm.model(input_ids=ids).logits
    return before[HOOK][0], after, logits


def expected(sae, x, edits):
    """The formulas of the issue, computed literally with the dense SAE."""
    max_act = torch.tensor(sae.provenance["feature_max_act"])
    z = sae.encode(x)  # (seq, d_sae)
    clamped = {f: e for f, e in edits.items() if not isinstance(e, Add)}
    z2 = z.clone()
    for f, e in clamped.items():
        z2[:, f] = e.value * max_act[f]
    out = sae.decode(z2) + (x - sae.decode(z)) if clamped else x.clone()
    for f, e in edits.items():
        if isinstance(e, Add):
            out = out + e.value * max_act[f] * sae.W_dec[f]
    out[0] = x[0]  # position 0 is BOS, the attention sink: never edited
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("edits", [{3: Clamp(10)}, {3: Add(4)}, {3: Ablate()}, {3: Clamp(5), 7: Ablate(), 9: Add(-2)}],
                         ids=["clamp", "add", "ablate", "mixed"])
@torch.no_grad()
def test_edit_changes_activation_exactly_as_the_formula(models, arch, edits):
    lm, sae = models["llama"], make_sae(arch)
    ids = prompt_ids(lm, PROMPT)
    x, after, _ = forward_with_capture(lm, sae, edits, ids)
    if not any(isinstance(e, Add) for e in edits.values()):
        assert (sae.encode(x)[:, 3] > 0).any(), "the test needs the clamped feature to fire somewhere"
    want = expected(sae, x, edits)
    # capture registered after the steering hook on the same module sees its result; the next block's
    # input is an independent witness of what flowed downstream
    torch.testing.assert_close(after[HOOK][0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[DOWNSTREAM][0], want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after[HOOK][0], x)


@pytest.mark.parametrize("edits", [{}, {5: Ablate()}, {3: Clamp(10, when=(4, 1e9))}, {3: Add(0.0)}],
                         ids=["empty", "ablate-dead-feature", "condition-never-true", "add-zero"])
@torch.no_grad()
def test_noop_edit_leaves_logits_identical(models, edits):
    lm, sae = models["llama"], make_sae("relu")
    with torch.no_grad():
        sae.b_enc[5] = -1e4  # feature 5 never fires: ablating it changes nothing
    ids = prompt_ids(lm, PROMPT)
    base = lm.model(input_ids=ids).logits
    _, _, logits = forward_with_capture(lm, sae, edits, ids)
    assert torch.equal(base, logits)


@pytest.mark.parametrize("arch", ["relu", "topk"])
@torch.no_grad()
def test_conditional_edit_touches_only_firing_positions(models, arch):
    lm, sae = models["llama"], make_sae(arch)
    ids = prompt_ids(lm, PROMPT)
    x = capture_x(lm, ids)
    z = sae.encode(x)  # (seq, d_sae)
    counts = (z > 0).sum(0).float()
    counts[[3, 9]] = -1.0
    g = int((counts - len(x) / 2).abs().argmin())  # the condition feature firing on about half the positions
    thr = float(z[:, g][z[:, g] > 0].min()) / 2
    firing = z[:, g] > thr
    assert 0 < firing.sum() < len(firing)
    edits = {3: Clamp(8, when=(g, thr)), 9: Add(3, when=(g, thr))}
    x2, after, _ = forward_with_capture(lm, sae, edits, ids)
    torch.testing.assert_close(x2, x)
    out = after[DOWNSTREAM][0]
    assert torch.equal(out[~firing], x[~firing])
    torch.testing.assert_close(out[firing], expected(sae, x, {3: Clamp(8), 9: Add(3)})[firing], atol=1e-5, rtol=1e-5)


def capture_x(lm, ids):
    with capture(lm.model, HOOK) as acts:
        lm.model(input_ids=ids)
    return acts[HOOK][0]


def _no_hooks(lm):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.model.modules())


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@torch.no_grad()
def test_hooks_removed_after_exceptions(models, exc):
    lm, sae = models["llama"], make_sae()
    ids = prompt_ids(lm, PROMPT)
    base = lm.model(input_ids=ids).logits
    with pytest.raises(exc):
        with steering(lm, sae, {3: Clamp(10)}):
            assert not _no_hooks(lm)
            lm.model(input_ids=ids)
            raise exc("stop")
    assert _no_hooks(lm)
    assert torch.equal(lm.model(input_ids=ids).logits, base)


@torch.no_grad()
def test_hooks_removed_when_the_forward_fails_inside_the_hook(models):
    lm = models["llama"]
    sae = make_sae(d_in=16)
    ids = prompt_ids(lm, PROMPT)
    with pytest.raises(ValueError, match="d_in=16.*width 32"):
        with steering(lm, sae, {3: Clamp(10)}):
            lm.model(input_ids=ids)
    assert _no_hooks(lm)


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampling"])
def test_generate_steers_every_position_with_kv_cache(models, family, temperature):
    lm = models[family]
    sae = make_sae(hook="blocks.1.hook_resid_pre")
    ids = prompt_ids(lm, PROMPT)
    seen = []
    mod = lm.model.get_submodule(resolve(lm.model, "blocks.1.hook_resid_pre").module_path)
    handle = mod.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]),
                                           with_kwargs=True)
    try:
        plain = generate_ids(lm, ids, max_new_tokens=6, temperature=temperature, seed=1, exact_length=True)
        seen.clear()
        with steering(lm, sae, {3: Add(200.0), 7: Clamp(50)}):
            steered = generate_ids(lm, ids, max_new_tokens=6, temperature=temperature, seed=1, exact_length=True)
            assert seen == [ids.shape[1]] + [1] * 5  # the prompt once, then one token per step (KV cache on)
            if temperature == 0:  # the cached steered run agrees with a full steered forward without cache
                full = lm.model(input_ids=steered[:, :-1], use_cache=False).logits.argmax(-1)
                assert torch.equal(full[0, ids.shape[1] - 1:], steered[0, ids.shape[1]:])
    finally:
        handle.remove()
    assert not torch.equal(plain, steered)
    assert _no_hooks(lm)
    again = generate_ids(lm, ids, max_new_tokens=6, temperature=temperature, seed=1, exact_length=True)
    assert torch.equal(again, plain)


def test_compare_generations_same_seed(models):
    lm, sae = models["gpt2"], make_sae()
    pairs = compare_generations(lm, sae, PROMPT, {3: Clamp(20)}, max_new_tokens=8, samples=2, seed=3)
    assert len(pairs) == 2
    noop = compare_generations(lm, sae, PROMPT, {}, max_new_tokens=8, samples=2, seed=3)
    assert [p.default_text for p in noop] == [p.steered_text for p in noop] == [p.default_text for p in pairs]
    for p in pairs:
        assert len(p.steered_acts[3]) == len(p.steered_tokens)
        assert "".join(p.steered_tokens) == p.steered_text


@torch.no_grad()
def test_norm_units_add_a_share_of_the_residual_norm(models):
    """Add(v, unit="norm") and VectorAdd(d, v) move x_t by v·‖x_t‖ along the unit direction (BOS untouched); a
    DialSpec in "norm" units adds the set's direction Σ max_f·W_dec[f], normalised, the same way."""
    lm, sae = models["llama"], make_sae()
    ids = prompt_ids(lm, PROMPT)
    x = forward_with_capture(lm, sae, {}, ids)[0]  # (seq, d)
    n = x.norm(dim=-1, keepdim=True)
    for edits, vector, d in [({3: Add(0.5, unit="norm")}, None, sae.W_dec[3]),
                             ({}, VectorAdd(torch.arange(32.0), 0.5), torch.arange(32.0))]:
        with steering(lm, sae, edits, vector=vector), capture(lm.model, DOWNSTREAM) as after:
            lm.model(input_ids=ids)
        want = x + 0.5 * n * d / d.norm()
        want[0] = x[0]
        torch.testing.assert_close(after[DOWNSTREAM][0], want, rtol=1e-4, atol=1e-5)
    maxes = torch.tensor(sae.provenance["feature_max_act"])
    spec = DialSpec((3, 7), "add", "norm")
    with dial_steering(lm, sae, spec, 0.25), capture(lm.model, DOWNSTREAM) as after:
        lm.model(input_ids=ids)
    d = maxes[3] * sae.W_dec[3] + maxes[7] * sae.W_dec[7]
    want = x + 0.25 * n * d / d.norm()
    want[0] = x[0]
    torch.testing.assert_close(after[DOWNSTREAM][0], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs a direction"):
        DialSpec(mode="vector")
    with pytest.raises(ValueError, match="unknown dial unit"):
        DialSpec((3,), "add", "raw")


# -- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("edits, match", [
    ({64: Clamp(1)}, "unknown feature id 64.*64 features"),
    ({-1: Clamp(1)}, "unknown feature id -1"),
    ({"12": Clamp(1)}, "unknown feature id '12'"),
    ({3: Clamp("abc")}, "must be a finite number, got 'abc'"),
    ({3: Clamp(float("nan"))}, "finite number"),
    ({3: Add(1, when=(99, 0.5))}, "unknown feature id 99"),
    ({3: Add(1, when=(4, "x"))}, "'when' threshold"),
    ({3: 10}, "expected Clamp, Add or Ablate"),
])
def test_bad_edits(models, edits, match):
    with pytest.raises(ValueError, match=match):
        with steering(models["llama"], make_sae(), edits):
            pass


def test_hook_not_in_model(models):
    with pytest.raises(HookError, match="blocks.7.hook_resid_post.*does not exist"):
        with steering(models["llama"], make_sae(hook="blocks.7.hook_resid_post"), {3: Clamp(1)}):
            pass


def test_missing_or_dead_max_activation(models):
    sae = make_sae()
    sae.provenance = {"hook_name": HOOK}
    with pytest.raises(ValueError, match="feature_max_act"):
        with steering(models["llama"], sae, {3: Clamp(1)}):
            pass
    with steering(models["llama"], sae, {3: Clamp(1)}, max_act={3: 2.0}):  # an explicit override works
        pass
    with steering(models["llama"], sae, {3: Ablate()}):  # ablation needs no max activation
        pass
    with pytest.raises(ValueError, match="dead"):
        with steering(models["llama"], sae, {3: Clamp(1)}, max_act={3: 0.0}):
            pass


def test_prompt_longer_than_context(models):
    with pytest.raises(ValueError, match="beyond the model's context of 128"):
        compare_generations(models["llama"], make_sae(), "x " * 200, {3: Clamp(1)}, max_new_tokens=4)


# -- CLI -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, tiny_model_dirs):
    sae = make_sae()
    out = tmp_path_factory.mktemp("sae") / "sae"
    save_sae(sae, out, model_name=str(tiny_model_dirs["llama"]), hook_name=HOOK,
             feature_max_act=sae.provenance["feature_max_act"])
    return out


def test_parse_feature_specs():
    from saelab.cli.steering import _parse_edit

    assert _parse_edit("1234=10x", "clamp") == (1234, Clamp(10.0))
    assert _parse_edit("77=0", "clamp") == (77, Ablate())
    assert _parse_edit("5=+4", "add") == (5, Add(4.0))
    assert _parse_edit("5=-2.5x", "add") == (5, Add(-2.5))
    for bad in ["1234=abc", "1234", "x=3", "1234=10y", "1234=inf"]:
        with pytest.raises(ValueError, match="--feature"):
            _parse_edit(bad, "clamp")


def test_cli_steer_json(sae_dir, capsys):
    from saelab.cli import main

    rc = main(["steer", str(sae_dir), "--prompt", "def f(x):", "--feature", "3=10x", "--feature", "7=0",
               "--when", "4>0.01", "--samples", "2", "--max-new-tokens", "5", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["samples"]) == 2 and set(out["samples"][0]["steered_acts"]) == {"3", "7"}
    assert out["edits"]["3"] == {"mode": "clamp", "value": 10.0, "when": [4, 0.01]}


@pytest.mark.parametrize("argv, match", [
    (["--feature", "3=abc"], "'abc' is not a number"),
    (["--feature", "640=10x"], "feature 640 does not exist"),
    (["--feature", "3=1x", "--when", "4>>1"], "--when"),
])
def test_cli_steer_errors(sae_dir, capsys, argv, match):
    from saelab.cli import main

    assert main(["steer", str(sae_dir), "--prompt", "def f(x):", "--max-new-tokens", "3", *argv]) == 2
    assert match in capsys.readouterr().err


def test_cli_dial_json(sae_dir, tmp_path, capsys):
    from saelab.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\nimport os\n")
    assert main(["dial", str(sae_dir), "--feature", "3", "--prompts", str(prompts), "--values", "0,5",
                 "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["value"] for p in out["points"]] == [None, 0.0, 5.0]
    assert all(len(p["answers"]) == 2 and p["fluency_nll"] >= 0 for p in out["points"])
    assert main(["dial", str(sae_dir), "--feature", "3", "--prompts", str(prompts), "--values", "0,abc"]) == 2
    assert "not a number" in capsys.readouterr().err
