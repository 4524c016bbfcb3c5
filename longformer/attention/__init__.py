"""Longformer attention: the layer module, the per-forward masks, and the dense reference."""
from .dense import dense_attention
from .masks import AttentionMasks, document_segments
from .self_attention import LongformerSelfAttention

__all__ = ["AttentionMasks", "document_segments", "LongformerSelfAttention", "dense_attention"]
