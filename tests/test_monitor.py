"""Monitoring on a tiny model with a planted feature: scanning streams, thresholds, generation policies."""

import io
import json

import pytest
import torch

from saelab import SAE, SAEConfig, save_sae
from saelab.monitor import Watchlist, histogram_quantile, scan, scan_jsonl, watch_generate
from saelab.texts import parse_texts as read_texts
from saelab.generation import generate_ids, generated_part, prompt_ids

HOOK = "blocks.0.hook_resid_pre"  # Llama's first block reads the token embeddings unchanged
PLANTED = 5
TEXTS = ["def f(x):\n    return x + 1\n", "import os\nos.system(cmd)\n", "", "os.system(x)\nos.system(y)\n"]


def planted_sae(lm, token_id: int) -> SAE:
    """An SAE whose feature PLANTED fires on exactly one token id (its embedding direction, with a bias
    halfway between that token's projection and the largest other one); the others never fire."""
    E = lm.model.get_input_embeddings().weight.detach()  # (vocab, d)
    w = E[token_id] / E[token_id].norm()
    proj = E @ w
    others = torch.cat([proj[:token_id], proj[token_id + 1:]]).max()
    assert proj[token_id] > others
    sae = SAE(SAEConfig(E.shape[1], 16, "relu"))
    sae.reset_parameters(0)
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)
        sae.W_enc[:, PLANTED] = w
        sae.b_enc[PLANTED] = -(proj[token_id] + others) / 2
    sae.provenance = {"hook_name": HOOK, "feature_max_act": [1.0] * 16}
    return sae


def test_scan_finds_the_planted_feature_in_a_stream(lm):
    target = lm.tokenizer("os", add_special_tokens=False)["input_ids"][0]
    sae = planted_sae(lm, target)
    wl = Watchlist({PLANTED: 0.0, 3: 0.0})
    alerts = list(scan(lm, sae, iter(TEXTS), wl))
    want = []
    for i, text in enumerate(TEXTS):
        enc = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for j, (tid, (a, b)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            if tid == target:
                want.append((i, a, text[a:b], j + 1))
    assert len(want) >= 2
    assert [(a.text_index, a.offset, a.token, a.position) for a in alerts] == want
    assert all(a.feature == PLANTED and a.activation > 0 for a in alerts)


def test_scan_reads_long_texts_in_windows(lm):
    target = lm.tokenizer("os", add_special_tokens=False)["input_ids"][0]
    sae = planted_sae(lm, target)
    text = "os.system(cmd)\n" * 40  # longer than the tiny model's 128-token context
    n_tokens = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    alerts = list(scan(lm, sae, [text], Watchlist({PLANTED: 0.0}), context=32))
    assert n_tokens > 128 and len(alerts) == 40
    assert [a.offset for a in alerts] == [15 * i for i in range(40)]


def test_scan_jsonl_streams_alerts(lm):
    target = lm.tokenizer("os", add_special_tokens=False)["input_ids"][0]
    sae = planted_sae(lm, target)
    lines = [json.dumps({"text": TEXTS[0]}), "", json.dumps(TEXTS[1])]
    out = io.StringIO()
    n = scan_jsonl(lm, sae, lines, Watchlist({PLANTED: 0.0}, {PLANTED: "the os module"}), out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert n == len(rows) == 1  # " os" after import is another token
    assert {r["text_index"] for r in rows} == {1}  # the second non-blank line
    assert set(rows[0]) == {"text_index", "offset", "token", "position", "feature", "explanation", "activation"}
    assert rows[0]["explanation"] == "the os module" and rows[0]["token"] == "os"


@pytest.mark.parametrize("line, match", [("{not json", "input:1: not valid JSON"), ('{"txt": "a"}', "'text'"),
                                         ("3", "input:1")])
def test_read_texts_bad_lines(line, match):
    with pytest.raises(ValueError, match=match):
        list(read_texts([line]))


def test_histogram_quantile():
    hist = {"zeros": 90, "edges": [0.1, 1.0, 10.0], "counts": [5, 5]}
    assert histogram_quantile(hist, 0.5) == 0.0
    assert histogram_quantile(hist, 0.95) == pytest.approx(1.0)
    assert histogram_quantile(hist, 0.925) == pytest.approx(0.1 * 10 ** 0.5)  # geometric inside a log bin
    assert histogram_quantile(hist, 1.0) == pytest.approx(10.0)
    assert histogram_quantile({"zeros": 5, "edges": [], "counts": []}, 0.9) is None


class FakeDB:
    """What Watchlist reads from a FeatureDB: feature rows and histograms."""

    def feature(self, i):
        return {"max_act": 4.0, "explanation": f"feature {i}" if i == 1 else ""}

    def histogram(self, i):
        return {"zeros": 900, "edges": [0.5, 1.0, 2.0], "counts": [50, 50]} if i == 1 else \
            {"zeros": 0, "edges": [], "counts": []}


def test_watchlist_thresholds():
    sae = SAE(SAEConfig(8, 4, "relu"))
    sae.provenance = {"feature_max_act": [2.0, 2.0, 2.0, 8.0]}
    wl = Watchlist.build(sae, [1, 2], db=FakeDB(), quantile=0.95)
    assert wl.thresholds == {1: pytest.approx(1.0), 2: 2.0}  # histogram quantile; else 0.5 × db max_act
    assert wl.explanations == {1: "feature 1"}
    assert Watchlist.build(sae, [3]).thresholds == {3: 4.0}  # 0.5 × saelab.json max activation
    assert Watchlist.build(sae, [0, 3], thresholds={0: 0.25}).thresholds == {0: 0.25, 3: 4.0}
    for bad, match in [([4], "unknown feature id 4"), ([], "empty")]:
        with pytest.raises(ValueError, match=match):
            Watchlist.build(sae, bad)
    with pytest.raises(ValueError, match="finite"):
        Watchlist.build(sae, [0], thresholds=float("nan"))


def _greedy(lm, prompt, n=12):
    ids = prompt_ids(lm, prompt)
    out = generate_ids(lm, ids, max_new_tokens=n, temperature=0)[0]
    return ids.shape[1], torch.cat([out[:ids.shape[1]], generated_part(lm, out, ids.shape[1])]).tolist()


def _firing_setup(lm):
    """A prompt, its greedy continuation, and a token that first appears in it at generated step ≥ 1."""
    for prompt in ["def f(x):", "import os", "x = 1", "os.system("]:
        n, seq = _greedy(lm, prompt)
        gen = seq[n:]
        for step, t in enumerate(gen[1:], 1):
            if t not in gen[:step]:
                return prompt, n, seq, t, n + step
    pytest.skip("greedy continuations of the tiny model are all one token")


def test_abort_stops_at_the_first_firing_token(lm):
    prompt, n, seq, target, first = _firing_setup(lm)
    sae = planted_sae(lm, target)
    result = watch_generate(lm, sae, prompt, Watchlist({PLANTED: 0.0}), "abort", max_new_tokens=12, temperature=0)
    assert result.aborted
    assert result.ids == seq[:first]  # everything before the firing token, which is withheld
    assert [(a.position, a.feature) for a in result.alerts] == [(first, PLANTED)]
    assert result.alerts[0].token == lm.tokenizer.decode([target])
    assert result.text == lm.tokenizer.decode(seq[n:first], skip_special_tokens=True)


def test_log_policy_alerts_on_every_firing_generated_token(lm):
    prompt, n, seq, target, first = _firing_setup(lm)
    sae = planted_sae(lm, target)
    result = watch_generate(lm, sae, prompt, Watchlist({PLANTED: 0.0}), "log", max_new_tokens=12, temperature=0)
    assert not result.aborted and result.ids == seq
    want = [p for p in range(n, len(seq)) if seq[p] == target]  # the last token too (never fed back by generate)
    assert [a.position for a in result.alerts] == want
    for a in result.alerts:
        full = prompt + result.text
        assert full[a.offset:a.offset + len(a.token)] == a.token


def test_ablate_policy_edits_from_the_first_firing_token(lm):
    prompt, n, seq, target, first = _firing_setup(lm)
    sae = planted_sae(lm, target)
    with torch.no_grad():
        sae.W_dec[PLANTED] *= 50.0  # make the ablation visible in the logits
    result = watch_generate(lm, sae, prompt, Watchlist({PLANTED: 0.0}), "ablate", max_new_tokens=12, temperature=0)
    assert result.ids[:first + 1] == seq[:first + 1]  # identical until the firing token is read
    assert result.alerts[0].position == first
    assert result.ids != seq


def test_bad_policy(lm):
    sae = planted_sae(lm, 5)
    with pytest.raises(ValueError, match="unknown policy 'stop'"):
        watch_generate(lm, sae, "x", Watchlist({PLANTED: 0.0}), "stop")


# -- CLI ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted_dir(lm, tiny_model_dirs, tmp_path_factory):
    target = lm.tokenizer("os", add_special_tokens=False)["input_ids"][0]
    out = tmp_path_factory.mktemp("planted") / "sae"
    save_sae(planted_sae(lm, target), out, model_name=str(tiny_model_dirs["llama"]), hook_name=HOOK,
                                 feature_max_act=[1.0] * 16)
    return out


def test_cli_monitor(planted_dir, tmp_path, capsys):
    from saelab.cli import main

    src, dst = tmp_path / "texts.jsonl", tmp_path / "alerts.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    assert main(["monitor", str(planted_dir), "--watch", f"{PLANTED},3", "--threshold", "0",
                 "--input", str(src), "--output", str(dst)]) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert rows and all(r["feature"] == PLANTED and r["token"] == "os" for r in rows)
    assert main(["monitor", str(planted_dir), "--watch", "99", "--input", str(src)]) == 2
    assert "feature 99 does not exist" in capsys.readouterr().err


def test_cli_generate(planted_dir, capsys):
    from saelab.cli import main

    assert main(["generate", str(planted_dir), "--prompt", "os.system(", "--watch", str(PLANTED), "--threshold", "0",
                 "--on-fire", "abort", "--max-new-tokens", "5", "--watch-prompt", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["aborted"] and out["text"] == "" and out["alerts"][0]["token"] == "os"
