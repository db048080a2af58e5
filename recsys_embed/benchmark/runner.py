"""Run the cells of a sweep: each one is ``CTRTask`` + ``CTRDataModule`` under a Lightning ``Trainer`` (as ``fit``).

A cell first checks that its method can be built at its budget (on the ``meta`` device when the method takes a
``device``, so no memory is allocated); a ``ValueError`` there is recorded as ``infeasible`` with the method's
message. Then it trains every stage of the method (one ``trainer.fit`` per stage, in memory, see
:func:`recsys_embed.training.stages.run_stages`) and tests (``trainer.test``) as ``recsys-embed fit
--test_after_fit true`` does, timing every train step, stage and test batch. Any other error is recorded as ``failed``
with its message, and the sweep goes on. A re-run skips ``ok`` cells, and ``infeasible`` ones while the method's
:func:`~recsys_embed.benchmark.identity.solver_version` is the one that judged them. Cells run one after another
in one process: two training processes on a small machine make fbgemm's OpenMP kernels crawl.
"""

from __future__ import annotations

import functools
import gc
import importlib.metadata
import json
import logging
import math
import platform
import socket
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from tqdm.auto import tqdm

import recsys_embed
from recsys_embed.benchmark.identity import import_class, plain, solver_version
from recsys_embed.benchmark.spec import Cell
from recsys_embed.benchmark.store import DONE_STATUSES, ResultStore
from recsys_embed.data import CTRDataModule, synthetic_dataset
from recsys_embed.methods import Budget, SparseOptimizer, build_embedding, method_class, method_options
from recsys_embed.methods.base import EmbeddingMethod, Stage, full_bytes
from recsys_embed.training import CTRTask, EmbeddingSpec, tables_for
from recsys_embed.training.stages import run_stages

log = logging.getLogger(__name__)

#: a cell runner: (cell, output folder) -> the cell's result row
CellRunner = Callable[[Cell, Path], dict[str, Any]]
#: train steps left out of the step-time median (kernel warm-up, first allocations)
WARMUP_STEPS = 3


def stack_versions() -> dict[str, str]:
    """Versions of the stack a result was measured on."""

    def dist(*names: str) -> str:
        for name in names:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
        return "unknown"

    return {
        "recsys_embed": recsys_embed.__version__,
        "torch": torch.__version__,
        "torchrec": dist("torchrec"),
        "fbgemm_gpu": dist("fbgemm-gpu-cpu", "fbgemm-gpu", "fbgemm_gpu"),
        "lightning": pl.__version__,
        "python": platform.python_version(),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_DATA_DIRS: dict[str, Path] = {}


def dataset_dir(cell: Cell) -> Path:
    """The cell's data folder; synthetic data is generated once (cached on disk and in this process)."""
    key = json.dumps(cell.dataset.resolved(), sort_keys=True)
    if key not in _DATA_DIRS:
        if cell.dataset.data_dir:
            _DATA_DIRS[key] = Path(cell.dataset.data_dir)
        else:
            _DATA_DIRS[key] = synthetic_dataset(cell.dataset.synthetic_config())
    return _DATA_DIRS[key]


def resolved_config(embedding: EmbeddingMethod) -> str:
    """The method's resolved knobs as built, as JSON: its :meth:`~EmbeddingMethod.config` (defaults filled in,
    budget solved: e.g. ``hash``'s rows and seed, ``qr``'s per-table bases)."""
    return json.dumps(plain(embedding.config()), sort_keys=True)


def base_row(cell: Cell) -> dict[str, Any]:
    """The part of a row known before running: what the cell is."""
    settings = cell.settings()
    training = cell.training
    return {
        "cell_id": cell.cell_id,
        "sweep": cell.sweep,
        "dataset": cell.dataset.name,
        "model": cell.model.label,
        "method": cell.method.name,
        "method_label": cell.method.label,
        "method_version": method_class(cell.method.name).version,
        "options": json.dumps(cell.method.options, sort_keys=True),
        "budget_ratio": cell.budget,
        "seed": cell.seed,
        "batch_size": training.batch_size,
        "eval_batch_size": training.eval_batch_size or training.batch_size,
        "embedding_dim": training.embedding_dim,
        "max_steps": training.max_steps,
        "max_epochs": training.max_epochs,
        "threads": torch.get_num_threads(),
        "host": socket.gethostname(),
        "versions": json.dumps(stack_versions(), sort_keys=True),
        "settings": json.dumps(settings, sort_keys=True, default=str),
        "started_at": _now(),
    }


class StepTimer(Callback):
    """Wall time of every train step (forward, backward, fused row update, dense step) and every test batch."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.test: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.train.append(time.perf_counter() - self._start)

    def on_test_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_test_batch_end(self, *args: Any) -> None:
        self.test.append(time.perf_counter() - self._start)

    def train_step_ms(self) -> float:
        steps = self.train[WARMUP_STEPS:] if len(self.train) > 2 * WARMUP_STEPS else self.train
        return 1e3 * statistics.median(steps) if steps else math.nan

    def inference_ms(self) -> float:
        return 1e3 * statistics.median(self.test) if self.test else math.nan


def _metric(metrics: dict[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float(value) if value is not None else math.nan


def feasibility(cell: Cell, tables: Sequence[Any], options: dict[str, Any]) -> str | None:
    """``None`` if the method builds at the cell's budget, else the method's reason (its ``ValueError``)."""
    name = cell.method.name
    trial = dict(options)
    if "device" in method_options(name):
        trial["device"] = "meta"
    try:
        build_embedding(name, tables, budget=Budget(ratio=cell.budget), **trial)
    except ValueError as error:
        return str(error)
    return None


def run_cell(cell: Cell, output: Path) -> dict[str, Any]:
    """Train and test one cell; return its row (status ``ok``, ``infeasible`` or ``failed``)."""
    row = base_row(cell)
    start = time.perf_counter()
    training = cell.training
    try:
        data = CTRDataModule(
            data_dir=str(dataset_dir(cell)),
            batch_size=training.batch_size,
            eval_batch_size=training.eval_batch_size,
            seed=cell.seed,
        )
        rows = data.schema.rows
        row.update(
            train_rows=rows.get("train"),
            val_rows=rows.get("val"),
            test_rows=rows.get("test"),
            num_sparse=len(data.cardinalities),
            num_dense=data.num_dense,
        )
        tables = tables_for(data.cardinalities, training.embedding_dim)
        options = dict(cell.method.options)
        if method_class(cell.method.name).needs_id_counts:
            options["id_counts"] = data.id_counts()
        reason = feasibility(cell, tables, options)
        if reason is not None:
            log.info("Infeasible: %s: %s", cell.describe(), reason)
            row.update(status="infeasible", reason=reason, solver=solver_version(cell.method.name))
            row.update(full_bytes=full_bytes(tables))
        else:
            row.update(_train_and_test(cell, data, output))
            row["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - a failed cell is recorded, the sweep goes on
        log.error("Cell failed: %s", cell.describe(), exc_info=True)
        row.update(status="failed", reason=f"{type(error).__name__}: {error}"[:4000])
    finally:
        gc.collect()
    row.update(finished_at=_now(), wall_s=time.perf_counter() - start)
    return row


def _train_and_test(cell: Cell, data: CTRDataModule, output: Path) -> dict[str, Any]:
    training = cell.training
    pl.seed_everything(cell.seed, workers=True, verbose=False)
    optimizer = training.optimizer
    task = CTRTask(
        cardinalities=data.cardinalities,
        num_dense=data.num_dense,
        embedding_dim=training.embedding_dim,
        embedding=EmbeddingSpec(
            method=cell.method.name, budget=Budget(ratio=cell.budget), options=dict(cell.method.options)
        ),
        model=functools.partial(cell.model.model_class(), **cell.model.options),
        sparse_optimizer=SparseOptimizer(**training.sparse_optimizer),
        optimizer=functools.partial(import_class(optimizer["class_path"]), **optimizer.get("init_args", {})),
        id_counts_dir=str(data.data_dir),
    )
    timer = StepTimer()
    logger = CSVLogger(output / "runs", name=cell.cell_id, version="") if training.csv_logs else False

    def stage_trainer(stage: Stage, folder: Path | None) -> pl.Trainer:
        return pl.Trainer(
            accelerator=training.accelerator,
            devices=1,
            max_epochs=stage.max_epochs if stage.max_epochs is not None else training.max_epochs,
            max_steps=training.max_steps,
            limit_train_batches=training.limit_train_batches,
            limit_val_batches=training.limit_val_batches,
            limit_test_batches=training.limit_test_batches,
            num_sanity_val_steps=0,
            inference_mode=False,  # fbgemm's CPU kernels cannot run fused tables under inference_mode
            logger=logger,
            callbacks=[timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=training.log_every_n_steps,
        )

    started = time.perf_counter()
    run = run_stages(task, data, stage_trainer)  # one stage (a plain fit) for single-stage methods
    fit_s = time.perf_counter() - started
    task, trainer = run.task, run.trainer
    if trainer is None:  # pragma: no cover - in memory every stage runs
        raise RuntimeError(f"Method {cell.method.name!r} declares no stage to train.")
    validation = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    started = time.perf_counter()
    tested = trainer.test(task, datamodule=data, verbose=False)
    test_s = time.perf_counter() - started
    metrics = tested[0] if tested else {}
    embedding = task.embedding
    return {
        "resolved": resolved_config(embedding),
        "ratio": float(embedding.compression_ratio()),
        "memory_bytes": int(embedding.memory_bytes()),
        "training_bytes": int(embedding.training_bytes()),
        "full_bytes": int(embedding.full_bytes()),
        "val_auc": _metric(validation, "val/auc"),
        "val_logloss": _metric(validation, "val/logloss"),
        "test_auc": _metric(metrics, "test/auc"),
        "test_logloss": _metric(metrics, "test/logloss"),
        "steps": sum(r.steps for r in run.results),
        "epochs": int(trainer.current_epoch),
        "train_time_s": fit_s,
        "stage_times": json.dumps({"fit": round(fit_s, 3), "test": round(test_s, 3), "stages": run.stage_times()}),
        "train_step_ms": timer.train_step_ms(),
        "test_time_s": test_s,
        "inference_ms": timer.inference_ms(),
        "device": str(trainer.strategy.root_device),
    }


def run_sweep(
    cells: Sequence[Cell],
    output: str | Path,
    *,
    runner: CellRunner = run_cell,
    progress: bool = True,
) -> Counter[str]:
    """Run the cells not yet finished under ``output`` (one after another), writing each row as it ends.

    Cells with an ``ok`` cell file under ``output`` are skipped, and ``infeasible`` ones judged by the method's
    current solver version; ``failed`` ones are retried. Returns how many cells ended in each status (``skipped``
    for those already done).
    """
    output = Path(output)
    store = ResultStore(output)
    done = done_ids(cells, store.load())
    todo = [c for c in cells if c.cell_id not in done]
    counts: Counter[str] = Counter(skipped=len(cells) - len(todo))
    log.info("%d cells: %d already finished under %s, %d to run", len(cells), counts["skipped"], output, len(todo))
    bar = tqdm(todo, desc="bench", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(cell.describe(), refresh=True)
        try:
            row = runner(cell, output)
        except Exception as error:  # noqa: BLE001 - a runner that raises still leaves a row
            log.error("Cell failed: %s", cell.describe(), exc_info=True)
            row = {**base_row(cell), "status": "failed", "reason": f"{type(error).__name__}: {error}"}
            row["finished_at"] = _now()
        store.write(row)
        counts[row["status"]] += 1
        if row["status"] == "ok":
            log.info("%s: test AUC %s, ratio %s", cell.describe(), _fmt(row.get("test_auc")), _fmt(row.get("ratio")))
        elif row["status"] not in DONE_STATUSES:
            log.warning("%s: %s", cell.describe(), row.get("reason"))
    bar.close()
    return counts


def done_ids(cells: Sequence[Cell], frame: pd.DataFrame) -> set[str]:
    """The cells a re-run skips: ``ok``, or ``infeasible`` under the method's current solver version."""
    rows = frame.set_index("cell_id")
    status, solver = rows["status"].to_dict(), rows["solver"].to_dict()
    done = set()
    for cell in cells:
        cell_id = cell.cell_id
        if status.get(cell_id) == "ok":
            done.add(cell_id)
        elif status.get(cell_id) == "infeasible" and solver.get(cell_id) == solver_version(cell.method.name):
            done.add(cell_id)
    return done


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "?"


def describe_counts(counts: Counter[str]) -> str:
    return ", ".join(f"{counts[k]} {k}" for k in ("ok", "infeasible", "failed", "skipped") if counts[k])


__all__ = [
    "CellRunner",
    "StepTimer",
    "base_row",
    "dataset_dir",
    "describe_counts",
    "done_ids",
    "feasibility",
    "resolved_config",
    "run_cell",
    "run_sweep",
    "stack_versions",
]
