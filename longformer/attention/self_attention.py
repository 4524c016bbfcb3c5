"""LongformerSelfAttention: the projections of one layer, and the choice of kernel that combines them."""
import torch
from torch import nn

from ..kernels import (band_kernel, choose_backends, global_query_attention, sliding_window_attention,
                       strided_band_attention)
from ..kernels.linear import linear, matmul_t
from .dense import dense_attention
from .masks import AttentionMasks


class LongformerSelfAttention(nn.Module):
    """Sliding-window attention (±w tokens, w = attention_window // 2) plus global attention.

    Every token attends to its window and to all global tokens through query/key/value; global tokens
    attend to all tokens through query_global/key_global/value_global.
    """

    def __init__(self, config, layer_id: int):
        super().__init__()
        C = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.one_sided_window = config.attention_window[layer_id] // 2
        self.dropout = config.attention_probs_dropout_prob
        self.config = config  # read at each call: attention_backend may be changed on a built model
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.query_global, self.key_global, self.value_global = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x: torch.Tensor, masks: AttentionMasks) -> torch.Tensor:
        """x [B, L, C] -> [B, L, C]; padding positions get zeros."""
        backend = self.config.attention_backend
        dropout_p = self.dropout if self.training else 0.0
        if backend == "dense":
            return dense_attention(x, self, masks, dropout_p)
        # auto: the fused kernel, the fastest on every device measured; chunked: the explicit one (None)
        sdpa = choose_backends(x.device.type, self.config.sdpa_backends) if backend in ("auto", "sdpa") else None
        B, L, C = x.shape
        x = _in_autocast_dtype(x)
        split = lambda t: t.view(*t.shape[:2], self.num_heads, self.head_dim)  # noqa: E731  [B, n, C] -> [B, n, H, D]
        q, k, v = (split(linear(x, p.weight, p.bias)) for p in (self.query, self.key, self.value))
        w = self.one_sided_window
        k_glob = v_glob = None
        if masks.num_global:
            k_glob, v_glob = masks.gather_global(k), masks.gather_global(v)  # [B, G, H, D]
        kernel = band_kernel(q, dropout_p, sdpa)
        if kernel:
            out = strided_band_attention(kernel, q, k, v, w, masks.band_mask(w, q.dtype, kernel), k_glob, v_glob,
                                         masks.global_allowed() if masks.num_global else None, dropout_p,
                                         self._projections(x) if torch.is_autocast_enabled(x.device.type) else None)
        else:
            out = sliding_window_attention(q, k, v, w, masks.window_mask(w, q.dtype), k_glob, v_glob, dropout_p, sdpa)
        out_g = None
        if masks.num_global:
            q_g = split(self.query_global(masks.gather_global(x)))  # [B, G, H, D]
            out_g = global_query_attention(q_g, x, self.key_global, self.value_global, masks.global_keys, dropout_p)
        return masks.place(out, out_g).reshape(B, L, C)

    def _projections(self, x: torch.Tensor):
        """A function making q, k and v [B, L, H, D] again from x (in autocast's dtype; the linear layers keep it
        for their backward anyway), as forward made them. Under autocast the band's kernel calls it in backward
        rather than keep q, k and v: 3 bf16 matmuls a layer (~15 ms at 4,096 tokens on a 2-core EPYC) for
        18 MB a layer (0.22 GB of a longformer-base step). In fp32 they would cost ~5% of the step."""
        def project():
            cast = lambda t: t.to(x.dtype)  # noqa: E731
            return tuple(matmul_t(x, cast(p.weight), cast(p.bias)).view(*x.shape[:2], self.num_heads, self.head_dim)
                         for p in (self.query, self.key, self.value))
        return project


def _in_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x cast once to autocast's dtype where autocast is on: each matmul that reads x would otherwise cast it
    again and keep its own copy for backward (five copies of x a layer)."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x
