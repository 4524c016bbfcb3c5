"""The dense reference: Longformer attention written out with an explicit L x L mask. O(L^2): for tests only.

Local rows: token i sees real token j when |i - j| <= w or j is global, through the local projections.
Global rows: global token i sees every real token through the global projections.
Padding rows output zeros (as HF's implementation does). With packed documents (masks.segments), both
kinds of row see only tokens of their own document.
"""
import math

import torch
import torch.nn.functional as F


def _softmax_attention(q, k, v, allowed, dropout_p):
    """q, k, v [B, L, H, D]; allowed [B, L, L] bool -> [B, L, H, D]."""
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    probs = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), dropout_p)
    return torch.einsum("bhij,bjhd->bihd", probs, v)


def dense_attention(x, attn, masks, dropout_p: float = 0.0):
    """x [B, L, C]; attn: a LongformerSelfAttention (its projections); masks: AttentionMasks."""
    B, L, _ = x.shape
    split = lambda t: t.view(B, L, attn.num_heads, attn.head_dim)  # noqa: E731
    pos = torch.arange(L, device=x.device)
    band = (pos[:, None] - pos[None, :]).abs() <= attn.one_sided_window  # [L, L]
    local_allowed = masks.keep[:, None, :] & (band[None] | masks.is_global[:, None, :])
    global_allowed = masks.keep[:, None, :].expand(B, L, L)
    if masks.segments is not None:
        same_document = masks.segments[:, :, None] == masks.segments[:, None, :]  # [B, L, L]
        local_allowed, global_allowed = local_allowed & same_document, global_allowed & same_document
    out = _softmax_attention(split(attn.query(x)), split(attn.key(x)), split(attn.value(x)),
                             local_allowed, dropout_p)
    if masks.num_global:
        out_g = _softmax_attention(split(attn.query_global(x)), split(attn.key_global(x)),
                                   split(attn.value_global(x)), global_allowed, dropout_p)
        out = torch.where(masks.is_global[:, :, None, None], out_g, out)
    return (out * masks.keep[:, :, None, None]).flatten(2)
