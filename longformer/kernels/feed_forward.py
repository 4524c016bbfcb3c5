"""The feed-forward block's second half, linear(act(h)), keeping only h for the backward pass."""
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


def act_linear(h: torch.Tensor, act, linear: nn.Linear) -> torch.Tensor:
    """linear(act(h)); in training, through ActLinear (torch.compile recomputes act(h) by itself)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return linear(act(h))
    return ActLinear.apply(h, linear.weight, linear.bias, act)
