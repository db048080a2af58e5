"""CTR and graph CF models; each receives its embedding module and never builds its own tables.

Every model is ``Model(embedding, num_dense, *, options...)`` with ``forward(dense (B, num_dense), sparse KJT) ->
logits (B,)``, so ``CTRTask`` (and the CLI's ``model.model.class_path``) can pick any of them. Graph models
(``LightGCN``, ``NGCF``, ``MFBPR``) are ``Model(embedding, num_users, num_items, *, options...)`` over
:func:`graph_tables` and return the propagated user and item embeddings (``GraphTask`` trains them).
"""

from recsys_embed.models.dcn import DCN, DCNv2
from recsys_embed.models.deepfm import DeepFM
from recsys_embed.models.dlrm import DLRM
from recsys_embed.models.graph_base import GraphModel, graph_tables
from recsys_embed.models.lightgcn import LightGCN
from recsys_embed.models.mf_bpr import MFBPR
from recsys_embed.models.ngcf import NGCF
from recsys_embed.models.wide_deep import WideDeep

__all__ = ["DCN", "DCNv2", "DLRM", "DeepFM", "GraphModel", "LightGCN", "MFBPR", "NGCF", "WideDeep", "graph_tables"]
