"""LayerNorm that keeps its output for the backward pass instead of its input.

In a layer, each LayerNorm's output is also the next linear layer's input, which autograd keeps anyway;
its input (the residual sum) is kept only for LayerNorm's backward. Keeping the output instead and
recovering the normalised input from it, x_hat = (y - bias) / weight, saves one [B, L, C] tensor per
LayerNorm: 2 x 12.6 MB a layer of longformer-base at 4,096 tokens in fp32 (as Apex's memory-efficient
LayerNorm does). That recovery needs every weight to be non-zero; where one is zero, torch's LayerNorm runs.
Under autocast it keeps the normalised input x_hat in autocast's dtype instead (6.3 against 12.6 MB).
The cpu-training plan only: the check reads the weight back, which on a GPU would wait for it.
"""
import torch
from torch import nn


class OutputLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, low_dtype: torch.dtype | None):
        """low_dtype None: keep y, and recover x_hat from it in backward. A dtype (autocast's): keep x_hat in
        it, half of fp32 y's size; a backward from x_hat rounded to bf16 is as precise as autocast's own
        matmul gradients, where one from a rounded y would lose digits to (y - bias) / weight."""
        C = x.shape[-1]
        ctx.kept_x_hat = low_dtype is not None
        if low_dtype is None:
            y, _, rstd = torch.native_layer_norm(x, (C,), weight, bias, eps)
            ctx.save_for_backward(y, weight, bias, rstd)
        else:
            x_hat, _, rstd = torch.native_layer_norm(x, (C,), None, None, eps)
            y = torch.addcmul(bias, x_hat, weight)
            ctx.save_for_backward(x_hat.to(low_dtype), weight, bias, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        kept, weight, bias, rstd = ctx.saved_tensors
        x_hat = kept.to(weight.dtype) if ctx.kept_x_hat else (kept - bias) / weight
        # torch's fused backward, given x_hat itself as the input (mean 0, rstd 1), returns the gradient with
        # respect to x_hat; x's is that times rstd. 1.0-1.4 against 13-16 ms for [4,096 x 768] written out as
        # the formula's ten passes, each into a fresh 12.6 MB tensor.
        grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
            grad, x_hat, (x_hat.shape[-1],), torch.zeros_like(rstd), torch.ones_like(rstd), weight, bias,
            [True, True, True])
        return grad_x.mul_(rstd), grad_w, grad_b, None, None


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state dict), keeping its output for backward where the plan says so
    (cpu-training), or under autocast its normalised input in autocast's dtype."""

    def forward(self, x: torch.Tensor, plan=None) -> torch.Tensor:
        if plan is None or plan.layer_norm != "keep-output" or self.weight is None or self.bias is None:
            return super().forward(x)
        if plan.autocast is None and not bool(self.weight.ne(0).all()):
            return super().forward(x)
        return OutputLayerNorm.apply(x, self.weight, self.bias, self.eps, plan.autocast)
