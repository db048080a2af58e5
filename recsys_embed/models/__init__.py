"""CTR models; each receives its embedding module and never builds its own tables.

Every model is ``Model(embedding, num_dense, *, options...)`` with ``forward(dense (B, num_dense), sparse KJT) ->
logits (B,)``, so ``CTRTask`` (and the CLI's ``model.model.class_path``) can pick any of them.
"""

from recsys_embed.models.dcn import DCN, DCNv2
from recsys_embed.models.deepfm import DeepFM
from recsys_embed.models.dlrm import DLRM
from recsys_embed.models.wide_deep import WideDeep

__all__ = ["DCN", "DCNv2", "DLRM", "DeepFM", "WideDeep"]
