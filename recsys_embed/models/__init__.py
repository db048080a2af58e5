"""CTR models; each receives its embedding module and never builds its own tables."""

from recsys_embed.models.dlrm import DLRM

__all__ = ["DLRM"]
