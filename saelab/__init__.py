"""saelab: dictionary learning on language models.

Public API (re-exported names only; each lives in its stage's module).
"""

from saelab.analyze import analyze
from saelab.corpus import CorpusSpec
from saelab.evaluate import EvalReport, evaluate
from saelab.explain import detection_score, offline_explanation
from saelab.featuredb import FeatureDB
from saelab.fmap import layout, neighbourhood_map
from saelab.formats import load_sae, save_sae
from saelab.harvest import harvest
from saelab.hooks import capture, hook_names, intervene, resolve
from saelab.llm import LLMClient
from saelab.models import LoadedModel, load_model
from saelab.monitor import Watchlist, scan
from saelab.neuronpedia import export_neuronpedia
from saelab.sae import SAE, SAEConfig
from saelab.stage_config import AnalyzeConfig, EvalConfig, HarvestConfig
from saelab.store import ActivationStore
from saelab.steer import Ablate, Add, Clamp, steering
from saelab.textfeatures import contrastive_search, inspect_text
from saelab.train import TrainConfig, train

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
