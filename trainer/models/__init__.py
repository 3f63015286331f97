"""Model zoo: one module per architecture family, all registered in ``_api.BUILTIN_MODELS``."""

from trainer.models import lenet  # noqa: F401  (registers lenet5)
from trainer.models._api import count_parameters, get_model, get_model_builder, list_models, register_model

__all__ = ["count_parameters", "get_model", "get_model_builder", "list_models", "register_model"]
