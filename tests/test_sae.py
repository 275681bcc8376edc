"""The SAE module: hand-set weights with known outputs, and invariants over every architecture."""

import copy

import pytest
import torch

from saelab.basis import Basis, NeuronBasis, SparseActs
from saelab.mining import sparse_latents
from saelab.sae import ARCHITECTURES, SAE, SAEConfig, jumprelu, step

# A hand-made SAE, d_in=2, d_sae=4. With b_dec = (0.5, -0.5), the inputs below give x − b_dec = (1, 2)
# and (0, 3), so pre = (x − b_dec) W_enc + b_enc is, row by row (see the columns of W_enc):
#   row 0: (1, 1.5, 1, 0.5)       row 1: (0, 2.5, 3, -2.5)
W_ENC = [[1.0, 0.0, -1.0, 2.0], [0.0, 1.0, 1.0, -1.0]]
B_ENC = [0.0, -0.5, 0.0, 0.5]
W_DEC = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]]
B_DEC = [0.5, -0.5]
X = [[1.5, 1.5], [0.5, 2.5]]
THRESHOLD = [1.0, 1.0, 1.0, 0.25]  # jumprelu: pre == θ must NOT fire (strict >)
EXPECTED_Z = {
    "relu": [[1.0, 1.5, 1.0, 0.5], [0.0, 2.5, 3.0, 0.0]],
    "topk": [[1.0, 1.5, 1.0, 0.0], [0.0, 2.5, 3.0, 0.0]],  # k=3
    "jumprelu": [[0.0, 1.5, 0.0, 0.5], [0.0, 2.5, 3.0, 0.0]],
    "batchtopk": [[0.0, 0.0, 0.0, 0.0], [0.0, 2.5, 3.0, 0.0]],  # k=1 × batch 2: the top 2 of the whole batch
}


def hand_sae(arch: str) -> SAE:
    sae = SAE(SAEConfig(d_in=2, d_sae=4, architecture=arch, k=3 if arch == "topk" else 1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor(W_ENC))
        sae.b_enc.copy_(torch.tensor(B_ENC))
        sae.W_dec.copy_(torch.tensor(W_DEC))
        sae.b_dec.copy_(torch.tensor(B_DEC))
        sae.threshold.copy_(torch.tensor(THRESHOLD))
    return sae


def random_sae(arch: str, d_in: int = 8, d_sae: int = 32, k: int = 4, seed: int = 0) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k if arch in ("topk", "batchtopk") else None))
    sae.reset_parameters(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
        sae.threshold.copy_(0.2 * torch.rand(d_sae, generator=g))
    return sae


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hand_set_weights_give_known_latents_and_reconstruction(arch):
    sae = hand_sae(arch)
    x = torch.tensor(X)
    expected_pre = torch.tensor([[1.0, 1.5, 1.0, 0.5], [0.0, 2.5, 3.0, -2.5]])
    torch.testing.assert_close(sae.pre_acts(x), expected_pre)
    z = sae.encode(x)
    expected = torch.tensor(EXPECTED_Z[arch])
    torch.testing.assert_close(z, expected)
    # x̂ = z W_dec + b_dec, written out for row 1 (the same in every architecture): 2.5·(0,1) + 3·(1,1) + b_dec
    torch.testing.assert_close(sae.decode(z)[1], torch.tensor([3.0 + 0.5, 5.5 - 0.5]))
    torch.testing.assert_close(sae.decode(z), expected @ torch.tensor(W_DEC) + torch.tensor(B_DEC))


def test_hand_set_relu_reconstruction_row0():
    sae = hand_sae("relu")
    # z = (1, 1.5, 1, 0.5): x̂ = (1 + 0 + 1 + 1, 0 + 1.5 + 1 − 0.5) + (0.5, −0.5) = (3.5, 1.5)
    torch.testing.assert_close(sae(torch.tensor(X)).x_hat[0], torch.tensor([3.5, 1.5]))


def test_batchtopk_eval_uses_threshold():
    sae = hand_sae("batchtopk")
    with torch.no_grad():
        sae.threshold.fill_(1.2)
    sae.eval()
    z = sae.encode(torch.tensor(X))
    # JumpReLU with the global θ = 1.2, per token: row 0 keeps only 1.5 even though training gave it nothing
    torch.testing.assert_close(z, torch.tensor([[0.0, 1.5, 0.0, 0.0], [0.0, 2.5, 3.0, 0.0]]))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("training", [True, False])
def test_encode_decode_forward_consistent(arch, training):
    sae = random_sae(arch).train(training)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    out = sae(x)
    z = sae.encode(x)
    torch.testing.assert_close(out.z, z)
    torch.testing.assert_close(out.x_hat, sae.decode(z))
    torch.testing.assert_close(out.x_hat, z @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(out.mse, (out.x_hat - x).pow(2).sum(-1).mean())
    torch.testing.assert_close(out.l0, (z != 0).float().sum(-1).mean())
    assert (z >= 0).all()
    # leading batch dimensions are allowed: [2, 8, d_in] gives the same rows as [16, d_in]
    torch.testing.assert_close(sae.encode(x.view(2, 8, 8)).view(16, -1), z)


def test_topk_exactly_k_active():
    sae = random_sae("topk", k=5)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: exactly k survive per row
    z = sae.encode(torch.randn(64, 8))
    assert ((z > 0).sum(-1) == 5).all()
    # and the survivors are the k largest pre-activations
    pre = sae.pre_acts(torch.randn(64, 8, generator=torch.Generator().manual_seed(1)))
    z = sae.activate(pre)
    kth = pre.topk(5, dim=-1).values[:, -1:]
    assert torch.equal(z > 0, pre >= kth)


def test_topk_never_more_than_k_and_never_negative():
    sae = random_sae("topk", k=6)
    with torch.no_grad():
        sae.b_enc.fill_(-2.5)  # mostly negative pre-activations: fewer than k may fire, never negative
    z = sae.encode(torch.randn(64, 8))
    assert ((z > 0).sum(-1) <= 6).all() and (z >= 0).all()
    assert ((z > 0).sum(-1) < 6).any()


def test_jumprelu_threshold_is_strict():
    sae = random_sae("jumprelu", d_in=2, d_sae=3).eval()
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([0.5, 0.5, 0.5]))
    pre = torch.tensor([[0.5, 0.5000001, 0.4999999]])
    z = sae.activate(pre)
    assert z[0, 0] == 0 and z[0, 1] == pre[0, 1] and z[0, 2] == 0
    sae.train()
    torch.testing.assert_close(sae.activate(pre), z)  # training forward is the same function


def test_jumprelu_negative_threshold_gives_no_negative_latents():
    sae = random_sae("jumprelu", d_in=2, d_sae=2).eval()
    with torch.no_grad():
        sae.threshold.fill_(-1.0)
    z = sae.activate(torch.tensor([[-0.5, 0.7]]))
    torch.testing.assert_close(z, torch.tensor([[0.0, 0.7]]))


def test_batchtopk_training_keeps_k_times_batch_over_the_batch():
    sae = random_sae("batchtopk", k=3).train()
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # all positive: exactly k·batch latents survive in the whole batch
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 3, 20)[:, None]
    z = sae.encode(x)
    assert int((z > 0).sum()) == 3 * 20
    per_row = (z > 0).sum(-1)
    assert per_row.min() != per_row.max()  # the budget is shared, not per token
    pre = sae.pre_acts(x)
    cutoff = pre.flatten().topk(60).values[-1]
    assert torch.equal(z > 0, pre >= cutoff)


def test_batchtopk_eval_is_jumprelu_with_the_threshold():
    sae = random_sae("batchtopk", k=3).eval()
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    x = torch.randn(32, 8)
    pre = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), pre * (pre > 0.3))
    assert sae.uses_threshold and not sae.train().uses_threshold


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sparse_path_equals_dense_path(arch):
    sae = random_sae(arch, k=4).eval()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    z = sae.encode(x)
    k = 4 if arch == "topk" else sae.d_sae  # other archs: with k = d_sae the top-k holds every active latent
    vals, idx = sae.encode_topk(x, k=k)
    assert vals.shape == idx.shape == (16, k)
    torch.testing.assert_close(torch.zeros_like(z).scatter_(1, idx, vals), z)
    torch.testing.assert_close(sae.decode_sparse(vals, idx), sae.decode(z))


def test_sparse_path_gradients_equal_dense_gradients():
    sae = random_sae("topk", k=4)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
    sae.decode_sparse(*sae.encode_topk(x)).pow(2).sum().backward()
    sparse_grads = [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
    sae.zero_grad()
    sae.decode(sae.encode(x)).pow(2).sum().backward()
    for g_sparse, p in zip(sparse_grads, (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)):
        torch.testing.assert_close(g_sparse, p.grad)


# -- the basis interface: one selection rule for every path --------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("theta", ["positive", "below zero"])
def test_subset_and_sparse_encoders_equal_encode(arch, theta):
    sae = random_sae(arch, k=4).eval()
    with torch.no_grad():
        sae.b_enc.sub_(0.3)  # plenty of pre-activations between a negative θ and 0
        if theta == "below zero":
            sae.threshold.copy_(-0.5 * torch.rand(sae.d_sae, generator=torch.Generator().manual_seed(7)))
    x = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(8))  # (batch, seq, d_in)
    z = sae.encode(x)  # (3, 16, d_sae)
    pre = sae.pre_acts(x)
    if theta == "below zero" and sae.uses_threshold:
        assert ((pre < 0) & (pre > sae.threshold)).any()  # the case the old steering encoder got wrong
    assert (z >= 0).all()
    features = [31, 0, 5, 17, 5, 2]  # any order, repeats allowed
    torch.testing.assert_close(sae.subset_encoder(features)(x), z[..., features])
    values, indices = sae.encode_sparse(x)
    assert values.shape == indices.shape and values.shape[:2] == (3, 16)
    if arch == "topk":
        assert values.shape[-1] == 4
    torch.testing.assert_close(torch.zeros_like(z).scatter_(-1, indices, values), z)


def test_subset_encoder_rejects_unknown_features():
    with pytest.raises(ValueError, match="32 features"):
        random_sae("relu").subset_encoder([3, 32])


def test_sae_and_neurons_are_bases():
    neurons = NeuronBasis(8)
    assert isinstance(random_sae("topk"), Basis) and isinstance(neurons, Basis)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(9))
    z = neurons.encode(x)
    torch.testing.assert_close(z, x.clamp_min(0))
    torch.testing.assert_close(neurons.subset_encoder([4, 1])(x), z[:, [4, 1]])
    code = neurons.encode_sparse(x)
    assert isinstance(code, SparseActs)
    torch.testing.assert_close(torch.zeros_like(z).scatter_(-1, code.indices, code.values), z)
    with pytest.raises(ValueError, match="positive width"):
        NeuronBasis(0)


@pytest.mark.parametrize("basis", ["neurons", *ARCHITECTURES])
def test_mining_reads_any_basis(basis):
    """mining.sparse_latents gives exactly the non-zero entries of encode(x) of kept tokens, for any basis."""
    b = NeuronBasis(8) if basis == "neurons" else random_sae(basis, k=4).eval()
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(10))
    keep = torch.ones(20, dtype=torch.bool)
    keep[::3] = False
    tok, feat, val, (top_v, top_i) = sparse_latents(b, x, keep, m=3)
    z = b.encode(x) * keep[:, None]  # (20, d)
    t_ref, f_ref = z.nonzero(as_tuple=True)  # row-major: sorted by token, then feature
    assert torch.equal(tok, t_ref) and torch.equal(feat, f_ref)
    torch.testing.assert_close(val, z[t_ref, f_ref])
    torch.testing.assert_close(top_v, z.topk(3, dim=1).values)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fold_input_scale(arch):
    scale = 3.7
    sae = random_sae(arch).eval()
    folded = copy.deepcopy(sae)
    folded.fold_input_scale(scale)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(6))
    on_scaled = sae(scale * x)
    on_raw = folded(x)
    torch.testing.assert_close(on_raw.z, on_scaled.z)
    torch.testing.assert_close(on_raw.x_hat, on_scaled.x_hat / scale)


def test_remove_parallel_decoder_grad_leaves_orthogonal_grads():
    sae = random_sae("topk")
    sae.set_decoder_norm_to_unit()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_decoder_grad()
    G, W = sae.W_dec.grad, sae.W_dec.detach()
    torch.testing.assert_close((G * W).sum(1), torch.zeros(32), atol=1e-6, rtol=0)
    # what was removed is exactly the parallel part
    torch.testing.assert_close(before - G, (before * W).sum(1, keepdim=True) * W)


def test_jumprelu_ste_gradients_hand_case():
    eps = 0.1
    threshold = torch.tensor([0.5, 0.5], requires_grad=True)
    pre = torch.tensor([[0.52, 0.8], [0.47, 0.1]], requires_grad=True)
    jumprelu(pre, threshold, eps).sum().backward()
    # ∂z/∂θ_j = −(θ_j/ε)·Σ 1[|pre − θ_j| < ε/2]: latent 0 has two pre within 0.05 of θ, latent 1 none
    torch.testing.assert_close(threshold.grad, torch.tensor([-(0.5 / eps) * 2, 0.0]))
    # ∂z/∂pre = 1[pre > θ] (no STE on the input)
    torch.testing.assert_close(pre.grad, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))

    threshold.grad = None
    step(pre.detach(), threshold, eps).sum().backward()  # the L0 penalty's step: −(1/ε) per nearby pre
    torch.testing.assert_close(threshold.grad, torch.tensor([-(1.0 / eps) * 2, 0.0]))


def test_jumprelu_sae_training_threshold_gets_gradient():
    sae = random_sae("jumprelu").train()
    assert sae.threshold.requires_grad
    x = torch.randn(64, 8)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # all pre-activations positive, so θ below is positive too
        sae.threshold.copy_(sae.pre_acts(x)[0])  # row 0's pre sits exactly on θ: within any bandwidth
    sae.encode(x).sum().backward()
    assert (sae.threshold.grad < 0).all()  # raising θ can only switch latents off


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        SAEConfig(d_in=2, d_sae=4, architecture="gated")
    with pytest.raises(ValueError, match="k"):
        SAEConfig(d_in=2, d_sae=4, architecture="topk", k=5)
    with pytest.raises(ValueError, match="positive"):
        SAEConfig(d_in=0, d_sae=4, architecture="relu")
