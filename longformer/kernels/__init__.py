"""The fast ops behind the attention: banded sliding-window attention and dense global attention."""
from .banded import global_query_attention, sliding_window_attention, window_mask

__all__ = ["global_query_attention", "sliding_window_attention", "window_mask"]
