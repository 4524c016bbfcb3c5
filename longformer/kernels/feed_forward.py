"""The feed-forward block, linear_out(act(linear_in(x))): in training keeping only linear_in's output for the
backward pass (linear.ActLinear); on CPU without autograd, in chunks of rows."""
import torch
from torch import nn

from .linear import linear


def feed_forward(x: torch.Tensor, linear_in: nn.Linear, act, linear_out: nn.Linear) -> torch.Tensor:
    """linear_out(act(linear_in(x))): on CPU without autograd CHUNK_ROWS rows at a time; otherwise through
    linear(), which in training keeps only linear_in's output (torch.compile and export see the plain expression)."""
    if (torch.is_grad_enabled() or x.device.type != "cpu" or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()):
        return linear(linear(x, linear_in.weight, linear_in.bias), linear_out.weight, linear_out.bias, act)
    rows = x.flatten(0, -2)  # [N, C]
    out = torch.cat([linear_out(act(linear_in(chunk))) for chunk in rows.split(CHUNK_ROWS)])
    return out.view(*x.shape[:-1], out.shape[-1])


# Rows per chunk on CPU. A chunk's [rows, intermediate] activations (12 MB for 1,024 rows of longformer-base
# in fp32) are reused from the heap, where a whole sequence's (50 MB at 4,096 tokens) is a fresh mapping from
# the OS every time, its pages faulted in at first touch: measured 169 against 195 ms a layer's feed-forward.
CHUNK_ROWS = 1024
