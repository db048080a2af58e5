"""Multi-hot (list) features through every layer: schema, loader, id counts, synthetic data, MovieLens genres,
every registered method inside DLRM, and a CLI fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from recsys_embed.data import CTRDataModule, CTRSchema, ParquetBatches, SyntheticConfig, generate_synthetic
from recsys_embed.data.schema import count_ids, load_id_counts, sparse_kinds
from recsys_embed.methods import available_methods, build_embedding, method_class
from recsys_embed.models import DLRM
from recsys_embed.training import tables_for
from tests.conftest import SHARED_DATA, SMALL_TABLE_OPTIONS, budget_for

TAGS = [[1, 2], [], [3, 3, 0], [4], []]


def _folder(tmp_path: Path, tags: pa.Array | None = None, row_group: int = 2, order: tuple[str, ...] = ()) -> CTRSchema:
    """Five rows: a scalar ``cat_0`` and a list ``tags`` (``TAGS``); ``int_0`` is the row number."""
    table = pa.table(
        {
            "label": pa.array([1, 0, 0, 1, 0], pa.float32()),
            "int_0": pa.array([0, 1, 2, 3, 4], pa.float32()),
            "cat_0": pa.array([3, 1, 4, 1, 5], pa.int64()),
            "tags": tags if tags is not None else pa.array(TAGS, pa.list_(pa.int64())),
        }
    )
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=row_group)
    schema = CTRSchema(
        dense=["int_0"],
        sparse=list(order or ("cat_0", "tags")),
        cardinalities={"cat_0": 6, "tags": 5},
        splits={"train": "train.parquet"},
        rows={"train": 5},
    )
    schema.save(tmp_path)
    return schema


def _bags(batch: object, key: str) -> list[list[int]]:
    """Each row's bag of ``key`` in a batch's KJT."""
    jt = batch.sparse_features.to_dict()[key]  # type: ignore[attr-defined]
    return [t.tolist() for t in torch.split(jt.values(), jt.lengths().tolist())]


# ---------------------------------------------------------------------------------------------------- schema


def test_list_columns_are_detected_from_the_parquet_type_and_old_schemas_load(tmp_path: Path) -> None:
    schema = _folder(tmp_path)
    assert sparse_kinds(pq.read_schema(tmp_path / "train.parquet"), schema.sparse) == {"cat_0": False, "tags": True}
    assert CTRSchema.load(tmp_path) == schema  # schema.json has no new key: older folders load unchanged
    assert ParquetBatches(tmp_path / "train.parquet", schema, 2).list_columns == ["tags"]


@pytest.mark.parametrize(
    "column",
    [
        pa.array([["a"], [], ["b"], ["c"], []], pa.list_(pa.string())),
        pa.array([[1.5], [], [2.0], [1.0], []], pa.list_(pa.float64())),
        pa.array([[[1]], [], [[2]], [[3]], []], pa.list_(pa.list_(pa.int64()))),
        pa.array(["a", "b", "c", "d", "e"]),
    ],
    ids=["list<string>", "list<double>", "list<list<int64>>", "string"],
)
def test_a_categorical_column_of_the_wrong_type_is_one_clear_error(tmp_path: Path, column: pa.Array) -> None:
    schema = _folder(tmp_path, tags=column)
    with pytest.raises(ValueError, match=r"Categorical column 'tags' .* must be an integer column .* list<int64>"):
        ParquetBatches(tmp_path / "train.parquet", schema, 2)


@pytest.mark.parametrize(
    "column, message",
    [
        (pa.array([[1], None, [2], [3], []], pa.list_(pa.int64())), r"'tags' .* 1 null lists; write an empty list"),
        (pa.array([[1, None], [], [2], [None], []], pa.list_(pa.int64())), r"'tags' .* 2 null ids inside its lists"),
    ],
    ids=["null list", "nested null"],
)
def test_nulls_in_lists_are_one_clear_error(tmp_path: Path, column: pa.Array, message: str) -> None:
    schema = _folder(tmp_path, tags=column, row_group=5)
    with pytest.raises(ValueError, match=message):
        list(ParquetBatches(tmp_path / "train.parquet", schema, 2))


# ---------------------------------------------------------------------------------------------------- loader


def test_lists_become_kjt_lengths_and_values_exactly(tmp_path: Path) -> None:
    schema = _folder(tmp_path)
    batches = list(ParquetBatches(tmp_path / "train.parquet", schema, batch_size=2))
    assert [len(b.labels) for b in batches] == [2, 2, 1]
    # feature-major: cat_0 of the rows (bags of one), then each row's tags list; empty lists are empty bags
    assert batches[0].sparse_features.values().tolist() == [3, 1, 1, 2]
    assert batches[0].sparse_features.lengths().tolist() == [1, 1, 2, 0]
    assert batches[1].sparse_features.values().tolist() == [4, 1, 3, 3, 0, 4]
    assert batches[1].sparse_features.lengths().tolist() == [1, 1, 3, 1]
    assert batches[2].sparse_features.values().tolist() == [5]
    assert batches[2].sparse_features.lengths().tolist() == [1, 0]
    assert all(b.sparse_features.stride() == len(b.labels) for b in batches)
    assert batches[0].sparse_features.values().dtype == torch.int64


def test_batches_that_span_row_groups_and_key_order_follow_the_schema(tmp_path: Path) -> None:
    schema = _folder(tmp_path, order=("tags", "cat_0"))
    batches = list(ParquetBatches(tmp_path / "train.parquet", schema, batch_size=3))  # row groups of 2 rows
    assert batches[0].sparse_features.keys() == ["tags", "cat_0"]
    assert batches[0].sparse_features.values().tolist() == [1, 2, 3, 3, 0, 3, 1, 4]
    assert batches[0].sparse_features.lengths().tolist() == [2, 0, 3, 1, 1, 1]
    assert [_bags(b, "tags") for b in batches] == [TAGS[:3], TAGS[3:]]


@pytest.mark.parametrize("kind", [pa.list_(pa.int32()), pa.large_list(pa.int64()), pa.list_(pa.uint16())])
def test_any_integer_list_type_reads_as_int64(tmp_path: Path, kind: pa.DataType) -> None:
    schema = _folder(tmp_path, tags=pa.array(TAGS, kind))
    batches = list(ParquetBatches(tmp_path / "train.parquet", schema, batch_size=5))
    assert _bags(batches[0], "tags") == TAGS and batches[0].sparse_features.values().dtype == torch.int64


def _row_list(r: int) -> list[int]:
    return [(r * (j + 3)) % 11 for j in range(r % 5)]  # 0..4 ids, empty every 5th row


def _numbered_rows(tmp_path: Path, rows: int = 500) -> tuple[Path, CTRSchema]:
    table = pa.table(
        {
            "label": pa.array(np.arange(rows) % 2, pa.float32()),
            "int_0": pa.array(np.arange(rows), pa.float32()),
            "cat_0": pa.array(np.arange(rows) % 13, pa.int64()),
            "tags": pa.array([_row_list(r) for r in range(rows)], pa.list_(pa.int64())),
        }
    )
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=64)
    schema = CTRSchema(dense=["int_0"], sparse=["tags", "cat_0"], cardinalities={"tags": 11, "cat_0": 13})
    return tmp_path / "train.parquet", schema


def test_shuffling_keeps_each_rows_list_with_the_row(tmp_path: Path) -> None:
    path, schema = _numbered_rows(tmp_path)
    seen = []
    for batch in ParquetBatches(path, schema, batch_size=37, shuffle=True, seed=4):
        rows = batch.dense_features[:, 0].long().tolist()
        assert _bags(batch, "tags") == [_row_list(r) for r in rows]
        assert _bags(batch, "cat_0") == [[r % 13] for r in rows]
        seen += rows
    assert seen != sorted(seen) and sorted(seen) == list(range(500))


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_rank_gets_its_rows_with_their_lists(tmp_path: Path, shuffle: bool) -> None:
    path, schema = _numbered_rows(tmp_path)
    one = list(ParquetBatches(path, schema, 40, shuffle=shuffle, seed=2))
    ranks = [list(ParquetBatches(path, schema, 20, shuffle=shuffle, seed=2, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for whole, first, second in zip(one, *ranks):
        assert len(first.labels) == len(second.labels) == len(whole.labels) // 2
        for key in ("tags", "cat_0"):
            assert _bags(first, key) + _bags(second, key) == _bags(whole, key)[: 2 * len(first.labels)]
        for part in (first, second):
            assert _bags(part, "tags") == [_row_list(r) for r in part.dense_features[:, 0].long().tolist()]


def test_an_id_outside_the_cardinality_inside_a_list_is_rejected_by_the_method(tmp_path: Path) -> None:
    schema = _folder(tmp_path, tags=pa.array([[1], [], [7], [4], []], pa.list_(pa.int64())))
    batch = next(iter(ParquetBatches(tmp_path / "train.parquet", schema, 5)))
    emb = build_embedding("full", tables_for(schema.cardinalities, 4))
    with pytest.raises(ValueError, match=r"Feature 'tags' has id 7, but it was declared with 5 ids"):
        emb(batch.sparse_features)


# ------------------------------------------------------------------------------------------------- id counts


def test_every_id_of_every_list_counts() -> None:
    lists = pa.chunked_array(
        [pa.array([[1, 2], [], [2, 2]], pa.list_(pa.int64())), pa.array([[0]], pa.list_(pa.int64()))]
    )
    counts = count_ids({"tags": lists, "cat_0": np.array([0, 0, 1, 1])}, {"tags": 4, "cat_0": 2})
    assert counts["tags"].tolist() == [1, 1, 3, 0] and counts["cat_0"].tolist() == [2, 2]
    with pytest.raises(ValueError, match=r"'tags' has ids in \[1, 4\] outside \[0, 4\)"):
        count_ids({"tags": pa.array([[1, 4], []])}, {"tags": 4})
    with pytest.raises(ValueError, match=r"'tags' .* null ids"):
        count_ids({"tags": pa.array([[1, None]])}, {"tags": 4})


# -------------------------------------------------------------------------------------------- synthetic data

MULTI = SyntheticConfig(
    train_rows=3000,
    val_rows=500,
    test_rows=500,
    num_sparse=3,
    num_dense=2,
    max_cardinality=500,
    num_multi_hot=2,
    multi_hot_cardinality=60,
    multi_hot_mean_length=2.5,
    multi_hot_max_length=6,
    seed=1,
)


@pytest.fixture(scope="module")
def multi_hot_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("multi_hot")
    generate_synthetic(folder, MULTI)
    return folder


def test_synthetic_multi_hot_lists_are_seeded_and_well_formed(multi_hot_dataset: Path, tmp_path: Path) -> None:
    again = generate_synthetic(tmp_path / "again", MULTI)
    assert (tmp_path / "again" / "train.parquet").read_bytes() == (multi_hot_dataset / "train.parquet").read_bytes()
    assert again.sparse == ["cat_0", "cat_1", "cat_2", "cat_3", "cat_4"]
    assert [again.cardinalities[f"cat_{k}"] for k in (3, 4)] == [60, 60]
    train = pq.read_table(multi_hot_dataset / "train.parquet")
    counts = load_id_counts(multi_hot_dataset)
    for name in ("cat_3", "cat_4"):
        assert train.schema.field(name).type == pa.list_(pa.int64())
        lengths = np.diff(train[name].combine_chunks().offsets.to_numpy())
        assert lengths.max() <= 6 and (lengths == 0).any() and abs(lengths.mean() - 2.5) < 0.15
        flat = train[name].combine_chunks().values.to_numpy()
        assert 0 <= flat.min() and flat.max() < 60
        np.testing.assert_array_equal(counts[name], np.bincount(flat, minlength=60))
    # the scalar columns are the same draws as without lists; the labels also see the lists
    plain_cfg = SyntheticConfig(**{**MULTI.__dict__, "num_multi_hot": 0})
    generate_synthetic(tmp_path / "plain", plain_cfg)
    plain = pq.read_table(tmp_path / "plain" / "train.parquet")
    for name in ("cat_0", "cat_1", "cat_2", "int_0", "int_1"):
        assert train[name].equals(plain[name])
    assert not train["label"].equals(plain["label"])
    assert "num_multi_hot" not in plain_cfg.recorded() and MULTI.recorded()["num_multi_hot"] == 2
    assert plain_cfg.fingerprint() != MULTI.fingerprint()


def test_multi_hot_options_are_checked() -> None:
    with pytest.raises(ValueError, match="num_multi_hot >= 0"):
        SyntheticConfig(num_multi_hot=-1)
    with pytest.raises(ValueError, match="multi_hot_max_length >= 1"):
        SyntheticConfig(num_multi_hot=1, multi_hot_max_length=0)


def test_datamodule_streams_lists_as_bags(multi_hot_dataset: Path) -> None:
    dm = CTRDataModule(data_dir=str(multi_hot_dataset), batch_size=500)
    assert dm.multi_hot == ["cat_3", "cat_4"]
    assert dm.cardinalities == dict(zip(dm.schema.sparse, MULTI.cardinalities()))
    batches = list(dm.train_dataloader())
    assert len(batches) == 6
    lengths = batches[0].sparse_features.length_per_key()
    assert lengths[:3] == [500, 500, 500] and lengths[3] != 500
    per_key = batches[0].sparse_features.to_dict()
    assert (per_key["cat_3"].lengths() == 0).any() and per_key["cat_3"].lengths().max() <= 6


# ------------------------------------------------------------------------------- every method, DLRM, the CLI


@pytest.mark.parametrize("name", available_methods())
def test_every_method_trains_dlrm_on_a_loader_batch_with_lists(name: str, multi_hot_dataset: Path) -> None:
    schema = CTRSchema.load(multi_hot_dataset)
    batch = next(iter(ParquetBatches(schema.split_path(multi_hot_dataset, "train"), schema, 256)))
    assert (batch.sparse_features.to_dict()["cat_3"].lengths() == 0).any()  # empty bags are in the batch
    tables = tables_for(schema.cardinalities, 8)
    options = {"id_counts": load_id_counts(multi_hot_dataset)} if method_class(name).needs_id_counts else {}
    options.update(SMALL_TABLE_OPTIONS.get(name, {}))
    torch.manual_seed(0)
    emb = build_embedding(name, tables, budget=budget_for(name, 2.0), **options)
    model = DLRM(emb, num_dense=2, bottom_mlp=[16], top_mlp=[16])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)

    def loss() -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(
            model(batch.dense_features, batch.sparse_features), batch.labels
        )

    first = loss().item()
    for _ in range(40):
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert loss().item() < 0.8 * first


def test_cli_fit_on_synthetic_data_with_a_list_feature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from recsys_embed.cli import main
    from tests.test_cli import CONFIG, TINY

    monkeypatch.chdir(tmp_path)
    lists = ["--data.synthetic.num_multi_hot=1", "--data.synthetic.multi_hot_cardinality=200"]
    main(["fit", "--config", CONFIG, *TINY, *lists, "--model.embedding.method=qr", "--trainer.max_steps=4"])
    assert sorted(tmp_path.glob("runs/synthetic_dlrm/**/checkpoints/last.ckpt"))
    hparams = yaml.safe_load(next(tmp_path.glob("runs/synthetic_dlrm/lightning_logs/*/hparams.yaml")).read_text())
    assert "cat_4" in hparams["cardinalities"] and hparams["cardinalities"]["cat_4"] == 200


# ------------------------------------------------------------------------------------------ MovieLens genres


def test_movielens_genres_are_a_list_feature(tmp_path: Path) -> None:
    source = SHARED_DATA / "ml-100k"
    if not source.is_dir():
        pytest.skip(f"{source} is absent: the real sample data lives in ../shared/data beside the repository")
    from data_scripts import movielens

    schema = movielens.prepare_movielens(source, tmp_path / "out")
    assert schema.cardinalities["cat_7"] == 19 and schema.source["features"]["cat_7"] == "genres"
    items = [line.split("|") for line in (source / "u.item").read_text(encoding="latin-1").splitlines()]
    genres = [[g for g, flag in enumerate(r[-19:]) if flag == "1"] for r in items]  # item id k -> row k - 1
    test = pq.read_table(tmp_path / "out" / "test.parquet")
    assert test.schema.field("cat_7").type == pa.list_(pa.int64())
    assert test["cat_7"].to_pylist() == [genres[i] for i in test["cat_1"].to_numpy()]
    train = pq.read_table(tmp_path / "out" / "train.parquet")
    expected = np.bincount(np.concatenate([genres[i] for i in train["cat_1"].to_numpy()]), minlength=19)
    np.testing.assert_array_equal(load_id_counts(tmp_path / "out")["cat_7"], expected)
    dm = CTRDataModule(data_dir=str(tmp_path / "out"), batch_size=1000)
    assert dm.multi_hot == ["cat_7"]
    batch = next(iter(dm.test_dataloader()))
    assert _bags(batch, "cat_7") == [genres[i] for i in test["cat_1"].to_numpy()[:1000]]
    assert _bags(batch, "cat_6") == [[g[0] if g else 0] for g in (genres[i] for i in test["cat_1"].to_numpy()[:1000])]
