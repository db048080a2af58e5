"""``alpt``: learnt step sizes (LSQ gradient, their direction, that they change in training), memory, budgets."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from recsys_embed.methods import Budget, build_embedding
from recsys_embed.methods.alpt import alpt_bytes, lsq_step_gradient
from tests.conftest import make_tables, random_kjt


def test_lsq_step_gradient_known_answers() -> None:
    step = torch.tensor(0.5)
    w = torch.tensor([0.6, -0.2, 100.0, -100.0])  # w / step = 1.2, -0.4, beyond 127, beyond -128
    got = lsq_step_gradient(w, step, torch.ones(4), bits=8)
    torch.testing.assert_close(got, torch.tensor([1.0 - 1.2, 0.0 + 0.4, 127.0, -128.0]))


@pytest.mark.parametrize("step_size", ["row", "table"])
def test_step_sizes_change_in_training_and_only_for_rows_read(step_size: str) -> None:
    tables = make_tables()
    emb = build_embedding("alpt", tables, bits=8, step_size=step_size, step_lr=0.1)
    start = emb.steps.t2.clone()
    kjt = random_kjt(tables, batch=16, seed=3, allow_empty=False)
    for _ in range(5):
        emb(kjt).values().pow(2).sum().backward()
    changed = (emb.steps.t2 != start).squeeze(1)
    assert changed.any()
    if step_size == "row":
        read = torch.zeros_like(changed)
        read[kjt["f2"].values()] = True
        assert torch.equal(changed, read)  # a row's step size moves only when the row is read


def test_saturated_rows_grow_their_step_size() -> None:
    """A row pulled far beyond what its step can hold (``clip``) gets a larger step (the LSQ gradient's sign)."""
    tables = [EmbeddingBagConfig(name="t", num_embeddings=3, embedding_dim=4, feature_names=["f"])]
    emb = build_embedding("alpt", tables, bits=8, clip=0.1, step_lr=0.1)
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([0]), lengths=torch.tensor([1]), stride=1)
    start = emb.steps.t0.clone()
    for _ in range(50):
        (emb(kjt).values() - 5.0).pow(2).sum().backward()  # target 5 per value, far above 0.1
    assert emb.steps.t0[0] > 1.5 * start[0]
    assert torch.equal(emb.steps.t0[1:], start[1:])
    assert emb.dequantised(0, torch.tensor([0])).min() > 0.1  # the row now holds values past the initial clip


@pytest.mark.parametrize(("step_size", "ratio"), [("row", 3.2), ("table", 4.0)])
def test_memory_is_int_rows_plus_fp32_steps(step_size: str, ratio: float) -> None:
    tables = make_tables(dim=16)
    emb = build_embedding("alpt", tables, bits=8, step_size=step_size)
    served = emb.to_serving()
    stored = sum(v.numel() * v.element_size() for v in served.state_dict().values())
    assert stored == emb.memory_bytes() == alpt_bytes(tables, 8, step_size)
    assert emb.compression_ratio() == pytest.approx(ratio, rel=1e-3)
    assert emb.compression_ratio() <= ratio


def test_budget_picks_the_bits_or_says_what_it_reaches() -> None:
    tables = make_tables(dim=16)
    assert build_embedding("alpt", tables, budget=Budget(ratio=1.5)).bits == 16
    assert build_embedding("alpt", tables, budget=Budget(ratio=3)).bits == 8
    assert build_embedding("alpt", tables, budget=Budget(ratio=3.9), step_size="table").bits == 8
    with pytest.raises(ValueError, match=r"'alpt' cannot fit .*per row .*ratio 3\.20.*step_size='table'"):
        build_embedding("alpt", tables, budget=Budget(ratio=3.5))
    with pytest.raises(ValueError, match="step_size='column' .* must be one of 'row', 'table'"):
        build_embedding("alpt", tables, step_size="column")
    with pytest.raises(ValueError, match="bits must be 8 or 16"):
        build_embedding("alpt", tables, bits=2)


def test_served_form_equals_trained_eval_outputs_after_training() -> None:
    tables = make_tables()
    emb = build_embedding("alpt", tables, bits=8)
    kjt = random_kjt(tables, batch=16, seed=4)
    for _ in range(3):
        emb(kjt).values().pow(2).sum().backward()
    served = emb.to_serving()
    emb.eval()
    assert torch.equal(served(kjt).values(), emb(kjt).values())
    assert set(served.state_dict()) == {f"{part}.t{i}" for part in ("rows", "steps") for i in range(3)}
