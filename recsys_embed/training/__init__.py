"""Training: LightningModules and their helpers."""

from recsys_embed.training.ctr_task import CTRTask, EmbeddingSpec, tables_for
from recsys_embed.training.graph_task import GraphTask
from recsys_embed.training.sharding import ShardingPlanError, consolidated_state_dict, load_sharded_state, shard_model
from recsys_embed.training.strategy import TorchRecStrategy

__all__ = [
    "CTRTask",
    "EmbeddingSpec",
    "GraphTask",
    "ShardingPlanError",
    "TorchRecStrategy",
    "consolidated_state_dict",
    "load_sharded_state",
    "shard_model",
    "tables_for",
]
