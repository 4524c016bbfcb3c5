"""Band attention on CPU in eager mode: key windows as overlapping views of k and v.

Query block c (positions c*n .. c*n + n - 1, n = BLOCKS[kernel]) sees keys c*n - w .. c*n + n - 1 + w: 2w + n
keys that lie next to each other in k. With w zeros before k, block c's window starts at row c*n, so all the
windows are one as_strided view [nc, 2w + n, *] of the padded k. Blocks of w queries against three copied
key blocks (banded.key_windows) score 3w keys for the 2w + 1 each query may see; blocks of 64 score 2w + 64.
Two kernels read the views (measured, one layer of longformer-base at 4,096 tokens on a 2-core EPYC):

- "flash", fp32 without autograd or dropout: CPU's fused flash kernel (blocks of 32), the inner blocks'
  windows views of k and v themselves, the end blocks' views of padded copies of their rows. The
  global keys cannot be part of the view; they are attended apart and merged through the log-sum-exp of
  each part, which the flash kernel returns (the public SDPA does not):
  out = e^(lse_w - lse) out_w + sum_g e^(s_g - lse) v_g.
- "explicit", everything else (training, dropout, bf16): ExplicitBand (blocks of 64), matmuls for every head
  over groups of blocks whose scores stay in cache, the scores key-major [blocks, H, 2w + n + G, n]: the window
  is the first, untransposed operand of the first matmul and the right operand of the second. Each group's
  windows are copied into two reused buffers, with the G global keys (and values) in rows after them, so
  that one matmul and one softmax cover window and global keys. (oneDNN's bf16 matmul copies an operand
  that is neither contiguous nor transposed-contiguous anyway, into a fresh allocation each time.)
"""
import math

import torch
from torch.nn.attention import SDPBackend

from .dropout import draw_keep, factor, pack_keep, unpack_keep

# Queries per block, per kernel, and the explicit kernel's groups of blocks: their scores take about GROUP_BYTES
# and stay in cache. Measured with benchmarks/band_kernels.py, one layer's band of longformer-base at 4,096
# tokens on a 2-core EPYC, ms: flash (fp32, no autograd) 61-66 for blocks of 32, 59-62 for 64, 66-77 for 128;
# explicit in training with dropout, blocks of 64 / 128 in groups of 2 MB: bf16 133 / 136 (4 MB: 139 / 141; the
# blocks of w = 256 that training ran before: 197-202), fp32 249 / 257 (4 MB: 284 / 266; before: 330-354);
# its bf16 forward 24 / 25 (before: 28-31). Those were a head at a time; every head at once (now), in one later
# run against a head at a time: bf16 154 against 170, fp32 272 against 284; the demo model's step (4 heads,
# w = 32, 16 x 256 tokens) 215 against 238 ms, the blocks of w 210.
BLOCKS = {"flash": 32, "explicit": 64}
GROUP_BYTES = 2 << 20

_flash_with_lse = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def band_kernel(q: torch.Tensor, dropout_p: float, sdpa_backends: tuple | None) -> str | None:
    """Which kernel of this file runs the band: "flash" (CPU, fp32, no dropout, no autograd, the fused kernel
    first in sdpa_backends), "explicit" (the rest on CPU), or None (not on CPU, in torch.compile or export,
    or attention_backend "chunked", whose sdpa_backends is None: banded.sliding_window_attention runs)."""
    if (q.device.type != "cpu" or sdpa_backends is None
            or torch.compiler.is_compiling() or torch.compiler.is_exporting()):
        return None
    flash = (q.dtype == torch.float32 and not dropout_p and not (torch.is_grad_enabled() and q.requires_grad)
             and _flash_with_lse is not None and sdpa_backends[0] == SDPBackend.FLASH_ATTENTION)
    return "flash" if flash else "explicit"


def _padded(x: torch.Tensor, before: int, rows: int) -> torch.Tensor:
    """x [B, L, *rest] -> [B, rows, *rest]: `before` zeros, x, zeros up to rows (x itself where that is x)."""
    if before == 0 and rows == x.shape[1]:
        return x
    zeros = lambda n: x.new_zeros(x.shape[0], n, *x.shape[2:])  # noqa: E731
    return torch.cat([zeros(before), x, zeros(rows - before - x.shape[1])], dim=1)


def _windows(xp: torch.Tensor, nc: int, block: int, length: int) -> torch.Tensor:
    """xp [R, *rest] (one example, padded) -> the view [nc, length, *rest] whose block c is rows c * block onwards."""
    step = xp.stride(0)
    return xp.as_strided((nc, length, *xp.shape[1:]), (block * step, step, *xp.stride()[1:]), xp.storage_offset())


def band_mask(keep: torch.Tensor, local_keys: torch.Tensor, w: int, dtype: torch.dtype, kernel: str,
              segments: torch.Tensor | None = None, global_allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Additive mask for strided_band_attention's kernel ("flash" or "explicit", from band_kernel) in dtype
    (keep, local_keys, segments as for banded.window_mask). Query a of a block sees slots a .. a + 2w
    (|query - key| <= w); a query that is not a real token sees itself (slot a + w), so that no row is empty.
    With n = BLOCKS[kernel] queries a block and S = 2w + n: flash [B, nc, 1, n, S]; explicit key-major
    [B, nc, S + G, n], rows S .. S + G - 1 the global keys, which global_allowed [B, L, G] (bool, or None for
    G = 0) says each query sees."""
    B, L = keep.shape
    n = BLOCKS[kernel]
    nc, S = -(-L // n), 2 * w + n
    windows = lambda x: torch.stack([_windows(r, nc, n, S) for r in _padded(x, w, nc * n + 2 * w)])  # noqa: E731
    a = torch.arange(n, device=keep.device)[:, None]
    b = torch.arange(S, device=keep.device)[None, :]
    band = (b >= a) & (b <= a + 2 * w)  # [n, S]
    allowed = band & windows(local_keys)[:, :, None, :]  # [B, nc, n, S]
    if segments is not None:
        allowed &= _padded(segments, 0, nc * n).view(B, nc, n, 1) == windows(segments)[:, :, None]
    not_real = ~_padded(keep, 0, nc * n).view(B, nc, n, 1)
    allowed |= not_real & (b == a + w)
    if kernel == "flash":
        return _additive(allowed, dtype).unsqueeze(2)
    if global_allowed is not None:
        allowed = torch.cat([allowed, _padded(global_allowed, 0, nc * n).view(B, nc, n, -1)], dim=-1)
    return _additive(allowed.transpose(-1, -2), dtype)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, the dtype's most negative finite value elsewhere (contiguous)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def strided_band_attention(kernel: str, q, k, v, w: int, mask, k_global=None, v_global=None, global_allowed=None,
                           dropout_p: float = 0.0, project=None):
    """q, k, v [B, L, H, D]; kernel from band_kernel and mask from band_mask for it; k_global, v_global
    [B, G, H, D] and global_allowed [B, L, G] bool (which global keys each query sees; the flash kernel's), or
    None. project: None, or a function returning q, k and v again, which the explicit kernel then calls in
    backward instead of keeping them. Returns [B, L, H, D]."""
    if kernel == "flash":
        return _flash_band(q, k, v, w, mask, k_global, v_global, global_allowed)
    return ExplicitBand.apply(q, k, v, k_global, v_global, mask, w, dropout_p, project)


def _flash_band(q, k, v, w: int, mask, k_global, v_global, global_allowed):
    B, L, H, D = q.shape
    nc, n = mask.shape[1], mask.shape[3]
    qp = _padded(q, 0, nc * n)
    out, lse = q.new_empty(B, nc * n, H, D), q.new_empty(B, H, nc * n)
    # Blocks lo .. hi - 1 have windows inside the sequence: views of k and v themselves. Only the blocks at either
    # end, whose windows reach past it, read a padded copy of the rows they need (not of all of k and v: 2 x 12 MB
    # copied, into fresh pages, a layer of longformer-base at 4,096 tokens).
    lo = min(-(-w // n), nc)
    hi = max(lo, min(nc, (L - w - n) // n + 1))
    for b in range(B):  # the windows are a view of one example's rows: a batch of examples is no single stride
        for c0, c1 in ((0, lo), (lo, hi), (hi, nc)):
            if c0 == c1:
                continue
            first, end = c0 * n - w, c1 * n + w  # the rows of k and v these windows read
            rows = (_padded(x[b:b + 1, max(first, 0):min(end, L)], max(-first, 0), end - first)[0] for x in (k, v))
            kw, vw = (_windows(r, c1 - c0, n, 2 * w + n).transpose(1, 2) for r in rows)  # [blocks, H, S, D]
            o, s = _flash_with_lse(qp[b, c0 * n:c1 * n].view(c1 - c0, n, H, D).transpose(1, 2), kw, vw, 0.0, False,
                                   attn_mask=mask[b, c0:c1])
            out[b, c0 * n:c1 * n].view(c1 - c0, n, H, D).copy_(o.transpose(1, 2))  # o [blocks, H, n, D]
            lse[b, :, c0 * n:c1 * n].view(H, c1 - c0, n).copy_(s.transpose(0, 1))  # s [blocks, H, n]
    out = out[:, :L]
    if k_global is None:
        return out
    lse = lse[..., :L]  # [B, H, L]
    scores = torch.matmul(q.transpose(1, 2), k_global.permute(0, 2, 3, 1)).mul_(1.0 / math.sqrt(D))  # [B, H, L, G]
    scores.masked_fill_(~global_allowed[:, None], torch.finfo(scores.dtype).min)
    total = torch.logaddexp(lse, torch.logsumexp(scores, dim=-1))  # [B, H, L]
    probs = torch.exp(scores - total[..., None])
    out.mul_(torch.exp(lse - total).transpose(1, 2)[..., None])
    for b in range(B):  # out[b] += probs[b] @ v_global[b], per head, written in place: [H, L, G] @ [H, G, D]
        out[b].transpose(0, 1).baddbmm_(probs[b], v_global[b].transpose(0, 1))
    return out



class ExplicitBand(torch.autograd.Function):
    """softmax(q k^T / sqrt(D) + mask) * keep / (1 - p) @ v over the band and the global keys, every head at once
    over groups of blocks. It keeps q, k and v (or a function making them again) and its dropout decisions as
    bits; backward builds the block-major copies, each group's windows and probabilities again. A window's
    gradient goes back to the keys it was read from: consecutive windows overlap, so it is added a block at a
    time into an fp32 sum."""

    @staticmethod
    def forward(ctx, q, k, v, k_global, v_global, mask, w: int, dropout_p: float, project=None):
        B, L, H, D = q.shape
        nc, n = mask.shape[1], mask.shape[3]
        qb, kh, vh, kgh, vgh = _operands(q, k, v, k_global, v_global, w, nc, n)
        out = torch.empty_like(qb)  # [B, nc, H, n, D]
        decisions = []  # per group, packed as bits
        for b, blocks, kc, vc in _groups(kh, vh, kgh, vgh, w, nc, n):
            probs = _probs(qb[b, blocks], kc, mask[b, blocks])
            if dropout_p:
                keep = draw_keep(probs.shape, dropout_p, q.device)
                probs.mul_(factor(keep, probs.dtype))
                decisions.append(pack_keep(keep))
            o = out[b, blocks].flatten(0, 1)
            torch.baddbmm(o, probs.flatten(0, 1).transpose(1, 2), vc.flatten(0, 1), beta=0,
                          alpha=1.0 / (1.0 - dropout_p), out=o)
        # Kept as one tensor: a small allocation per group, alive until backward, would pin the heap pages
        # between them (measured +0.4 GB of peak RSS in an fp32 training step of longformer-base).
        ctx.group_bits = [len(d) for d in decisions]
        # q, k and v as they came (the linear layers' outputs), or nothing where project makes them again; their
        # padded copies are made again in backward. Keeping those copies instead put 3 new allocations a layer
        # between the step's short-lived ones: +0.3 GB of peak RSS (fragmented heap) in an fp32 step of
        # longformer-base.
        ctx.project, kept = project, () if project else (q, k, v)
        ctx.save_for_backward(k_global, v_global, mask, torch.cat(decisions) if decisions else None, *kept)
        ctx.w, ctx.dropout_p = w, dropout_p
        return _tokens(out, 0, L)

    @staticmethod
    def backward(ctx, grad_out):
        k_global, v_global, mask, bits, *kept = ctx.saved_tensors
        q, k, v = ctx.project() if ctx.project else kept
        w, p = ctx.w, ctx.dropout_p
        decisions = bits.split(ctx.group_bits) if p else None
        B, L, H, D = q.shape
        nc, n = mask.shape[1], mask.shape[3]
        qb, kh, vh, kgh, vgh = _operands(q, k, v, k_global, v_global, w, nc, n)
        S = 2 * w + n
        go = _block_major(grad_out, nc, n)
        grad_q = torch.empty_like(qb)  # every block written once
        acc = torch.promote_types(qb.dtype, torch.float32)
        # The windows' gradients, summed block by block: the rows of kh, then whole blocks past its end.
        grad_k, grad_v = (torch.zeros(B, nc + -(-S // n), H, n, D, dtype=acc) for _ in range(2))
        grad_kg, grad_vg = (None if x is None else torch.zeros(x.shape, dtype=acc) for x in (kgh, vgh))
        # Dropout's 1 / (1 - p) multiplies every gradient, the softmax scale 1 / sqrt(D) q's and k's: q's both in the
        # matmul that writes it; k's scale comes with qb, which carries it, and k's and v's 1 / (1 - p) goes on their
        # sums at the end, in place, before the cast to q's dtype.
        scale_q, scale_kv = 1.0 / math.sqrt(D) / (1.0 - p), 1.0 / (1.0 - p)
        flat = lambda x: x.flatten(0, 1)  # noqa: E731  [m, H, *] -> [m * H, *]
        for i, (b, blocks, kc, vc) in enumerate(_groups(kh, vh, kgh, vgh, w, nc, n)):
            probs = _probs(qb[b, blocks], kc, mask[b, blocks])  # [m, H, S + G, n]
            kept = factor(unpack_keep(decisions[i], probs.shape), probs.dtype) if p else None
            g = flat(go[b, blocks])  # [m * H, n, D]
            gv = torch.bmm(flat(probs if kept is None else probs * kept), g)
            _fold(grad_v, grad_vg, gv.view(kc.shape), b, blocks.start, S)
            grad_probs = torch.bmm(flat(vc), g.transpose(1, 2)).view(probs.shape)
            if kept is not None:
                grad_probs.mul_(kept)
            grad_scores = flat(torch.ops.aten._softmax_backward_data(grad_probs, probs, 2, probs.dtype))
            gq = flat(grad_q[b, blocks])
            torch.baddbmm(gq, grad_scores.transpose(1, 2), flat(kc), beta=0, alpha=scale_q, out=gq)
            _fold(grad_k, grad_kg, torch.bmm(grad_scores, flat(qb[b, blocks])).view(kc.shape), b, blocks.start, S)
        glob = lambda g, scale: None if g is None else g.mul_(scale).to(q.dtype).transpose(1, 2)  # noqa: E731
        # k's and v's past the w zeros before k
        return (_tokens(grad_q, 0, L), _tokens(grad_k, w, L, scale_kv, q.dtype), _tokens(grad_v, w, L, scale_kv, q.dtype),
                glob(grad_kg, scale_kv), glob(grad_vg, scale_kv), None, None, None, None)


def _operands(q, k, v, k_global, v_global, w: int, nc: int, n: int):
    """q / sqrt(D) block-major [B, nc, H, n, D] (zeros after it); k and v head-major [B, H, nc * n + 2w, D] (w zeros
    before, the rest after), where each head's windows are a strided view; the global keys and values [B, H, G, D]."""
    kh, vh = (_head_major(x, w, nc * n + 2 * w) for x in (k, v))
    kgh, vgh = (None if x is None else x.transpose(1, 2) for x in (k_global, v_global))
    return _block_major(q, nc, n, 1.0 / math.sqrt(q.shape[-1])), kh, vh, kgh, vgh


def _head_major(x, before: int, rows: int):
    """x [B, L, H, D] -> [B, H, rows, D] contiguous: `before` zeros, x, zeros up to rows, in one copy of x."""
    B, L, H, D = x.shape
    out = x.new_empty(B, H, rows, D)
    out[:, :, :before].zero_()
    out[:, :, before + L:].zero_()
    out[:, :, before:before + L].copy_(x.transpose(1, 2))
    return out


def _block_major(x, nc: int, n: int, scale: float = 1.0):
    """x [B, L, H, D] -> x * scale [B, nc, H, n, D] contiguous, zeros after x."""
    B, L, H, D = x.shape
    out = x.new_empty(B, nc, H, n, D)
    return torch.mul(_padded(x, 0, nc * n).view(B, nc, n, H, D).transpose(2, 3), scale, out=out)


def _tokens(x, first: int, L: int, scale: float = 1.0, dtype: torch.dtype | None = None):
    """x [B, blocks, H, n, D] (multiplied by scale in place) -> its rows first .. first + L - 1 in dtype (x's where
    None), [B, L, H, D]: a view of a token-major copy, cast as it is copied. (x.reshape(...).to(dtype) made two
    copies, the first in x's fp32: 6-15 ms each, under torch.profiler, in a bf16 step of longformer-base.)"""
    B, nb, H, n, D = x.shape
    if scale != 1.0:
        x.mul_(scale)
    out = torch.empty(B, nb, n, H, D, dtype=dtype or x.dtype, device=x.device)
    return out.copy_(x.transpose(2, 3)).view(B, nb * n, H, D)[:, first:first + L]


def _groups(kh, vh, kgh, vgh, w: int, nc: int, n: int):
    """(example, blocks, keys, values) for groups of blocks (a slice) whose scores, every head's, take about
    GROUP_BYTES; keys and values [m, H, S + G, D] hold each block's window, then the G global keys (values), in
    two buffers that every group reuses."""
    B, H, _, D = kh.shape
    G, S = 0 if kgh is None else kgh.shape[2], 2 * w + n
    per_group = max(1, min(nc, GROUP_BYTES // (H * (S + G) * n * kh.element_size())))
    buffers = [x.new_empty(per_group, H, S + G, D) for x in (kh, vh)]
    for b in range(B):
        windows = [_windows(x[b].transpose(0, 1), nc, n, S).transpose(1, 2) for x in (kh, vh)]  # [nc, H, S, D]
        if G:  # the same for every group of the example
            for buf, glob in zip(buffers, (kgh, vgh)):
                buf[:, :, S:].copy_(glob[b].expand(per_group, H, G, D))
        for c0 in range(0, nc, per_group):
            blocks = slice(c0, min(c0 + per_group, nc))
            m = blocks.stop - c0
            for buf, win in zip(buffers, windows):
                buf[:m, :, :S].copy_(win[blocks])
            yield b, blocks, buffers[0][:m], buffers[1][:m]


def _probs(q, keys, mask):
    """q [m, H, n, D] times 1 / sqrt(D), keys [m, H, K, D], mask [m, K, n] -> probabilities key-major
    [m, H, K, n], the softmax over the keys in q's dtype (CPU's bf16 softmax sums in fp32)."""
    return torch.softmax(torch.matmul(keys, q.transpose(-1, -2)).add_(mask[:, None]), dim=2)


def _fold(grad, grad_global, g, b: int, c0: int, S: int):
    """Adds the windows' gradient g [m, H, S + G, D] of blocks c0 .. c0 + m - 1 back to the rows they were read
    from: grad [B, blocks, H, n, D] (window c starts at block c) and grad_global [B, H, G, D]. A window at a time
    (consecutive windows overlap), its whole blocks in one add: 98 against 142 us a group of two windows of
    longformer-base at 4,096 tokens, where a block of every window at a time took an add a block."""
    m, H, _, D = g.shape
    n = grad.shape[3]
    whole = S // n
    for j in range(m):
        # add_ on the view: `grad[...] += g` would also copy the sum onto itself (__setitem__)
        grad[b, c0 + j:c0 + j + whole].add_(g[j, :, :whole * n].view(H, whole, n, D).transpose(0, 1))
        if S > whole * n:  # the window's last, partial block
            grad[b, c0 + j + whole, :, :S - whole * n].add_(g[j, :, whole * n:S])
    if grad_global is not None:
        grad_global[b].add_(g[:, :, S:].sum(0))
