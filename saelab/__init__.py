"""saelab: dictionary learning on language models.

Public API (re-exported names only; each lives in its stage's module). The re-exports are lazy
(PEP 562): ``import saelab`` loads no torch or transformers, so ``saelab --help`` and every
command's argument parsing answer at once; ``saelab.load_model`` imports its module on first use.
"""

from __future__ import annotations

import importlib
import sys
import types

# public name -> the module it lives in
_EXPORTS = {
    "analyze": "saelab.analyze",
    "CorpusSpec": "saelab.corpus",
    "EvalReport": "saelab.evaluate",
    "evaluate": "saelab.evaluate",
    "detection_score": "saelab.explain",
    "offline_explanation": "saelab.explain",
    "FeatureDB": "saelab.featuredb",
    "layout": "saelab.fmap",
    "neighbourhood_map": "saelab.fmap",
    "load_sae": "saelab.formats",
    "save_sae": "saelab.formats",
    "harvest": "saelab.harvest",
    "capture": "saelab.hooks",
    "hook_names": "saelab.hooks",
    "intervene": "saelab.hooks",
    "resolve": "saelab.hooks",
    "LLMClient": "saelab.llm",
    "LoadedModel": "saelab.models",
    "load_model": "saelab.models",
    "Watchlist": "saelab.monitor",
    "scan": "saelab.monitor",
    "export_neuronpedia": "saelab.neuronpedia",
    "SAE": "saelab.sae",
    "SAEConfig": "saelab.sae",
    "AnalyzeConfig": "saelab.stage_config",
    "EvalConfig": "saelab.stage_config",
    "HarvestConfig": "saelab.stage_config",
    "ActivationStore": "saelab.store",
    "Ablate": "saelab.steer",
    "Add": "saelab.steer",
    "Clamp": "saelab.steer",
    "steering": "saelab.steer",
    "contrastive_search": "saelab.textfeatures",
    "inspect_text": "saelab.textfeatures",
    "TrainConfig": "saelab.train",
    "train": "saelab.train",
}

__all__ = [
    "Ablate",
    "ActivationStore",
    "Add",
    "analyze",
    "AnalyzeConfig",
    "capture",
    "Clamp",
    "contrastive_search",
    "CorpusSpec",
    "detection_score",
    "EvalConfig",
    "EvalReport",
    "evaluate",
    "export_neuronpedia",
    "FeatureDB",
    "harvest",
    "HarvestConfig",
    "hook_names",
    "inspect_text",
    "intervene",
    "layout",
    "LLMClient",
    "load_model",
    "load_sae",
    "LoadedModel",
    "neighbourhood_map",
    "offline_explanation",
    "resolve",
    "SAE",
    "SAEConfig",
    "save_sae",
    "scan",
    "steering",
    "train",
    "TrainConfig",
    "Watchlist",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Import a public name's module on first access and cache the name in this module."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'saelab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value   # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """This package, where importing a submodule that shares its name with a function (``saelab.analyze``,
    ``harvest``, ``evaluate``, ``train``) leaves ``saelab.analyze`` the function, as the eager re-exports did:
    the import system's ``setattr(saelab, "analyze", <module>)`` is not kept for those names."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
