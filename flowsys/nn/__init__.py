"""torch-style neural-network modules: ``from flowsys import nn``."""

from flowsys.nn import functional, init
from flowsys.nn.layers import GELU, Dropout, Embedding, Identity, LayerNorm, Linear, ModuleDict, ModuleList, ReLU, Sequential
from flowsys.nn.init import meta_init
from flowsys.nn.module import Module, Parameter

__all__ = ["Module", "Parameter", "Linear", "Embedding", "LayerNorm", "GELU", "ReLU", "Dropout", "Identity",
           "Sequential", "ModuleList", "ModuleDict", "functional", "init", "meta_init"]
