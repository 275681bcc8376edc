import pytest
import torch

from saelab.hooks import HookError, capture, hook_names, hook_shapes, intervene, resolve, run_to_hooks
from saelab.models import load_model
from tiny_models import FAMILIES


def _ids(n=2, seq=10, vocab=96):
    return torch.randint(1, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_hooks_match_output_hidden_states(tiny_model_dirs, family):
    lm = load_model(str(tiny_model_dirs[family]))
    ids = _ids()
    n = lm.n_layers
    names = [f"blocks.{L}.hook_resid_pre" for L in range(n)] + [f"blocks.{L}.hook_resid_post" for L in range(n - 1)]
    with torch.no_grad(), capture(lm, names) as acts:
        out = lm.model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    for L in range(n):
        torch.testing.assert_close(acts[f"blocks.{L}.hook_resid_pre"], hs[L], rtol=0, atol=0)
    for L in range(n - 1):  # the last hidden state has the final norm applied by HF
        torch.testing.assert_close(acts[f"blocks.{L}.hook_resid_post"], hs[L + 1], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_hook_resolves_and_identity_intervention_is_exact(tiny_model_dirs, family):
    lm = load_model(str(tiny_model_dirs[family]))
    ids = _ids()
    names = hook_names(lm)
    assert "blocks.1.hook_resid_post" in names and "blocks.1.mlp.hook_post" in names
    shapes = hook_shapes(lm)
    assert shapes["blocks.0.hook_resid_pre"] == lm.config.hidden_size
    assert shapes["blocks.0.mlp.hook_post"] == (128 if family == "gpt2" else lm.config.intermediate_size)
    with torch.no_grad():
        clean = lm.model(input_ids=ids)[0]
        with intervene(lm, {n: (lambda x: x.clone()) for n in names}):
            same = lm.model(input_ids=ids)[0]
    torch.testing.assert_close(same, clean, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_intervention_changes_downstream_and_hooks_are_removed(tiny_model_dirs, family):
    lm = load_model(str(tiny_model_dirs[family]))
    ids = _ids()
    with torch.no_grad():
        clean = lm.model(input_ids=ids).logits
        with intervene(lm, {"blocks.1.hook_resid_post": lambda x: x * 0}):
            zeroed = lm.model(input_ids=ids).logits
        assert not torch.allclose(zeroed, clean)
        with pytest.raises(RuntimeError):
            with intervene(lm, {"blocks.1.hook_resid_post": lambda x: x * 0}):
                raise RuntimeError("boom")
        assert torch.equal(lm.model(input_ids=ids).logits, clean)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in lm.model.modules())


def test_mlp_out_is_what_the_block_adds(tiny_model_dirs):
    lm = load_model(str(tiny_model_dirs["llama"]))
    names = ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post",
             "blocks.1.hook_resid_pre", "blocks.1.hook_attn_out"]
    with torch.no_grad(), capture(lm, names) as a:
        lm.model(input_ids=_ids())
    torch.testing.assert_close(a["blocks.1.hook_resid_mid"] + a["blocks.1.hook_mlp_out"], a["blocks.1.hook_resid_post"])
    torch.testing.assert_close(a["blocks.1.hook_resid_pre"] + a["blocks.1.hook_attn_out"], a["blocks.1.hook_resid_mid"])


def test_run_to_hooks_stops_early_and_matches_full_pass(tiny_model_dirs):
    lm = load_model(str(tiny_model_dirs["llama"]))
    ids = _ids()
    calls = []
    last = lm.model.model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        early = run_to_hooks(lm, ids, ["blocks.0.hook_resid_post"])
    finally:
        last.remove()
    assert calls == []
    with torch.no_grad(), capture(lm, ["blocks.0.hook_resid_post"]) as full:
        lm.model(input_ids=ids)
    assert torch.equal(early["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"])


def test_unknown_hook_lists_valid_ones(tiny_model_dirs):
    lm = load_model(str(tiny_model_dirs["llama"]))
    with pytest.raises(HookError, match="blocks.0.hook_resid_post"):
        resolve(lm.model, "blocks.9.hook_resid_post")
    with pytest.raises(HookError, match="Valid hooks"):
        resolve(lm.model, "blocks.0.hook_nonsense")
    point = resolve(lm.model, "model.layers.1:input")
    assert point.io == "input" and point.module_path == "model.layers.1"


def test_neox_parallel_residual_has_no_resid_mid(tiny_model_dirs):
    lm = load_model(str(tiny_model_dirs["gpt_neox"]))
    assert "blocks.0.hook_resid_mid" not in hook_names(lm)


def test_bad_model_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))
