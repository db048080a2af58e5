"""A method saved and loaded alone: name, class version, logical tables, resolved config and state.

The file needs no training config and no data: :func:`load_method` rebuilds the form from the saved config (no
budget is solved again, no id counts are read) and loads the state. Only plain types and tensors are stored, so
it loads with ``torch.load(weights_only=True)``.

Example::

    save_method(emb, "emb.pt")
    emb = load_method("emb.pt")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchrec import EmbeddingBagConfig

from recsys_embed.methods.base import EmbeddingMethod
from recsys_embed.methods.registry import method_class

FORMAT = "recsys_embed.method/1"


def tables_to_dicts(tables: Sequence[EmbeddingBagConfig]) -> list[dict[str, Any]]:
    """The logical tables as plain dicts (name, num_embeddings, embedding_dim, feature_names)."""
    return [
        {
            "name": t.name,
            "num_embeddings": t.num_embeddings,
            "embedding_dim": t.embedding_dim,
            "feature_names": list(t.feature_names),
        }
        for t in tables
    ]


def tables_from_dicts(tables: Sequence[dict[str, Any]]) -> list[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(**t) for t in tables]


def describe(method: EmbeddingMethod) -> dict[str, Any]:
    """What rebuilds ``method``'s form: ``{"name", "version", "tables", "config"}`` (plain types only)."""
    return {
        "name": method.name,
        "version": type(method).version,
        "tables": tables_to_dicts(method.embedding_bag_configs()),
        "config": method.config(),
    }


def check_same_tables(saved: Sequence[dict[str, Any]], tables: Sequence[EmbeddingBagConfig], where: str) -> None:
    """A clear error when a saved method's logical tables differ from the ones a model expects."""
    expected = tables_to_dicts(tables)
    if list(saved) == expected:
        return
    saved_by_name = {t["name"]: t for t in saved}
    lines = []
    for t in expected:
        got = saved_by_name.pop(t["name"], None)
        if got is None:
            lines.append(f"table {t['name']!r} missing from {where}")
        elif got != t:
            lines.append(f"table {t['name']!r}: {where} has {got}, expected {t}")
    lines += [f"{where} has extra table {name!r}" for name in saved_by_name]
    detail = "; ".join(lines) or "same tables in another order"
    raise ValueError(
        f"The embedding method in {where} was built for other tables ({detail}). Load it with the dataset and "
        "embedding_dim it was trained on."
    )


def rebuild(description: dict[str, Any], device: str | torch.device | None = None) -> EmbeddingMethod:
    """The form :func:`describe` described (weights still to be loaded)."""
    cls = method_class(description["name"])
    if description["version"] != cls.version:
        raise ValueError(
            f"Saved method {description['name']!r} is version {description['version']}, this code has version "
            f"{cls.version}: load it with the recsys_embed release that wrote it."
        )
    return cls.from_config(tables_from_dicts(description["tables"]), dict(description["config"]), device=device)


def save_method(method: EmbeddingMethod, path: str | Path) -> None:
    """Save ``method`` alone (its current form and weights) to ``path``."""
    state = {k: v.detach().cpu() for k, v in method.state_dict().items()}
    torch.save({"format": FORMAT, **describe(method), "state": state}, path)


def load_method(
    path: str | Path, *, tables: Sequence[EmbeddingBagConfig] | None = None, device: str | torch.device | None = None
) -> EmbeddingMethod:
    """Load what :func:`save_method` wrote; with ``tables``, check they are the ones it was built for."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} is not a saved recsys_embed method (save one with save_method).")
    if tables is not None:
        check_same_tables(saved["tables"], tables, str(path))
    method = rebuild(saved, device=device)
    method.load_state_dict(saved["state"])
    return method
