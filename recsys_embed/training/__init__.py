"""Training: LightningModules and their helpers."""

from recsys_embed.training.ctr_task import CTRTask, EmbeddingSpec, tables_for

__all__ = ["CTRTask", "EmbeddingSpec", "tables_for"]
