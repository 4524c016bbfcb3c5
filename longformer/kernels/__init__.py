"""The fast ops behind the attention: banded sliding-window attention and re-associated global attention."""
from .banded import sliding_window_attention, window_mask
from .global_attention import global_query_attention
from .sdpa import choose_backends

__all__ = ["choose_backends", "global_query_attention", "sliding_window_attention", "window_mask"]
