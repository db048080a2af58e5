"""recsys_embed: recommendation models under an embedding-memory budget."""

from recsys_embed.methods import Budget, available_methods, build_embedding

__version__ = "0.1.0"
__all__ = ["Budget", "__version__", "available_methods", "build_embedding"]
