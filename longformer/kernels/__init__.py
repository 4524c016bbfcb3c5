"""The fast ops behind the attention: banded sliding-window attention and re-associated global attention."""
from .banded import sliding_window_attention, window_mask
from .global_attention import global_query_attention
from .sdpa import choose_backends
from .strided import band_kernel, band_mask, strided_band_attention

__all__ = ["band_kernel", "band_mask", "choose_backends", "global_query_attention", "sliding_window_attention",
           "strided_band_attention", "window_mask"]
