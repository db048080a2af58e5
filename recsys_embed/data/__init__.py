"""Data: parquet/synthetic CTR data -> ``KeyedJaggedTensor`` batches; interaction graphs -> BPR batches."""

from recsys_embed.data.batches import Batch, ParquetBatches
from recsys_embed.data.datamodule import CTRDataModule
from recsys_embed.data.graph import InteractionGraph
from recsys_embed.data.graph_datamodule import GraphDataModule
from recsys_embed.data.schema import CTRSchema, load_id_counts
from recsys_embed.data.synthetic import SyntheticConfig, generate_synthetic, synthetic_dataset

__all__ = [
    "Batch",
    "CTRDataModule",
    "CTRSchema",
    "GraphDataModule",
    "InteractionGraph",
    "ParquetBatches",
    "SyntheticConfig",
    "generate_synthetic",
    "load_id_counts",
    "synthetic_dataset",
]
