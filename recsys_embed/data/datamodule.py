"""``CTRDataModule``: a Lightning data module over a CTR parquet folder (or the embedded synthetic data)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pyarrow.parquet as pq
from torch.utils.data import DataLoader

from recsys_embed.data.batches import ParquetBatches
from recsys_embed.data.schema import CTRSchema, load_id_counts, sparse_kinds
from recsys_embed.data.synthetic import SyntheticConfig, synthetic_dataset

log = logging.getLogger(__name__)


class CTRDataModule(pl.LightningDataModule):
    """Streams ``train``/``val``/``test`` parquet splits as (dense, KJT, labels) batches.

    Args:
        data_dir: a folder written by a data script (``schema.json`` + parquet). Unset: the embedded synthetic
            dataset described by ``synthetic``, generated once into ``$RECSYS_EMBED_CACHE`` (default
            ``~/.cache/recsys_embed``).
        synthetic: size and shape of the synthetic data (ignored when ``data_dir`` is set).
        batch_size: training batch size; ``eval_batch_size`` (default: the same) for val/test.
        shuffle: shuffle row groups and rows each epoch (train split only), seeded by ``seed`` and the epoch.
        drop_last: drop the last, smaller train batch (a batch of one row breaks batch norm); val/test keep it.

    Example::

        dm = CTRDataModule(batch_size=4096)
        dm.cardinalities   # {"cat_0": 10, ..., "cat_25": 1000000}
        batch = next(iter(dm.train_dataloader()))
    """

    def __init__(
        self,
        data_dir: str | None = None,
        synthetic: SyntheticConfig = SyntheticConfig(),
        batch_size: int = 4096,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive (got {batch_size}).")
        self.data_dir = Path(data_dir) if data_dir else synthetic_dataset(synthetic)
        self.schema = CTRSchema.load(self.data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.shuffle, self.seed, self.num_workers, self.drop_last = shuffle, seed, num_workers, drop_last
        train_rows = self.schema.rows.get("train", batch_size)
        if drop_last and train_rows < batch_size:
            raise ValueError(
                f"The train split has {train_rows} rows, fewer than data.batch_size={batch_size}, so every batch would "
                "be dropped: lower data.batch_size or set data.drop_last=false."
            )
        log.info(
            "CTR data %s: %s rows, %d dense, %d categorical",
            self.data_dir,
            self.schema.rows,
            len(self.schema.dense),
            len(self.schema.sparse),
        )

    @property
    def cardinalities(self) -> dict[str, int]:
        """Categorical feature -> number of ids (linked to the model's tables)."""
        return dict(self.schema.cardinalities)

    @property
    def multi_hot(self) -> list[str]:
        """The categorical features stored as lists (a bag of ids per row), from the train split's column types."""
        path = self.schema.split_path(self.data_dir, "train")
        return [
            k for k, is_list in sparse_kinds(pq.read_schema(path), self.schema.sparse, str(path)).items() if is_list
        ]

    @property
    def num_dense(self) -> int:
        return len(self.schema.dense)

    def id_counts(self) -> dict[str, np.ndarray]:
        """Train-split id counts per categorical feature (for frequency-aware methods)."""
        return load_id_counts(self.data_dir)

    def _loader(self, split: str, train: bool) -> DataLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        dataset = ParquetBatches(
            self.schema.split_path(self.data_dir, split),
            self.schema,
            self.batch_size if train else self.eval_batch_size,
            shuffle=self.shuffle and train,
            drop_last=self.drop_last and train,
            seed=self.seed,
            rank=rank,
            world_size=world,
        )
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", train=True)
        if len(loader.dataset) == 0:  # type: ignore[arg-type]
            world = self.trainer.world_size if self.trainer else 1
            raise ValueError(
                f"The train split ({self.schema.rows.get('train')} rows) gives no batch of data.batch_size="
                f"{self.batch_size} x {world} process(es) rows with data.drop_last=true: lower data.batch_size "
                "(it is per process), use fewer processes, or set data.drop_last=false."
            )
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
