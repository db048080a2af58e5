"""Input checks of every method's forward: key order, per-id weights, id ranges, as one fx leaf when traced.

Eager forwards call :func:`in_feature_order` and :func:`check_ids`; a ``torchrec.fx`` trace records
:func:`checked_features` as one leaf call (``torch.fx.wrap``), so the traced module still checks every input.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx
from torchrec import KeyedJaggedTensor


class IdBounds(NamedTuple):
    """Per feature: its cardinality, whether its ids may exceed it (hashed), and its table's name."""

    method: str
    cardinality: dict[str, int]
    unbounded: list[str]
    tables: dict[str, str]


def in_feature_order(features: KeyedJaggedTensor, names: list[str]) -> KeyedJaggedTensor:
    """``features`` with its keys in the order ``names`` (permuted if needed); a clear error for missing keys and
    for per-id weights (which no method applies)."""
    if features.weights_or_none() is not None:
        raise ValueError(
            "The KeyedJaggedTensor carries per-id weights, which recsys_embed methods do not apply (they would "
            "be ignored silently): build the batch without weights=, or scale the pooled embeddings in the model."
        )
    keys = features.keys()
    if keys != names:
        missing = [f for f in names if f not in keys]
        if missing:
            raise ValueError(
                f"Input KeyedJaggedTensor lacks features {missing} that the tables read "
                f"(got keys {keys}); build the batch with the same feature names as the tables."
            )
        features = features.permute([keys.index(f) for f in names])
    return features


@torch.fx.wrap
def checked_features(features: KeyedJaggedTensor, names: list[str], bounds: IdBounds | None) -> KeyedJaggedTensor:
    """:func:`in_feature_order`, then :func:`check_ids` unless ``bounds`` is None: the input checks of a served form
    as one call (a leaf of an fx graph, so they run on every input of the traced module)."""
    if features.stride() == 0:
        raise ValueError(
            "An fx-traced embedding needs a batch of at least one example (got an empty batch): the traced graph has "
            "no branch for it. Skip empty batches, or run the eager module (it returns a (0, dim) KeyedTensor)."
        )
    features = in_feature_order(features, names)
    if bounds is not None:
        check_ids(features, names, bounds)
    return features


def check_ids(features: KeyedJaggedTensor, names: list[str], bounds: IdBounds) -> None:
    """Ids are int64/int32, ``>= 0`` and below their feature's cardinality (unless the feature is ``unbounded``)."""
    values = features.values()
    if values.numel() == 0:
        return
    if values.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"Ids must be int64 (or int32) tensors, got {values.dtype}.")
    lengths = features.length_per_key()
    for key, chunk in zip(names, torch.split(values, lengths)):
        if chunk.numel() == 0:
            continue
        low, high = int(chunk.min()), int(chunk.max())
        if low < 0:
            raise ValueError(
                f"Feature {key!r} (table {bounds.tables[key]!r}) has negative id {low}; ids must be >= 0. "
                "Map missing values to a reserved id when preparing the data."
            )
        if key not in bounds.unbounded and high >= bounds.cardinality[key]:
            raise ValueError(out_of_range_message(bounds, key, high))


def out_of_range_message(bounds: IdBounds, key: str, high: int) -> str:
    """What an id past the cardinality means, and what to do, in the user's terms (CLI and Python)."""
    n = bounds.cardinality[key]
    if bounds.unbounded:
        why = (
            f"method {bounds.method!r} hashes other features but keeps this one's table unhashed (it has no more "
            "ids than the method's rows), so its ids must be in range"
        )
    else:
        why = f"method {bounds.method!r} has one row (or one row's code) per id, so ids must be in range"
    return (
        f"Feature {key!r} has id {high}, but it was declared with {n} ids (0..{n - 1}): {why}. The count comes "
        "from the data's schema.json (CLI) or the table's num_embeddings (Python): rebuild the data with its "
        "data script so that unseen and rare ids map to the OOV id, or declare a larger cardinality."
    )
