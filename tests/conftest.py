import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_configure(config):
    # The token cache goes to a fresh folder per test run (inherited by subprocesses), never ~/.cache.
    import tempfile

    from saelab.errors import SaelabError
    from saelab.llamacpp import find_llama_server

    try:  # the user's llama-server built into the real cache (tests/test_llamacpp.py), found before it moves
        server = find_llama_server()
    except SaelabError:
        server = None  # a bad SAELAB_LLAMA_SERVER: test_llamacpp.py says so
    if server is not None:
        os.environ.setdefault("SAELAB_LLAMA_SERVER", str(server))
    os.environ["SAELAB_CACHE"] = tempfile.mkdtemp(prefix="saelab-test-cache-")

from tiny_models import FAMILIES, save_tiny_model  # noqa: E402


# -- shared factories: built once per session; the builders live in tiny_models.py and factories.py ---

@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {fam: save_tiny_model(fam, root / fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def web_run_dir(tmp_path_factory) -> Path:
    """The web run folder (tiny llama, TopK SAE, features.db, eval.json) of the API and browser tests."""
    from factories import build_web_run

    return build_web_run(tmp_path_factory.mktemp("web_run"))


def pytest_collection_modifyitems(config, items):
    """``slow`` tests are left out by ``-m "not slow"``; a plain run skips those without ``ci=True`` (the
    one of each heavy kind that CI runs) unless SAELAB_SLOW=1."""
    if os.environ.get("SAELAB_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end test; set SAELAB_SLOW=1 to run")
    for item in items:
        slow = item.get_closest_marker("slow")
        if slow is not None and not slow.kwargs.get("ci", False):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lm(tiny_model_dirs):
    """The tiny Llama, loaded once for every module that does not define its own ``lm``."""
    from saelab.models import load_model

    return load_model(str(tiny_model_dirs["llama"]))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """A small Python corpus folder of code lines (:func:`factories.write_code_corpus`)."""
    from factories import write_code_corpus

    return write_code_corpus(tmp_path_factory.mktemp("code_corpus"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dirs, lm, tmp_path_factory):
    """The tiny Llama (``model_dir``, loaded as ``lm``) and a corpus folder of one-line functions (``corpus``):
    what the provenance, source, session and text-feature tests run a model on."""
    from types import SimpleNamespace

    from factories import write_function_corpus

    corpus = write_function_corpus(tmp_path_factory.mktemp("function_corpus"))
    return SimpleNamespace(model_dir=str(tiny_model_dirs["llama"]), corpus=str(corpus), lm=lm)
