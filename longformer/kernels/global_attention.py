"""Global tokens attend to every token through key_global / value_global, without projecting all L tokens.

HF projects the whole sequence with key_global and value_global (2 L C^2 FLOPs a layer) for the sake of a
few global queries. Re-associating the products moves the projections to the G query side instead:

    score(g, j) = q_g . (Wk x_j + bk) = (Wk^T q_g) . x_j + q_g . bk     (the last term is constant in j,
                                                                         so the softmax ignores it)
    out_g       = sum_j p_gj (Wv x_j + bv) = Wv (sum_j p_gj x_j) + bv sum_j p_gj

which costs about 4 H G L C + 4 G C^2 instead of 2 L C^2: cheaper while G < head_dim global tokens, the
usual case (one <s> for classification, a question's tokens for QA). sum_j p_gj is 1 except under dropout.
"""
import math

import torch
import torch.nn.functional as F

from .banded import contiguous


def global_query_attention(q_global, x, key_global: torch.nn.Linear, value_global: torch.nn.Linear,
                           key_keep, dropout_p: float = 0.0):
    """q_global [B, G, H, D] (projected, unscaled); x [B, L, C] the layer input; key_keep [B, L] bool (the keys
    every global query sees) or [B, G, L] (each its own: packed documents). Returns [B, G, H, D]."""
    B, G, H, D = q_global.shape
    C = x.shape[-1]
    wk = key_global.weight.view(H, D, C)
    wv = value_global.weight.view(H, D, C)
    # Heads folded into the rows, so that x is shared by every head rather than broadcast (copied) to each.
    # Heads as bmm's batch, so that no operand is broadcast over B (export then holds for B = 1 too).
    qh = contiguous(q_global.permute(2, 0, 1, 3)).view(H, B * G, D)
    q_in = torch.bmm(qh, wk).view(H, B, G, C).transpose(0, 1)  # [B, H, G, C]: queries in input space
    q_in = contiguous(q_in).view(B, H * G, C)
    scores = torch.bmm(q_in, x.transpose(1, 2)) * (1.0 / math.sqrt(D))  # [B, H*G, L]
    if key_keep.dim() == 3:
        scores = scores.view(B, H, G, -1).masked_fill(~key_keep[:, None], torch.finfo(scores.dtype).min)
        scores = scores.view(B, H * G, -1)
    else:
        scores = scores.masked_fill(~key_keep[:, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_in.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    mixed = torch.bmm(probs, x.to(probs.dtype)).view(B, H, G, C)
    out = torch.bmm(contiguous(mixed.transpose(0, 1)).view(H, B * G, C), wv.transpose(1, 2))  # [H, B*G, D]
    out = out.view(H, B, G, D).permute(1, 2, 0, 3)  # [B, G, H, D]
    bias = value_global.bias.view(H, D) * probs.sum(-1).view(B, H, G).transpose(1, 2)[..., None]  # [B, G, H, D]
    return out + bias.to(out.dtype)
