"""recsys_embed: recommendation models under an embedding-memory budget.

The top-level names are imported lazily, so light modules (the data layer, data scripts) load without torchrec.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["Budget", "__version__", "available_methods", "build_embedding"]


def __getattr__(name: str) -> Any:
    if name in ("Budget", "available_methods", "build_embedding"):
        return getattr(importlib.import_module("recsys_embed.methods"), name)
    raise AttributeError(f"module 'recsys_embed' has no attribute {name!r}")
