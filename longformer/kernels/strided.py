"""Band attention for the CPU forward without autograd: key windows as overlapping views of k and v.

Query block c (positions c*n .. c*n + n - 1, n = BLOCK) sees keys c*n - w .. c*n + n - 1 + w: 2w + n keys
that lie next to each other in k. With w zeros before k, block c's window starts at row c*n, so all the
windows are one as_strided view [nc, 2w + n, H, D] of the padded k. Blocks of w queries against three copied
key blocks (banded.key_windows) score 3w keys for the 2w + 1 each query may see; blocks of 32 score 2w + 32.
Two kernels read the views, each where it is the faster (measured, one layer of longformer-base at 4,096
tokens on a 2-core EPYC):

- fp32: CPU's fused flash kernel (50 ms; the grouped kernel of banded.py 78-85). The global keys cannot be part
  of the view; they are attended apart and merged through the log-sum-exp of each part, which the flash
  kernel returns (the public SDPA does not): out = e^(lse_w - lse) out_w + sum_g e^(s_g - lse) v_g.
- bf16: explicit matmuls per head (29-33 ms; the flash kernel 51, the grouped kernel 48), over groups of
  blocks whose scores stay in cache, the scores key-major [blocks, 2w + n + G, n]: the window is then the
  first, untransposed operand of the first matmul and the right operand of the second. (oneDNN's bf16
  matmul copies an operand that is neither contiguous nor transposed-contiguous, so each group's windows
  are copied, in cache.) Each window is read G rows longer; those rows' scores are overwritten with the
  global keys' scores, so that one softmax covers window and global keys.
"""
import math

import torch
from torch.nn.attention import SDPBackend

# Queries per block, measured as above in fp32: 64 ms for blocks of 256 (the copied windows: 87), 57 for 128,
# 52 for 64, 51 for 32, 57 for 16; in bf16 (explicit) 29 ms for 32 and for 64.
BLOCK = 32

# Blocks per matmul in the bf16 kernel: their scores take about this much, and stay in cache (measured 29 ms
# a layer with 4 MB, 30-33 with 1, 2, 8 or 16 MB).
GROUP_BYTES = 4 << 20

_flash_with_lse = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def strided_band_applies(q: torch.Tensor, dropout_p: float, sdpa_backends: tuple | None) -> bool:
    """Whether strided_band_attention runs: on CPU, in fp32 or bf16, without dropout or autograd, in eager
    mode, and with the fused attention on (sdpa_backends="math" turns the fp32 kernel off, attention_backend
    "chunked" both)."""
    if q.dtype == torch.float32:
        kernel_on = (_flash_with_lse is not None and bool(sdpa_backends)
                     and sdpa_backends[0] == SDPBackend.FLASH_ATTENTION)
    else:
        kernel_on = q.dtype == torch.bfloat16 and sdpa_backends is not None
    return (kernel_on and q.device.type == "cpu" and not dropout_p
            and not (torch.is_grad_enabled() and q.requires_grad)
            and not (torch.compiler.is_compiling() or torch.compiler.is_exporting()))


def _padded(x: torch.Tensor, before: int, rows: int) -> torch.Tensor:
    """x [B, L, *rest] -> [B, rows, *rest]: `before` zeros, x, zeros up to rows (x itself where that is x)."""
    if before == 0 and rows == x.shape[1]:
        return x
    zeros = lambda n: x.new_zeros(x.shape[0], n, *x.shape[2:])  # noqa: E731
    return torch.cat([zeros(before), x, zeros(rows - before - x.shape[1])], dim=1)


def _windows(xp: torch.Tensor, nc: int, length: int) -> torch.Tensor:
    """xp [R, *rest] (one example, padded) -> the view [nc, length, *rest] whose block c is rows c*BLOCK onwards."""
    step = xp.stride(0)
    return xp.as_strided((nc, length, *xp.shape[1:]), (BLOCK * step, step, *xp.stride()[1:]), xp.storage_offset())


def band_mask(keep: torch.Tensor, local_keys: torch.Tensor, w: int, dtype: torch.dtype,
              segments: torch.Tensor | None = None, global_allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask for strided_band_attention in dtype (keep, local_keys, segments as for banded.window_mask).
    Query a of a block sees slots a .. a + 2w (|query - key| <= w); a query that is not a real token sees itself
    (slot a + w), so that no row is empty. fp32 (the flash kernel): [B, nc, 1, BLOCK, S], S = 2w + BLOCK.
    bf16 (explicit): key-major [B, nc, S + G, BLOCK], rows S .. S + G - 1 the global keys, which global_allowed
    [B, L, G] (bool, or None for G = 0) says each query sees."""
    B, L = keep.shape
    nc, S = -(-L // BLOCK), 2 * w + BLOCK
    windows = lambda x: torch.stack([_windows(r, nc, S) for r in _padded(x, w, nc * BLOCK + 2 * w)])  # noqa: E731
    a = torch.arange(BLOCK, device=keep.device)[:, None]
    b = torch.arange(S, device=keep.device)[None, :]
    band = (b >= a) & (b <= a + 2 * w)  # [BLOCK, S]
    allowed = band & windows(local_keys)[:, :, None, :]  # [B, nc, BLOCK, S]
    if segments is not None:
        allowed &= _padded(segments, 0, nc * BLOCK).view(B, nc, BLOCK, 1) == windows(segments)[:, :, None]
    not_real = ~_padded(keep, 0, nc * BLOCK).view(B, nc, BLOCK, 1)
    allowed |= not_real & (b == a + w)
    if dtype == torch.float32:
        return _additive(allowed, dtype).unsqueeze(2)
    if global_allowed is not None:
        allowed = torch.cat([allowed, _padded(global_allowed, 0, nc * BLOCK).view(B, nc, BLOCK, -1)], dim=-1)
    return _additive(allowed.transpose(-1, -2), dtype)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, the dtype's most negative finite value elsewhere (contiguous)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def strided_band_attention(q, k, v, w: int, mask, k_global=None, v_global=None, global_allowed=None):
    """q, k, v [B, L, H, D] in fp32 or bf16; mask from band_mask; k_global, v_global [B, G, H, D] and
    global_allowed [B, L, G] bool (which global keys each query sees; the fp32 kernel's), or None.
    Returns [B, L, H, D]."""
    if q.dtype == torch.float32:
        return _flash_band(q, k, v, w, mask, k_global, v_global, global_allowed)
    return _explicit_band(q, k, v, w, mask, k_global, v_global)


def _flash_band(q, k, v, w: int, mask, k_global, v_global, global_allowed):
    B, L, H, D = q.shape
    nc = mask.shape[1]
    qp = _padded(q, 0, nc * BLOCK)
    kp, vp = (_padded(x, w, nc * BLOCK + 2 * w) for x in (k, v))
    out, lse = [], []
    for b in range(B):  # the windows are a view of one example's rows: a batch of examples is no single stride
        kw, vw = (_windows(x[b], nc, 2 * w + BLOCK).transpose(1, 2) for x in (kp, vp))  # [nc, H, S, D]
        o, s = _flash_with_lse(qp[b].view(nc, BLOCK, H, D).transpose(1, 2), kw, vw, 0.0, False, attn_mask=mask[b])
        out.append(o.transpose(1, 2).reshape(nc * BLOCK, H, D))  # o [nc, H, BLOCK, D], stored [nc, BLOCK, H, D]
        lse.append(s.transpose(0, 1).reshape(H, nc * BLOCK))  # s [nc, H, BLOCK]
    out = (out[0][None] if B == 1 else torch.stack(out))[:, :L]  # [B, L, H, D]
    if k_global is None:
        return out
    lse = torch.stack(lse)[..., :L]  # [B, H, L]
    scores = torch.matmul(q.transpose(1, 2), k_global.permute(0, 2, 3, 1)).mul_(1.0 / math.sqrt(D))  # [B, H, L, G]
    scores.masked_fill_(~global_allowed[:, None], torch.finfo(scores.dtype).min)
    total = torch.logaddexp(lse, torch.logsumexp(scores, dim=-1))  # [B, H, L]
    probs = torch.exp(scores - total[..., None])
    out.mul_(torch.exp(lse - total).transpose(1, 2)[..., None])
    for b in range(B):  # out[b] += probs[b] @ v_global[b], per head, written in place: [H, L, G] @ [H, G, D]
        out[b].transpose(0, 1).baddbmm_(probs[b], v_global[b].transpose(0, 1))
    return out


def _explicit_band(q, k, v, w: int, mask, k_global, v_global):
    B, L, H, D = q.shape
    nc, G, S = mask.shape[1], 0 if k_global is None else k_global.shape[1], 2 * w + BLOCK
    q = _padded(q * (1.0 / math.sqrt(D)), 0, nc * BLOCK)
    kp, vp = (_padded(x, w, nc * BLOCK + 2 * w + G) for x in (k, v))  # G rows more: each window reads S + G
    out = q.new_empty(B, H, nc * BLOCK, D)
    per_group = max(1, GROUP_BYTES // ((S + G) * BLOCK * q.element_size()))
    for b in range(B):
        kw, vw = (_windows(x[b], nc, S + G) for x in (kp, vp))  # [nc, S + G, H, D]
        if G:
            global_scores = torch.matmul(q[b].transpose(0, 1), k_global[b].permute(1, 2, 0))  # [H, nc * BLOCK, G]
        for h in range(H):
            for c0 in range(0, nc, per_group):
                c1 = min(c0 + per_group, nc)
                blocks = lambda x: x.unflatten(0, (c1 - c0, BLOCK))  # noqa: E731  [n * BLOCK, *] -> [n, BLOCK, *]
                scores = torch.bmm(kw[c0:c1, :, h], blocks(q[b, c0 * BLOCK:c1 * BLOCK, h]).transpose(1, 2))
                if G:  # [n, S + G, BLOCK]: the last G rows are the global keys' scores
                    scores[:, S:] = blocks(global_scores[h, c0 * BLOCK:c1 * BLOCK]).transpose(1, 2)
                probs = torch.softmax(scores.add_(mask[b, c0:c1]), dim=1)
                o = blocks(out[b, h, c0 * BLOCK:c1 * BLOCK])  # [n, BLOCK, D]
                if G:
                    global_probs = probs[:, S:].transpose(1, 2).clone()  # [n, BLOCK, G]
                    probs[:, S:] = 0  # those rows of vw are the next values in v, not the global ones
                torch.bmm(probs.transpose(1, 2), vw[c0:c1, :, h], out=o)
                if G:
                    o.baddbmm_(global_probs, v_global[b, :, h].expand(c1 - c0, G, D))
    return out.transpose(1, 2)[:, :L].contiguous()
