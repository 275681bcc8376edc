"""Model and hook names are checked before a model loads or the hub is asked: one line, nearest names."""

import json
import os
import subprocess
import sys

import pytest

from saelab import model_names
from saelab.errors import InvalidModel
from saelab.model_names import HookNameError, check_hook_name, check_model_name, known_names, local_config


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache, no offline flag, and a hub that must not be asked unless a test says so."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def no_network(timeout=0):
        raise AssertionError("the hub was probed")

    monkeypatch.setattr(model_names, "hub_reachable", no_network)
    return tmp_path / "hub"


def cache_model(hub, hub_id: str, config: dict) -> None:
    snap = hub / f"models--{hub_id.replace('/', '--')}" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))


def test_a_typo_of_a_known_name_fails_with_the_name_and_never_asks_the_hub(hub):
    for typo, meant in (("smolm2", "smollm2"), ("builtiin", "builtin"), ("smollm", "smollm2")):
        with pytest.raises(InvalidModel, match=f"no model '{typo}'.*did you mean {meant}\\?"):
            check_model_name(typo)
    cache_model(hub, "gpt2", {"model_type": "gpt2", "n_layer": 12})
    with pytest.raises(InvalidModel, match="did you mean gpt2"):
        check_model_name("gtp2")


def test_known_and_local_names_pass_without_the_hub(hub, tmp_path, monkeypatch):
    cache_model(hub, "EleutherAI/pythia-70m", {"model_type": "gpt_neox", "num_hidden_layers": 6})
    assert known_names() == ["builtin", "smollm2", "EleutherAI/pythia-70m"]
    for name in ("builtin", "smollm2", str(tmp_path), "./nowhere", "x.gguf"):
        check_model_name(name)            # the loaders check paths and files themselves
    monkeypatch.setattr(model_names, "hub_reachable", lambda timeout=0: True)
    check_model_name("EleutherAI/pythia-70m")
    assert "HF_HUB_OFFLINE" not in os.environ   # online: transformers may look for a newer revision


def test_a_cached_model_with_no_hub_loads_offline(hub, monkeypatch):
    cache_model(hub, "EleutherAI/pythia-70m", {"model_type": "gpt_neox", "num_hidden_layers": 6})
    monkeypatch.setattr(model_names, "hub_reachable", lambda timeout=0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")             # not offline; undone (unset) after the test
    check_model_name("EleutherAI/pythia-70m")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_offline_an_unknown_name_fails_at_once_with_the_nearest_cached_one(hub, monkeypatch):
    cache_model(hub, "EleutherAI/pythia-70m", {"model_type": "gpt_neox", "num_hidden_layers": 6})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InvalidModel, match="HF_HUB_OFFLINE is set \\(did you mean EleutherAI/pythia-70m\\?\\)"):
        check_model_name("EleutherAI/pythia-160m")


def test_online_an_unknown_hub_id_goes_to_the_hub_only_when_it_answers(hub, monkeypatch):
    monkeypatch.setattr(model_names, "hub_reachable", lambda timeout=0: True)
    check_model_name("someone/new-model")
    monkeypatch.setattr(model_names, "hub_reachable", lambda timeout=0: False)
    with pytest.raises(InvalidModel, match="hub cannot be reached"):
        check_model_name("someone/new-model")


def test_hub_probe_is_bounded_and_false_for_a_host_that_does_not_resolve(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://no-such-host.invalid")
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    assert model_names.hub_reachable(timeout=1.0) is False


def test_hook_names_checked_against_config_json(hub):
    check_hook_name("builtin", "blocks.1.hook_resid_post")
    check_hook_name("builtin", "model.layers.1")          # raw paths are left to the loaded model
    with pytest.raises(HookNameError, match="model builtin has 4 blocks \\(0-3\\)"):
        check_hook_name("builtin", "blocks.4.hook_resid_post")
    with pytest.raises(HookNameError, match="did you mean blocks.1.hook_resid_post"):
        check_hook_name("builtin", "blocks.1.resid_post")
    cache_model(hub, "EleutherAI/pythia-70m", {"model_type": "gpt_neox", "num_hidden_layers": 6,
                                               "use_parallel_residual": True})
    with pytest.raises(HookNameError, match="a gpt_neox model has no hook_resid_mid"):
        check_hook_name("EleutherAI/pythia-70m", "blocks.2.hook_resid_mid")
    check_hook_name("EleutherAI/pythia-70m", "blocks.5.mlp.hook_post")
    cache_model(hub, "odd/model", {"model_type": "somethingnew", "num_hidden_layers": 2})
    check_hook_name("odd/model", "blocks.1.hook_resid_mid")   # unknown family: checked once loaded
    check_hook_name("odd/model", "blocks.attn")
    assert local_config("nobody/nothing") is None
    check_hook_name("nobody/nothing", "blocks.99.nonsense")    # no config on disk: nothing to check against


def test_load_model_refuses_a_typo_before_importing_transformers(hub):
    from saelab.models import load_model

    with pytest.raises(InvalidModel, match="did you mean smollm2"):
        load_model("smolm2")


def test_the_cli_says_it_in_one_line_without_loading_torch(tmp_path):
    code = ("import sys\nfrom saelab.cli import main\n"
            "rc = main(['hooks', 'smolm2'])\n"
            "rc2 = main(['harvest', '--model', 'builtin', '--hook', 'blocks.9.hook_resid_post', '--tokens', '10',\n"
            "            '--out', 'x'])\n"
            "print(rc, rc2, 'torch' in sys.modules)")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_CACHE": str(tmp_path), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.stdout.strip() == "2 2 False", result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and "did you mean smollm2?" in errors[0] and "has 4 blocks" in errors[1], errors


def test_explains_model_is_the_llms_name_and_is_not_checked(hub):
    from argparse import Namespace

    from saelab.cli import check_names

    check_names(Namespace(command="explain", model="gpt-4o-mini", hook=None))
    try:
        check_names(Namespace(command="steer", model="smolm2", hook=None))
    except InvalidModel as e:
        assert "did you mean smollm2" in str(e)
    else:
        raise AssertionError("steer's --model was not checked")
