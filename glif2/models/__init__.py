"""The paper's networks. Importing this package registers every model (glif2.models.registry holds the registry).

glif2.models.list_models()   # cifarnet, glifnet_small, resnet18, resnet18ms, resnet19, resnet34, resnet34ms, ...
"""

from glif2.models import convnets, resnet, sew
from glif2.models.registry import create_model, list_models, register_model, unregister_model

__all__ = ["convnets", "create_model", "list_models", "register_model", "resnet", "sew", "unregister_model"]
