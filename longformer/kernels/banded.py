"""Sliding-window attention as blocks: queries in blocks of w against their three neighbouring key blocks.

A query at position i = c*w + a (block c, offset a) may see keys j with |i - j| <= w. All such keys lie in
blocks c-1, c, c+1, so each block of w queries attends to a window of 3w keys (plus the G global keys,
appended to every window) under one static band pattern. That is a batch of small dense attentions: the
scores never exceed [w, 3w + G] per block, memory is linear in L, and the whole thing is a single call
of torch's scaled_dot_product_attention (fused: scores and probabilities never reach memory), or of the
explicit matmul-softmax-matmul below where SDPA is unwanted. L need not be a multiple of w: the last
block is padded here and the padding is cut from the output. These blocks serve CUDA, torch.compile and
export, and the "chunked" backend; on CPU in eager mode kernels/strided.py runs the band instead.
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel


def _pad_blocks(x: torch.Tensor, w: int, before: int = 0, after: int = 0) -> torch.Tensor:
    """x [B, L, *rest] -> [B, (before + nc + after) * w, *rest], nc = num_blocks(L, w): `before` blocks of zeros,
    x, zeros up to whole blocks, `after` blocks of zeros. Works for every dtype, bool included."""
    L = x.shape[1]
    nc = num_blocks(L, w)
    zeros = lambda n: x.new_zeros(x.shape[0], n, *x.shape[2:])  # noqa: E731
    if isinstance(L, int):
        pad = nc * w - L + after * w
        return x if before == pad == 0 else torch.cat([zeros(before * w), x, zeros(pad)], dim=1)
    # A symbolic L (torch.export): zeros of static sizes, then a slice, so that no size depends on L % w and
    # the exported graph holds for every length.
    padded = torch.cat([zeros(before * w), x, zeros((after + 1) * w)], dim=1)
    return contiguous(padded.narrow(1, 0, (before + nc + after) * w))


def contiguous(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy. Unlike .contiguous() or reshape, it asks nothing about the sizes, so that torch.export
    adds no guard such as batch != 1 (which would make the exported graph refuse a batch of one)."""
    return x.clone(memory_format=torch.contiguous_format)


def num_blocks(length: int, w: int) -> int:
    # Written with positive operands only: an exported graph's integer division truncates (ONNX Div),
    # which equals floor division only there.
    return (length + w - 1) // w


# Key slots per block are padded to a multiple of this: CUDA's memory-efficient SDPA wants every mask
# stride but the last to be a multiple of 8, and otherwise copies the mask on every call.
KEY_MULTIPLE = 8


def num_keys(w: int, num_global: int = 0) -> int:
    """Key slots per block: 3w window keys, the global keys, masked slack up to a multiple of KEY_MULTIPLE."""
    return num_blocks(3 * w + num_global, KEY_MULTIPLE) * KEY_MULTIPLE


def key_windows(x: torch.Tensor, w: int, extra: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, L, *rest] -> [B, nc, num_keys(w, G), *rest]: block c gets blocks c-1, c, c+1 of x, then `extra`
    [B, G, *rest], then zeros up to the padded key count.

    Blocks before the start and after the end are zeros; the band mask hides them, and the slack slots.
    """
    B, L, rest = x.shape[0], x.shape[1], x.shape[2:]
    nc = num_blocks(L, w)
    xb = _pad_blocks(x, w, 1, 1).view(B, nc + 2, w, *rest)  # [B, nc + 2, w, *rest]
    parts = [xb[:, :-2], xb[:, 1:-1], xb[:, 2:]]
    G = 0 if extra is None else extra.shape[1]
    if G:
        parts.append(extra[:, None].expand(B, nc, *extra.shape[1:]))
    slack = num_keys(w, G) - 3 * w - G
    if not isinstance(slack, int) or slack:  # a count sized at run time (export) may be 0: an empty part then
        parts.append(x.new_zeros(B, nc, slack, *rest))
    return torch.cat(parts, dim=2)


def window_mask(keep: torch.Tensor, local_keys: torch.Tensor, w: int, dtype: torch.dtype,
                global_valid: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                global_segments: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask [B * nc, 1, w, num_keys(w, G)] for sliding_window_attention.

    keep [B, L] bool: real tokens. local_keys [B, L] bool: keys reachable through the window (real tokens
    that are not global; global tokens are reached through their own columns instead, so they are not
    counted twice). global_valid [B, G] bool: which global-key slots hold a real global token.
    segments [B, L] and global_segments [B, G] (packed documents): a key is seen only from its own segment.

    Every row allows at least one key: a query that is not a real token (padding, or the tail of the last
    block) sees itself. CUDA's fused kernels return NaN for a row with no key at all, and 0 x NaN stays NaN
    when padding is zeroed, so such a row would poison every real token whose window reaches it.
    """
    B, L = keep.shape
    nc, S = num_blocks(L, w), num_keys(w, 0 if global_valid is None else global_valid.shape[1])
    a = torch.arange(w, device=keep.device)[:, None]
    b = torch.arange(S, device=keep.device)[None, :]
    # |(c*w + a) - ((c-1)*w + b)| <= w over the 3w window keys; past them the slots decide by themselves.
    band = ((b >= a) & (b <= a + 2 * w)) | (b >= 3 * w)  # [w, S]
    allowed = band & key_windows(local_keys, w, global_valid)[:, :, None, :]  # [B, nc, w, S]
    if segments is not None:
        query_segment = _pad_blocks(segments, w).view(B, nc, w, 1)
        allowed &= query_segment == key_windows(segments, w, global_segments)[:, :, None, :]
    not_real = ~_pad_blocks(keep, w).view(B, nc, w, 1)
    allowed |= not_real & (b == a + w)  # the query's own slot, in the middle block
    # The dtype's most negative finite value rather than -inf, with q's dtype, so that SDPA casts nothing.
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.view(B * nc, 1, w, S)


def attend(q, k, v, mask, dropout_p: float, sdpa_backends: tuple | None):
    """softmax(q k^T / sqrt(D) + mask) v over [N, H, S, D] tensors: fused SDPA restricted to sdpa_backends
    (from sdpa.choose_backends); with None, explicit with an fp32 softmax."""
    if sdpa_backends is not None:
        with sdpa_kernel(list(sdpa_backends), set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1])) + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)


def sliding_window_attention(q, k, v, w: int, mask, k_global=None, v_global=None,
                             dropout_p: float = 0.0, sdpa_backends: tuple | None = None):
    """Local (+ global-key) attention. q, k, v [B, L, H, D]; k_global, v_global [B, G, H, D]; mask from
    window_mask; sdpa_backends as for attend. Returns [B, L, H, D]."""
    B, L, H, D = q.shape
    nc = num_blocks(L, w)
    qb = _pad_blocks(q, w).view(B * nc, w, H, D).transpose(1, 2)  # [B*nc, H, w, D]
    kw = key_windows(k, w, k_global).flatten(0, 1).transpose(1, 2)  # [B*nc, H, S, D], S = num_keys(w, G)
    vw = key_windows(v, w, v_global).flatten(0, 1).transpose(1, 2)
    out = attend(qb, kw, vw, mask, dropout_p, sdpa_backends)  # [B*nc, H, w, D]
    return out.transpose(1, 2).reshape(B, nc * w, H, D).narrow(1, 0, L)
