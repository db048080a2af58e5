"""The compression registry: one file per method, all behind :class:`EmbeddingMethod`."""

# importing the method modules registers them
from recsys_embed.methods import adapt, full, hashing, mde, multi_hash, qr, qr_path, unified  # noqa: F401
from recsys_embed.methods.base import Budget, EmbeddingMethod, full_bytes
from recsys_embed.methods.fused import SparseOptimizer, dense_parameters, fuse_tables
from recsys_embed.methods.registry import available_methods, build_embedding, method_class, method_options

__all__ = [
    "Budget",
    "EmbeddingMethod",
    "SparseOptimizer",
    "available_methods",
    "build_embedding",
    "dense_parameters",
    "full_bytes",
    "fuse_tables",
    "method_class",
    "method_options",
]
