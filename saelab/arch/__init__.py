"""SAE architectures: one registered class each (:mod:`saelab.arch.base`); ``get(name)`` answers for it.

Adding one: a new module here with a subclass of :class:`Architecture` decorated with ``@register``,
imported below (the import order is the order ``names()`` lists them in, and ``--arch`` offers them).
"""

# isort: off
from saelab.arch import relu, topk, jumprelu, matryoshka  # noqa: F401  (registration)
# isort: on
from saelab.arch.base import Architecture, StepStats, by_saved_name, get, names, register, saved_names

__all__ = ["Architecture", "StepStats", "by_saved_name", "get", "names", "register", "saved_names"]
