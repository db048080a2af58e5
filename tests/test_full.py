"""``full``: parity with TorchRec's EmbeddingBagCollection (plain and fused), id checks, fused training."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

from recsys_embed.methods import SparseOptimizer, build_embedding, dense_parameters, fuse_tables
from recsys_embed.methods.full import Full
from tests.conftest import make_tables, random_kjt


def _ebc_with_same_weights(emb: Full) -> EmbeddingBagCollection:
    ebc = EmbeddingBagCollection(tables=emb.embedding_bag_configs())
    ebc.load_state_dict({k.removeprefix("tables."): v for k, v in emb.state_dict().items()})
    return ebc


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_parity_with_torchrec_ebc(fused: bool) -> None:
    tables = make_tables()
    emb = build_embedding("full", tables)
    ebc = _ebc_with_same_weights(emb)
    if fused:
        assert fuse_tables(emb, SparseOptimizer()) == 1
    kjt = random_kjt(tables, batch=9)
    got, expected = emb(kjt), ebc(kjt)
    assert got.keys() == expected.keys()
    torch.testing.assert_close(got.values(), expected.values())


def test_key_order_of_the_input_does_not_matter() -> None:
    tables = make_tables()
    emb = build_embedding("full", tables)
    kjt = random_kjt(tables, batch=4)
    reordered = kjt.permute([2, 0, 1])
    torch.testing.assert_close(emb(reordered).values(), emb(kjt).values())


def test_fused_step_updates_only_rows_that_were_read() -> None:
    tables = make_tables((10,), dim=4)
    emb = build_embedding("full", tables)
    fuse_tables(emb, SparseOptimizer(name="sgd", lr=0.5))
    before = emb.state_dict()["tables.embedding_bags.t0.weight"].clone()
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([3, 3, 7]), lengths=torch.tensor([2, 1]))
    emb(kjt).values().sum().backward()
    after = emb.state_dict()["tables.embedding_bags.t0.weight"]
    # d(sum)/d(row) = number of reads: row 3 read twice, row 7 once; SGD moves them by -lr * reads
    torch.testing.assert_close(after[3], before[3] - 1.0)
    torch.testing.assert_close(after[7], before[7] - 0.5)
    untouched = [i for i in range(10) if i not in (3, 7)]
    torch.testing.assert_close(after[untouched], before[untouched])


def test_dense_parameters_leave_out_fused_tables() -> None:
    emb = build_embedding("full", make_tables())
    model = torch.nn.ModuleDict({"emb": emb, "head": torch.nn.Linear(3, 1)})
    assert len(dense_parameters(model)) == 2 + 3  # plain tables are dense parameters until fused
    fuse_tables(model, SparseOptimizer())
    assert len(dense_parameters(model)) == 2


def test_sparse_optimizer_errors() -> None:
    with pytest.raises(ValueError, match="Unknown sparse optimizer"):
        SparseOptimizer(name="adamw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        SparseOptimizer(lr=0)
    with pytest.raises(ValueError, match="needs CUDA"):
        fuse_tables(build_embedding("full", make_tables()), SparseOptimizer(name="adam"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0, 7, 1], r"Feature 'f0' has id 7, but it was declared with 7 ids \(0..6\).*schema.json.*OOV"),
        ([0, -1, 1], r"Feature 'f0' \(table 't0'\) has negative id -1"),
    ],
)
def test_ids_outside_the_table_are_errors(values: list[int], message: str) -> None:
    emb = build_embedding("full", make_tables((7, 5), dim=2))
    kjt = KeyedJaggedTensor(keys=["f0", "f1"], values=torch.tensor(values + [1]), lengths=torch.tensor([2, 1, 1, 0]))
    with pytest.raises(ValueError, match=message):
        emb(kjt)


def test_validation_can_be_turned_off_for_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    checked, unchecked = (build_embedding("full", make_tables((7,), dim=2), validate_ids=v) for v in (True, False))
    unchecked.load_state_dict(checked.state_dict())
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([0, 6, 3]), lengths=torch.tensor([2, 1]))
    calls: list[str] = []
    for emb in (checked, unchecked):
        monkeypatch.setattr(emb, "_check_ids", lambda features, emb=emb: calls.append(emb.validate_ids))
    torch.testing.assert_close(unchecked(kjt).values(), checked(kjt).values())
    assert calls == [True]  # the range check ran for the validating module only


def test_mean_pooling_and_weighted_features_are_refused() -> None:
    from torchrec.modules.embedding_configs import PoolingType

    tables = make_tables((7,), dim=4)
    tables[0].pooling = PoolingType.MEAN
    with pytest.raises(ValueError, match="MEAN pooling.*SUM only"):
        build_embedding("full", tables)
    emb = build_embedding("full", make_tables((7,), dim=4))
    weighted = KeyedJaggedTensor(
        keys=["f0"], values=torch.tensor([1, 2]), lengths=torch.tensor([2]), weights=torch.tensor([0.5, 2.0])
    )
    with pytest.raises(ValueError, match="per-id weights"):
        emb(weighted)


def test_missing_feature_key_is_an_error() -> None:
    emb = build_embedding("full", make_tables((7, 5), dim=2))
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([1]), lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"lacks features \['f1'\]"):
        emb(kjt)


def test_float_ids_are_an_error() -> None:
    emb = build_embedding("full", make_tables((7,), dim=2))
    kjt = KeyedJaggedTensor(keys=["f0"], values=torch.tensor([1.0]), lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="int64"):
        emb(kjt)


def test_fused_optimizer_state_round_trips_and_checks_tables() -> None:
    tables = make_tables((10, 20), dim=4)
    source = build_embedding("full", tables)
    fuse_tables(source, SparseOptimizer(name="rowwise_adagrad"))
    source(random_kjt(tables, batch=5)).values().sum().backward()
    state = source.tables.optimizer_state()
    assert set(state) == {"t0.0", "t1.0"} and state["t1.0"].sum() > 0  # row-wise accumulators were updated
    target = build_embedding("full", tables)
    fuse_tables(target, SparseOptimizer(name="rowwise_adagrad"))
    target.tables.load_optimizer_state(state)
    torch.testing.assert_close(target.tables.optimizer_state()["t1.0"], state["t1.0"])
    other = build_embedding("full", tables)
    fuse_tables(other, SparseOptimizer(name="sgd"))
    with pytest.raises(ValueError, match="another sparse optimizer"):
        other.tables.load_optimizer_state(state)


def test_ctr_task_checkpoints_the_fused_optimizer_state() -> None:
    from recsys_embed.training import CTRTask

    task = CTRTask({"cat_0": 10, "cat_1": 20}, 0)
    fuse_tables(task.net, task.sparse_optimizer)
    kjt = KeyedJaggedTensor(keys=["cat_0", "cat_1"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.ones(4).long())
    task.net(torch.zeros(2, 0), kjt).sum().backward()
    checkpoint: dict = {}
    task.on_save_checkpoint(checkpoint)
    saved = checkpoint["fused_optimizer_state"]["net.embedding.tables"]
    assert saved["t_cat_1.0"].sum() > 0
    fresh = CTRTask({"cat_0": 10, "cat_1": 20}, 0)
    fuse_tables(fresh.net, fresh.sparse_optimizer)
    fresh.on_load_checkpoint(checkpoint)
    torch.testing.assert_close(fresh.net.embedding.tables.optimizer_state()["t_cat_1.0"], saved["t_cat_1.0"])
