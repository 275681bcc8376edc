"""saelab's control vectors in a real llama.cpp ``llama-server`` (skipped where it is not installed:
``scripts/install_llamacpp.sh`` builds it).

The tiny model's test checks the layer numbering in llama.cpp itself: the float32 GGUF of a tiny random
Llama with an exported control vector gives the next-token log-probabilities that transformers gives with
the same direction added at the SAE's hook, and the neighbouring layer's file does not. The SmolLM2 tests
(slow) compare the exported Golden Gate dial with saelab's own Add-steering on held-out questions.
"""

import numpy as np
import pytest
import torch

from saelab.controlvector import feature_direction, llamacpp_layer, write_control_vector
from saelab.hooks import intervene
from saelab.llamacpp import LlamaServer, ServerConfig, find_llama_server
from tiny_models import save_tiny_model, write_tiny_gguf

SERVER = find_llama_server()
pytestmark = pytest.mark.skipif(SERVER is None, reason="llama-server is not installed (scripts/install_llamacpp.sh "
                                                       "builds it into the saelab cache; or set SAELAB_LLAMA_SERVER)")

IDS = [0, 5, 17, 33, 8, 41, 2, 50]


def _served_logprobs(server, ids):
    """The first generated token's top log-probabilities {token id: logprob} from llama-server."""
    reply = server.complete(ids, 1, n_probs=20)
    top = reply["completion_probabilities"][0]["top_logprobs"]
    return {t["id"]: t["logprob"] for t in top}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamacpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny_model("llama", root / "hf")
    # llama.cpp wants one embedding row per token of the vocabulary the file lists (the tiny BPE has fewer)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(str(folder))))
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # random init gives near-uniform logits: spread them so layers differ
    model.save_pretrained(str(folder))
    model = write_tiny_gguf(folder, root / "tiny.gguf").eval()
    return root, model


def test_control_vector_layer_numbering_in_llama_server(tiny):
    root, model = tiny
    g = torch.Generator().manual_seed(0)
    d = torch.randn(model.config.hidden_size, generator=g) * 3.0  # (d_model,) large enough to move the logits
    hook = "blocks.1.hook_resid_post"
    right = write_control_vector(root / "right.gguf", d, llamacpp_layer(hook), "llama")
    wrong = write_control_vector(root / "wrong.gguf", d, llamacpp_layer(hook) + 1, "llama")
    expected = {}
    for name in (hook, "blocks.2.hook_resid_post"):  # saelab's hook, and the next block's output
        with torch.no_grad(), intervene(model, {name: lambda x: x + d}):
            expected[name] = torch.log_softmax(model(input_ids=torch.tensor([IDS])).logits[0, -1].float(), -1)
    served = {}
    for path in (right, wrong):
        with LlamaServer(ServerConfig(root / "tiny.gguf", [(path, 1.0)], context=128, log=root / "server.log")) as s:
            served[path.name] = _served_logprobs(s, IDS)

    def gap(got, want):  # max |logprob difference| over the tokens llama-server reported
        ids = sorted(got)
        return float(np.abs(np.array([got[i] for i in ids]) - want[ids].numpy()).max())

    tol = 2e-3
    layers_apart = gap(served["right.gguf"], expected["blocks.2.hook_resid_post"])
    print(f"right file vs saelab's hook {gap(served['right.gguf'], expected[hook]):.1e}, vs the next layer "
          f"{layers_apart:.1e}; wrong file vs the next layer {gap(served['wrong.gguf'], expected['blocks.2.hook_resid_post']):.1e}")
    assert gap(served["right.gguf"], expected[hook]) < tol < layers_apart / 5
    assert gap(served["wrong.gguf"], expected["blocks.2.hook_resid_post"]) < tol


# -- SmolLM2 (slow) -------------------------------------------------------------------------------------

GG_FEATURES = (3737, 3594, 4648, 1202)  # bridge, River/Bridge, California/Francisco, Francisco/Gate
KEYWORDS = ("golden gate", "bridge", "san francisco")
N_QUESTIONS, MAX_NEW = 10, 32
STRENGTH = 2.0
"""Add strength (× each feature's max activation) of the Golden Gate dial."""
RATE_GAP = 0.3
"""How far the server's on-concept rate may be from saelab's: Q4_1 vs float32 arithmetic, 10 questions."""


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from saelab.formats import load_sae
    from saelab.measures import encode_prompt
    from saelab.models import load_model, smollm2_gguf
    from saelab.demo import SHIPPED
    from saelab.experiments import PROMPTS
    from saelab.texts import read_texts

    lm = load_model("smollm2")
    sae = load_sae(SHIPPED / "smollm2")
    questions = read_texts(PROMPTS / "neutral_chat.txt")[-N_QUESTIONS:]  # held out from the experiments' selection
    encoded = [encode_prompt(lm, q, chat=True, max_new_tokens=MAX_NEW) for q in questions]
    return tmp_path_factory.mktemp("smollm2"), smollm2_gguf(), lm, sae, questions, encoded


def _server_answers(gguf, vectors, encoded, log):
    with LlamaServer(ServerConfig(gguf, vectors, log=log)) as s:
        return [s.complete(ids[0].tolist(), MAX_NEW)["content"] for ids in encoded]


@pytest.mark.slow(ci=True)
def test_exported_golden_gate_dial_in_llama_server(smollm2):
    """Greedy answers to held-out questions. A zero-strength vector changes no answer of the plain server;
    the exported Golden Gate dial is on concept about as often in llama-server (Q4_1 arithmetic) as saelab's
    own Add with the same direction (float32); neither default is."""
    from saelab.measures import Judge, concept_curve, keyword_hit
    from saelab.steer import DialSpec

    root, gguf, lm, sae, questions, encoded = smollm2
    maxes = dict(enumerate(sae.provenance["feature_max_act"]))

    def exported(name, strength):
        direction = feature_direction(sae, {f: strength for f in GG_FEATURES}, maxes)
        return [(write_control_vector(root / name, direction, 15, "llama"), 1.0)]

    plain = _server_answers(gguf, [], encoded, root / "plain.log")
    zero = _server_answers(gguf, exported("zero.gguf", 0.0), encoded, root / "zero.log")
    steered = _server_answers(gguf, exported("gg.gguf", STRENGTH), encoded, root / "gg.log")
    assert zero == plain and all(plain)
    rate = lambda answers: float(np.mean([keyword_hit(a, KEYWORDS) for a in answers]))  # noqa: E731
    default, added = concept_curve(lm, sae, DialSpec(tuple(GG_FEATURES), "add", "max"), questions, [STRENGTH],
                                   judge=Judge(keywords=KEYWORDS), chat=True, max_new_tokens=MAX_NEW)
    print(f"on concept, {len(questions)} held-out questions: llama-server {rate(steered):.0%} (plain "
          f"{rate(plain):.0%}), saelab Add {added.concept_rate:.0%} (default {default.concept_rate:.0%})")
    assert rate(plain) <= 0.1 and default.concept_rate <= 0.1
    assert added.concept_rate >= 0.6 and abs(rate(steered) - added.concept_rate) <= RATE_GAP
