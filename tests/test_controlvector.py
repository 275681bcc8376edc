"""llama.cpp control vectors: the GGUF file through gguf's own reader, and the layer numbering checked
against a forward pass (what saelab adds at its hook == what llama.cpp's convention adds)."""

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from saelab import SAE, SAEConfig, save_sae
from saelab.cli import main
from saelab.controlvector import (feature_direction, llamacpp_layer, model_hint, read_control_vector,
                                  write_control_vector)
from saelab.errors import SaelabError
from saelab.hooks import intervene
from tiny_models import save_tiny_model

HOOK = "blocks.1.hook_resid_post"


def make_sae(d_in=32, d_sae=16, hook=HOOK):
    sae = SAE(SAEConfig(d_in, d_sae, "relu"))
    sae.reset_parameters(0)
    sae.provenance = {"hook_name": hook, "feature_max_act": [0.5 + i / 10 for i in range(d_sae)]}
    return sae


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = save_tiny_model("llama", tmp_path_factory.mktemp("cv") / "llama")
    return folder, AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def test_file_round_trips_through_ggufs_reader(tmp_path):
    vec = np.linspace(-1, 1, 576, dtype=np.float32)
    path = write_control_vector(tmp_path / "gg.gguf", vec, 15, "llama", {"hook": "blocks.15.hook_resid_post"})
    reader = gguf.GGUFReader(str(path))  # the gguf package's reader, not ours
    assert [(t.name, list(t.shape), t.tensor_type) for t in reader.tensors] == [
        ("direction.15", [576], gguf.GGMLQuantizationType.F32)]
    np.testing.assert_array_equal(np.asarray(reader.tensors[0].data), vec)
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    cv = read_control_vector(path)
    assert cv.model_hint == "llama" and list(cv.directions) == [15]
    assert cv.source == {"hook": "blocks.15.hook_resid_post"}
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temp file that is gone


@pytest.mark.parametrize("hook, layer", [("blocks.15.hook_resid_post", 15), ("blocks.16.hook_resid_pre", 15),
                                         ("model.layers.3", 3), ("blocks.1.hook_resid_post", 1)])
def test_llamacpp_layer_of_each_hook(hook, layer):
    assert llamacpp_layer(hook) == layer


@pytest.mark.parametrize("hook, message", [
    ("blocks.0.hook_resid_post", "output of block 0"), ("blocks.1.hook_resid_pre", "output of block 0"),
    ("blocks.3.hook_mlp_out", "inside block 3"), ("blocks.3.hook_resid_mid", "inside block 3"),
    ("model.layers.3.mlp", "block outputs only")])
def test_hooks_a_control_vector_cannot_reach(hook, message):
    with pytest.raises(SaelabError, match=message):
        llamacpp_layer(hook)


def test_feature_direction_is_what_add_adds():
    sae = make_sae()
    maxes = dict(enumerate(sae.provenance["feature_max_act"]))
    d = feature_direction(sae, {2: 1.5, 7: -0.5}, maxes)
    expected = 1.5 * maxes[2] * sae.W_dec[2] - 0.5 * maxes[7] * sae.W_dec[7]
    torch.testing.assert_close(d, expected.detach())
    with pytest.raises(SaelabError, match="finite"):
        feature_direction(sae, {2: float("nan")}, maxes)
    with pytest.raises(ValueError, match="unknown feature id 99"):
        feature_direction(sae, {99: 1.0}, maxes)


def _llamacpp_convention(model, cv):
    """What llama.cpp does with a control vector (llama-adapter.cpp, llama-graph.cpp): direction.N is added
    to the output of decoder layer N (0-based ``il``), at every position. Written with plain torch hooks on
    the decoder layers, independently of saelab's hook names."""
    def add(vec):
        return lambda module, args, out: ((out[0] + vec,) + tuple(out[1:])) if isinstance(out, tuple) else out + vec
    return [model.model.layers[n].register_forward_hook(add(torch.from_numpy(v))) for n, v in cv.directions.items()]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"])
def test_layer_numbering_matches_a_forward_pass(tiny_llama, tmp_path, hook):
    """Adding the direction at the hook saelab names gives the hidden states llama.cpp's convention gives
    for the exported file; the neighbouring layers give different ones (an off-by-one cannot pass)."""
    _, model = tiny_llama
    sae = make_sae(hook=hook)
    d = feature_direction(sae, {1: 4.0, 5: 3.0}, dict(enumerate(sae.provenance["feature_max_act"])))
    path = write_control_vector(tmp_path / "v.gguf", d, llamacpp_layer(hook), "llama")
    cv = read_control_vector(path)
    ids = torch.tensor([[0, 5, 17, 33, 8, 41, 2]])
    plain = _logits(model, ids)
    with intervene(model, {hook: lambda x: x + d}):
        saelab_steered = _logits(model, ids)
    handles = _llamacpp_convention(model, cv)
    try:
        llamacpp_steered = _logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    assert (saelab_steered - plain).abs().max() > 1e-3  # the direction does something
    torch.testing.assert_close(llamacpp_steered, saelab_steered)
    for other in (0, 2):  # the layer before and after
        with intervene(model, {f"blocks.{other}.hook_resid_post": lambda x: x + d}):
            assert (_logits(model, ids) - llamacpp_steered).abs().max() > 1e-3


def test_bad_directions_are_refused(tmp_path):
    with pytest.raises(SaelabError, match="NaN or inf"):
        write_control_vector(tmp_path / "v.gguf", np.array([1.0, np.nan]), 3, "llama")
    with pytest.raises(SaelabError, match="one vector"):
        write_control_vector(tmp_path / "v.gguf", np.ones((2, 3)), 3, "llama")
    with pytest.raises(SaelabError, match="direction.0 is refused"):
        write_control_vector(tmp_path / "v.gguf", np.ones(3), 0, "llama")
    assert not list(tmp_path.iterdir())
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(SaelabError, match="junk.gguf is not a readable GGUF file"):
        read_control_vector(tmp_path / "junk.gguf")


def test_model_hint_from_the_models_files(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    assert model_hint(str(folder)) == "llama"
    assert model_hint(str(tmp_path / "nowhere")) is None


# -- CLI -------------------------------------------------------------------------------------------------

@pytest.fixture
def sae_dir(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    sae = make_sae()
    save_sae(sae, tmp_path / "sae", model_name=str(folder), hook_name=HOOK,
             feature_max_act=sae.provenance["feature_max_act"])
    return tmp_path / "sae", sae


def test_cli_exports_features_as_add_does(sae_dir, tmp_path, capsys):
    path, sae = sae_dir
    out = tmp_path / "cv.gguf"
    assert main(["export", "control-vector", str(path), "--out", str(out), "--feature", "3=2", "--feature", "9=-1x"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}: direction.1 " in text and "model hint 'llama'" in text and "--control-vector" in text
    cv = read_control_vector(out)
    maxes = sae.provenance["feature_max_act"]
    expected = 2 * maxes[3] * sae.W_dec[3] - maxes[9] * sae.W_dec[9]
    np.testing.assert_allclose(cv.directions[1], expected.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert cv.source["features"] == {"3": 2.0, "9": -1.0} and cv.source["hook"] == HOOK


def test_cli_exports_a_direction_file(sae_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    path, _ = sae_dir
    save_file({"direction": torch.arange(32, dtype=torch.float32)}, str(tmp_path / "d.safetensors"))
    out = tmp_path / "cv.gguf"
    assert main(["export", "control-vector", str(path), "--out", str(out),
                 "--direction", str(tmp_path / "d.safetensors"), "--scale", "0.5"]) == 0
    np.testing.assert_array_equal(read_control_vector(out).directions[1], np.arange(32, dtype=np.float32) * 0.5)


@pytest.mark.parametrize("extra, message", [
    ([], "give --feature ID=STRENGTH"),
    (["--feature", "3=1", "--direction", "x.safetensors"], "exactly one"),
    (["--feature", "3=1", "--feature", "3=2"], "feature 3 is given twice"),
    (["--feature", "99=1"], "unknown feature id 99"),
    (["--feature", "3=inf"], "finite"),
    (["--direction", "missing.safetensors"], "not a readable safetensors file"),
])
def test_cli_user_errors_are_one_line(sae_dir, tmp_path, capsys, extra, message):
    path, _ = sae_dir
    assert main(["export", "control-vector", str(path), "--out", str(tmp_path / "cv.gguf"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saelab: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "cv.gguf").exists()


def test_cli_refuses_a_direction_of_the_wrong_width(sae_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    path, _ = sae_dir
    save_file({"direction": torch.ones(7)}, str(tmp_path / "d.safetensors"))
    assert main(["export", "control-vector", str(path), "--out", str(tmp_path / "cv.gguf"),
                 "--direction", str(tmp_path / "d.safetensors")]) == 2
    assert "needs a tensor 'direction' of shape [32]" in capsys.readouterr().err


def test_cli_exports_a_concept_file_and_refuses_a_dial_that_is_no_constant(sae_dir, tmp_path, capsys):
    from saelab.conceptfile import make_concept, save_concept
    from saelab.steer import DialSpec

    path, sae = sae_dir
    save_concept(tmp_path / "add.json", make_concept(sae, "x", DialSpec((3, 9), "add", "max"), 2.0))
    out = tmp_path / "cv.gguf"
    assert main(["export", "control-vector", str(path), "--out", str(out), "--concept", str(tmp_path / "add.json")]) == 0
    maxes = sae.provenance["feature_max_act"]
    expected = 2 * maxes[3] * sae.W_dec[3] + 2 * maxes[9] * sae.W_dec[9]
    np.testing.assert_allclose(read_control_vector(out).directions[1], expected.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert main(["export", "control-vector", str(path), "--out", str(out),
                 "--concept", f"{tmp_path / 'add.json'}=0.5"]) == 0                       # STRENGTH overrides
    np.testing.assert_allclose(read_control_vector(out).directions[1], expected.detach().numpy() / 4, rtol=1e-5,
                               atol=1e-6)
    vec = tuple(float(i) for i in range(32))
    save_concept(tmp_path / "dom.json", make_concept(sae, "x", DialSpec((), "vector", "max", direction=vec), 0.5,
                                                     method="difference-of-means"))
    assert main(["export", "control-vector", str(path), "--out", str(out), "--concept", str(tmp_path / "dom.json")]) == 0
    np.testing.assert_allclose(read_control_vector(out).directions[1], np.arange(32, dtype=np.float32) * 0.5)
    save_concept(tmp_path / "norm.json", make_concept(sae, "x", DialSpec((3,), "add", "norm"), 0.5))
    save_concept(tmp_path / "clamp.json", make_concept(sae, "x", DialSpec((3,), "clamp", "max"), 2.0))
    capsys.readouterr()
    for name in ("norm.json", "clamp.json"):
        assert main(["export", "control-vector", str(path), "--out", str(tmp_path / "no.gguf"),
                     "--concept", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert "not one constant vector" in err and err.count("\n") == 1
    assert not (tmp_path / "no.gguf").exists()
