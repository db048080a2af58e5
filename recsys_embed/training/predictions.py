"""Predictions of a ``CTRTask`` for every row of a parquet file, written as parquet (``recsys-embed predict``).

The output has one row per input row, in the input's order: ``row`` (the row's index within its split or file),
``label`` (when the input has a label column) and ``score`` (the predicted click probability, the sigmoid of the
model's logit).

Example::

    dataset = PredictionBatches(schema.split_path(data_dir, "test"), schema, batch_size=16384)
    writer = PredictionWriter("runs/x/predictions/test.parquet", has_labels=dataset.has_labels)
    Trainer(callbacks=[writer], inference_mode=False).predict(task, DataLoader(dataset, batch_size=None))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import IterableDataset

from recsys_embed.data.batches import Batch, batch_from_block, block_from_arrow
from recsys_embed.data.schema import CTRSchema

log = logging.getLogger(__name__)


class PredictionBatches(IterableDataset):
    """One parquet file's rows, in file order, as :class:`~recsys_embed.data.batches.Batch` es of at most
    ``batch_size`` rows (a row group's last batch may be smaller).

    The file needs the schema's dense and categorical columns; its label column is optional (``has_labels``;
    without one, batches carry zero labels). Read by one process, one loader worker (row order is the output's).
    """

    def __init__(self, path: str | Path, schema: CTRSchema, batch_size: int) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"The prediction batch size must be positive (got {batch_size}).")
        self.path, self.schema, self.batch_size = Path(path), schema, batch_size
        if not self.path.is_file():
            raise ValueError(f"No parquet file {self.path} to predict on: give an existing file (--predict_file).")
        names = set(pq.read_schema(self.path).names)
        missing = sorted({*schema.dense, *schema.sparse} - names)
        if missing:
            raise ValueError(
                f"{self.path} lacks the columns {missing} of the model's data schema: predict on a file with the "
                "training data's dense and categorical columns."
            )
        self.has_labels = schema.label in names
        self.columns = [*([schema.label] if self.has_labels else []), *schema.dense, *schema.sparse]

    def __len__(self) -> int:
        meta = pq.ParquetFile(self.path).metadata
        return sum(math.ceil(meta.row_group(g).num_rows / self.batch_size) for g in range(meta.num_row_groups))

    def __iter__(self) -> Iterator[Batch]:
        file = pq.ParquetFile(self.path)
        for group in range(file.num_row_groups):
            table = file.read_row_group(group, columns=self.columns)
            if not self.has_labels:
                table = table.append_column(self.schema.label, pa.array(np.zeros(table.num_rows, np.float32)))
            block = block_from_arrow(table, self.schema, str(self.path))
            for start in range(0, len(block), self.batch_size):
                yield batch_from_block(block.take(slice(start, start + self.batch_size)), self.schema.sparse)


class PredictionWriter(Callback):
    """Stream a predict run's scores to a parquet file: ``row``, ``label`` (if ``has_labels``), ``score``.

    Rows are numbered in the order batches arrive (one process: the input's order). The file appears, complete,
    when the run ends (it is written next to it first, then renamed). A plain callback, not Lightning's
    ``BasePredictionWriter``: rows are numbered here, so the predict loop need not track sampler indices (which an
    iterable dataset has not).
    """

    def __init__(self, path: str | Path, *, has_labels: bool) -> None:
        super().__init__()
        self.path, self.has_labels = Path(path), has_labels
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def _schema(self) -> pa.Schema:
        label = [pa.field("label", pa.int8())] if self.has_labels else []
        return pa.schema([pa.field("row", pa.int64()), *label, pa.field("score", pa.float32())])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if trainer.world_size > 1:
            raise ValueError(
                f"recsys-embed predict runs on one process (got {trainer.world_size}): set --trainer.devices=1 "
                "(row numbers and the output file are one process's)."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self._partial, self._schema())
        self._rows = 0

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        scores = torch.as_tensor(outputs).detach().float().cpu().numpy().reshape(-1)
        columns: dict[str, Any] = {"row": np.arange(self._rows, self._rows + len(scores), dtype=np.int64)}
        if self.has_labels:
            columns["label"] = batch.labels.cpu().numpy().astype(np.int8)
        columns["score"] = scores
        assert self._writer is not None
        self._writer.write_table(pa.table(columns, schema=self._schema()))
        self._rows += len(scores)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        self._partial.replace(self.path)
        columns = "row, label, score" if self.has_labels else "row, score"
        log.info("Wrote %d predictions (%s) to %s", self._rows, columns, self.path)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._writer is not None:  # the run failed: leave no partial file
            self._writer.close()
            self._writer = None
            self._partial.unlink(missing_ok=True)
