"""The band on CPU in eager mode (the cpu-inference and cpu-training plans): key windows as overlapping views.

Query block c (positions c*n .. c*n + n - 1, n = plan.block) sees keys c*n - w .. c*n + n - 1 + w: 2w + n keys that
lie next to each other in k. With w zeros before k, block c's window starts at row c*n, so all the windows are one
as_strided view [nc, 2w + n, *] of the padded k. Blocks of w queries against three copied key blocks
(kernels/banded.py) score 3w keys for the 2w + 1 each query may see; blocks of 64 score 2w + 64. Two kernels read
the views, with banded.band_mask's masks (their block sizes, measured, are in longformer/plan.py):

- flash_band, fp32 without autograd or attention dropout: CPU's fused flash kernel (blocks of 32), the inner
  blocks' windows views of k and v themselves, the end blocks' views of padded copies of their rows. The global
  keys cannot be part of the view; they are attended apart and merged through the log-sum-exp of each part,
  which the flash kernel returns (the public SDPA does not): out = e^(lse_w - lse) out_w + sum_g e^(s_g - lse) v_g.
- explicit_band, everything else (training, dropout, bf16): ExplicitBand (blocks of 64), matmuls for every head
  over groups of blocks whose scores stay in cache, the scores key-major [blocks, H, 2w + n + G, n]: the window
  is the first, untransposed operand of the first matmul and the right operand of the second. Each group's
  windows are copied into two reused buffers, with the G global keys (and values) in rows after them, so
  that one matmul and one softmax cover window and global keys. (oneDNN's bf16 matmul copies an operand
  that is neither contiguous nor transposed-contiguous anyway, into a fresh allocation each time.)
"""
import math

import torch

from .banded import pad, pad_blocks
from .dropout import draw_keep, factor, pack_keep, unpack_keep

def _windows(xp: torch.Tensor, nc: int, block: int, length: int) -> torch.Tensor:
    """xp [R, *rest] (one example, padded) -> the view [nc, length, *rest] whose block c is rows c * block onwards."""
    step = xp.stride(0)
    return xp.as_strided((nc, length, *xp.shape[1:]), (block * step, step, *xp.stride()[1:]), xp.storage_offset())


def flash_band(q, k, v, w: int, masks, glob, dropout_p: float, plan, project=None):
    """q, k, v [B, L, H, D]; masks: AttentionMasks; glob: the global keys and values [B, G, H, D], or None; no
    dropout (dropout_p and project are the other bands'). Returns [B, L, H, D]."""
    B, L, H, D = q.shape
    n = plan.block
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # plans pick this band where it exists
    mask = masks.band_mask(w, n, q.dtype, global_keys=False)[:, :, None]  # [B, nc, 1, n, 2w + n]
    nc = mask.shape[1]
    qp = pad_blocks(q, n)
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
            rows = (pad(x[b:b + 1, max(first, 0):min(end, L)], max(-first, 0), end - first)[0] for x in (k, v))
            kw, vw = (_windows(r, c1 - c0, n, 2 * w + n).transpose(1, 2) for r in rows)  # [blocks, H, S, D]
            o, s = flash(qp[b, c0 * n:c1 * n].view(c1 - c0, n, H, D).transpose(1, 2), kw, vw, 0.0, False,
                         attn_mask=mask[b, c0:c1])
            out[b, c0 * n:c1 * n].view(c1 - c0, n, H, D).copy_(o.transpose(1, 2))  # o [blocks, H, n, D]
            lse[b, :, c0 * n:c1 * n].view(H, c1 - c0, n).copy_(s.transpose(0, 1))  # s [blocks, H, n]
    out = out[:, :L]
    if glob is None:
        return out
    k_global, v_global = glob
    lse = lse[..., :L]  # [B, H, L]
    scores = torch.matmul(q.transpose(1, 2), k_global.permute(0, 2, 3, 1)).mul_(1.0 / math.sqrt(D))  # [B, H, L, G]
    scores.masked_fill_(~masks.global_allowed()[:, None], torch.finfo(scores.dtype).min)
    total = torch.logaddexp(lse, torch.logsumexp(scores, dim=-1))  # [B, H, L]
    probs = torch.exp(scores - total[..., None])
    out.mul_(torch.exp(lse - total).transpose(1, 2)[..., None])
    for b in range(B):  # out[b] += probs[b] @ v_global[b], per head, written in place: [H, L, G] @ [H, G, D]
        out[b].transpose(0, 1).baddbmm_(probs[b], v_global[b].transpose(0, 1))
    return out


def explicit_band(q, k, v, w: int, masks, glob, dropout_p: float, plan, project=None):
    """q, k, v [B, L, H, D]; masks: AttentionMasks; glob: the global keys and values [B, G, H, D], or None.
    project: None, or a function returning q, k and v again, which the kernel then calls in backward instead of
    keeping them. Returns [B, L, H, D]."""
    mask = masks.band_mask(w, plan.block, q.dtype, key_major=True)  # [B, nc, 2w + n + G, n]
    k_global, v_global = glob or (None, None)
    return ExplicitBand.apply(q, k, v, k_global, v_global, mask, w, dropout_p, plan.group_bytes, project)


class ExplicitBand(torch.autograd.Function):
    """softmax(q k^T / sqrt(D) + mask) * keep / (1 - p) @ v over the band and the global keys, every head at once
    over groups of blocks. It keeps q, k and v (or a function making them again) and its dropout decisions as
    bits; backward builds the block-major copies, each group's windows and probabilities again. A window's
    gradient goes back to the keys it was read from: consecutive windows overlap, so it is added a block at a
    time into an fp32 sum."""

    @staticmethod
    def forward(ctx, q, k, v, k_global, v_global, mask, w: int, dropout_p: float, group_bytes: int, project=None):
        B, L, H, D = q.shape
        nc, n = mask.shape[1], mask.shape[3]
        qb, kh, vh, kgh, vgh = _operands(q, k, v, k_global, v_global, w, nc, n)
        out = torch.empty_like(qb)  # [B, nc, H, n, D]
        decisions = []  # per group, packed as bits
        for b, blocks, kc, vc in _groups(kh, vh, kgh, vgh, w, nc, n, group_bytes):
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
        ctx.w, ctx.dropout_p, ctx.group_bytes = w, dropout_p, group_bytes
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
        for i, (b, blocks, kc, vc) in enumerate(_groups(kh, vh, kgh, vgh, w, nc, n, ctx.group_bytes)):
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
                glob(grad_kg, scale_kv), glob(grad_vg, scale_kv), None, None, None, None, None)


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
    return torch.mul(pad_blocks(x, n).view(B, nc, n, H, D).transpose(2, 3), scale, out=out)


def _tokens(x, first: int, L: int, scale: float = 1.0, dtype: torch.dtype | None = None):
    """x [B, blocks, H, n, D] (multiplied by scale in place) -> its rows first .. first + L - 1 in dtype (x's where
    None), [B, L, H, D]: a view of a token-major copy, cast as it is copied. (x.reshape(...).to(dtype) made two
    copies, the first in x's fp32: 6-15 ms each, under torch.profiler, in a bf16 step of longformer-base.)"""
    B, nb, H, n, D = x.shape
    if scale != 1.0:
        x.mul_(scale)
    out = torch.empty(B, nb, n, H, D, dtype=dtype or x.dtype, device=x.device)
    return out.copy_(x.transpose(2, 3)).view(B, nb * n, H, D)[:, first:first + L]


def _groups(kh, vh, kgh, vgh, w: int, nc: int, n: int, group_bytes: int):
    """(example, blocks, keys, values) for groups of blocks (a slice) whose scores, every head's, take about
    group_bytes; keys and values [m, H, S + G, D] hold each block's window, then the G global keys (values), in
    two buffers that every group reuses."""
    B, H, _, D = kh.shape
    G, S = 0 if kgh is None else kgh.shape[2], 2 * w + n
    per_group = max(1, min(nc, group_bytes // (H * (S + G) * n * kh.element_size())))
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
