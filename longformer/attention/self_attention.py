"""LongformerSelfAttention: the projections of one layer, combined by the band kernel its plan names."""
import torch
from torch import nn

from ..kernels.banded import blocks_band
from ..kernels.global_attention import global_query_attention
from ..kernels.linear import linear, matmul_t
from ..kernels.strided import explicit_band, flash_band
from .dense import dense_attention
from .masks import AttentionMasks

# The band paths behind one interface: (q, k, v, w, masks, global keys and values, dropout_p, plan, project).
BANDS = {"blocks": blocks_band, "flash": flash_band, "explicit": explicit_band}


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
        self.query, self.key, self.value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.query_global, self.key_global, self.value_global = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)

    def forward(self, x: torch.Tensor, masks: AttentionMasks, plan) -> torch.Tensor:
        """x [B, L, C] -> [B, L, C]; padding positions get zeros. plan: the forward's (longformer/plan.py)."""
        dropout_p = self.dropout if self.training else 0.0
        if plan.band == "dense":
            return dense_attention(x, self, masks, dropout_p)
        B, L, C = x.shape
        # Cast once to autocast's dtype: each matmul that reads x would otherwise cast it again and keep its own
        # copy for backward (five copies of x a layer).
        x = x if plan.autocast is None else x.to(plan.autocast)
        split = lambda t: t.view(*t.shape[:2], self.num_heads, self.head_dim)  # noqa: E731  [B, n, C] -> [B, n, H, D]
        q, k, v = (split(linear(x, p.weight, p.bias, plan)) for p in (self.query, self.key, self.value))
        glob = (masks.gather_global(k), masks.gather_global(v)) if masks.num_global else None  # [B, G, H, D] each
        project = self._projections(x, plan) if plan.band == "explicit" and plan.autocast else None
        out = BANDS[plan.band](q, k, v, self.one_sided_window, masks, glob, dropout_p, plan, project)
        out_g = None
        if masks.num_global:
            q_g = split(self.query_global(masks.gather_global(x)))  # [B, G, H, D]
            out_g = global_query_attention(q_g, x, self.key_global, self.value_global, masks.global_keys, dropout_p)
        return masks.place(out, out_g).reshape(B, L, C)

    def _projections(self, x: torch.Tensor, plan):
        """A function making q, k and v [B, L, H, D] again from x (in autocast's dtype; the linear layers keep it
        for their backward anyway), as forward made them. Under autocast the explicit band calls it in backward
        rather than keep q, k and v: 3 bf16 matmuls a layer (~15 ms at 4,096 tokens on a 2-core EPYC) for
        18 MB a layer (0.22 GB of a longformer-base step). In fp32 they would cost ~5% of the step."""
        def project():
            cast = lambda t: t.to(x.dtype)  # noqa: E731
            return tuple(matmul_t(x, cast(p.weight), cast(p.bias), plan).view(*x.shape[:2], self.num_heads,
                                                                               self.head_dim)
                         for p in (self.query, self.key, self.value))
        return project
