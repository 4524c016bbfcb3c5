"""Dropout decisions hashed 16 bits at a time and kept for the backward pass as bits.

torch's CPU dropout draws a float per element and keeps that float noise tensor for backward (as large as
the activation it drops: 12 MB per dropout of longformer-base at 4,096 tokens in fp32, 25 in a layer). Here
two 16-bit decisions come from each 32-bit hash of a counter (the keep probability exact to 1/65536), and
backward reads them back from one bit each: 6-7 against 17-18 ms for forward and backward of a dropout of
[4096, 768] fp32 on a 2-core EPYC, and 1/32 of the memory. The CPU plans use it (longformer/plan.py); the others
run torch's own dropout: CUDA's is fused and keeps one byte per element.

Why a hash: torch's CPU generator (mt19937) runs on one core, while the other waits. Hashing the counter
i = 0, 1, ... with elementwise int32 ops runs on every core: for the [2, 12, 577, 64] decisions of one group
of the band kernel, 0.35-0.50 against 0.85-0.89 ms; for [4096, 768], 1.5 against 3.0 ms. Each call takes its
key from torch's generator, so that torch.manual_seed, per-rank seeds and a resumed generator state decide the
draws as before.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

# Eight 0/1 bytes read as one little-endian int64, times GATHER: bit 56 + i of the product is byte i.
GATHER = 0x0102040810204080
# A byte times SPREAD is that byte eight times over; & SELECT keeps bit i in byte i.
SPREAD = 0x0101010101010101
SELECT = 0x8040201008040201 - 2**64  # as a signed int64


def draw_keep(shape: tuple, p: float, device: torch.device) -> torch.Tensor:
    """Bool decisions [*shape], True with probability 1 - p (exact to 1/65536), keyed by torch's generator."""
    n = math.prod(shape)
    m = (n + 1) // 2  # 32-bit hashes, two 16-bit decisions each
    if m >= 2**31:
        raise ValueError(f"dropout over {n} elements at once: more than this kernel's int32 counter reaches "
                         f"(2^32); split the tensor")
    # The key (a random odd multiplier and an offset) makes each call hash i * a + b: different calls read the
    # hash at unrelated points, where keys added to i alone (i + b) would give overlapping, shifted streams.
    a, b = torch.randint(-2**31, 2**31, (2,)).tolist()
    x = _hash(torch.arange(m, dtype=torch.int32, device=device).mul_(a | 1).add_(b))
    # Each int16 is uniform over [-32768, 32767]: at least round(p * 65536) - 32768 with probability 1 - p.
    # That comparison, made by clamping to [t - 1, t] and subtracting t - 1 (0 or 1, in place): a comparison's
    # bool output runs 3x slower here (155 against 51 us for one group of the band kernel's scores).
    t = round(p * 65536) - 32768
    if not -32768 < t <= 32767:  # p below 1/131072 or above 1 - 1/131072: every element kept, or none
        return torch.full(shape, t <= -32768, dtype=torch.bool, device=device)
    return x.view(torch.int16)[:n].clamp_(t - 1, t).sub_(t - 1).to(torch.uint8).view(torch.bool).view(shape)


def _hash(x: torch.Tensor) -> torch.Tensor:
    """int32 x -> a 32-bit hash of each element, in place: Chris Wellons' lowbias32 (xor-shifts and multiplies,
    every output bit depending on every input bit). torch's >> is arithmetic on int32; masking its result
    makes it the logical shift that the hash needs; multiplies wrap modulo 2^32."""
    shifted = torch.empty_like(x)
    for shift, multiplier in ((16, 0x7feb352d), (15, 0x846ca68b - 2**32), (16, None)):
        torch.bitwise_right_shift(x, shift, out=shifted).bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(shifted)
        if multiplier:
            x.mul_(multiplier)
    return x


def pack_keep(keep: torch.Tensor) -> torch.Tensor:
    """Contiguous bool decisions -> uint8 [ceil(n / 8)], eight to a byte."""
    flat = keep.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    return ((flat.view(torch.int64) * GATHER) >> 56).to(torch.uint8)  # the arithmetic shift leaves bits 0-7 right


def unpack_keep(packed: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The bool decisions [*shape] that pack_keep packed."""
    spread = (packed.to(torch.int64) * SPREAD) & SELECT  # byte i of each int64: bit i of the packed byte, in place
    # Bytes of 0 or 2^i, clamped to 0 or 1: valid bools as they are (2x faster than comparing to 0).
    return spread.view(torch.uint8).clamp_(max=1).view(torch.bool)[:math.prod(shape)].view(shape)


def factor(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1.0 where kept, 0.0 where dropped. Through a uint8 view: converting bool directly, or multiplying or
    selecting (torch.where) by it, runs an unvectorized loop here, 2-8x slower than this and a multiply."""
    return keep.view(torch.uint8).to(dtype)


def _apply(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    # x * 1.0 or 0.0, then the scale, as torch's dropout rounds it (a scale rounded to x's dtype first would not)
    return factor(keep, x.dtype).mul_(x).mul_(1.0 / (1.0 - p))


class BitDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        keep = draw_keep(x.shape, p, x.device)
        ctx.save_for_backward(pack_keep(keep))
        ctx.p = p
        return _apply(x, keep, p)

    @staticmethod
    def backward(ctx, grad):
        packed, = ctx.saved_tensors
        return _apply(grad, unpack_keep(packed, grad.shape), ctx.p), None


class Dropout(nn.Dropout):
    """nn.Dropout (same p, same train/eval switch), with decisions kept as bits where the plan says so."""

    def forward(self, x: torch.Tensor, plan=None) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if plan is None or plan.dropout != "bits":
            return F.dropout(x, self.p, True)
        return BitDropout.apply(x, self.p)
