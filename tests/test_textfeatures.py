"""Inspected texts follow the SAE's own position rule (the BOS part too), as training, eval and analysis do."""

from __future__ import annotations

import torch

from saelab.sae import SAE, SAEConfig
from saelab.textfeatures import text_latents

HOOK = "blocks.1.hook_resid_post"


def _relu_sae(d_in: int, **provenance) -> SAE:
    sae = SAE(SAEConfig(d_in, 16, "relu"))
    sae.reset_parameters(seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)              # every latent fires wherever a position counts
    sae.provenance = provenance
    return sae


def test_a_bos_inside_the_text_counts_unless_the_sae_left_bos_out(tiny_llama):
    lm = tiny_llama.lm
    bos = lm.tokenizer.bos_token_id
    text = f"def f(x):{lm.tokenizer.bos_token}    return x"
    d_in = lm.model.config.hidden_size
    rule = {"bos": {"token_id": bos, "excluded": True}, "positions": {"bos_token_id": bos, "exclude_bos": True,
                                                                      "sink_factor": None}}
    ids, z_out = text_latents(_relu_sae(d_in, **rule), lm, text, HOOK)
    at = ids.index(bos)                    # the BOS inside the text (the window's own BOS is not listed)
    assert bool((z_out[at] == 0).all()) and bool((z_out[at - 1] > 0).all())
    ids, z_in = text_latents(_relu_sae(d_in), lm, text, HOOK)      # an SAE that kept BOS rows in training
    assert bool((z_in[at] > 0).all())
