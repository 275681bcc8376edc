"""The seed experiments end to end on a tiny run (the web tests' run folder): reports written, numbers consistent."""

import json

import pytest

from saelab.conceptexp import wilson
from saelab.experiments import ExperimentConfig, dangerous_calls, monotone_to_strength, PROMPTS
from saelab.texts import read_texts


@pytest.fixture(scope="module")
def run_dir(web_run_dir):
    return web_run_dir


def test_prompt_sets_are_big_enough_and_distinct():
    neutral = read_texts(PROMPTS / "neutral_chat.txt")
    assert len(neutral) >= 24 and len(set(neutral)) == len(neutral)
    assert not any("golden gate" in q.lower() or "bridge" in q.lower() for q in neutral)
    assert len(read_texts(PROMPTS / "code_prompts.txt")) >= 30
    pos, neg = read_texts(PROMPTS / "unsafe_code_positive.jsonl"), read_texts(PROMPTS / "unsafe_code_negative.jsonl")
    assert all(dangerous_calls(t) for t in pos), [t for t in pos if not dangerous_calls(t)]
    assert not any(dangerous_calls(t) for t in neg), [t for t in neg if dangerous_calls(t)]


@pytest.mark.parametrize("text, calls", [
    ("yaml.load(f, Loader=yaml.SafeLoader)", []), ("yaml.load(f)", ["yaml.load without SafeLoader"]),
    ("ast.literal_eval(s)", []), ("x = eval(s)", ["eval"]), ("subprocess.run(c, shell=True)", ["shell=True"]),
    ("cur.execute('SELECT * FROM t WHERE a = ?', (a,))", []),
    ("cur.execute(\"SELECT * FROM t WHERE a = '%s'\" % a)", ["SQL by string formatting"]),
    ("cur.execute(f\"DELETE FROM t WHERE id = {i}\")", ["SQL by string formatting"]),
])
def test_dangerous_call_patterns(text, calls):
    assert dangerous_calls(text) == calls


def test_wilson_and_monotone():
    import torch

    lo, hi = wilson(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35
    values = (0.0, 1.0, 2.0, 3.0)
    rising = torch.tensor([[0.0, 1.0], [0.2, 1.1], [0.5, 1.4], [0.1, 9.0]])  # 3× breaks fluency: strength 2×
    assert monotone_to_strength(rising, values) == (True, 2.0)
    falling = torch.tensor([[0.3, 1.0], [0.2, 1.1], [0.5, 1.2], [0.6, 1.3]])
    assert monotone_to_strength(falling, values) == (False, 3.0)


def test_builtin_dial_experiment_on_a_tiny_run(run_dir, tmp_path):
    from saelab.cli import main

    out = tmp_path / "dial"
    assert main(["experiment", "builtin-dial", str(run_dir), "--out", str(out), "--values", "1,3",
                 "--max-new-tokens", "3", "--n-features", "3"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["groups"]) == {"random", "top output score"}
    for g in res["groups"].values():
        assert len(g["features"]) == 3 and 0 <= g["monotone"] <= 1
        assert all(len(c["activation"]) == 3 for c in g["curves"])
    assert (out / "report.html").read_text().count("<table>") == 2 and (out / "report.png").stat().st_size > 1000


def test_praise_lexicon():
    from saelab.experiments import praises_user

    assert praises_user("What a brilliant question! Photosynthesis is ...")
    assert praises_user("You are truly an amazing cook.") and praises_user("You're so talented!")
    assert praises_user("Your idea is absolutely brilliant.")
    assert not praises_user("Photosynthesis is an amazing process that plants use.")
    assert not praises_user("You can add salt to make the sauce better.")
    pos = read_texts(PROMPTS / "sycophancy_positive.jsonl")
    neg = read_texts(PROMPTS / "sycophancy_negative.jsonl")
    assert all(praises_user(t) for t in pos), [t for t in pos if not praises_user(t)]
    assert not any(praises_user(t) for t in neg), [t for t in neg if praises_user(t)]


def test_evaluation_prompts_are_apart_from_calibration_and_examples():
    from saelab.experiments import SPECS

    for name, make in SPECS.items():
        exp = make(ExperimentConfig())
        held = {p for ps in exp.evaluation.values() for p in ps}
        assert len(held) >= 20 and len(exp.calibration) >= 8, name
        assert not held & set(exp.calibration) and not held & set(exp.positives + exp.negatives), name
        assert len(exp.positives) + len(exp.negatives) <= 40, name


def test_every_experiment_has_a_runner_and_a_cli_name():
    from saelab.cli.concepts import EXPERIMENTS as CLI_NAMES
    from saelab.experiments import EXPERIMENTS, RUNNERS

    assert set(RUNNERS) == set(EXPERIMENTS) == set(CLI_NAMES) == {"golden-gate", "sycophancy", "unsafe-code",
                                                                   "builtin-dial"}
