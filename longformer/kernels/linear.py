"""A linear layer, optionally after an activation, that keeps for backward only its input and the fp32 weight.

Under autocast, F.linear keeps the bf16 copy of its weight for the backward pass: 16.5 MB a layer of
longformer-base, alive from the forward to the backward. This keeps the fp32 weight (a parameter, there anyway)
and casts it again in backward (but for the tied vocabulary decoder, whose backward comes right after its forward:
see ActLinear.forward), and keeps its input in autocast's dtype (the copy the matmul reads anyway: half of an fp32
input). With an activation, linear(act(h)) keeps h alone and computes act(h) again in backward: autograd would
keep both h and act(h) [B, L, intermediate], a layer's two largest tensors (100 of its ~250 MB at 4,096 tokens in
fp32), where act(h) costs one elementwise pass. On CPU the work goes a chunk of rows at a time (kernels/rows.py):
act(h), its gradient and the gradient into it are then 12 MB pieces from the heap rather than 50 MB fresh mappings
(0.12 GB less peak memory in a training step of longformer-base at 4,096 tokens).

On CPU the products go through oneDNN's linear op (matmul_t). torch.matmul sends fp32 to MKL, whose sgemm takes a
slower code path on AMD CPUs than on Intel's: on the 2-core EPYC of CI it ran the products of longformer-base
(forward, input gradient, weight gradient) at 0.17-0.21 TFLOP/s, oneDNN at 0.28-0.47, to the same fp32 accuracy.
torch.matmul sends bf16 to oneDNN already; there the op, with its bias fused, was 5-10% faster in the forward,
torch.matmul faster for the weight gradient, which keeps it.
"""
import contextlib

import torch
import torch.nn.functional as F

from .rows import in_row_chunks, row_slices

_onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def matmul_t(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, plan) -> torch.Tensor:
    """x @ w^T (+ bias) as F.linear computes it, autocast's cast included: x [..., K], w [N, K], any strides.
    Through oneDNN's linear op where the plan says so (see above), else F.linear."""
    if plan.linear != "onednn":
        return F.linear(x, w, bias)
    if plan.autocast:  # autocast knows nothing of the oneDNN op: its cast, done here
        x, w, bias = x.to(plan.autocast), _cast(w, plan.autocast), None if bias is None else _cast(bias, plan.autocast)
    if x.shape[-1] == 0:
        return F.linear(x, w, bias)
    return _onednn_linear(x, w, bias, "none", [], "")


_casts: dict | None = None  # while cached_casts() is on: (id, version, dtype) -> (tensor, its cast)


@contextlib.contextmanager
def cached_casts():
    """Inside it, matmul_t casts each weight and bias for autocast once rather than at every call (autocast
    caches its casts of parameters, but only for the ops it sees). For a layer run in chunks of rows without
    autograd: 38 against 15 ms of weight casts in a bf16 forward of longformer-base at 4,096 tokens."""
    global _casts
    outer = _casts
    _casts = {} if outer is None else outer
    try:
        yield
    finally:
        _casts = outer


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if _casts is None or t.dtype == dtype:
        return t.to(dtype)
    key = (id(t), t._version, dtype)  # the tensor is kept with its cast, so its id is not reused meanwhile
    if key not in _casts:
        _casts[key] = (t, t.to(dtype))
    return _casts[key][1]


class ActLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, act, tied, plan):
        ctx.act, ctx.tied, ctx.plan, ctx.cast = act, tied, plan, plan.autocast
        ctx.input_dtype = h.dtype
        cast_weight = None
        if ctx.cast:  # cast here, rather than by autocast, whose cache would keep the copy to the end of the forward
            h, cast_weight = h.to(ctx.cast), weight.to(ctx.cast)
        # The tied decoder keeps its cast weight: it is the forward's last matmul, and only the loss runs before its
        # backward, which casts the weight otherwise (77 MB for longformer-base, and as many page faults, a step).
        ctx.save_for_backward(h, weight, bias, cast_weight if tied is not None else None)
        w, b = (weight, bias) if cast_weight is None else (cast_weight, None if bias is None else bias.to(ctx.cast))
        if act is None:  # one product: in chunks, then concatenated, was 10-20% slower
            return matmul_t(h, w, b, plan)
        return in_row_chunks(lambda x: matmul_t(act(x), w, b, plan), plan.row_chunk, h)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, cast_weight = ctx.saved_tensors
        cast = (lambda t: t.to(ctx.cast)) if ctx.cast else (lambda t: t)  # noqa: E731
        hs, gs = h.flatten(0, -2), grad_out.flatten(0, -2)  # [N, in], [N, out]
        grad_h = torch.empty_like(hs, dtype=ctx.input_dtype) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None  # written by the first chunk
        w = cast(weight) if cast_weight is None else cast_weight
        onednn_weight_grad = ctx.plan.linear == "onednn" and ctx.cast is None
        for i, rows in enumerate(row_slices(hs.shape[0], ctx.plan.row_chunk)):
            with torch.enable_grad():
                x = hs[rows].detach().requires_grad_(ctx.act is not None)
                a = x if ctx.act is None else ctx.act(x)
            if grad_h is not None:
                grad_a = matmul_t(gs[rows], w.t(), None, ctx.plan).to(a.dtype)
                grad_h[rows] = grad_a if ctx.act is None else torch.autograd.grad(a, x, grad_a)[0]
            if grad_w is not None:
                _add_weight_grad(grad_w, gs[rows], cast(a.detach()), i == 0, ctx.plan if onednn_weight_grad else None)
        grad_b = gs.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        if ctx.tied is not None:  # handed to the word embedding's backward, which returns it with its own rows
            ctx.tied.grad, grad_w = grad_w, None
        return None if grad_h is None else grad_h.view_as(h), grad_w, grad_b, None, None, None


def _add_weight_grad(grad_w: torch.Tensor, g: torch.Tensor, a: torch.Tensor, first: bool, onednn_plan):
    """grad_w [out, in] += g^T @ a (g [n, out], a [n, in]; where first, grad_w = g^T @ a, its old contents
    unread: no zeroed gradient the size of the weight), output features a chunk at a time: the product in
    autocast's dtype is never whole beside the fp32 gradient (77 + 154 MB for the vocabulary decoder). With
    onednn_plan (a plan, in fp32) through oneDNN; else (bf16 on CPU too) through torch.matmul, which runs oneDNN
    there and was faster."""
    for chunk, out in zip(g.split(GRAD_CHUNK, dim=1), grad_w.split(GRAD_CHUNK)):
        product = chunk.t() @ a if onednn_plan is None else matmul_t(chunk.t(), a.t(), None, onednn_plan)
        if first:
            out.copy_(product)
        else:
            out += product


GRAD_CHUNK = 4096  # output features per chunk of the weight gradient


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan, act=None,
           tied=None) -> torch.Tensor:
    """F.linear(act(x), weight, bias); in training through ActLinear where it saves memory (with an activation,
    or under autocast, or with tied: a kernels.tied.TiedGradient, which then receives the weight's gradient) or
    time (the onednn plans, whose products go through matmul_t). The traced plans see the plain expression
    (torch.compile recomputes by itself)."""
    if plan.linear == "traced":
        return F.linear(x if act is None else act(x), weight, bias)
    if not plan.grad:
        return matmul_t(x if act is None else act(x), weight, bias, plan)
    if act is None and tied is None and plan.autocast is None and plan.linear == "torch":
        return F.linear(x, weight, bias)
    return ActLinear.apply(x, weight, bias, act, tied, plan)
