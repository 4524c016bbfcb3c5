"""One gradient tensor for the word embedding that the masked-LM decoder shares.

The decoder's gradient of the shared weight is a dense [vocab, hidden] (154 MB for longformer-base in fp32); the
lookup's is a few thousand rows. autograd sums the two into a third tensor of the full size, out of place
(measured with torch 2.13, for a sparse lookup gradient too), and that fresh 154 MB is faulted in from the OS at
every step. Here the decoder hands its gradient over instead of returning it (linear(..., tied=...)), and the
lookup's backward adds its rows into it and returns the sum: the weight receives one gradient, at the end of
backward, as it did from autograd.
"""
import torch
import torch.nn.functional as F


class TiedGradient:
    """The decoder's weight gradient on its way to the lookup's backward: one per forward pass."""

    def __init__(self):
        self.grad = None


class TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx: int | None, tied: TiedGradient):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.tied, ctx.shape = padding_idx, tied, weight.shape
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        ids, = ctx.saved_tensors
        total, ctx.tied.grad = ctx.tied.grad, None
        if total is None:  # a loss without the decoder's logits
            total = grad.new_zeros(ctx.shape)
        rows, ids = grad.reshape(-1, grad.shape[-1]), ids.reshape(-1)
        if ctx.padding_idx is not None:  # the padding row gets no gradient, as in F.embedding
            rows = rows * ids.ne(ctx.padding_idx)[:, None]
        return None, total.index_add_(0, ids, rows.to(total.dtype)), None, None
