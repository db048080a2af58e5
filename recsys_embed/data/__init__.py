"""Data: parquet/synthetic CTR data -> ``KeyedJaggedTensor`` batches."""

from recsys_embed.data.batches import Batch, ParquetBatches
from recsys_embed.data.datamodule import CTRDataModule
from recsys_embed.data.schema import CTRSchema, load_id_counts
from recsys_embed.data.synthetic import SyntheticConfig, generate_synthetic, synthetic_dataset

__all__ = [
    "Batch",
    "CTRDataModule",
    "CTRSchema",
    "ParquetBatches",
    "SyntheticConfig",
    "generate_synthetic",
    "load_id_counts",
    "synthetic_dataset",
]
