"""Sliding-window attention as blocks: queries in blocks of w against their three neighbouring key blocks.

A query at position i = c*w + a (block c, offset a) may see keys j with |i - j| <= w. All such keys lie in
blocks c-1, c, c+1, so each block of w queries attends to a window of 3w keys (plus the G global keys,
appended to every window) under one static band pattern. That is a batch of small dense attentions: the
scores never exceed [w, 3w + G] per block, memory is linear in L, and the whole thing is a single call
of torch's scaled_dot_product_attention (fused: scores and probabilities never reach memory), or of the
explicit matmul-softmax-matmul below where SDPA is unwanted. L need not be a multiple of w: the last
block is padded here and the padding is cut from the output.
"""
import math

import torch
import torch.nn.functional as F


def _pad_seq(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Zero-pad dim 1 (the sequence) of x [B, L, ...]; works for every dtype, bool included."""
    if left == 0 and right == 0:
        return x
    zeros = lambda n: x.new_zeros(x.shape[0], n, *x.shape[2:])  # noqa: E731
    return torch.cat([zeros(left), x, zeros(right)], dim=1)


def num_blocks(length: int, w: int) -> int:
    return -(-length // w)


def key_windows(x: torch.Tensor, w: int, extra: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, L, *rest] -> [B, nc, 3w (+ G), *rest]: block c gets blocks c-1, c, c+1 of x, then `extra` [B, G, *rest].

    Blocks before the start and after the end are zeros; the band mask hides them.
    """
    B, L, rest = x.shape[0], x.shape[1], x.shape[2:]
    nc = num_blocks(L, w)
    xb = _pad_seq(x, w, nc * w - L + w).view(B, nc + 2, w, *rest)  # [B, nc + 2, w, *rest]
    parts = [xb[:, :-2], xb[:, 1:-1], xb[:, 2:]]
    if extra is not None:
        parts.append(extra[:, None].expand(B, nc, *extra.shape[1:]))
    return torch.cat(parts, dim=2)


def window_mask(local_keys: torch.Tensor, w: int, dtype: torch.dtype,
                global_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask [B * nc, 1, w, 3w + G] for sliding_window_attention.

    local_keys [B, L] bool: keys reachable through the window (real tokens that are not global; global
    tokens are reached through their own columns instead, so they are not counted twice).
    global_valid [B, G] bool: which global-key slots hold a real global token.
    """
    B, L = local_keys.shape
    a = torch.arange(w, device=local_keys.device)[:, None]
    b = torch.arange(3 * w, device=local_keys.device)[None, :]
    band = (b >= a) & (b <= a + 2 * w)  # [w, 3w]: |(c*w + a) - ((c-1)*w + b)| <= w
    allowed = band & key_windows(local_keys, w)[:, :, None, :]  # [B, nc, w, 3w]
    if global_valid is not None:
        nc = allowed.shape[1]
        G = global_valid.shape[1]
        allowed = torch.cat([allowed, global_valid[:, None, None, :].expand(B, nc, w, G)], dim=-1)
    # A large finite negative rather than -inf: rows of padding queries see no key at all, and must stay
    # finite (they are zeroed afterwards) so that no NaN reaches the gradients.
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.view(B * allowed.shape[1], 1, w, allowed.shape[-1])


class DropoutAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(D) + mask) * keep / (1 - p) @ v, for where no fused kernel takes dropout (CPU).

    torch's unfused fallback would keep every block's scores, probabilities and dropout mask for the
    backward pass. This keeps q, k, v and the mask of kept probabilities (bool), and recomputes the
    probabilities in backward: near a fused kernel's memory, with one draw of random numbers. Scales are
    applied to the small tensors (q, v, gradients) rather than to the [N, H, w, S] ones.
    """

    @staticmethod
    def _probs(q, k, mask):
        scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-1, -2)).add_(mask)
        return torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)

    @staticmethod
    def forward(ctx, q, k, v, mask, keep, dropout_p: float):
        ctx.save_for_backward(q, k, v, mask, keep)
        ctx.scale = 1.0 / (1.0 - dropout_p)
        return torch.matmul(DropoutAttention._probs(q, k, mask) * keep, v * ctx.scale)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, keep = ctx.saved_tensors
        probs = DropoutAttention._probs(q, k, mask)
        grad_out = grad_out * ctx.scale
        grad_v = torch.matmul((probs * keep).transpose(-1, -2), grad_out)
        grad_probs = torch.matmul(grad_out, v.transpose(-1, -2)).mul_(keep)
        grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
        return (torch.matmul(grad_scores, k) * sm_scale, torch.matmul(grad_scores.transpose(-1, -2), q) * sm_scale,
                grad_v, None, None, None)


def attend(q, k, v, mask, dropout_p: float, use_sdpa: bool):
    """softmax(q k^T / sqrt(D) + mask) v over [N, H, S, D] tensors: fused SDPA, or explicit in fp32."""
    if use_sdpa and dropout_p and q.device.type == "cpu":
        keep = torch.rand(*q.shape[:-1], k.shape[-2], device=q.device) >= dropout_p  # [N, H, w, S]
        return DropoutAttention.apply(q, k, v, mask, keep, dropout_p)
    if use_sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1])) + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)


def sliding_window_attention(q, k, v, w: int, mask, k_global=None, v_global=None,
                             dropout_p: float = 0.0, use_sdpa: bool = True):
    """Local (+ global-key) attention. q, k, v [B, L, H, D]; k_global, v_global [B, G, H, D]; mask from
    window_mask. Returns [B, L, H, D]."""
    B, L, H, D = q.shape
    nc = num_blocks(L, w)
    qb = _pad_seq(q, 0, nc * w - L).view(B * nc, w, H, D).transpose(1, 2)  # [B*nc, H, w, D]
    kw = key_windows(k, w, k_global).flatten(0, 1).transpose(1, 2)  # [B*nc, H, 3w+G, D]
    vw = key_windows(v, w, v_global).flatten(0, 1).transpose(1, 2)
    out = attend(qb, kw, vw, mask, dropout_p, use_sdpa)  # [B*nc, H, w, D]
    return out.transpose(1, 2).reshape(B, nc * w, H, D)[:, :L]
