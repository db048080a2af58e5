"""One rank of the sharding tests (``tests/test_sharding.py`` starts it once per rank, like ``torchrun``).

``python tests/sharded_worker.py DATA_DIR OUT_DIR [--load CKPT_DIR] [--memory-cap BYTES]`` with ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` set. For each method in ``METHODS`` it trains
``STEPS`` steps (plain fused tables on one process, the ``torchrec`` strategy on several), recording the global
loss of every step, and writes on rank 0: ``{method}.losses.json``, ``{method}.ckpt`` (the final checkpoint) and
``{method}.preds.pt`` (predictions on the first validation batch). With ``--load`` it also restores
``CKPT_DIR/{method}.ckpt`` through the strategy and writes ``{method}.loaded_preds.pt``, then resumes ``fit`` from
it at its last step (nothing to train) and saves ``{method}.resumed.ckpt``. With ``--memory-cap`` it
only plans (an impossible cap) and writes each rank's error to ``plan_error.{rank}.txt``. With ``--forward-all``
it shards every registered method (no training) and writes, per method, the largest difference between its sharded
and unsharded outputs to ``forward_diff.json``.

Every training run (no ``--memory-cap`` or ``--forward-all``) also trains :class:`MixedStorage`, a test-only method
(never registered) with pooled, unpooled and fp16 tables and an optimizer override, in a plain loop: ``MIXED_STEPS``
steps (fused tables on one process, :func:`shard_model` on several), writing on rank 0 ``mixed.losses.json``,
``mixed.state.pt`` (consolidated weights and fused optimizer state) and ``mixed.preds.pt``. On several processes it
first shards the method under each request of ``MIXED_SHARDING`` and writes the differences to its unsharded forms
and the plan to ``mixed.forward.json``; with ``--load`` it restores ``CKPT_DIR/mixed.state.pt`` into fresh shards and
writes ``mixed.loaded.pt`` (predictions and the optimizer state gathered back).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagConfig, EmbeddingConfig, JaggedTensor, KeyedJaggedTensor, KeyedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys_embed.data import CTRDataModule  # noqa: E402
from recsys_embed.methods import Budget, SparseOptimizer, available_methods, build_embedding  # noqa: E402
from recsys_embed.methods.base import EmbeddingMethod  # noqa: E402
from recsys_embed.methods.fused import FusedTables, dense_parameters, fuse_tables  # noqa: E402
from recsys_embed.methods.storage import TableOptions  # noqa: E402
from recsys_embed.training import CTRTask, EmbeddingSpec, ShardingPlanError, TorchRecStrategy, shard_model  # noqa: E402
from recsys_embed.training.sharding import (  # noqa: E402
    consolidated_optimizer_state,
    consolidated_state_dict,
    load_sharded_optimizer_state,
    load_sharded_state,
)
from tests.conftest import budget_for, make_tables, method_options, random_kjt  # noqa: E402

METHODS = {"full": None, "qr": Budget(ratio=4), "unified": Budget(ratio=4)}
STEPS = 8
BATCH = 256  # global batch; each of N ranks gets BATCH / N rows
MIXED_TABLES = (7, 50, 3000, 400, 120)
MIXED_STEPS = 4
MIXED_BATCH = 32  # global batch of the mixed-storage loop
MIXED_OPTIMIZER = SparseOptimizer(lr=0.1)  # the run's; the unpooled group overrides it
#: sharding requests of the mixed forward check (the last: unpooled row-wise, pooled table-column-wise)
MIXED_SHARDING = {
    "table_wise": ["table_wise"],
    "column_wise": ["column_wise"],
    "row_wise": ["row_wise", "table_column_wise"],
}


class MixedStorage(EmbeddingMethod):
    """Test-only method (never registered): each storage kind the sharding path must handle, over >= 4 tables.

    The first tables are pooled fp32 rows trained by the run's sparse optimizer; the two before the last are
    unpooled (a TorchRec ``EmbeddingCollection``) with their own optimizer (element-wise Adagrad), their bags summed
    here; the last is pooled fp16 rows without stochastic rounding (deterministic, so one and two processes agree).
    """

    def __init__(self, tables: Sequence[EmbeddingBagConfig], *, device: str | torch.device | None = None) -> None:
        super().__init__(tables)
        if len(self._tables) < 4:
            raise ValueError(f"MixedStorage needs at least 4 tables (got {len(self._tables)}).")
        bags, seq, half = self._tables[:-3], self._tables[-3:-1], self._tables[-1:]
        sequence = [
            EmbeddingConfig(
                name=t.name,
                num_embeddings=t.num_embeddings,
                embedding_dim=t.embedding_dim,
                feature_names=list(t.feature_names),
            )
            for t in seq
        ]
        self.bags = self.add_tables("bags", bags, device=device)
        own = TableOptions(optimizer=SparseOptimizer(name="adagrad", lr=0.2))
        self.seq = self.add_tables("seq", sequence, pooled=False, options=own, device=device)
        low = TableOptions(precision="fp16", stochastic_rounding=False)
        self.low = self.add_tables("low", half, options=low, device=device)
        self._split = [sum(len(t.feature_names) for t in group) for group in (bags, seq, half)]

    def lookup(self, features: KeyedJaggedTensor) -> KeyedTensor:
        bags, seq, half = features.split(self._split)
        rows = self.seq(seq)
        batch = features.stride()
        summed = []
        for key in seq.keys():
            jagged = rows[key]
            owner = torch.arange(batch, device=jagged.values().device).repeat_interleave(jagged.lengths())
            total = torch.zeros(batch, jagged.values().shape[1], device=owner.device)
            summed.append(total.index_add(0, owner, jagged.values().float()))
        values = torch.cat([self.bags(bags).values().float(), *summed, self.low(half).values().float()], dim=1)
        return KeyedTensor(keys=self._feature_names, length_per_key=self._length_per_key, values=values)

    def memory_bytes(self) -> int:
        return sum(s.bytes() for s in self.storage())


class MixedNet(nn.Module):
    """MixedStorage and a linear head: ``KJT -> logits``."""

    def __init__(self, tables: Sequence[EmbeddingBagConfig]) -> None:
        super().__init__()
        self.emb = MixedStorage(tables)
        self.head = nn.Linear(sum(t.embedding_dim for t in tables), 1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.emb(features).values()).squeeze(-1)


def bag_rows(features: KeyedJaggedTensor, start: int, stop: int) -> KeyedJaggedTensor:
    """Bags ``start:stop`` of every feature (one rank's share of a global batch)."""
    parts = {}
    for key, jagged in features.to_dict().items():
        offsets = jagged.offsets()
        values = jagged.values()[int(offsets[start]) : int(offsets[stop])]
        parts[key] = JaggedTensor(values=values, lengths=jagged.lengths()[start:stop])
    return KeyedJaggedTensor.from_jt_dict(parts)


def mixed_batch(tables: list[EmbeddingBagConfig], seed: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    labels = torch.randint(0, 2, (MIXED_BATCH,), generator=torch.Generator().manual_seed(seed)).float()
    return random_kjt(tables, MIXED_BATCH, seed=seed), labels


def mixed_net(tables: list[EmbeddingBagConfig]) -> MixedNet:
    torch.manual_seed(0)
    return MixedNet(tables)


def mixed_forward_checks(tables: list[EmbeddingBagConfig]) -> dict[str, dict[str, object]]:
    """Per sharding request: sharded forward against the plain and the fused unsharded forms, and the plan."""
    features = random_kjt(tables, 16, seed=99)
    results = {}
    for name, request in MIXED_SHARDING.items():
        plain = mixed_net(tables)
        seq_features = features.split(plain.emb._split)[1]
        seq_keys = seq_features.keys()
        fused = copy.deepcopy(plain)
        fuse_tables(fused, MIXED_OPTIMIZER)
        with torch.no_grad():
            expected, expected_fused = plain(features), fused(features)
            expected_rows = plain.emb.seq(seq_features)
            sharded = shard_model(
                mixed_net(tables), MIXED_OPTIMIZER, device=torch.device("cpu"), sharding_types=request
            )
            got = sharded(features)
            rows = sharded.module.emb.seq(seq_features)
        results[name] = {
            "vs_plain": float((got - expected).abs().max()),
            "vs_fused": float((got - expected_fused).abs().max()),
            "seq_keys": list(rows.keys()) == seq_keys,
            "seq_rows": max(float((rows[k].values() - expected_rows[k].values()).abs().max()) for k in seq_keys),
            "seq_lengths": all(torch.equal(rows[k].lengths(), expected_rows[k].lengths()) for k in seq_keys),
            "plan": {
                f"{path}.{table}": sharding.sharding_type
                for path, tables_plan in sharded.plan.plan.items()
                for table, sharding in tables_plan.items()  # type: ignore[union-attr]
            },
        }
    return results


def fused_optimizer_state(net: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The fused optimizer state of a model on one process or sharded (the checkpoint layout)."""
    if isinstance(net, DistributedModelParallel):
        return consolidated_optimizer_state(net)
    return {name: m.optimizer_state() for name, m in net.named_modules() if isinstance(m, FusedTables)}


def mixed_run(world: int, rank: int, out_dir: Path, load: Path | None) -> None:
    """Train MixedStorage ``MIXED_STEPS`` steps (see the module docstring) and write its results on rank 0."""
    tables = make_tables(MIXED_TABLES)
    if world > 1:
        checks = mixed_forward_checks(tables)
        if rank == 0:
            (out_dir / "mixed.forward.json").write_text(json.dumps(checks))
    net: nn.Module = mixed_net(tables)
    if world > 1:
        net = shard_model(net, MIXED_OPTIMIZER, device=torch.device("cpu"))
    else:
        fuse_tables(net, MIXED_OPTIMIZER)
    dense = torch.optim.SGD(dense_parameters(net), lr=0.1)
    share = MIXED_BATCH // world
    losses = []
    for step in range(MIXED_STEPS):
        features, labels = mixed_batch(tables, seed=step)
        local = slice(rank * share, (rank + 1) * share)
        loss = F.binary_cross_entropy_with_logits(net(bag_rows(features, local.start, local.stop)), labels[local])
        dense.zero_grad()
        loss.backward()
        dense.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total) / world)
    held_out = random_kjt(tables, 16, seed=1234)
    with torch.no_grad():
        preds = net(held_out)
    state = {"weights": consolidated_state_dict(net), "optimizer": fused_optimizer_state(net)}
    if rank == 0:
        (out_dir / "mixed.losses.json").write_text(json.dumps(losses))
        torch.save(state, out_dir / "mixed.state.pt")
        torch.save(preds, out_dir / "mixed.preds.pt")
    if load is not None and world > 1:
        saved = torch.load(load / "mixed.state.pt")
        restored = shard_model(mixed_net(tables), MIXED_OPTIMIZER, device=torch.device("cpu"))
        load_sharded_state(restored, saved["weights"])
        load_sharded_optimizer_state(restored, saved["optimizer"])
        with torch.no_grad():
            loaded = {"preds": restored(held_out), "optimizer": fused_optimizer_state(restored)}
        if rank == 0:
            torch.save(loaded, out_dir / "mixed.loaded.pt")


class GlobalLoss(pl.Callback):
    """The mean over ranks of each step's loss (= the loss of the global batch, ranks having equal shares)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


def make(method: str, world: int, data_dir: str, memory_cap: int | None = None) -> tuple[Any, ...]:
    pl.seed_everything(0)
    data = CTRDataModule(data_dir=data_dir, batch_size=BATCH // world, eval_batch_size=500, shuffle=True)
    task = CTRTask(
        data.cardinalities, data.num_dense, 8, EmbeddingSpec(method, METHODS[method]), id_counts_dir=data_dir
    )
    recorder = GlobalLoss()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=TorchRecStrategy(memory_cap_bytes=memory_cap) if world > 1 else "auto",
        max_steps=STEPS,
        limit_val_batches=0,
        inference_mode=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    return data, task, trainer, recorder


def predictions(task: CTRTask, data: CTRDataModule) -> torch.Tensor:
    """Predictions for the whole first validation batch of one process (every rank feeds the same rows)."""
    data.trainer = None  # read the split as one process would
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        return task(batch)


def forward_differences() -> dict[str, float]:
    """Every registered method, sharded over the process group, against itself unsharded (same weights)."""
    tables = make_tables((7, 50, 3000, 400))
    kjt = random_kjt(tables, 16, seed=1)
    dist.init_process_group("gloo")
    diffs = {}
    for name in available_methods():
        torch.manual_seed(0)
        method = build_embedding(name, tables, budget=budget_for(name), **method_options(name, tables))
        with torch.no_grad():
            expected = method(kjt).values()
            sharded = shard_model(torch.nn.ModuleDict({"m": method}), SparseOptimizer(), device=torch.device("cpu"))
            diffs[name] = float((sharded.module["m"](kjt).values() - expected).abs().max())
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--load", type=Path)
    parser.add_argument("--memory-cap", type=int)
    parser.add_argument("--forward-all", action="store_true")
    args = parser.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if args.forward_all:
        diffs = forward_differences()
        if rank == 0:
            (args.out_dir / "forward_diff.json").write_text(json.dumps(diffs))
        dist.destroy_process_group()
        return
    if args.memory_cap is not None:
        data, task, trainer, _ = make("full", world, args.data_dir, args.memory_cap)
        try:
            trainer.fit(task, datamodule=data)
        except ShardingPlanError as error:
            (args.out_dir / f"plan_error.{rank}.txt").write_text(str(error))
        return
    for method in METHODS:
        data, task, trainer, recorder = make(method, world, args.data_dir)
        trainer.fit(task, datamodule=data)
        trainer.save_checkpoint(args.out_dir / f"{method}.ckpt")
        preds = predictions(task, data)
        if rank == 0:
            (args.out_dir / f"{method}.losses.json").write_text(json.dumps(recorder.losses))
            torch.save(preds, args.out_dir / f"{method}.preds.pt")
        if args.load is not None:
            data, task, trainer, _ = make(method, world, args.data_dir)
            trainer.validate(task, datamodule=data, ckpt_path=args.load / f"{method}.ckpt")
            preds = predictions(task, data)
            if rank == 0:
                torch.save(preds, args.out_dir / f"{method}.loaded_preds.pt")
            # resume fit at its last step: restores weights and fused optimizer state, trains nothing, saves again
            data, task, trainer, _ = make(method, world, args.data_dir)
            trainer.fit(task, datamodule=data, ckpt_path=args.load / f"{method}.ckpt")
            trainer.save_checkpoint(args.out_dir / f"{method}.resumed.ckpt")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    mixed_run(world, rank, args.out_dir, args.load)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # all work is done and written: skip the interpreter's teardown, where a library thread (gloo/fbgemm) now and
    # then aborts the process ("terminate called without an active exception") and fails a run that succeeded
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
