"""Model zoo: one module per architecture family, each registering its builders in
``_api.BUILTIN_MODELS``. Every non-private module of this package is imported here, so adding a
family is adding a file.
"""

import importlib
import pkgutil

from trainer.models._api import count_parameters, get_model, get_model_builder, list_models, register_model
from trainer.models._blocks import ACTIVATIONS, POOLS

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "ACTIVATIONS",
    "POOLS",
    "count_parameters",
    "get_model",
    "get_model_builder",
    "list_models",
    "register_model",
]
