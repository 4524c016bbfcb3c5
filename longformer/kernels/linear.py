"""A linear layer, optionally after an activation, that keeps for backward only its input and the fp32 weight.

Under autocast, F.linear keeps the bf16 copy of its weight for the backward pass: 16.5 MB a layer of
longformer-base and 77 MB for the tied vocabulary decoder, alive from the forward to the backward. This keeps
the fp32 weight (a parameter, there anyway) and casts it again in backward. With an activation, linear(act(h))
keeps h alone and computes act(h) again in backward: autograd would keep both h and act(h) [B, L,
intermediate], a layer's two largest tensors (100 of its ~250 MB at 4,096 tokens in fp32), where act(h) costs
one elementwise pass.
"""
import torch
import torch.nn.functional as F


class ActLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, act):
        device = h.device.type
        ctx.act, ctx.cast = act, torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.save_for_backward(h, weight, bias)
        a = h if act is None else act(h)
        if ctx.cast:  # cast here, rather than by autocast, whose cache would keep the copy to the end of the forward
            a, weight, bias = a.to(ctx.cast), weight.to(ctx.cast), None if bias is None else bias.to(ctx.cast)
        return F.linear(a, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias = ctx.saved_tensors
        cast = (lambda t: t.to(ctx.cast)) if ctx.cast else (lambda t: t)  # noqa: E731
        a = h
        if ctx.act is not None:
            with torch.enable_grad():
                h = h.detach().requires_grad_()
                a = ctx.act(h)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.matmul(grad_out, cast(weight)).to(a.dtype)
            grad_h = grad_a if ctx.act is None else torch.autograd.grad(a, h, grad_a)[0]
        rows = grad_out.flatten(0, -2)  # [N, out]
        if ctx.needs_input_grad[1]:
            # Output features a chunk at a time: the product in autocast's dtype is never whole beside the
            # fp32 gradient (77 + 154 MB for the vocabulary decoder).
            a = cast(a.detach()).flatten(0, -2)
            grad_w = torch.empty_like(weight)
            for chunk, out in zip(rows.split(GRAD_CHUNK, dim=1), grad_w.split(GRAD_CHUNK)):
                out.copy_(chunk.t() @ a)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0).to(bias.dtype)
        return grad_h, grad_w, grad_b, None


GRAD_CHUNK = 4096  # output features per chunk of the weight gradient


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act=None) -> torch.Tensor:
    """F.linear(act(x), weight, bias), through ActLinear in training where it saves memory: with an activation,
    or under autocast. torch.compile and export see the plain expression (compile recomputes by itself)."""
    plain = (torch.compiler.is_compiling() or torch.compiler.is_exporting() or not torch.is_grad_enabled()
             or (act is None and not torch.is_autocast_enabled(x.device.type)))
    if plain:
        return F.linear(x if act is None else act(x), weight, bias)
    return ActLinear.apply(x, weight, bias, act)
