"""Dials that write: fluency that does not punish the topic, the difference-of-means baseline against a hand
computation, concept files (round trip, another SAE's refused) and a concept experiment end to end, tiny."""

import json

import pytest
import torch

from saelab import SAE, SAEConfig, load_model
from saelab.baselines import difference_of_means, dom_spec, prompted
from saelab.concept import ConceptConfig
from saelab.conceptexp import ConceptExperiment, run_experiment
from saelab.conceptfile import load_concept, make_concept, parse_concept_arg, save_concept
from saelab.errors import SAEMismatch
from saelab.hooks import capture
from saelab.measures import Judge, encode_prompt, is_degenerate, read_answers
from saelab.steer import DialSpec

HOOK = "blocks.1.hook_resid_post"
LAST = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def lm(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]))


def random_sae(d_in=32, d_sae=16, hook=HOOK, seed=0):
    sae = SAE(SAEConfig(d_in, d_sae, "relu"))
    sae.reset_parameters(seed)
    sae.eval()
    sae.provenance = {"hook_name": hook, "feature_max_act": [1.0] * d_sae}
    return sae


@torch.no_grad()
def test_fluency_is_flat_for_a_fluent_topic_change_and_rises_for_word_salad():
    """On the builtin code model: after a prompt about reading a config file, an answer that fluently changes the
    subject (a summing loop) costs about what the on-topic answer costs read without the prompt, while the same
    tokens shuffled cost far more; read with the prompt (relevance), the topic change costs more."""
    import random

    lm = load_model("builtin")
    tok = lm.tokenizer
    prompt = encode_prompt(lm, "import os\n\n\ndef read_config(path):\n")
    on = "    with open(path) as f:\n        return f.read()\n"
    off = "    total = 0\n    for i in range(10):\n        total += i\n    return total\n"
    ids = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in (on, off)]
    shuffled = ids[1].tolist()
    random.Random(0).shuffle(shuffled)
    ids.append(torch.tensor(shuffled))
    a_on, a_off, a_salad = read_answers(lm, None, [prompt] * 3, ids, Judge(keywords=["total"]))
    assert a_off.fluency_nll <= 1.2 * a_on.fluency_nll            # flat: a fluent change of subject
    assert a_salad.fluency_nll >= 2.0 * a_on.fluency_nll          # word salad
    assert a_off.relevance_nll > a_on.relevance_nll               # relevance does punish the topic change
    assert (a_on.on_concept, a_off.on_concept) == (False, True)
    assert not a_off.degenerate and is_degenerate([5, 6, 7] * 6) and is_degenerate([]) and is_degenerate([3] * 9)


@torch.no_grad()
def test_difference_of_means_matches_a_hand_computation(lm):
    sae = random_sae()
    pos, neg = ["import os\nos.system(cmd)\n", "os.system(x)"], ["def f(x):\n    return x + 1\n", "print(f(x))"]
    got = difference_of_means(lm, sae, pos, neg)

    def pooled(texts):  # BOS first, then every token but BOS (no sink rule in this SAE's provenance)
        rows = []
        for t in texts:
            ids = [lm.tokenizer.bos_token_id] + lm.tokenizer(t, add_special_tokens=False)["input_ids"]
            with capture(lm.model, HOOK) as acts:
                lm.model(input_ids=torch.tensor([ids]))
            rows.append(acts[HOOK][0, 1:])
        return torch.cat(rows).mean(0)

    torch.testing.assert_close(got, pooled(pos) - pooled(neg), rtol=1e-5, atol=1e-6)
    spec = dom_spec(got)
    assert spec.mode == "vector" and spec.unit == "norm" and len(spec.direction) == 32
    with pytest.raises(ValueError, match="positive and negative"):
        difference_of_means(lm, sae, pos, [])
    user = prompted(lm, ["x = 1"], "import os", "user")[0]
    assert user[0].tolist() == encode_prompt(lm, "import os\n\nx = 1")[0].tolist()
    with pytest.raises(ValueError, match="unknown place"):
        prompted(lm, ["hi"], "x", "assistant")


def test_concept_file_round_trip_and_another_sae_refused(tmp_path):
    sae = random_sae()
    c = make_concept(sae, "bridge", DialSpec((3, 5), "add", "norm", "generated"), 0.5, keywords=["bridge"],
                     measures={"calibrated": True})
    path = save_concept(tmp_path / "concepts" / "bridge.json", c)
    back = load_concept(path, sae)
    assert back == c and back.spec() == DialSpec((3, 5), "add", "norm", "generated")
    obj = json.loads(path.read_text())
    assert obj["saelab_concept"] == 1 and obj["sae"]["d_sae"] == 16 and len(obj["sae"]["weights_sha256"]) == 64
    vec = make_concept(sae, "v", DialSpec(mode="vector", unit="norm", direction=tuple([0.5] * 32)), 0.25,
                       "difference-of-means")
    assert load_concept(save_concept(tmp_path / "v.json", vec), sae).spec().direction == tuple([0.5] * 32)
    other = random_sae(seed=1)
    with pytest.raises(SAEMismatch, match="made for another SAE.*weights_sha256"):
        load_concept(path, other)
    moved = random_sae(hook="blocks.0.hook_resid_post")
    moved.load_state_dict(sae.state_dict())
    with pytest.raises(SAEMismatch, match="hook"):
        load_concept(path, moved)
    (tmp_path / "bad.json").write_text('{"features": [1]}')
    with pytest.raises(ValueError, match="not a saelab concept file"):
        load_concept(tmp_path / "bad.json")
    assert parse_concept_arg("c.json=2.5") == ("c.json", 2.5) and parse_concept_arg("c.json") == ("c.json", None)


def test_concept_experiment_compares_every_method_on_held_out_prompts(lm, tmp_path):
    """The whole comparison on a tiny model: an SAE at the last block whose feature 5 writes ``system``."""
    w = lm.model.get_output_embeddings().weight.detach()
    (sid,) = lm.tokenizer.encode("system", add_special_tokens=False)
    sae = random_sae(hook=LAST)
    pos = ["import os\nos.system(cmd)\n", "os.system(x)", "x = os.system(cmd)", "os.system(f(x))"]
    neg = ["def f(x):\n    return x + 1\n", "print(f(x))", "x = f(cmd)", "import os\n"]
    with torch.no_grad():
        sae.b_enc.fill_(-10.0)
        sae.W_dec[5] = w[sid] / w[sid].norm()
        sae.W_enc[:, 5] = difference_of_means(lm, sae, pos, neg) * 10  # fires more on the positive texts
        sae.b_enc[5] = 0.0
    exp = ConceptExperiment("tiny", pos, neg, ["def f(x):\n", "x = 1\n"], {"a": ["import os\n"], "b": ["y = 2\n"]},
                            Judge(keywords=["system"]), "Say system.", ["system"], max_new_tokens=3)
    cfg = ConceptConfig(clamp_values=(300.0,), add_values=(20.0,), sizes=(1,), max_new_tokens=3,
                        screen_strength=300.0, screen_tokens=3, max_fluency_ratio=1e9, max_degenerate=1.0)
    res = run_experiment(lm, sae, None, exp, cfg, tmp_path, "test")
    methods = [r["method"] for r in res["rows"]]
    assert methods == ["none", "SAE dial", "difference of means", "prompting (system)", "prompting (user)"]
    assert res["dial"]["features"][0] == 5 and all(r["n"] == 2 and set(r["groups"]) == {"a", "b"} for r in res["rows"])
    assert res["rows"][1]["rate"] == 1.0 and res["rows"][0]["rate"] == 0.0 and res["rows"][1]["calibrated"]
    assert "wins" in res["verdict"] or "ties" in res["verdict"] or "loses" in res["verdict"]
    assert load_concept(tmp_path / "concept.json", sae).features[0] == 5
    assert (tmp_path / "report.html").is_file() and (tmp_path / "concept-dom.json").is_file()


def test_chat_loop_streams_answers_with_the_dial_on(lm, tmp_path):
    import io

    from saelab.chat import chat_loop, terminal_safe

    tok = lm.tokenizer
    old = getattr(tok, "chat_template", None)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    try:
        sae = random_sae()
        concept = (make_concept(sae, "c", DialSpec((3,), "clamp"), 5.0), 5.0)
        out = io.StringIO()
        history = chat_loop(lm, sae, None, concept, io.StringIO("x = 1\n/reset\nimport os\n/quit\n"), out,
                            max_new_tokens=3)
        assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "import os"
        assert out.getvalue().count("model> ") == 2
    finally:
        tok.chat_template = old
    assert terminal_safe("a\x1b[31mb\n") == "a\\x1b[31mb\n"


def test_cli_steer_and_monitor_take_a_concept_file(lm, tiny_model_dirs, tmp_path, capsys):
    from saelab.cli import main
    from saelab.formats import save_sae

    sae = random_sae()
    save_sae(sae, tmp_path / "sae", model_name=str(tiny_model_dirs["llama"]), hook_name=HOOK,
             feature_max_act=[1.0] * 16)
    path = save_concept(tmp_path / "c.json", make_concept(sae, "c", DialSpec((3, 4), "add", "norm"), 0.5))
    assert main(["steer", str(tmp_path / "sae"), "--prompt", "import os", "--concept", f"{path}=0.25",
                 "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["concept"]["strength"] == 0.25 and out["temperature"] == 0.0
    assert main(["steer", str(tmp_path / "sae"), "--prompt", "import os", "--concept", str(path),
                 "--max-new-tokens", "3"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("prompt:\nimport os\n") and "default answer:" in text and "steered answer:" in text
    other = random_sae(seed=3)
    foreign = save_concept(tmp_path / "f.json", make_concept(other, "f", DialSpec((3,)), 1.0))
    assert main(["steer", str(tmp_path / "sae"), "--prompt", "x", "--concept", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert "made for another SAE" in err and len(err.strip().splitlines()) == 1, err
    assert main(["steer", str(tmp_path / "sae"), "--prompt", "x"]) == 2
    assert "nothing to steer" in capsys.readouterr().err
    texts = tmp_path / "t.jsonl"
    texts.write_text('"import os"\n')
    assert main(["monitor", str(tmp_path / "sae"), "--concept", str(path), "--input", str(texts), "--threshold",
                 "0.0"]) == 0
    alerts = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert {a["feature"] for a in alerts} <= {3, 4}
