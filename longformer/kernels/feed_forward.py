"""The feed-forward block, linear_out(act(linear_in(x))): in training keeping only linear_in's output for the
backward pass; on CPU without autograd, in chunks of rows."""
import torch
import torch.nn.functional as F
from torch import nn


class ActLinear(torch.autograd.Function):
    """autograd would keep both h and act(h) [B, L, intermediate] (act's input and linear's input), a layer's
    two largest tensors: 100 of its ~250 MB in longformer-base at 4,096 tokens, fp32. This keeps h, computes
    act(h) again in backward (one elementwise pass, ~1% of the step) and does the linear's backward itself,
    in the dtypes autocast gave the forward."""

    @staticmethod
    def forward(ctx, h, weight, bias, act):
        device = h.device.type
        ctx.act, ctx.cast = act, torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.save_for_backward(h, weight, bias)
        return F.linear(act(h), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias = ctx.saved_tensors
        cast = (lambda t: t.to(ctx.cast)) if ctx.cast else (lambda t: t)  # noqa: E731
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            a = ctx.act(h)
        rows = grad_out.flatten(0, -2)  # [N, out]
        grad_w = (rows.t() @ cast(a.detach()).flatten(0, -2)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = rows.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        grad_h = None
        if ctx.needs_input_grad[0]:
            grad_h, = torch.autograd.grad(a, h, torch.matmul(grad_out, cast(weight)).to(a.dtype))
        return grad_h, grad_w, grad_b, None


def feed_forward(x: torch.Tensor, linear_in: nn.Linear, act, linear_out: nn.Linear) -> torch.Tensor:
    """linear_out(act(linear_in(x))): in training through ActLinear; on CPU without autograd, CHUNK_ROWS rows
    at a time (torch.compile and export see the plain expression)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return linear_out(act(linear_in(x)))
    if torch.is_grad_enabled():
        return ActLinear.apply(linear_in(x), linear_out.weight, linear_out.bias, act)
    if x.device.type != "cpu":
        return linear_out(act(linear_in(x)))
    rows = x.flatten(0, -2)  # [N, C]
    out = torch.cat([linear_out(act(linear_in(chunk))) for chunk in rows.split(CHUNK_ROWS)])
    return out.view(*x.shape[:-1], out.shape[-1])


# Rows per chunk on CPU. A chunk's [rows, intermediate] activations (12 MB for 1,024 rows of longformer-base
# in fp32) are reused from the heap, where a whole sequence's (50 MB at 4,096 tokens) is a fresh mapping from
# the OS every time, its pages faulted in at first touch: measured 169 against 195 ms a layer's feed-forward.
CHUNK_ROWS = 1024
