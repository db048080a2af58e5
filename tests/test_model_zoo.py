"""The CTR model zoo (DLRM, DeepFM, Wide&Deep, DCN, DCN-v2) over every registered method, the cross layers' math,
no per-id parameters outside the embedding, mixed dims, TorchRec's DLRM as a drop-in user, and the shipped YAMLs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM as TorchRecDLRM
from torchrec.modules.deepfm import FactorizationMachine

from recsys_embed.cli import main
from recsys_embed.methods import available_methods, build_embedding
from recsys_embed.models import DCN, DLRM, DCNv2, DeepFM, WideDeep
from recsys_embed.models.cross import dcn_cross, dcnv2_cross
from recsys_embed.models.layers import EmbeddingFields, fm_interaction, mlp
from tests.conftest import UPDATED_IN_BACKWARD, budget_for, make_tables, method_options, random_kjt
from tests.test_cli import TINY

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "ctr"
NUM_DENSE = 3
BATCH = 16

ModelBuilder = Callable[[nn.Module, int], nn.Module]
MODELS: dict[str, ModelBuilder] = {
    "DLRM": lambda emb, nd: DLRM(emb, nd, bottom_mlp=[16], top_mlp=[16]),
    "DeepFM": lambda emb, nd: DeepFM(emb, nd, deep_mlp=(16, 8)),
    "WideDeep": lambda emb, nd: WideDeep(emb, nd, deep_mlp=(16, 8)),
    "DCN": lambda emb, nd: DCN(emb, nd, num_cross_layers=2, deep_mlp=(16, 8)),
    "DCNv2": lambda emb, nd: DCNv2(emb, nd, num_cross_layers=2, deep_mlp=(16, 8)),
}


def build(name: str, tables: list[EmbeddingBagConfig]) -> nn.Module:
    """The registered method ``name`` at ratio 4, with the extra options it needs (e.g. id counts).

    ``full`` builds at ratio 1, and a method that cannot reach ratio 4 on these tiny tables at the ratio the method
    contract test declares for it (one place that lists such exceptions, kept by the method authors).
    """
    budget = budget_for(name)
    return build_embedding(name, tables, budget=budget, **method_options(name, tables))


def fixed_batch(
    tables: list[EmbeddingBagConfig], num_dense: int = NUM_DENSE, batch: int = BATCH, seed: int = 0
) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, num_dense, generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g).float()
    return dense, random_kjt(tables, batch=batch, seed=seed), labels


def own_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's parameters outside its embedding module."""
    return {n: p for n, p in model.named_parameters() if not n.startswith("embedding.")}


# ---- every registered method x every model ------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", available_methods())
def test_every_model_trains_over_every_method(method: str, model_name: str) -> None:
    torch.manual_seed(0)
    tables = make_tables()
    embedding = build(method, tables)
    model = MODELS[model_name](embedding, NUM_DENSE)
    dense, kjt, labels = fixed_batch(tables)

    logits = model(dense, kjt)
    assert logits.shape == (BATCH,)
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    rows_before = {k: v.clone() for k, v in embedding.state_dict().items()}
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert set(own_parameters(model)) <= set(grads), "every dense parameter gets a gradient"
    if method in UPDATED_IN_BACKWARD:  # its rows were updated inside backward
        assert any(not torch.equal(v, rows_before[k]) for k, v in embedding.state_dict().items()), "rows updated"
    else:
        assert any(n.startswith("embedding.") for n in grads), "the embedding gets a gradient"

    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):  # the model can fit one fixed batch: the loss must fall, not merely change
        optimizer.step()
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(model(dense, kjt), labels).backward()
    with torch.no_grad():
        after = F.binary_cross_entropy_with_logits(model(dense, kjt), labels)
    assert torch.isfinite(after) and after < 0.8 * loss.detach()


@pytest.mark.parametrize("model_name", list(MODELS))
def test_no_dense_features_and_a_plain_torchrec_ebc(model_name: str) -> None:
    tables = make_tables()
    _, kjt, _ = fixed_batch(tables)
    for embedding in (build_embedding("full", tables), EmbeddingBagCollection(tables=tables)):
        model = MODELS[model_name](embedding, 0)
        assert model(torch.zeros(BATCH, 0), kjt).shape == (BATCH,)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_no_parameter_per_id_outside_the_embedding(model_name: str) -> None:
    """First-order / wide terms come from the embeddings: no hidden per-id table (it would escape the budget)."""
    cards = (997, 1009, 1013)  # match no other size in the models
    model = MODELS[model_name](build_embedding("full", make_tables(cards)), NUM_DENSE)
    for name, param in own_parameters(model).items():
        assert not set(param.shape) & set(cards), f"{name} {tuple(param.shape)} has a per-id dimension"


# ---- DCN-v2 variants and the cross layers -------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["stacked", "parallel"])
@pytest.mark.parametrize("low_rank", [None, 3])
def test_dcnv2_variants(low_rank: int | None, structure: str) -> None:
    tables = make_tables()
    dense, kjt, labels = fixed_batch(tables)
    model = DCNv2(build_embedding("full", tables), NUM_DENSE, low_rank=low_rank, structure=structure, deep_mlp=(8,))
    d = 3 * 8 + NUM_DENSE
    per_layer = d * d + d if low_rank is None else 2 * d * low_rank + d
    assert sum(p.numel() for p in model.cross.parameters()) == 3 * per_layer
    head_in = 8 if structure == "stacked" else d + 8
    assert model.head.in_features == head_in
    loss = F.binary_cross_entropy_with_logits(model(dense, kjt), labels)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.cross.parameters())


def test_dcnv2_cross_only_and_bad_options() -> None:
    tables = make_tables()
    dense, kjt, _ = fixed_batch(tables)
    cross_only = DCNv2(build_embedding("full", tables), NUM_DENSE, structure="stacked", deep_mlp=())
    assert cross_only.head.in_features == 3 * 8 + NUM_DENSE
    assert cross_only(dense, kjt).shape == (BATCH,)
    with pytest.raises(ValueError, match="structure"):
        DCNv2(build_embedding("full", tables), NUM_DENSE, structure="serial")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="low_rank"):
        DCNv2(build_embedding("full", tables), NUM_DENSE, low_rank=0)
    with pytest.raises(ValueError, match="num_cross_layers"):
        DCN(build_embedding("full", tables), NUM_DENSE, num_cross_layers=0)


def _set(param: torch.Tensor, values: list) -> None:
    with torch.no_grad():
        param.copy_(torch.tensor(values, dtype=param.dtype))


def test_cross_v1_matches_a_hand_computation() -> None:
    cross = dcn_cross(2, num_layers=2)  # TorchRec's VectorCrossNet
    _set(cross.kernels[0], [[0.5], [-1.0]])
    _set(cross.bias[0], [[0.1], [0.2]])
    _set(cross.kernels[1], [[1.0], [1.0]])
    _set(cross.bias[1], [[0.0], [0.0]])
    # x0 = [1, 2]: x0.w0 = -1.5 -> x1 = x0 * -1.5 + b0 + x0 = [-0.4, -0.8]; x1.w1 = -1.2 -> x2 = [-1.6, -3.2]
    got = cross(torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    torch.testing.assert_close(got, torch.tensor([[-1.6, -3.2], [0.1, 0.2]]))


def test_cross_v2_full_and_low_rank_match_hand_computations() -> None:
    full = dcnv2_cross(2, num_layers=2)  # TorchRec's CrossNet
    _set(full.kernels[0], [[1.0, 0.0], [2.0, -1.0]])
    _set(full.bias[0], [[0.5], [0.0]])
    _set(full.kernels[1], [[1.0, 0.0], [0.0, 1.0]])
    _set(full.bias[1], [[0.0], [0.0]])
    # x0 = [1, 2]: W0 x0 + b0 = [1.5, 0] -> x1 = x0 * [1.5, 0] + x0 = [2.5, 2]; W1 x1 = x1 -> x2 = x0 * x1 + x1 = [5, 6]
    torch.testing.assert_close(full(torch.tensor([[1.0, 2.0]])), torch.tensor([[5.0, 6.0]]))

    low = dcnv2_cross(2, num_layers=1, low_rank=1)  # TorchRec's LowRankCrossNet
    _set(low.V_kernels[0], [[1.0, 1.0]])  # V^T
    _set(low.W_kernels[0], [[2.0], [-1.0]])  # U
    _set(low.bias[0], [0.0, 1.0])
    # V^T x0 = 3 -> U 3 + b = [6, -2] -> x1 = x0 * [6, -2] + x0 = [7, -2]
    torch.testing.assert_close(low(torch.tensor([[1.0, 2.0]])), torch.tensor([[7.0, -2.0]]))


def test_low_rank_cross_equals_full_rank_with_w_equal_u_v_transpose() -> None:
    torch.manual_seed(0)
    low = dcnv2_cross(5, num_layers=2, low_rank=2)
    full = dcnv2_cross(5, num_layers=2)
    with torch.no_grad():
        for layer in range(2):
            full.kernels[layer].copy_(low.W_kernels[layer] @ low.V_kernels[layer])
            full.bias[layer].copy_(low.bias[layer].unsqueeze(1))
    x0 = torch.randn(4, 5)
    torch.testing.assert_close(low(x0), full(x0))


def _linear_cross(x0: torch.Tensor, layers: list[nn.Module]) -> torch.Tensor:
    """The cross networks as this project computed them before TorchRec's: ``x = x0 * layer(x) + x``."""
    x = x0
    for layer in layers:
        x = x0 * layer(x) + x
    return x


@pytest.mark.parametrize("low_rank", [None, 3])
def test_torchrec_cross_v2_starts_and_computes_as_the_earlier_linear_layers(low_rank: int | None) -> None:
    """Same seed, same numbers: the TorchRec module draws nn.Linear's init in nn.Linear's order (so seeded runs keep
    their figures) and computes the same outputs as the earlier Linear-based layers with those weights."""
    torch.manual_seed(3)
    cross = dcnv2_cross(7, num_layers=2, low_rank=low_rank)
    after_cross = torch.rand(1)
    torch.manual_seed(3)
    if low_rank is None:
        layers = [nn.Linear(7, 7) for _ in range(2)]
        assert all(torch.equal(cross.kernels[i], layer.weight) for i, layer in enumerate(layers))
        assert all(torch.equal(cross.bias[i].squeeze(1), layer.bias) for i, layer in enumerate(layers))
    else:
        layers = [nn.Sequential(nn.Linear(7, low_rank, bias=False), nn.Linear(low_rank, 7)) for _ in range(2)]
        for i, (down, up) in enumerate(layers):
            assert torch.equal(cross.V_kernels[i], down.weight) and torch.equal(cross.W_kernels[i], up.weight)
            assert torch.equal(cross.bias[i], up.bias)
    assert torch.equal(torch.rand(1), after_cross)  # the generator is where the earlier layers left it
    x0 = torch.randn(5, 7)
    torch.testing.assert_close(cross(x0), _linear_cross(x0, layers))


def test_torchrec_cross_v1_starts_and_computes_as_the_earlier_vectors() -> None:
    torch.manual_seed(3)
    cross = dcn_cross(6, num_layers=2)
    torch.manual_seed(3)
    weights = [torch.empty(6).uniform_(-(6**-0.5), 6**-0.5) for _ in range(2)]
    assert all(torch.equal(cross.kernels[i].squeeze(1), w) for i, w in enumerate(weights))
    assert all(torch.equal(b, torch.zeros(6, 1)) for b in cross.bias)
    with torch.no_grad():
        cross.bias[1].fill_(0.3)
    x0 = torch.randn(5, 6)
    x = x0
    for w, b in zip(weights, [0.0, 0.3]):  # DCN: x0 * (x . w) + b + x
        x = x0 * (x @ w).unsqueeze(1) + b + x
    torch.testing.assert_close(cross(x0), x)


def test_deepfm_fm_part_is_the_pairwise_sum_over_fields_and_the_dense_field() -> None:
    torch.manual_seed(0)
    tables = make_tables()
    dense, kjt, _ = fixed_batch(tables, batch=4)
    model = DeepFM(build_embedding("full", tables), NUM_DENSE, deep_mlp=(4,))
    with torch.no_grad():  # keep only the FM's second-order term
        for p in [*model.wide.parameters(), *model.deep[-1].parameters()]:
            p.zero_()
    emb = model.embedding(kjt)
    vectors = [emb[k] for k in model.fields.keys] + [dense @ model.dense_field.linear.weight.T]
    expected = sum((vectors[i] * vectors[j]).sum(1) for i in range(4) for j in range(i + 1, 4))
    torch.testing.assert_close(model(dense, kjt), expected)
    torch.testing.assert_close(fm_interaction(torch.stack(vectors, 1)), expected)


# ---- mixed embedding dims -----------------------------------------------------------------------------------------
def mixed_tables() -> list[EmbeddingBagConfig]:
    return make_tables((7, 50), dim=4) + [
        EmbeddingBagConfig(name="t9", num_embeddings=30, embedding_dim=8, feature_names=["g"])
    ]


def test_deepfm_rejects_mixed_dims_naming_them_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"DeepFM needs one embedding_dim.*\[4, 8\].*same embedding_dim"):
        DeepFM(build_embedding("full", mixed_tables()), NUM_DENSE)
    with pytest.raises(ValueError, match="one embedding_dim"):
        DLRM(build_embedding("full", mixed_tables()), NUM_DENSE)


@pytest.mark.parametrize("model_name", ["WideDeep", "DCN", "DCNv2"])
def test_concatenating_models_accept_mixed_dims(model_name: str) -> None:
    tables = mixed_tables()
    dense, kjt, _ = fixed_batch(tables, batch=5)
    model = MODELS[model_name](build_embedding("full", tables), NUM_DENSE)
    assert EmbeddingFields.of(model.embedding).total_dim == 16
    assert model(dense, kjt).shape == (5,)


def test_fm_term_is_not_torchrecs_factorization_machine() -> None:
    """Why DeepFM keeps :func:`fm_interaction`: TorchRec's FM sums the products of all F*D scalars, not field pairs."""
    vectors = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])  # one row, F = 2 fields, D = 2
    torch.testing.assert_close(fm_interaction(vectors), torch.tensor([1.0 * 3.0 + 2.0 * -1.0]))  # <v_1, v_2> = 1
    scalars = [1.0, 2.0, 3.0, -1.0]
    all_pairs = sum(scalars[i] * scalars[j] for i in range(4) for j in range(i + 1, 4))  # = -1
    torch.testing.assert_close(FactorizationMachine()([vectors]), torch.tensor([[all_pairs]]))


def test_mlp_layer_order_and_identity() -> None:
    """:func:`mlp` (the deep towers; TorchRec's MLP has no batch norm or dropout) keeps its layer order."""
    assert [type(m) for m in mlp(4, [3, 2], last_activation=False)] == [nn.Linear, nn.ReLU, nn.Linear]
    layers = [type(m) for m in mlp(4, [3, 2], dropout=0.1, batch_norm=True, last_activation=False)]
    assert layers == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    x = torch.randn(2, 4)
    assert torch.equal(mlp(4, [])(x), x)


# ---- a TorchRec model as the user of a recsys_embed method -------------------------------------------------------
@pytest.mark.parametrize("method", available_methods())
def test_torchrec_dlrm_trains_on_a_method_as_its_embedding_bag_collection(method: str) -> None:
    torch.manual_seed(0)
    tables = make_tables()
    model = TorchRecDLRM(
        embedding_bag_collection=build(method, tables),
        dense_in_features=NUM_DENSE,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
    )
    dense, kjt, labels = fixed_batch(tables, batch=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(dense, kjt).squeeze(1), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---- the shipped configs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    run_dir = f"runs/{config.stem}"
    assert resolved["trainer"]["default_root_dir"] == run_dir
    assert {logger["init_args"]["save_dir"] for logger in resolved["trainer"]["logger"]} == {run_dir}


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("synthetic_*.yaml")), ids=lambda p: p.stem)
def test_synthetic_configs_fit_a_few_steps(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(config), *TINY, "--data.batch_size=1000", "--trainer.log_every_n_steps=1"])
    metrics = next(tmp_path.glob(f"runs/{config.stem}/lightning_logs/*/metrics.csv")).read_text()
    assert "train/loss" in metrics.splitlines()[0] and "val/auc" in metrics.splitlines()[0]
    run = tmp_path / "runs" / config.stem
    # a one-stage method checkpoints in its run folder; a staged one (optembed) per stage under stages/
    assert list(run.glob("**/checkpoints/last.ckpt")) or list(run.glob("stages/*/final.ckpt"))
