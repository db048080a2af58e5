"""Which result rows the report pools, and what each section of the report states about its rows.

Every row carries its cell's identity (the ``settings`` column, :meth:`~recsys_embed.benchmark.spec.Cell.settings`).
The rows of one dataset x model name are split into *setting groups*: rows whose identities agree on everything
but the method, the budget and the seed (data fingerprint, training settings, model options, package version).
When a name holds two groups (an edited spec rerun into the same folder, two ``data_dir``s under one dataset
name), each becomes its own section, labelled with what differs (``training.max_epochs=2``). Inside a group, a
method label used with two method settings (options, class version) is split the same way. So a table entry pools
seeds of one setting only, and each section says which seeds it pooled.

Example::

    for label, rows in setting_groups(frame[frame["dataset"] == "criteo"]):
        print(label or "one setting", len(rows))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys_embed.benchmark.identity import IDENTITY_FORMAT, POOLED_OVER, canonical_json

#: identity keys that vary inside one section (the table's rows and columns, and the seeds it pools)
VARYING = ("method", "budget_ratio", POOLED_OVER)
#: differences shown in a label before ``…``
SHOWN_DIFFERENCES = 3
OLDER_FORMAT = f"older results: identity format < {IDENTITY_FORMAT}, settings not fully recorded"


def identity(text: Any) -> dict[str, Any]:
    """A row's ``settings`` JSON as a dict (``{}`` when absent or unreadable)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, Mapping) and item:
            out |= _flatten(item, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = canonical_json(item)
    return out


def difference_labels(identities: list[dict[str, Any]]) -> list[str]:
    """For each identity, ``key=value`` of the keys whose values are not the same in all of them."""
    flat = [_flatten(i) for i in identities]
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if len({f.get(k, "—") for f in flat}) > 1]
    labels = []
    for ident, items in zip(identities, flat):
        shown = [f"{k}={items.get(k, '—')}" for k in differing]
        text = ", ".join(shown[:SHOWN_DIFFERENCES]) + (", …" if len(shown) > SHOWN_DIFFERENCES else "")
        if ident.get("format", 0) < IDENTITY_FORMAT:
            text = f"{OLDER_FORMAT}; {text}"
        labels.append(text)
    return labels


def _context(ident: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ident.items() if k not in VARYING}


def setting_groups(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The rows split by everything but method, budget and seed: ``(label, rows)``, label ``""`` for one group.

    Inside each group, a method label that stands for several method settings is renamed
    ``label (what differs)``, so that a table entry never pools two settings.
    """
    idents = [identity(t) for t in frame["settings"]]
    keys = pd.Series([canonical_json(_context(i)) for i in idents], index=frame.index)
    groups = list(frame.groupby(keys, sort=False))
    labels = difference_labels([_context(identity(g["settings"].iloc[0])) for _, g in groups])
    if len(groups) == 1:
        labels = [""]
    return [(label, _split_method_labels(group)) for label, (_, group) in zip(labels, groups)]


def _split_method_labels(group: pd.DataFrame) -> pd.DataFrame:
    group = group.copy()
    methods = pd.Series([canonical_json(identity(t).get("method", {})) for t in group["settings"]], index=group.index)
    for label, rows in group.groupby("method_label", sort=False):
        variants = list(dict.fromkeys(methods[rows.index]))
        if len(variants) < 2:
            continue
        names = difference_labels([{"format": IDENTITY_FORMAT, **json.loads(v)} for v in variants])
        for variant, name in zip(variants, names):
            group.loc[rows.index[methods[rows.index] == variant], "method_label"] = f"{label} ({name})"
    return group


def pooled_note(group: pd.DataFrame) -> str:
    """What the section's entries pool: which seeds, and how many per entry."""
    ok = group[group["status"] == "ok"]
    counts = ok.groupby(["method_label", "budget_ratio"])["seed"].nunique()
    per_entry = values_of(pd.DataFrame({"n": counts.to_numpy()}), "n")
    older = identity(group["settings"].iloc[0]).get("format", 0) < IDENTITY_FORMAT
    same = f"{OLDER_FORMAT}: data fingerprint and defaults unknown" if older else "nothing else differs"
    return (
        f"Each entry pools the seeds of one setting ({same}): seeds {values_of(group, 'seed')}; "
        f"{per_entry} ok seed(s) per entry."
    )


def values_of(frame: pd.DataFrame, column: str) -> str:
    """The values a column takes, joined (one value in a sweep that kept it fixed)."""
    values = frame[column].dropna().unique().tolist()
    values = sorted(values, key=lambda v: (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v)))
    return ", ".join(_fmt(v) for v in values) if values else "—"


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return f"{int(value):,}"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return str(value)


def _json_values(frame: pd.DataFrame, column: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for text in frame[column].dropna().unique():
        value = identity(text)
        if value and value not in out:
            out.append(value)
    return out


def header(frame: pd.DataFrame, output: Path) -> list[str]:
    """The report's first lines: where the rows come from, seeds, budgets, machine and versions."""
    status = frame["status"].value_counts()
    lines = [
        "# Embedding compression benchmark",
        "",
        f"Built {pd.Timestamp.now(tz='UTC'):%Y-%m-%d %H:%M UTC} from {len(frame)} result rows under `{output}` "
        f"({', '.join(f'{status.get(s, 0)} {s}' for s in ('ok', 'infeasible', 'failed'))}); every number below is "
        "read from those rows. Rebuild with `recsys-embed bench report --output " + str(output) + "`.",
        "",
        f"- sweep: {values_of(frame, 'sweep')}",
        f"- seeds: {values_of(frame, 'seed')} (tables: mean ± sample std over the seeds of one setting)",
        f"- budgets asked (compression ratio vs full fp32 tables): {values_of(frame, 'budget_ratio')}",
        f"- machine: {values_of(frame, 'host')}, device {values_of(frame[frame['status'] == 'ok'], 'device')}, "
        f"{values_of(frame, 'threads')} torch threads; cell wall time total "
        f"{frame['wall_s'].fillna(0).sum() / 60:.1f} min",
    ]
    for versions in _json_values(frame, "versions"):
        lines.append("- versions: " + ", ".join(f"{k} {versions[k]}" for k in sorted(versions)))
    return lines


def _optimizer(settings: Any) -> str:
    """``name (lr x)`` of a sparse or dense optimizer's settings (the other arguments are in the identity)."""
    if not isinstance(settings, Mapping):
        return "?"
    args = settings.get("init_args", settings)
    return f"{settings.get('class_path', settings.get('name', '?'))} (lr {args.get('lr', '?')})"


def section_facts(group: pd.DataFrame) -> list[str]:
    """A section's data, model and training, read from its rows (one setting group)."""
    settings = _json_values(group, "settings")
    first = settings[0] if settings else {}
    source = first.get("dataset", {})
    if "synthetic" in source:
        cfg = source["synthetic"]
        origin = (
            f"synthetic (seed {cfg.get('seed')}, cardinalities {cfg.get('min_cardinality'):,}.."
            f"{cfg.get('max_cardinality'):,}, Zipf {cfg.get('zipf_exponent')})"
        )
    else:
        origin = f"`{source.get('data_dir', '?')}` (fingerprint {source.get('fingerprint', 'not recorded')})"
    training = first.get("training", {})
    ok = group[group["status"] == "ok"]
    return [
        f"- data: {origin}; rows train {values_of(group, 'train_rows')}, val {values_of(group, 'val_rows')}, test "
        f"{values_of(group, 'test_rows')}; {values_of(group, 'num_sparse')} categorical + "
        f"{values_of(group, 'num_dense')} dense features",
        f"- model options: {json.dumps(first.get('model', {}).get('options', {}), sort_keys=True)}",
        f"- training: embedding dim {values_of(group, 'embedding_dim')}, batch {values_of(group, 'batch_size')} (eval "
        f"{values_of(group, 'eval_batch_size')}), max_epochs {values_of(group, 'max_epochs')}, max_steps "
        f"{values_of(group, 'max_steps')}, limit_train_batches {training.get('limit_train_batches', '?')}; train steps "
        f"run per cell: {values_of(ok, 'steps')}; sparse optimizer {_optimizer(training.get('sparse_optimizer'))}; "
        f"dense optimizer {_optimizer(training.get('optimizer'))}; recsys_embed "
        f"{first.get('recsys_embed', 'not recorded')}",
        f"- {pooled_note(group)}",
    ]
