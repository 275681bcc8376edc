"""SAE folders: save → load round trips, each foreign format against its own math, and bad files."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.formats import feature_max_activations, load_sae, save_sae
from saelab.sae import ARCHITECTURES, SAE, SAEConfig

D_IN, D_SAE = 6, 16
RNG = np.random.default_rng(0)


def random_sae(arch: str, seed: int = 0) -> SAE:
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=3 if arch in ("topk", "batchtopk") else None,
                        metadata={"model_name": "tiny"}))
    sae.reset_parameters(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(D_IN, D_SAE, generator=g))
        sae.b_enc.copy_(0.2 * torch.randn(D_SAE, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(D_IN, generator=g))
        sae.threshold.copy_(0.05 + 0.3 * torch.rand(D_SAE, generator=g))
        if arch == "batchtopk":
            sae.threshold.fill_(0.21)  # one global θ, as training sets it
    return sae


def inputs(n: int = 32, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def arrays(*shapes):
    return [RNG.standard_normal(s).astype(np.float32) for s in shapes]


def assert_outputs(sae: SAE, z_expected: np.ndarray, x_hat_expected: np.ndarray, x: np.ndarray) -> None:
    out = sae(torch.from_numpy(x))
    np.testing.assert_allclose(out.z.detach().numpy(), z_expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.x_hat.detach().numpy(), x_hat_expected, rtol=1e-5, atol=1e-5)
    assert (z_expected > 0).sum() > 0 and (z_expected == 0).sum() > 0  # the case is not degenerate


# -- our folders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip(tmp_path, arch):
    sae = random_sae(arch).eval()
    density = torch.rand(D_SAE).tolist()
    density[3] = 0.0  # a dead latent
    save_sae(sae, tmp_path / "sae", model_name="tiny", hook_name="blocks.1.hook_resid_post",
             hf_hook_name="model.layers.1", context_size=64, prepend_bos=True, tokens_trained=1000,
             train_config={"lr": 1e-3, "k": sae.cfg.k}, input_scale=2.5, feature_density=density,
             feature_max_act=torch.arange(D_SAE, dtype=torch.float32))
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.architecture == ("jumprelu" if arch == "batchtopk" else arch)
    assert loaded.cfg.k == (sae.cfg.k if arch == "topk" else None)
    assert not loaded.training
    x = inputs()
    a, b = sae(x), loaded(x)
    assert torch.equal(a.z, b.z) and torch.equal(a.x_hat, b.x_hat)
    assert loaded.provenance["trained_architecture"] == arch
    assert loaded.provenance["train_config"] == {"lr": 1e-3, "k": sae.cfg.k}
    assert loaded.provenance["input_scale"] == 2.5
    assert loaded.cfg.metadata["hook_name"] == "blocks.1.hook_resid_post"
    torch.testing.assert_close(feature_max_activations(loaded), torch.arange(D_SAE, dtype=torch.float32))
    sparsity = load_file(tmp_path / "sae" / "sparsity.safetensors")["sparsity"]
    torch.testing.assert_close(sparsity, torch.log10(torch.tensor(density) + 1e-10))
    assert sparsity[3] == -10.0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_saved_folder_is_saelens_v6(tmp_path, arch):
    sae = random_sae(arch)
    save_sae(sae, tmp_path / "sae", hook_name="blocks.0.hook_resid_post", context_size=32, corpus={"source": "x"})
    files = sorted(p.name for p in (tmp_path / "sae").iterdir())
    assert files == ["cfg.json", "sae_weights.safetensors", "saelab.json"]  # no density given → no sparsity file
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu",
                                   "batchtopk": "jumprelu"}[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg.get("k") == (3 if arch == "topk" else None)
    assert cfg["metadata"]["sae_lens_version"].startswith("6.")
    assert cfg["metadata"]["model_name"] == "tiny" and cfg["metadata"]["context_size"] == 32
    assert "corpus" not in cfg["metadata"]  # training provenance stays in saelab.json
    assert json.loads((tmp_path / "sae" / "saelab.json").read_text())["corpus"] == {"source": "x"}
    weights = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    expected = {"W_enc": [D_IN, D_SAE], "b_enc": [D_SAE], "W_dec": [D_SAE, D_IN], "b_dec": [D_IN]}
    if arch in ("jumprelu", "batchtopk"):
        expected["threshold"] = [D_SAE]
    assert {k: list(v.shape) for k, v in weights.items()} == expected


def test_save_replaces_atomically_and_keeps_provenance(tmp_path):
    out = tmp_path / "sae"
    save_sae(random_sae("relu", seed=1), out, feature_density=[0.5] * D_SAE)
    loaded = load_sae(out)
    save_sae(loaded, out, tokens_trained=7)  # re-save over itself: provenance is carried over and extended
    again = load_sae(out)
    assert again.provenance["tokens_trained"] == 7 and again.provenance["feature_density"] == [0.5] * D_SAE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temp folders left behind


def test_save_refuses_nan_weights_and_bad_provenance(tmp_path):
    sae = random_sae("topk")
    with pytest.raises(ValueError, match="feature_density"):
        save_sae(sae, tmp_path / "a", feature_density=[0.1] * (D_SAE - 1))
    with pytest.raises(TypeError, match="train_config"):
        save_sae(sae, tmp_path / "a", train_config={"fn": print})
    with torch.no_grad():
        sae.W_dec[2, 1] = float("nan")
    with pytest.raises(ValueError, match="W_dec has 1 NaN"):
        save_sae(sae, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_feature_max_activations_missing(tmp_path):
    save_sae(random_sae("relu"), tmp_path / "sae")
    with pytest.raises(ValueError, match="feature_max_act"):
        feature_max_activations(load_sae(tmp_path / "sae"))


# -- SAELens ---------------------------------------------------------------------------------------


def write_saelens(folder: Path, cfg: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
              str(folder / "sae_weights.safetensors"))
    return folder


def test_saelens_v6_topk_with_decoder_norm_rescaling(tmp_path):
    W_enc, b_enc, W_dec, b_dec = arrays((D_IN, D_SAE), (D_SAE,), (D_SAE, D_IN), (D_IN,))
    W_dec *= np.linspace(0.2, 3, D_SAE, dtype=np.float32)[:, None]  # decoder rows of very different norms
    cfg = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "k": 4,
           "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"sae_lens_version": "6.5.1", "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_pre"}}
    folder = write_saelens(tmp_path / "v6", cfg, dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec))
    save_file({"sparsity": torch.full((D_SAE,), -2.0)}, str(folder / "sparsity.safetensors"))
    sae = load_sae(folder)
    # SAELens TopKSAE.encode/decode, written out in numpy
    x = inputs().numpy()
    norms = np.linalg.norm(W_dec, axis=1)
    hidden = ((x - b_dec) @ W_enc + b_enc) * norms
    z = np.zeros_like(hidden)
    top = np.argsort(-hidden, axis=1)[:, :4]
    np.put_along_axis(z, top, np.maximum(np.take_along_axis(hidden, top, 1), 0), 1)
    x_hat = (z / norms) @ W_dec + b_dec
    # our z is SAELens' z (in the rescaled basis, where decoder rows have unit norm)
    assert_outputs(sae, z, x_hat, x)
    assert sae.cfg.metadata["model_name"] == "gpt2" and sae.cfg.k == 4
    np.testing.assert_allclose(sae.provenance["feature_density"], np.full(D_SAE, 0.01), rtol=1e-5)


@pytest.mark.parametrize("threshold_shift", [0.0, -0.4])
def test_saelens_v6_jumprelu_without_b_dec_on_input(tmp_path, threshold_shift):
    W_enc, b_enc, W_dec, b_dec = arrays((D_IN, D_SAE), (D_SAE,), (D_SAE, D_IN), (D_IN,))
    threshold = np.abs(arrays((D_SAE,))[0]) * 0.5 + threshold_shift  # may be negative: ReLU still applies
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "metadata": {"sae_lens_version": "6.0.0"}}
    folder = write_saelens(tmp_path / "jr", cfg, dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
                                                      threshold=threshold))
    x = inputs().numpy()
    hidden = x @ W_enc + b_enc  # apply_b_dec_to_input false: b_dec is not subtracted
    z = np.maximum(hidden, 0) * (hidden > threshold)
    assert_outputs(load_sae(folder), z, z @ W_dec + b_dec, x)
    assert load_sae(folder).provenance == {}


def test_saelens_old_flat_topk_config(tmp_path):
    W_enc, b_enc, W_dec, b_dec = arrays((D_IN, D_SAE), (D_SAE,), (D_SAE, D_IN), (D_IN,))
    scaling = np.linspace(0.5, 2, D_SAE, dtype=np.float32)
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "model_name": "pythia-70m",
           "hook_point": "blocks.2.hook_resid_post", "hook_point_layer": 2, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": True, "normalize_activations": False,
           "finetuning_scaling_factor": True, "context_size": 128, "sae_lens_training_version": "3.13.0"}
    folder = write_saelens(tmp_path / "old", cfg, dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
                                                       scaling_factor=scaling))
    sae = load_sae(folder)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 3
    assert sae.cfg.metadata["hook_name"] == "blocks.2.hook_resid_post"
    assert sae.cfg.metadata["context_size"] == 128
    x = inputs().numpy()
    hidden = (x - b_dec) @ W_enc + b_enc
    kth = np.sort(hidden, axis=1)[:, -3:-2]
    z = np.where(hidden >= kth, np.maximum(hidden, 0), 0)
    assert_outputs(sae, z, (z * scaling) @ W_dec + b_dec, x)  # old SAELens decode: (z·s) W_dec + b_dec


def test_saelens_old_flat_relu_config(tmp_path):
    W_enc, b_enc, W_dec, b_dec = arrays((D_IN, D_SAE), (D_SAE,), (D_SAE, D_IN), (D_IN,))
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "hook_name": "blocks.0.hook_mlp_out",
           "activation_fn_str": "relu", "normalize_activations": "none", "apply_b_dec_to_input": True}
    folder = write_saelens(tmp_path / "old", cfg, dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec))
    x = inputs().numpy()
    z = np.maximum((x - b_dec) @ W_enc + b_enc, 0)
    sae = load_sae(folder / "cfg.json")  # a file inside the folder works too
    assert sae.cfg.architecture == "relu"
    assert_outputs(sae, z, z @ W_dec + b_dec, x)


# -- sparsify --------------------------------------------------------------------------------------


def write_sparsify(root: Path, hook: str, k: int = 3, dtype=torch.float32, **cfg_extra) -> tuple:
    enc_w, enc_b, W_dec, b_dec = arrays((D_SAE, D_IN), (D_SAE,), (D_SAE, D_IN), (D_IN,))
    folder = root / hook
    folder.mkdir(parents=True)
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN, **cfg_extra}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    tensors = {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec}
    save_file({k_: torch.from_numpy(v).to(dtype) for k_, v in tensors.items()}, str(folder / "sae.safetensors"))
    return folder, {k_: torch.from_numpy(v).to(dtype).float().numpy() for k_, v in tensors.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsify_folder(tmp_path, dtype):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
    folder, w = write_sparsify(tmp_path / "run", "layers.4", dtype=dtype)
    write_sparsify(tmp_path / "run", "layers.5", dtype=dtype)
    sae = load_sae(folder)
    # sparsify SparseCoder: top_acts, top_idx = topk(relu(encoder(x − b_dec))); x̂ = Σ acts·W_dec[idx] + b_dec
    x = inputs().numpy()
    pre = np.maximum((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"], 0)
    top_idx = np.argsort(-pre, axis=1)[:, :3]
    top_acts = np.take_along_axis(pre, top_idx, 1)
    x_hat = np.einsum("nk,nkd->nd", top_acts, w["W_dec"][top_idx]) + w["b_dec"]
    z = np.zeros_like(pre)
    np.put_along_axis(z, top_idx, top_acts, 1)
    assert_outputs(sae, z, x_hat, x)
    assert sae.cfg.metadata == {"hf_hook_name": "layers.4", "hook_name": "blocks.4.hook_resid_post",
                                "model_name": "EleutherAI/pythia-70m"}
    with pytest.raises(ValueError, match=r"holds 2 SAEs \(one per hook: layers.4, layers.5\)"):
        load_sae(tmp_path / "run")


@pytest.mark.parametrize("extra, message", [({"activation": "groupmax"}, "activation 'groupmax'"),
                                            ({"transcode": True}, "transcoder"),
                                            ({"skip_connection": True}, "skip connection")])
def test_sparsify_unsupported_options(tmp_path, extra, message):
    folder, _ = write_sparsify(tmp_path, "layers.0", **extra)
    with pytest.raises(ValueError, match=message):
        load_sae(folder)


# -- Gemma Scope -----------------------------------------------------------------------------------


def test_gemma_scope_params_npz(tmp_path):
    W_enc, b_enc, W_dec, b_dec = arrays((D_IN, D_SAE), (D_SAE,), (D_SAE, D_IN), (D_IN,))
    threshold = np.abs(arrays((D_SAE,))[0])
    folder = tmp_path / "layer_3" / "width_16k" / "average_l0_50"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec, threshold=threshold)
    # Gemma Scope's JumpReLUSAE: pre = x W_enc + b_enc; acts = 1[pre > θ]·ReLU(pre); x̂ = acts W_dec + b_dec
    x = inputs().numpy()
    pre = x @ W_enc + b_enc
    acts = (pre > threshold) * np.maximum(pre, 0)
    for path in (folder, folder / "params.npz"):
        sae = load_sae(path)
        assert sae.cfg.architecture == "jumprelu"
        assert_outputs(sae, acts, acts @ W_dec + b_dec, x)


# -- bad files -------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    save_sae(random_sae("jumprelu"), tmp_path / "sae")
    return tmp_path / "sae"


def rewrite_weights(folder: Path, fn) -> None:
    tensors = load_file(folder / "sae_weights.safetensors")
    fn(tensors)
    save_file(tensors, str(folder / "sae_weights.safetensors"))


def test_missing_key(saved):
    rewrite_weights(saved, lambda t: t.pop("b_dec"))
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: missing tensor\(s\) b_dec"):
        load_sae(saved)


def test_shape_mismatch(saved):
    rewrite_weights(saved, lambda t: t.update(W_dec=t["W_dec"].T.contiguous()))
    with pytest.raises(ValueError, match=rf"W_dec has shape \[{D_IN}, {D_SAE}\], expected \[{D_SAE}, {D_IN}\]"):
        load_sae(saved)


def test_nan_weights(saved):
    def poison(t):
        t["W_enc"][0, 0] = float("nan")
        t["threshold"][1] = float("inf")
    rewrite_weights(saved, poison)
    with pytest.raises(ValueError, match="W_enc has 1 NaN/inf"):
        load_sae(saved)


def test_unknown_architecture_and_unsupported_options(saved):
    cfg = json.loads((saved / "cfg.json").read_text())
    for change, message in [({"architecture": "gated"}, "architecture 'gated' is not supported"),
                            ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
                            ({"d_sae": 0}, "d_sae must be a positive integer")]:
        (saved / "cfg.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=message):
            load_sae(saved)


def test_unexpected_tensor_is_refused(saved):
    rewrite_weights(saved, lambda t: t.update(b_gate=torch.zeros(D_SAE)))
    with pytest.raises(ValueError, match="unexpected tensor"):
        load_sae(saved)


def test_damaged_config_and_weights(saved):
    (saved / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_sae(saved)
    (saved / "cfg.json").write_text("{broken")
    with pytest.raises(ValueError, match="cfg.json: not valid JSON"):
        load_sae(saved)
    (saved / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match="cfg.json: missing"):
        load_sae(saved)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such SAE"):
        load_sae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no SAE found"):
        load_sae(tmp_path / "empty")


class _Trap:
    """Unpickling this creates a file: proof that a loader unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["sae.pt", "model.bin", "weights.pkl"])
def test_pickle_files_are_refused_not_unpickled(tmp_path, name):
    marker = tmp_path / "unpickled"
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / name).write_bytes(pickle.dumps(_Trap(marker)))
    for path in (folder, folder / name):
        with pytest.raises(ValueError, match="pickle file"):
            load_sae(path)
    assert not marker.exists()


def test_object_npz_is_refused(tmp_path):
    marker = tmp_path / "unpickled"
    np.savez(tmp_path / "params.npz", W_enc=np.array([_Trap(marker)], dtype=object))
    with pytest.raises(ValueError, match="pickled/object arrays"):
        load_sae(tmp_path / "params.npz")
    assert not marker.exists()


def test_gemma_scope_missing_threshold_and_bad_shape(tmp_path):
    W_enc, b_enc, W_dec, b_dec = arrays((D_IN, D_SAE), (D_SAE,), (D_SAE, D_IN), (D_IN,))
    np.savez(tmp_path / "a.npz", W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec)
    with pytest.raises(ValueError, match=r"a.npz: missing tensor\(s\) threshold"):
        load_sae(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec[:-1], threshold=b_enc)
    with pytest.raises(ValueError, match=r"b_dec has shape \[5\], expected \[6\]"):
        load_sae(tmp_path / "b.npz")
