"""Data layer: parquet -> KJT batches against a hand-built reference, shuffling, rank splits, synthetic data."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.datasets.utils import Batch as TorchRecBatch
from torchrec.streamable import Pipelineable

from recsys_embed.data import CTRDataModule, CTRSchema, ParquetBatches, SyntheticConfig, generate_synthetic
from recsys_embed.data.schema import load_id_counts
from tests.conftest import TINY_SYNTHETIC


def _small_folder(tmp_path: Path, rows: int = 5, row_group: int | None = None) -> CTRSchema:
    table = pa.table(
        {
            "label": pa.array([1, 0, 0, 1, 0][:rows], pa.float32()),
            "int_0": pa.array([0.5, 1.5, 2.5, 3.5, 4.5][:rows], pa.float32()),
            "int_1": pa.array([10.0, 11.0, 12.0, 13.0, 14.0][:rows], pa.float32()),
            "cat_0": pa.array([3, 1, 4, 1, 5][:rows], pa.int64()),
            "cat_1": pa.array([9, 2, 6, 5, 3][:rows], pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=row_group or rows)
    schema = CTRSchema(
        dense=["int_0", "int_1"],
        sparse=["cat_0", "cat_1"],
        cardinalities={"cat_0": 6, "cat_1": 10},
        splits={"train": "train.parquet"},
        rows={"train": rows},
    )
    schema.save(tmp_path)
    return schema


def test_batches_equal_a_hand_built_reference(tmp_path: Path) -> None:
    schema = _small_folder(tmp_path)
    batches = list(ParquetBatches(tmp_path / "train.parquet", schema, batch_size=3))
    assert [len(b.labels) for b in batches] == [3, 2]
    first = batches[0]
    assert first.sparse_features.keys() == ["cat_0", "cat_1"]
    # feature-major: cat_0 of rows 0..2, then cat_1 of rows 0..2; one id per bag
    assert first.sparse_features.values().tolist() == [3, 1, 4, 9, 2, 6]
    assert first.sparse_features.lengths().tolist() == [1] * 6
    assert first.sparse_features.stride() == 3
    torch.testing.assert_close(first.dense_features, torch.tensor([[0.5, 10.0], [1.5, 11.0], [2.5, 12.0]]))
    torch.testing.assert_close(first.labels, torch.tensor([1.0, 0.0, 0.0]))
    assert batches[1].sparse_features.values().tolist() == [1, 5, 5, 3]
    assert first.sparse_features.to_dict()["cat_1"].values().tolist() == [9, 2, 6]


def test_batches_are_torchrecs_pipelineable_batch(tmp_path: Path) -> None:
    """TorchRec's GPU train pipelines need ``to`` / ``pin_memory`` / ``record_stream``: TorchRec's Batch has them."""
    schema = _small_folder(tmp_path)
    batch = next(iter(ParquetBatches(tmp_path / "train.parquet", schema, batch_size=3)))
    assert type(batch) is TorchRecBatch and isinstance(batch, Pipelineable)
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert type(moved) is TorchRecBatch
    torch.testing.assert_close(moved.dense_features, batch.dense_features)
    assert moved.sparse_features.values().tolist() == batch.sparse_features.values().tolist()
    torch.testing.assert_close(moved.labels, batch.labels)


def test_batches_span_row_groups_and_drop_last(tmp_path: Path) -> None:
    schema = _small_folder(tmp_path, row_group=2)
    assert pq.ParquetFile(tmp_path / "train.parquet").num_row_groups == 3
    ds = ParquetBatches(tmp_path / "train.parquet", schema, batch_size=3)
    assert [b.labels.tolist() for b in ds] == [[1, 0, 0], [1, 0]]
    assert len(ds) == 2
    dropped = ParquetBatches(tmp_path / "train.parquet", schema, batch_size=3, drop_last=True)
    assert [len(b.labels) for b in dropped] == [3] and len(dropped) == 1


def test_shuffle_is_a_seeded_permutation_that_changes_per_epoch(tiny_dataset: Path) -> None:
    schema = CTRSchema.load(tiny_dataset)
    path = schema.split_path(tiny_dataset, "train")

    def rows(epoch: int, seed: int = 0) -> np.ndarray:
        ds = ParquetBatches(path, schema, batch_size=1000, shuffle=True, seed=seed)
        ds.set_epoch(epoch)
        return np.concatenate([b.sparse_features.to_dict()["cat_3"].values().numpy() for b in ds])

    plain = np.concatenate(
        [b.sparse_features.to_dict()["cat_3"].values().numpy() for b in ParquetBatches(path, schema, 1000)]
    )
    epoch0 = rows(0)
    assert np.array_equal(epoch0, rows(0))  # deterministic
    assert not np.array_equal(epoch0, rows(1))  # a new order each epoch
    assert not np.array_equal(epoch0, plain)
    assert np.array_equal(np.sort(epoch0), np.sort(plain))  # same rows


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_take_equal_slices_of_the_global_batches_of_one_process(tmp_path: Path, shuffle: bool) -> None:
    schema = _small_folder(tmp_path, row_group=2)
    path = tmp_path / "train.parquet"
    one = [b.dense_features[:, 0].tolist() for b in ParquetBatches(path, schema, 2, shuffle=shuffle, seed=3)]
    ranks = [
        [
            b.dense_features[:, 0].tolist()
            for b in ParquetBatches(path, schema, 1, shuffle=shuffle, seed=3, rank=r, world_size=2)
        ]
        for r in range(2)
    ]
    assert len(one) == 3  # 2 + 2 + 1 rows
    # two global batches of 2 rows, split 1 + 1; the final 1-row batch cannot be split over 2 ranks and is left out
    assert [r0 + r1 for r0, r1 in zip(*ranks)] == one[:2]
    assert len(ParquetBatches(path, schema, 1, rank=1, world_size=2)) == 2


def test_rank_outside_the_world_is_a_clear_error(tmp_path: Path) -> None:
    schema = _small_folder(tmp_path)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size\)"):
        ParquetBatches(tmp_path / "train.parquet", schema, 2, rank=2, world_size=2)


def test_nulls_are_a_clear_error(tmp_path: Path) -> None:
    schema = _small_folder(tmp_path)
    table = pq.read_table(tmp_path / "train.parquet")
    table = table.set_column(3, "cat_0", pa.array([3, None, 4, 1, 5], pa.int64()))
    pq.write_table(table, tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"Column 'cat_0' .* 1 null values"):
        list(ParquetBatches(tmp_path / "train.parquet", schema, 2))


def test_labels_outside_zero_one_are_a_clear_error(tmp_path: Path) -> None:
    schema = _small_folder(tmp_path)
    table = pq.read_table(tmp_path / "train.parquet")
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array([0.0, 2.0, 1.0, 0.0, 1.0]))
    pq.write_table(table, tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"Column 'label' .* 1 labels outside \{0, 1\} \(first: 2\)"):
        list(ParquetBatches(tmp_path / "train.parquet", schema, 2))


def test_missing_columns_and_schema_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="No schema.json"):
        CTRSchema.load(tmp_path)
    schema = _small_folder(tmp_path)
    schema.sparse.append("cat_7")
    with pytest.raises(ValueError, match=r"lacks columns \['cat_7'\]"):
        ParquetBatches(tmp_path / "train.parquet", schema, 2)
    with pytest.raises(ValueError, match="no split 'val'"):
        schema.split_path(tmp_path, "val")


def test_synthetic_data_is_deterministic_and_well_formed(tmp_path: Path) -> None:
    cfg = SyntheticConfig(train_rows=3000, val_rows=500, test_rows=500, num_sparse=5, num_dense=2, max_cardinality=900)
    a, b = generate_synthetic(tmp_path / "a", cfg), generate_synthetic(tmp_path / "b", cfg)
    assert a == b
    for split in ("train", "val", "test"):
        assert (tmp_path / "a" / f"{split}.parquet").read_bytes() == (tmp_path / "b" / f"{split}.parquet").read_bytes()
    other = generate_synthetic(tmp_path / "c", SyntheticConfig(**{**cfg.__dict__, "seed": 1}))
    train = pq.read_table(tmp_path / "a" / "train.parquet")
    assert not train.equals(pq.read_table(tmp_path / "c" / "train.parquet"))
    assert other.cardinalities == a.cardinalities == dict(zip(a.sparse, cfg.cardinalities()))
    assert cfg.cardinalities()[0] == 10 and cfg.cardinalities()[-1] == 900
    for name, n in a.cardinalities.items():
        ids = train[name].to_numpy()
        assert 0 <= ids.min() and ids.max() < n
    counts = load_id_counts(tmp_path / "a")
    assert counts["cat_4"].sum() == 3000
    assert np.array_equal(counts["cat_4"], np.bincount(train["cat_4"].to_numpy(), minlength=900))
    top = np.sort(counts["cat_4"])[::-1]
    assert top[0] > 10 * np.median(top[top > 0])  # Zipf head
    assert 0.1 < train["label"].to_numpy().mean() < 0.6


def test_synthetic_config_errors() -> None:
    with pytest.raises(ValueError, match="positive"):
        SyntheticConfig(train_rows=0)
    with pytest.raises(ValueError, match="min_cardinality"):
        SyntheticConfig(min_cardinality=1)


def test_datamodule_on_the_cached_synthetic_data() -> None:
    dm = CTRDataModule(synthetic=TINY_SYNTHETIC, batch_size=512, eval_batch_size=1000)
    assert dm.cardinalities == dict(zip(dm.schema.sparse, TINY_SYNTHETIC.cardinalities()))
    assert dm.num_dense == 3
    batch = next(iter(dm.train_dataloader()))
    assert len(batch.labels) == 512 and batch.dense_features.shape == (512, 3)
    assert sum(len(b.labels) for b in dm.val_dataloader()) == 1500
    again = CTRDataModule(synthetic=TINY_SYNTHETIC)
    assert again.data_dir == dm.data_dir  # generated once, then reused
    assert set(dm.id_counts()) == set(dm.schema.sparse)


def test_datamodule_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size must be positive"):
        CTRDataModule(data_dir=str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match="No schema.json"):
        CTRDataModule(data_dir=str(tmp_path))


def test_dataloader_workers_split_the_rows_without_duplicates(tiny_dataset: Path) -> None:
    schema = CTRSchema.load(tiny_dataset)
    ds = ParquetBatches(schema.split_path(tiny_dataset, "train"), schema, batch_size=1000)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    labels_seen = sum(len(b.labels) for b in loader)
    assert labels_seen == TINY_SYNTHETIC.train_rows


def test_count_ids_rejects_ids_beyond_the_cardinality() -> None:
    from recsys_embed.data.schema import count_ids

    assert count_ids({"c": np.array([0, 2, 2])}, {"c": 3})["c"].tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        count_ids({"c": np.array([0, 3])}, {"c": 3})


def test_schema_with_unknown_keys_is_a_clear_error(tmp_path: Path) -> None:
    import json

    _small_folder(tmp_path)
    raw = json.loads((tmp_path / "schema.json").read_text())
    (tmp_path / "schema.json").write_text(json.dumps({**raw, "colour": "blue"}))
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        CTRSchema.load(tmp_path)


def test_datamodule_drops_the_last_train_batch_only() -> None:
    dm = CTRDataModule(synthetic=TINY_SYNTHETIC, batch_size=1000, eval_batch_size=1000)
    assert [len(b.labels) for b in dm.train_dataloader()] == [1000] * 6  # 6000 rows
    assert sum(len(b.labels) for b in dm.val_dataloader()) == TINY_SYNTHETIC.val_rows
    dm = CTRDataModule(synthetic=TINY_SYNTHETIC, batch_size=4000, drop_last=False)
    assert [len(b.labels) for b in dm.train_dataloader()] == [4000, 2000]
    with pytest.raises(ValueError, match="fewer than data.batch_size=8000"):
        CTRDataModule(synthetic=TINY_SYNTHETIC, batch_size=8000)


def test_a_train_split_too_small_for_the_global_batch_is_a_clear_error(tiny_dataset: Path) -> None:
    dm = CTRDataModule(data_dir=str(tiny_dataset), batch_size=4000)  # 6000 rows: one batch on one process
    assert len(dm.train_dataloader()) == 1
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2)  # type: ignore[assignment]  # 2 x 4000 > 6000 rows
    with pytest.raises(ValueError, match=r"gives no batch of data.batch_size=4000 x 2 process\(es\)"):
        dm.train_dataloader()
