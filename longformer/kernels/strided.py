"""Band attention for the CPU forward in fp32: key windows as overlapping views of k and v, none copied.

Query block c (positions c*n .. c*n + n - 1, n = BLOCK) sees keys c*n - w .. c*n + n - 1 + w: 2w + n keys
that lie next to each other in k. With w zeros before k, block c's window starts at row c*n, so all the
windows are one as_strided view [nc, H, 2w + n, D] of the padded k, and CPU's fused attention reads it
as it is. Blocks of w queries against three copied key blocks (banded.key_windows) score 3w keys for the
2w + 1 each query may see; blocks of 32 score 2w + 32, and copy nothing.

The global keys cannot be part of such a view. They are attended apart and merged through the log-sum-exp
of each part, which torch's CPU flash kernel returns (the public SDPA does not):

    out = e^(lse_w - lse) out_w + sum_g e^(s_g - lse) v_g,   lse = log(e^lse_w + sum_g e^s_g)

Forward only (no autograd through the overlapping views), fp32 only: in bf16 the grouped kernel is faster.
"""
import math

import torch
from torch.nn.attention import SDPBackend

# Queries per block, measured on a 2-core EPYC (longformer-base, 4,096 tokens, one layer's band in fp32):
# 64 ms for blocks of 256 (the copied windows: 87), 57 for 128, 52 for 64, 51 for 32, 57 for 16.
BLOCK = 32

_flash_with_lse = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def strided_band_applies(q: torch.Tensor, dropout_p: float, sdpa_backends: tuple | None) -> bool:
    """Whether strided_band_attention runs: on CPU, in fp32, without dropout or autograd, in eager mode, and
    where the configured SDPA backends put flash first (sdpa_backends="math" turns it off)."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and not dropout_p and _flash_with_lse is not None
            and bool(sdpa_backends) and sdpa_backends[0] == SDPBackend.FLASH_ATTENTION
            and not (torch.is_grad_enabled() and q.requires_grad)
            and not (torch.compiler.is_compiling() or torch.compiler.is_exporting()))


def _padded(x: torch.Tensor, w: int, nc: int) -> torch.Tensor:
    """x [B, L, *rest] -> [B, w + nc * BLOCK + w, *rest]: w zeros, x, zeros to whole blocks and w more."""
    zeros = lambda n: x.new_zeros(x.shape[0], n, *x.shape[2:])  # noqa: E731
    return torch.cat([zeros(w), x, zeros(nc * BLOCK - x.shape[1] + w)], dim=1)


def _windows(xp: torch.Tensor, w: int, nc: int) -> torch.Tensor:
    """xp [R, *rest] from _padded (one example) -> the view [nc, 2w + BLOCK, *rest] of every block's keys."""
    step = xp.stride(0)
    return xp.as_strided((nc, 2 * w + BLOCK, *xp.shape[1:]), (BLOCK * step, step, *xp.stride()[1:]),
                         xp.storage_offset())


def band_mask(keep: torch.Tensor, local_keys: torch.Tensor, w: int, dtype: torch.dtype,
              segments: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask [B, nc, 1, BLOCK, 2w + BLOCK] for strided_band_attention (keep, local_keys, segments as
    for banded.window_mask). Query a of a block sees slots a .. a + 2w (|query - key| <= w); a query that is
    not a real token sees itself (slot a + w), so that no row is empty."""
    B, L = keep.shape
    nc, S = -(-L // BLOCK), 2 * w + BLOCK
    a = torch.arange(BLOCK, device=keep.device)[:, None]
    b = torch.arange(S, device=keep.device)[None, :]
    band = (b >= a) & (b <= a + 2 * w)  # [BLOCK, S]
    keys = torch.stack([_windows(x, w, nc) for x in _padded(local_keys, w, nc)])  # [B, nc, S]
    allowed = band & keys[:, :, None, :]  # [B, nc, BLOCK, S]
    if segments is not None:
        query_segment = _padded(segments, 0, nc).view(B, nc, BLOCK, 1)
        allowed &= query_segment == torch.stack([_windows(x, w, nc) for x in _padded(segments, w, nc)])[:, :, None]
    not_real = ~_padded(keep, 0, nc).view(B, nc, BLOCK, 1)
    allowed |= not_real & (b == a + w)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=keep.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(2)


def strided_band_attention(q, k, v, w: int, mask, k_global=None, v_global=None, global_allowed=None):
    """q, k, v [B, L, H, D] fp32; mask from band_mask; k_global, v_global [B, G, H, D] and global_allowed
    [B, L, G] bool (which global keys each query sees), or None. Returns [B, L, H, D]."""
    B, L, H, D = q.shape
    nc = mask.shape[1]
    qp = q if L == nc * BLOCK else _padded(q, 0, nc)
    kp, vp = _padded(k, w, nc), _padded(v, w, nc)
    out, lse = [], []
    for b in range(B):  # the windows are a view of one example's rows: a batch of examples is no single stride
        o, s = _flash_with_lse(qp[b].view(nc, BLOCK, H, D).transpose(1, 2), _windows(kp[b], w, nc).transpose(1, 2),
                               _windows(vp[b], w, nc).transpose(1, 2), 0.0, False, attn_mask=mask[b])
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
