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
from torch.nn.attention import sdpa_kernel

from .dropout import draw_keep, pack_keep, unpack_keep


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
    if slack:
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


class GroupedAttention(torch.autograd.Function):
    """Band attention on CPU, query blocks taken in cache-sized groups, with dropout softmax(q k^T / sqrt(D)
    + mask) * keep / (1 - p) @ v: where the fused kernel takes no dropout, and in bf16/fp16, where it is
    slower (65 against 49 ms a layer of longformer-base at 4,096 tokens).

    It keeps only q, k and v (head-major, one copy each) and its dropout decisions as bits. Each group's key
    windows and probabilities are built again in backward: the windows are 3x the size of k and v, which a
    fused kernel would keep, and torch's unfused fallback would keep them with every block's scores and a
    byte per dropout decision. Scales are applied to the small tensors (q, v, gradients) rather than to the
    [H, n, w, S] ones.
    """

    @staticmethod
    def forward(ctx, q, k, v, k_global, v_global, mask, w: int, dropout_p: float):
        """q, k, v [B, L, H, D]; k_global, v_global [B, G, H, D] or None; mask [B * nc, 1, w, S].
        Returns [B, nc * w, H, D] (the tail of the last block is cut by the caller)."""
        B, L, H, D = q.shape
        nc = num_blocks(L, w)
        qh = _head_major(q, w, 0)  # [B, H, nc * w, D]
        kh, vh = _head_major(k, w, 1), _head_major(v, w, 1)  # [B, H, (nc + 2) * w, D]: a zero block each side
        kgh, vgh = _head_major(k_global), _head_major(v_global)  # [B, H, G, D] or None
        groups = _groups(B, nc, H * w * mask.shape[-1] * q.element_size())
        out = q.new_empty(B, nc * w, H, D)
        decisions = []  # per group, packed as bits
        for b, c0, c1 in groups:
            qg, kg, vg, mg = _group(qh, kh, vh, kgh, vgh, mask, w, nc, b, c0, c1)
            probs = _probs(qg, kg, mg)
            if dropout_p:
                keep = _band_keep(probs.shape, w, 0 if kgh is None else kgh.shape[2], dropout_p, q.device)
                probs.mul_(_factor(keep, probs.dtype))
                vg.mul_(1.0 / (1.0 - dropout_p))
                decisions.append(pack_keep(keep))
            _blocks(out, w, b, c0, c1).copy_(torch.matmul(probs, vg))
        ctx.save_for_backward(qh, kh, vh, kgh, vgh, mask, *decisions)
        ctx.w, ctx.nc, ctx.groups, ctx.dropout_p, ctx.q_shape = w, nc, groups, dropout_p, q.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qh, kh, vh, kgh, vgh, mask, *decisions = ctx.saved_tensors
        w, nc, p = ctx.w, ctx.nc, ctx.dropout_p
        grad_q = torch.empty_like(qh)  # every block written once; the windows overlap: k and v summed into zeros
        grad_k, grad_v = torch.zeros_like(kh), torch.zeros_like(vh)
        grad_kg = None if kgh is None else torch.zeros_like(kgh)
        grad_vg = None if vgh is None else torch.zeros_like(vgh)
        sm_scale = 1.0 / math.sqrt(qh.shape[-1])
        for i, (b, c0, c1) in enumerate(ctx.groups):
            qg, kg, vg, mg = _group(qh, kh, vh, kgh, vgh, mask, w, nc, b, c0, c1)
            probs = _probs(qg, kg, mg)
            go = _blocks(grad_out, w, b, c0, c1).contiguous()  # [H, n, w, D]
            kept = None
            if p:
                kept = _factor(unpack_keep(decisions[i], probs.shape), probs.dtype)
                go.mul_(1.0 / (1.0 - p))
            gv = torch.matmul((probs if kept is None else probs * kept).transpose(-1, -2), go)  # [H, n, S, D]
            grad_probs = torch.matmul(go, vg.transpose(-1, -2))
            if kept is not None:
                grad_probs.mul_(kept)
            grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            grad_q[b, :, c0 * w:c1 * w].view_as(qg).copy_(torch.matmul(grad_scores, kg).mul_(sm_scale))
            gk = torch.matmul(grad_scores.transpose(-1, -2), qg).mul_(sm_scale)  # [H, n, S, D]
            _fold_windows(grad_k, grad_kg, gk, w, b, c0, c1)
            _fold_windows(grad_v, grad_vg, gv, w, b, c0, c1)
        B, L, H, D = ctx.q_shape
        unpad = lambda g, first: g.narrow(2, first, L).transpose(1, 2)  # noqa: E731  [B, H, *, D] -> [B, L, H, D]
        return (unpad(grad_q, 0), unpad(grad_k, w), unpad(grad_v, w),
                None if grad_kg is None else grad_kg.transpose(1, 2), None if grad_vg is None else grad_vg.transpose(1, 2),
                None, None, None)


def _head_major(x, w: int | None = None, pad: int = 0):
    """x [B, L, H, D] -> [B, H, (pad + nc + pad) * w, D] contiguous, with `pad` zero blocks either side and
    zeros up to whole blocks; without w, x [B, G, H, D] -> [B, H, G, D]. None stays None."""
    if x is None:
        return None
    if w is not None:
        x = _pad_blocks(x, w, pad, pad)
    return contiguous(x.transpose(1, 2))


def _groups(B: int, nc: int, block_bytes: int) -> list[tuple[int, int, int]]:
    """(example, first block, end block) for groups of query blocks whose scores take about GROUP_BYTES."""
    n = max(1, GROUP_BYTES // block_bytes)
    return [(b, c0, min(c0 + n, nc)) for b in range(B) for c0 in range(0, nc, n)]


def _blocks(x, w: int, b: int, c0: int, c1: int):
    """x [B, nc * w, H, D] -> the view [H, n, w, D] of example b's blocks c0 .. c1 - 1."""
    return x[b, c0 * w:c1 * w].unflatten(0, (c1 - c0, w)).permute(2, 0, 1, 3)


def _group(qh, kh, vh, kgh, vgh, mask, w: int, nc: int, b: int, c0: int, c1: int):
    """One group's q [H, n, w, D], key and value windows [H, n, S, D], and mask [1, n, w, S]."""
    S, n = mask.shape[-1], c1 - c0
    qg = qh[b, :, c0 * w:c1 * w].unflatten(1, (n, w)).contiguous()
    kg, vg = (_windows(x[b], None if g is None else g[b], w, c0, c1, S) for x, g in ((kh, kgh), (vh, vgh)))
    return qg, kg, vg, mask[b * nc + c0:b * nc + c1].transpose(0, 1)


def _windows(xh, xg, w: int, c0: int, c1: int, S: int):
    """xh [H, (nc + 2) * w, D] (a zero block either side), xg [H, G, D] or None -> [H, n, S, D]: for blocks
    c0 .. c1 - 1, blocks c - 1, c, c + 1, the global keys, zeros up to S."""
    n, H, D = c1 - c0, xh.shape[0], xh.shape[-1]
    xb = xh[:, c0 * w:(c1 + 2) * w].unflatten(1, (n + 2, w))  # [H, n + 2, w, D]
    parts = [xb[:, :-2], xb[:, 1:-1], xb[:, 2:]]
    if xg is not None:
        parts.append(xg[:, None].expand(H, n, *xg.shape[1:]))
    slack = S - 3 * w - (0 if xg is None else xg.shape[1])
    if slack:
        parts.append(xh.new_zeros(H, n, slack, D))
    return torch.cat(parts, dim=2)


def _fold_windows(grad, grad_global, g, w: int, b: int, c0: int, c1: int):
    """Adds the windows' gradient g [H, n, S, D] back to the keys it came from: grad [B, H, (nc + 2) * w, D]
    (padded as _windows reads it) and grad_global [B, H, G, D]."""
    n = c1 - c0
    xb = grad[b, :, c0 * w:(c1 + 2) * w].unflatten(1, (n + 2, w))  # [H, n + 2, w, D]
    for i in range(3):  # block c - 1 + i of each window; consecutive windows overlap, hence one add at a time
        xb[:, i:i + n] += g[:, :, i * w:(i + 1) * w]
    if grad_global is not None:
        grad_global[b] += g[:, :, 3 * w:3 * w + grad_global.shape[2]].sum(1)


def _probs(q, k, mask):
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-1, -2)).add_(mask)
    # In q's dtype: CPU's bf16 softmax sums in fp32 itself, and rounds as an fp32 softmax cast back would
    # (one ulp apart in 1 of 80,000 probabilities), 7x faster than that fp32 pass and its cast.
    return torch.softmax(scores, dim=-1)


def _band_keep(shape: tuple, w: int, G: int, p: float, device: torch.device) -> torch.Tensor:
    """Dropout decisions for a group's scores [H, n, w, S], drawn only where the band lets a query see a key:
    row a's window keys a .. a + 2w and the G global keys, 2w + 1 + G of the S slots (66% for longformer-base).
    The other slots hold False: their probabilities are 0, and stay 0 whatever is decided there."""
    H, n, _, S = shape
    keep = torch.zeros(shape, dtype=torch.bool, device=device)
    # Row a's slot a + j sits at a * S + a + j = a * (S + 1) + j of its block: rows S + 1 apart, j from 0 to 2w.
    keep.as_strided((H, n, w, 2 * w + 1), (n * w * S, w * S, S + 1, 1)).copy_(draw_keep((H, n, w, 2 * w + 1), p, device))
    if G:
        keep[..., 3 * w:3 * w + G] = draw_keep((H, n, w, G), p, device)
    return keep


def _factor(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1.0 where kept, 0.0 where dropped. Through a uint8 view: converting bool directly, or multiplying by
    it, is an unvectorized cast here, 6-8x slower than this and a multiply."""
    return keep.view(torch.uint8).to(dtype)


# Query blocks per group: the group's [H, n, w, S] scores and probabilities stay in cache up to about this
# size. Measured on a 2-core EPYC with 32 MB of L3, forward + backward: one block of longformer-base (9 MB)
# at a time is 2.1x faster than all 16 blocks of 4,096 tokens in one call, and the time rises steeply past
# ~20 MB a call; tiny blocks are grouped, so that Python's overhead stays small.
GROUP_BYTES = 16 << 20


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
    window_mask; sdpa_backends as for attend, except that on CPU, with dropout or in half precision, the
    grouped kernel runs instead. Returns [B, L, H, D]."""
    B, L, H, D = q.shape
    if sdpa_backends is not None and q.device.type == "cpu" and (dropout_p or q.dtype != torch.float32):
        return GroupedAttention.apply(q, k, v, k_global, v_global, mask, w, dropout_p).narrow(1, 0, L)
    nc = num_blocks(L, w)
    qb = _pad_blocks(q, w).view(B * nc, w, H, D).transpose(1, 2)  # [B*nc, H, w, D]
    kw = key_windows(k, w, k_global).flatten(0, 1).transpose(1, 2)  # [B*nc, H, S, D], S = num_keys(w, G)
    vw = key_windows(v, w, v_global).flatten(0, 1).transpose(1, 2)
    out = attend(qb, kw, vw, mask, dropout_p, sdpa_backends)  # [B*nc, H, w, D]
    return out.transpose(1, 2).reshape(B, nc * w, H, D).narrow(1, 0, L)
