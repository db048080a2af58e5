"""Train-step and inference speed of every registered method vs ``full``, fused (fbgemm TBE) vs plain PyTorch.

One process, the default synthetic Criteo-shaped data (26 tables, 10..1M ids, real Zipf batches), dim 16. For each
method at the same batch:

* fused: the method's tables as fbgemm table-batched kernels with the optimizer fused in backward (what training
  uses), row-wise Adagrad;
* plain: the same method with per-table ``nn.EmbeddingBag(sparse=True)`` and ``torch.optim.Adagrad`` (the way
  research code such as DLRM's ``QREmbeddingBag`` is written).

A step is forward + a linear head + BCE loss + backward + optimizer step. Methods that cannot reach ``--ratio``
(``quant``, ``alpt``) run at their largest ratio (``RATIO_CEILING``); a last row times TorchRec's int8 serving form of
the full tables (inference only), the reference for ``quant``'s int8 rows. Prints a markdown table of medians::

    python benchmarks/method_speed.py [--ratio 10] [--batch-size 4096] [--steps 10] [--methods full hash qr]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from recsys_embed.data import CTRSchema, ParquetBatches, SyntheticConfig, load_id_counts, synthetic_dataset
from recsys_embed.data.batches import Batch
from recsys_embed.methods import (
    Budget,
    SparseOptimizer,
    available_methods,
    build_embedding,
    dense_parameters,
    full_bytes,
    fuse_tables,
    method_class,
)
from recsys_embed.training import tables_for


def make_step(embedding: nn.Module, fused: bool, dim_out: int) -> Callable[[Batch], None]:
    head = nn.Linear(dim_out, 1)
    model = nn.ModuleDict({"embedding": embedding, "head": head})
    if fused:
        fuse_tables(model, SparseOptimizer(name="rowwise_adagrad", lr=0.05))
        optimizers = [torch.optim.Adagrad(dense_parameters(model), lr=0.05)]
    else:
        sparse = []
        for module in model.modules():
            if isinstance(module, (nn.EmbeddingBag, nn.Embedding)):  # pooled and unpooled (per-id) tables
                module.sparse = True
                sparse.append(module.weight)
        ids = {id(p) for p in sparse}
        dense = [p for p in model.parameters() if id(p) not in ids]
        optimizers = [torch.optim.Adagrad(group, lr=0.05) for group in (sparse, dense) if group]

    def step(batch: Batch) -> None:
        logits = head(embedding(batch.sparse_features).values()).squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def median_ms(fn: Callable[[Batch], object], batches: list[Batch], steps: int) -> float:
    for batch in batches[:3]:
        fn(batch)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        fn(batches[i % len(batches)])
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


#: methods whose largest ratio is below the usual ``--ratio``: measured at most at this ratio (the ratio column says)
RATIO_CEILING = {"quant": 4.0, "alpt": 3.0}


def build(name: str, tables: list[EmbeddingBagConfig], ratio: float, counts: dict) -> nn.Module:
    options = {"id_counts": counts} if method_class(name).needs_id_counts else {}
    torch.manual_seed(0)
    ratio = 1 if name == "full" else min(ratio, RATIO_CEILING.get(name, ratio))
    return build_embedding(name, tables, budget=Budget(ratio=ratio), **options)


def torchrec_int8_reference(tables: list[EmbeddingBagConfig]) -> tuple[nn.Module, float]:
    """TorchRec's int8 serving form of the full tables (``QuantEmbeddingBagCollection``: int8 rows with an fp16
    scale and bias each, padded; inference only) and its ratio: the reference for ``quant``'s served int8 rows."""
    qconfig = torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.float),
        weight=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.qint8),
    )
    ebc = EmbeddingBagCollection(tables=tables)
    ebc.qconfig = qconfig
    quantised = QuantEmbeddingBagCollection.from_float(ebc)
    stored = sum(t.numel() * t.element_size() for t in quantised.state_dict().values())
    return quantised, full_bytes(tables) / stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--methods", nargs="*", default=available_methods())
    parser.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch baselines")
    parser.add_argument("--no-int8-reference", action="store_true", help="skip TorchRec's int8 serving row")
    args = parser.parse_args()

    folder = synthetic_dataset(SyntheticConfig())
    schema = CTRSchema.load(folder)
    tables = tables_for(schema.cardinalities, args.dim)
    counts = load_id_counts(folder)
    reader = ParquetBatches(schema.split_path(folder, "train"), schema, args.batch_size)
    batches = [b for b, _ in zip(reader, range(8))]
    methods = ["full"] + [m for m in args.methods if m != "full"]
    lookups = args.batch_size * len(tables)
    rows = []
    for name in methods:
        try:
            build(name, tables, args.ratio, counts)
        except ValueError as error:
            print(f"  {name}: infeasible at ratio {args.ratio:g}: {error}", flush=True)
            continue
        fused_ms = median_ms(
            make_step(build(name, tables, args.ratio, counts), True, args.dim * len(tables)), batches, args.steps
        )
        plain_ms = None
        if not args.no_plain:
            plain_ms = median_ms(
                make_step(build(name, tables, args.ratio, counts), False, args.dim * len(tables)), batches, args.steps
            )
        serving = build(name, tables, args.ratio, counts)
        fuse_tables(serving, SparseOptimizer())
        with torch.no_grad():
            infer_ms = median_ms(lambda b, module=serving: module(b.sparse_features), batches, args.steps)
        rows.append((name, serving.compression_ratio(), fused_ms, plain_ms, infer_ms))
        print(f"  measured {name}", flush=True)
    if not args.no_int8_reference:
        reference, ratio = torchrec_int8_reference(tables)
        with torch.no_grad():
            infer_ms = median_ms(lambda b: reference(b.sparse_features), batches, args.steps)
        rows.append(("full, TorchRec int8 (inference only)", ratio, None, None, infer_ms))
    full_ms = rows[0][2]
    print(
        f"\nbatch {args.batch_size}, {len(tables)} tables, dim {args.dim}, budget ratio {args.ratio:g}, "
        f"{torch.get_num_threads()} threads, median of {args.steps} steps"
    )
    print(
        "| method | ratio | fused step ms | vs full | plain step ms | fused speedup vs plain | inference M lookups/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, ratio, fused_ms, plain_ms, infer_ms in rows:
        plain = f"{plain_ms:.1f} | {plain_ms / fused_ms:.1f}x" if plain_ms else "- | -"
        fused = f"{fused_ms:.1f} | {fused_ms / full_ms:.2f}x" if fused_ms else "- | -"
        print(f"| {name} | {ratio:.1f} | {fused} | {plain} | {lookups / infer_ms / 1e3:.1f} |")


if __name__ == "__main__":
    main()
