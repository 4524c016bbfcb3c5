"""Dropout decisions drawn 16 bits at a time and kept for the backward pass as bits.

torch's CPU dropout draws a float per element and keeps that float noise tensor for backward (as large as
the activation it drops: 12 MB per dropout of longformer-base at 4,096 tokens in fp32, 25 in a layer). Here
four 16-bit decisions come from each 64-bit random draw (the keep probability exact to 1/65536), and
backward reads them back from one bit each: 4.7 against 22 ms a dropout of [4096, 768] fp32 on a 2-core
EPYC, and 1/32 of the memory. On other devices (and inside torch.compile) torch's own dropout runs: CUDA's
is fused and keeps one byte per element.
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
    """Bool decisions [*shape] from torch's generator, True with probability 1 - p (exact to 1/65536)."""
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    bits.random_(-2**63, 2**63 - 1)
    # Each int16 is uniform over [-32768, 32767]: at least round(p * 65536) - 32768 with probability 1 - p.
    return (bits.view(torch.int16)[:n] >= round(p * 65536) - 32768).view(shape)


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
    """nn.Dropout (same p, same train/eval switch), with decisions kept as bits on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.dropout(x, self.p, True)
        return BitDropout.apply(x, self.p)
