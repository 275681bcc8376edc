"""saelab: dictionary learning on language models.

Public API (re-exported names only; each lives in its stage's module).
"""

from saelab.corpus import CorpusSpec
from saelab.hooks import capture, hook_names, intervene, resolve
from saelab.models import LoadedModel, load_model
from saelab.sae import SAE, SAEConfig

__all__ = ["CorpusSpec", "LoadedModel", "SAE", "SAEConfig", "capture", "hook_names", "intervene", "load_model",
           "resolve"]
__version__ = "0.1.0"
