"""Sliding-window attention in blocks, and the helpers every band path shares: padding, key windows, the band mask.

Every band path cuts the queries into blocks of n and gives block c the keys c*n - w .. c*n + n - 1 + w: all that
its queries may see (|i - j| <= w) lie in that window of 2w + n keys, under one static band pattern (query a of a
block sees slots a .. a + 2w). The global keys come after the window, each path its own way. Here the blocks are
of n = w queries, so that each window is three whole blocks (c-1, c, c+1) of copied keys, the G global keys
appended, and the key count padded: a batch of small dense attentions, the scores never beyond [w, 3w + G] per
block, memory linear in L, in one call of torch's scaled_dot_product_attention (fused: scores and probabilities
never reach memory) or of the explicit matmul-softmax-matmul below. L need not be a multiple of n: the last block
is padded and the padding cut from the output. This is the band of the cuda, compiled and exported plans
(longformer/plan.py); kernels/strided.py has the CPU ones, which take the same masks in other layouts.
"""
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

# Key slots per block are padded to a multiple of this: CUDA's memory-efficient SDPA wants every mask
# stride but the last to be a multiple of 8, and otherwise copies the mask on every call.
KEY_MULTIPLE = 8


def num_blocks(length: int, n: int) -> int:
    # Written with positive operands only: an exported graph's integer division truncates (ONNX Div),
    # which equals floor division only there.
    return (length + n - 1) // n


def contiguous(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy. Unlike .contiguous() or reshape, it asks nothing about the sizes, so that torch.export
    adds no guard such as batch != 1 (which would make the exported graph refuse a batch of one)."""
    return x.clone(memory_format=torch.contiguous_format)


def pad(x: torch.Tensor, before: int, rows: int) -> torch.Tensor:
    """x [B, L, *rest] -> [B, rows, *rest]: `before` zeros, x, zeros up to rows (x itself where that is x). Works
    for every dtype, bool included."""
    if before == 0 and rows == x.shape[1]:
        return x
    zeros = lambda n: x.new_zeros(x.shape[0], n, *x.shape[2:])  # noqa: E731
    return torch.cat([zeros(before), x, zeros(rows - before - x.shape[1])], dim=1)


def pad_blocks(x: torch.Tensor, n: int, before: int = 0, after: int = 0) -> torch.Tensor:
    """x [B, L, *rest] -> [B, (before + nc + after) * n, *rest], nc = num_blocks(L, n): `before` blocks of zeros,
    x, zeros up to whole blocks, `after` blocks of zeros."""
    L = x.shape[1]
    nc = num_blocks(L, n)
    if isinstance(L, int):
        return pad(x, before * n, (before + nc + after) * n)
    # A symbolic L (torch.export): zeros of static sizes, then a slice, so that no size depends on L % n and
    # the exported graph holds for every length.
    zeros = lambda m: x.new_zeros(x.shape[0], m, *x.shape[2:])  # noqa: E731
    padded = torch.cat([zeros(before * n), x, zeros((after + 1) * n)], dim=1)
    return contiguous(padded.narrow(1, 0, (before + nc + after) * n))


def num_keys(w: int, n: int, num_global=0, multiple: int = 1):
    """Key slots per block: the window's 2w + n, the global keys, masked slack up to a multiple of `multiple`."""
    return num_blocks(2 * w + n + num_global, multiple) * multiple


def key_windows(x: torch.Tensor, w: int, n: int, extra: torch.Tensor | None = None,
                multiple: int = 1) -> torch.Tensor:
    """x [B, L, *rest] -> [B, nc, num_keys(w, n, G, multiple), *rest], nc = num_blocks(L, n): block c gets rows
    c*n - w .. c*n + n - 1 + w of x (zeros outside it), then `extra` [B, G, *rest], then zeros (the slack).

    Where w is whole blocks (the blocks band: n = w) the window is 2w/n + 1 shifted copies of x's blocks, which
    every tracer takes; otherwise (the CPU kernels' masks, in eager mode) an overlapping view of x, copied."""
    B, L, rest = x.shape[0], x.shape[1], x.shape[2:]
    nc = num_blocks(L, n)
    if w % n == 0:
        r = w // n
        xb = pad_blocks(x, n, r, r).view(B, nc + 2 * r, n, *rest)  # [B, nc + 2r, n, *rest]
        parts = [xb[:, i:i + nc] for i in range(2 * r + 1)]
    else:
        parts = [pad(x, w, nc * n + 2 * w).unfold(1, 2 * w + n, n).movedim(-1, 2)]  # [B, nc, 2w + n, *rest]
    G = 0 if extra is None else extra.shape[1]
    if G:
        parts.append(extra[:, None].expand(B, nc, *extra.shape[1:]))
    slack = num_keys(w, n, G, multiple) - 2 * w - n - G
    if not isinstance(slack, int) or slack:  # a count sized at run time (export) may be 0: an empty part then
        parts.append(x.new_zeros(B, nc, slack, *rest))
    return torch.cat(parts, dim=2)


def band_mask(keep: torch.Tensor, local_keys: torch.Tensor, w: int, n: int, dtype: torch.dtype,
              segments: torch.Tensor | None = None, global_allowed: torch.Tensor | None = None,
              multiple: int = 1, key_major: bool = False) -> torch.Tensor:
    """The additive mask of blocks of n queries against key_windows(k, w, n, the G global keys, multiple):
    [B, nc, n, S] (key-major: [B, nc, S, n]), 0 where query a of block c may see slot s, else the dtype's most
    negative finite value (not -inf, and q's dtype, so that SDPA casts nothing).

    keep [B, L] bool: real tokens. local_keys [B, L] bool: keys reached through the window (real tokens that are
    not global: those are reached through their own slots instead, so they are not counted twice). segments
    [B, L] (packed documents): a key is seen only from its own segment. global_allowed [B, L, G] bool: the global
    slots each query sees (masks.global_allowed), or None for none.

    Every row allows at least one key: a query that is not a real token (padding, or the tail of the last block)
    sees itself. CUDA's fused kernels return NaN for a row with no key at all, and 0 x NaN stays NaN when
    padding is zeroed, so such a row would poison every real token whose window reaches it."""
    B, L = keep.shape
    nc = num_blocks(L, n)
    a = torch.arange(n, device=keep.device)[:, None]
    b = torch.arange(2 * w + n, device=keep.device)[None, :]
    allowed = ((b >= a) & (b <= a + 2 * w)) & key_windows(local_keys, w, n)[:, :, None, :]  # [B, nc, n, 2w + n]
    if segments is not None:
        allowed &= pad_blocks(segments, n).view(B, nc, n, 1) == key_windows(segments, w, n)[:, :, None, :]
    allowed |= ~pad_blocks(keep, n).view(B, nc, n, 1) & (b == a + w)  # the query's own slot
    parts = [allowed]
    G = 0 if global_allowed is None else global_allowed.shape[2]
    if G:
        parts.append(pad_blocks(global_allowed, n).view(B, nc, n, G))
    slack = num_keys(w, n, G, multiple) - 2 * w - n - G
    if not isinstance(slack, int) or slack:
        parts.append(allowed.new_zeros(B, nc, n, slack))
    allowed = torch.cat(parts, dim=-1) if len(parts) > 1 else allowed
    if key_major:
        allowed = allowed.transpose(-1, -2)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)  # contiguous in either layout
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def attend(q, k, v, mask, dropout_p: float, sdpa_backends: tuple | None):
    """softmax(q k^T / sqrt(D) + mask) v over [N, H, S, D] tensors: fused SDPA restricted to sdpa_backends (the
    plan's), or with None explicit, with an fp32 softmax."""
    if sdpa_backends is not None:
        with sdpa_kernel(list(sdpa_backends), set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1])) + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v)


def blocks_band(q, k, v, w: int, masks, glob, dropout_p: float, plan, project=None):
    """The band in blocks of w queries. q, k, v [B, L, H, D]; masks: AttentionMasks; glob: the global keys and
    values [B, G, H, D], or None; plan.sdpa as for attend (project is the explicit band's). Returns [B, L, H, D]."""
    B, L, H, D = q.shape
    nc = num_blocks(L, w)
    S = num_keys(w, w, masks.num_global if glob else 0, KEY_MULTIPLE)
    mask = masks.band_mask(w, w, q.dtype, multiple=KEY_MULTIPLE).view(B * nc, 1, w, S)
    k_glob, v_glob = glob or (None, None)
    qb = pad_blocks(q, w).view(B * nc, w, H, D).transpose(1, 2)  # [B*nc, H, w, D]
    kw = key_windows(k, w, w, k_glob, KEY_MULTIPLE).flatten(0, 1).transpose(1, 2)  # [B*nc, H, S, D]
    vw = key_windows(v, w, w, v_glob, KEY_MULTIPLE).flatten(0, 1).transpose(1, 2)
    out = attend(qb, kw, vw, mask, dropout_p, plan.sdpa)  # [B*nc, H, w, D]
    return out.transpose(1, 2).reshape(B, nc * w, H, D).narrow(1, 0, L)
