"""The embedded default dataset: a deterministic synthetic CTR generator shaped like Criteo.

Categorical ids are Zipf-distributed (frequency rank ``r`` has probability ``∝ (r + 1)^-s``, ranks scattered over
the id space by a fixed permutation), with cardinalities log-spaced from ``min_cardinality`` to
``max_cardinality``. Labels come from a planted model::

    logit = bias + sum_f w_f[id_f] + sum_{(f, g) in pairs} <v_f[id_f], v_g[id_g]> + beta . dense

so every id carries its own effect and some feature pairs interact: a model that gives each id its own row can
learn effects that a heavily hashed table blurs, so compression costs measurable AUC. Everything is drawn from
``numpy.random.default_rng`` seeded by ``seed``: the same config gives the same bytes on every machine.

Optional multi-hot features (``num_multi_hot > 0``, default 0): list columns ``cat_{num_sparse}..`` of
``list<int64>``, each row's list length drawn from ``Poisson(multi_hot_mean_length)`` truncated at
``multi_hot_max_length`` (0 gives an empty list), its ids Zipf-distributed over ``multi_hot_cardinality`` ids;
the logit gains the mean of the list's per-id effects. They are drawn from their own seeded streams, so the
scalar columns and the default dataset are unchanged by the option.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from recsys_embed.data.schema import ROW_GROUP_ROWS, CTRSchema, count_ids, save_id_counts, write_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of the synthetic CTR data (the defaults are the project's default dataset)."""

    train_rows: int = 1_000_000
    val_rows: int = 100_000
    test_rows: int = 100_000
    num_sparse: int = 26
    num_dense: int = 13
    min_cardinality: int = 10
    max_cardinality: int = 1_000_000
    zipf_exponent: float = 1.05
    effect_scale: float = 0.6
    interaction_pairs: int = 12
    interaction_dim: int = 4
    interaction_scale: float = 0.5
    bias: float = -1.2
    seed: int = 0
    num_multi_hot: int = 0
    multi_hot_cardinality: int = 10_000
    multi_hot_mean_length: float = 3.0
    multi_hot_max_length: int = 20

    def __post_init__(self) -> None:
        if min(self.train_rows, self.val_rows, self.test_rows) <= 0:
            raise ValueError("SyntheticConfig: train_rows, val_rows and test_rows must be positive.")
        if self.num_sparse < 2 or self.num_dense < 0:
            raise ValueError("SyntheticConfig: need num_sparse >= 2 and num_dense >= 0.")
        if not 2 <= self.min_cardinality <= self.max_cardinality:
            raise ValueError("SyntheticConfig: need 2 <= min_cardinality <= max_cardinality.")
        if self.num_multi_hot < 0 or self.multi_hot_cardinality < 2:
            raise ValueError("SyntheticConfig: need num_multi_hot >= 0 and multi_hot_cardinality >= 2.")
        if self.multi_hot_mean_length < 0 or self.multi_hot_max_length < 1:
            raise ValueError("SyntheticConfig: need multi_hot_mean_length >= 0 and multi_hot_max_length >= 1.")

    def cardinalities(self) -> list[int]:
        """Every categorical feature's cardinality in column order: the scalar ones, then the list ones."""
        grid = np.geomspace(self.min_cardinality, self.max_cardinality, self.num_sparse)
        return [int(round(c)) for c in grid] + [self.multi_hot_cardinality] * self.num_multi_hot

    def recorded(self) -> dict[str, object]:
        """The options that define the data; the multi-hot ones only when used (the default data is unchanged)."""
        options = asdict(self)
        if not self.num_multi_hot:
            for key in MULTI_HOT_OPTIONS:
                options.pop(key)
        return options

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.recorded(), sort_keys=True).encode()).hexdigest()[:12]


MULTI_HOT_OPTIONS = ("num_multi_hot", "multi_hot_cardinality", "multi_hot_mean_length", "multi_hot_max_length")


class _PlantedModel:
    """The ground-truth click model and id samplers, drawn once from the seed."""

    def __init__(self, cfg: SyntheticConfig) -> None:
        rng = np.random.default_rng([cfg.seed, 0])
        self.cfg = cfg
        self.cards = cfg.cardinalities()  # scalar features first, then the multi-hot ones
        self.cdfs, self.perms, self.effects, self.latents = [], [], [], []
        for n in self.cards[: cfg.num_sparse]:
            weights = np.arange(1, n + 1, dtype=np.float64) ** -cfg.zipf_exponent
            cdf = np.cumsum(weights)
            self.cdfs.append(cdf / cdf[-1])
            self.perms.append(rng.permutation(n).astype(np.int64))
            self.effects.append(rng.normal(0.0, cfg.effect_scale, n).astype(np.float32))
            self.latents.append(rng.normal(0.0, cfg.interaction_scale, (n, cfg.interaction_dim)).astype(np.float32))
        all_pairs = [(f, g) for f in range(cfg.num_sparse) for g in range(f + 1, cfg.num_sparse)]
        chosen = rng.choice(len(all_pairs), size=min(cfg.interaction_pairs, len(all_pairs)), replace=False)
        self.pairs = [all_pairs[i] for i in sorted(chosen)]
        self.dense_weights = rng.normal(0.0, 0.3, cfg.num_dense).astype(np.float32)
        # the multi-hot features' parameters come from their own stream: the scalar ones stay as they were
        lists = np.random.default_rng([cfg.seed, 2])
        n = cfg.multi_hot_cardinality
        weights = np.arange(1, n + 1, dtype=np.float64) ** -cfg.zipf_exponent
        self.list_cdf = np.cumsum(weights) / weights.sum()
        self.list_perms = [lists.permutation(n).astype(np.int64) for _ in range(cfg.num_multi_hot)]
        self.list_effects = [
            lists.normal(0.0, cfg.effect_scale, n).astype(np.float32) for _ in range(cfg.num_multi_hot)
        ]

    def sample_lists(self, rows: int, rng: np.random.Generator) -> tuple[list[pa.Array], np.ndarray]:
        """The multi-hot columns (``list<int64>`` arrays) and their logit term (each list's mean id effect)."""
        cfg = self.cfg
        columns, logit = [], np.zeros(rows, dtype=np.float32)
        for k in range(cfg.num_multi_hot):
            lengths = np.minimum(rng.poisson(cfg.multi_hot_mean_length, rows), cfg.multi_hot_max_length)
            offsets = np.zeros(rows + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            ranks = np.searchsorted(self.list_cdf, rng.random(int(offsets[-1])), side="right")
            ids = self.list_perms[k][np.minimum(ranks, cfg.multi_hot_cardinality - 1)]
            row_of = np.repeat(np.arange(rows), lengths)
            total = np.bincount(row_of, weights=self.list_effects[k][ids], minlength=rows)
            logit += (total / np.maximum(lengths, 1)).astype(np.float32)
            columns.append(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids)))
        return columns, logit

    def sample(self, rows: int, rng: np.random.Generator, list_rng: np.random.Generator | None = None) -> pa.Table:
        """``rows`` rows; ``list_rng`` draws the multi-hot columns (needed when ``num_multi_hot > 0``)."""
        cfg = self.cfg
        ids = np.empty((cfg.num_sparse, rows), dtype=np.int64)
        for f in range(cfg.num_sparse):
            ranks = np.searchsorted(self.cdfs[f], rng.random(rows), side="right")
            ids[f] = self.perms[f][np.minimum(ranks, self.cards[f] - 1)]
        counts = rng.poisson(np.exp(rng.normal(1.0, 1.2, (rows, cfg.num_dense))))
        dense = np.log1p(counts).astype(np.float32)
        logit = np.full(rows, cfg.bias, dtype=np.float32)
        for f in range(cfg.num_sparse):
            logit += self.effects[f][ids[f]]
        for f, g in self.pairs:
            logit += np.einsum("ij,ij->i", self.latents[f][ids[f]], self.latents[g][ids[g]])
        if cfg.num_dense:
            logit += (dense - dense.mean(axis=0)) @ self.dense_weights
        lists: list[pa.Array] = []
        if cfg.num_multi_hot:
            assert list_rng is not None, "sample: multi-hot features need list_rng"
            lists, list_logit = self.sample_lists(rows, list_rng)
            logit += list_logit
        labels = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        columns = {"label": labels}
        columns.update({f"int_{j}": dense[:, j] for j in range(cfg.num_dense)})
        columns.update({f"cat_{f}": ids[f] for f in range(cfg.num_sparse)})
        columns.update({f"cat_{cfg.num_sparse + k}": column for k, column in enumerate(lists)})
        return pa.table(columns)


def generate_synthetic(folder: str | Path, cfg: SyntheticConfig = SyntheticConfig()) -> CTRSchema:
    """Write the synthetic dataset (train/val/test parquet, schema.json, id_counts.npz) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = _PlantedModel(cfg)
    sizes = {"train": cfg.train_rows, "val": cfg.val_rows, "test": cfg.test_rows}
    sparse = [f"cat_{f}" for f in range(cfg.num_sparse + cfg.num_multi_hot)]
    counts = {name: np.zeros(n, dtype=np.int64) for name, n in zip(sparse, model.cards)}
    progress = tqdm(total=sum(sizes.values()), desc="synthetic data", unit="row", unit_scale=True, leave=False)
    for split_index, (split, rows) in enumerate(sizes.items()):
        chunks = []
        for chunk_index, start in enumerate(range(0, rows, ROW_GROUP_ROWS)):
            rng = np.random.default_rng([cfg.seed, 1, split_index, chunk_index])
            list_rng = np.random.default_rng([cfg.seed, 3, split_index, chunk_index])
            chunk = model.sample(min(ROW_GROUP_ROWS, rows - start), rng, list_rng)
            if split == "train":
                for name, c in count_ids({s: chunk[s] for s in sparse}, dict(zip(sparse, model.cards))).items():
                    counts[name] += c
            chunks.append(chunk)
            progress.update(chunk.num_rows)
        write_split(folder, split, pa.concat_tables(chunks))
    progress.close()
    schema = CTRSchema(
        dense=[f"int_{j}" for j in range(cfg.num_dense)],
        sparse=sparse,
        cardinalities=dict(zip(sparse, model.cards)),
        splits={s: f"{s}.parquet" for s in sizes},
        rows=sizes,
        source={"generator": "recsys_embed.data.synthetic", "config": cfg.recorded()},
    )
    save_id_counts(folder, counts)
    schema.save(folder)
    return schema


def cache_root() -> Path:
    """Where generated data lives: ``$RECSYS_EMBED_CACHE`` or ``~/.cache/recsys_embed``."""
    return Path(os.environ.get("RECSYS_EMBED_CACHE", Path.home() / ".cache" / "recsys_embed"))


def synthetic_dataset(cfg: SyntheticConfig = SyntheticConfig()) -> Path:
    """The folder holding the synthetic data for ``cfg``, generated once and then reused."""
    folder = cache_root() / f"synthetic-{cfg.fingerprint()}"
    if not (folder / "schema.json").is_file():
        log.info("Generating synthetic CTR data into %s", folder)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        generate_synthetic(tmp, cfg)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            pass
    return folder
