"""The compression registry: one file per method, all behind :class:`EmbeddingMethod`.

Every module of this package is imported here (a package scan), so a new method is one new file whose class is
decorated with the ``register`` decorator (given the method's name), and nothing else.
"""

import importlib
import pkgutil

from recsys_embed.methods.base import Budget, EmbeddingMethod, ParameterGroup, Stage, full_bytes
from recsys_embed.methods.fused import dense_parameters, fuse_tables
from recsys_embed.methods.registry import available_methods, build_embedding, method_class, method_options
from recsys_embed.methods.saving import load_method, save_method
from recsys_embed.methods.storage import SparseOptimizer, TableOptions, TableStorage

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Budget",
    "EmbeddingMethod",
    "ParameterGroup",
    "SparseOptimizer",
    "Stage",
    "TableOptions",
    "TableStorage",
    "available_methods",
    "build_embedding",
    "dense_parameters",
    "full_bytes",
    "fuse_tables",
    "load_method",
    "method_class",
    "method_options",
    "save_method",
]
