"""``quant``: fixed-point rows (round trip, stochastic rounding), the update in backward, budget and option errors."""

from __future__ import annotations

import math

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.methods import Budget, SparseOptimizer, build_embedding
from recsys_embed.methods.fused import fuse_tables
from recsys_embed.methods.low_precision import dequantise, int_range, quantise, stochastic_round
from recsys_embed.methods.row_pruning import initial_rows
from recsys_embed.methods.storage import TableOptions
from tests.conftest import make_tables, random_kjt


@pytest.mark.parametrize("bits", [8, 16])
def test_round_trip_is_within_half_a_step(bits: int) -> None:
    step = 1.0 / 2 ** (bits - 1)
    w = torch.empty(10_000).uniform_(-1.0, 1.0 - step, generator=torch.Generator().manual_seed(0))
    q = quantise(w, step, bits, stochastic=False)
    assert q.dtype == (torch.int8 if bits == 8 else torch.int16)
    assert (dequantise(q, step) - w).abs().max() <= step / 2 + 1e-7
    beyond = quantise(torch.tensor([5.0, -5.0]), step, bits, stochastic=False)
    assert beyond.tolist() == [int_range(bits)[1], int_range(bits)[0]]  # saturates at the clip


def test_stochastic_rounding_is_unbiased_and_takes_both_neighbours() -> None:
    """Mean of 200k draws within 5 standard errors of x (a statistical check: fails if rounding were biased)."""
    torch.manual_seed(0)
    draws = 200_000
    for x in (0.1, 0.5, 2.75, -1.3):
        rounded = stochastic_round(torch.full((draws,), x))
        low = math.floor(x)
        assert set(rounded.unique().tolist()) == {low, low + 1}
        p = x - low
        standard_error = (p * (1 - p) / draws) ** 0.5
        assert abs(rounded.mean().item() - x) < 5 * standard_error
    assert torch.equal(stochastic_round(torch.tensor([3.0, -2.0])), torch.tensor([3.0, -2.0]))  # integers stay


def one_row_kjt(row: int) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=["f0"], values=torch.tensor([row]), lengths=torch.tensor([1]), stride=1)


def test_backward_writes_the_fp32_sgd_step_back_with_stochastic_rounding() -> None:
    """Known answer: with SGD, the stored row becomes ``w - lr * g`` rounded to one of its two neighbouring steps,
    and over many repeats its mean is ``w - lr * g`` (the update is unbiased although it is below one step)."""
    tables = [EmbeddingBagConfig(name="t", num_embeddings=4, embedding_dim=8, feature_names=["f0"])]
    emb = build_embedding("quant", tables, bits=8, rows_optimizer="sgd", rows_lr=0.001)
    step = emb.fixed_step
    w = emb.dequantised(0, torch.tensor([1]))[0].clone()
    expected = w - 0.001 * torch.ones(8)  # d(sum of the row)/d(row) = 1: a change of 0.128 steps
    torch.manual_seed(0)
    results = []
    for _ in range(2000):
        emb.rows.t0[1] = quantise(w, step, 8, stochastic=False)
        emb(one_row_kjt(1)).values().sum().backward()
        results.append(emb.dequantised(0, torch.tensor([1]))[0].clone())
    got = torch.stack(results)
    assert ((got - expected).abs() < step + 1e-7).all()
    assert torch.allclose(got.mean(0), expected, atol=4 * step * (0.128 * 0.872 / 2000) ** 0.5)
    assert torch.equal(emb.rows.t0[0], quantise(emb.dequantised(0, torch.tensor([0]))[0], step, 8, stochastic=False))


def test_budget_picks_the_bits_and_reaches_exactly_4x_or_2x() -> None:
    tables = make_tables()
    eight = build_embedding("quant", tables, budget=Budget(ratio=3))
    sixteen = build_embedding("quant", tables, budget=Budget(ratio=1.2))
    assert (eight.bits, eight.compression_ratio()) == (8, 4.0)
    assert (sixteen.bits, sixteen.compression_ratio()) == (16, 2.0)
    served = eight.to_serving()
    assert {k: v.dtype for k, v in served.state_dict().items()} == {f"rows.t{i}": torch.int8 for i in range(3)}


def test_options_and_budgets_it_cannot_meet_are_one_clear_error() -> None:
    tables = make_tables()
    with pytest.raises(ValueError, match=r"'quant' cannot fit .* ratio 4 \(\d+ bytes\) or 2 .* at most 4"):
        build_embedding("quant", tables, budget=Budget(ratio=4.5))
    with pytest.raises(ValueError, match="bits must be 8 or 16 \\(got 4\\)"):
        build_embedding("quant", tables, bits=4)
    with pytest.raises(ValueError, match="clip must be positive"):
        build_embedding("quant", tables, clip=0.0)
    with pytest.raises(ValueError, match="rows_lr positive"):
        build_embedding("quant", tables, rows_lr=-1.0)
    with pytest.raises(ValueError, match="'int8' needs method_owned=True"):
        TableOptions(precision="int8")


def test_training_mode_updates_eval_mode_does_not() -> None:
    emb = build_embedding("quant", make_tables(), bits=8)
    kjt = random_kjt(make_tables(), batch=8, seed=1)
    before = {k: v.clone() for k, v in emb.rows.state_dict().items()}
    with torch.no_grad():
        emb(kjt)
    emb.eval()
    assert not emb(kjt).values().requires_grad  # eval: no update hook on the rows
    assert all(torch.equal(before[k], v) for k, v in emb.rows.state_dict().items())
    emb.train()
    emb(kjt).values().pow(2).sum().backward()
    assert any(not torch.equal(before[k], v) for k, v in emb.rows.state_dict().items())


def test_16_bit_training_tracks_fbgemm_fused_rowwise_adagrad() -> None:
    """Parity: from the same rows, five steps of ``quant`` (16 bits) and of fused ``full`` (fbgemm's row-wise
    Adagrad, the same lr) give the same outputs up to a few quantisation steps."""
    tables = make_tables()
    full = build_embedding("full", tables)
    quant = build_embedding("quant", tables, bits=16, rows_lr=0.05)
    with torch.no_grad():
        for i, t in enumerate(tables):
            weight = full.state_dict()[f"tables.embedding_bags.{t.name}.weight"]
            weight.copy_(quant.dequantised(i, torch.arange(t.num_embeddings)))
    probe = random_kjt(tables, 64, seed=99)
    with torch.no_grad():
        before = full(probe).values()
    fuse_tables(full, SparseOptimizer(name="rowwise_adagrad", lr=0.05))
    target = torch.randn(32, 24, generator=torch.Generator().manual_seed(0))
    for step in range(5):
        kjt = random_kjt(tables, 32, seed=step)
        for emb in (full, quant):
            (emb(kjt).values() - target).pow(2).sum().backward()
    full.eval(), quant.eval()
    with torch.no_grad():
        after = full(probe).values()
        gap = (after - quant(probe).values()).abs().max().item()
    assert gap < 10 * quant.fixed_step  # a few steps of 1/32768 per pooled value
    assert (after - before).abs().max().item() > 1000 * quant.fixed_step  # while training moved them far more


def test_training_on_several_processes_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Method-owned integer rows are neither sharded nor synchronised: a multi-process fit would let ranks drift."""
    import recsys_embed.methods.low_precision as low_precision

    emb = build_embedding("quant", make_tables(), bits=8)
    kjt = random_kjt(make_tables(), batch=4)
    monkeypatch.setattr(low_precision.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(low_precision.dist, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="'quant' updates its integer rows in each process alone.*on one process"):
        emb(kjt)
    emb.eval()
    assert emb(kjt).values().shape == (4, 24)  # serving on several processes is fine


@pytest.mark.parametrize("name", ["quant", "alpt"])
def test_a_large_table_does_not_start_at_zero(name: str) -> None:
    """A 100k-row table's initial values (|w| <= 1/sqrt(n) = 0.0032) are below half an 8-bit step (1/256): rounded
    to nearest they would all be 0, and a dot-product model could never move them. Rounded stochastically they
    keep the initial magnitude on average."""
    table = [EmbeddingBagConfig(name="t0", num_embeddings=100_000, embedding_dim=8, feature_names=["f0"])]
    emb = build_embedding(name, table, bits=8)
    rows = emb.table_rows(0)
    assert 0.2 < float((rows != 0).float().mean()) < 0.6
    initial = initial_rows(table[0], 0, 0)
    step = emb.step(0, torch.arange(100_000))
    assert float(dequantise(rows, step).abs().mean()) == pytest.approx(float(initial.abs().mean()), rel=0.02)
    assert torch.equal(build_embedding(name, table, bits=8).table_rows(0), rows)  # seeded: the same rows again
