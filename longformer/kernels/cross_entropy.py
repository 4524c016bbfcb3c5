"""Cross-entropy over a vocabulary without fp32 copies of the logits kept or made whole.

F.cross_entropy(logits.float(), ...) keeps an fp32 log-softmax [N, vocab] for its backward and makes two more
of that size in it (the incoming gradient and its own): 370 MB for the 614 predicted tokens of a 4,096-token
masked-LM step with longformer-base's 50,265 words, at the top of the step's peak memory. This keeps the
logits as they came (bf16 under autocast) and one log-sum-exp per row, and works in fp32 a chunk of rows at a
time; the gradient it returns is what autocast's would be (fp32 softmax minus one-hot, cast to the logits'
dtype).
"""
import torch

# fp32 elements per chunk of rows (4 MB), in one buffer that every chunk reuses and that stays in cache. A fresh
# buffer per step each chunk (as torch.exp(chunk.float() - lse) makes) is faulted in from the OS every time:
# forward and backward for 625 x 50,265 bf16 logits took 117 ms that way, 52 ms this way (2-core EPYC).
CHUNK_ELEMENTS = 1 << 20


class CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, mean: bool):
        """logits [N, V] any float dtype, labels [N] -> the summed (or mean) loss over rows not ignored, in fp32
        (fp64 for fp64 logits)."""
        wide = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(logits.shape[0], dtype=wide, device=logits.device)
        for chunk, rows, buf in _chunks(logits, wide):
            m = chunk.amax(dim=-1, keepdim=True)  # exact in any dtype; 0 where infinite, as in torch.logsumexp
            m.masked_fill_(m.isinf(), 0)
            lse[rows] = buf.copy_(chunk).sub_(m).exp_().sum(dim=-1).log_().add_(m.squeeze(1))
        valid = labels.ne(ignore_index)
        target = logits.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1).to(wide)
        divisor = valid.sum() if mean else torch.ones((), dtype=torch.long, device=logits.device)
        ctx.save_for_backward(logits, labels, lse, valid, divisor)
        return torch.where(valid, lse - target, 0.0).sum() / divisor  # 0 / 0 = nan with nothing predicted, as torch's

    @staticmethod
    def backward(ctx, grad_loss):
        logits, labels, lse, valid, divisor = ctx.saved_tensors
        grad = torch.empty_like(logits)
        weight = valid.to(lse.dtype) * (grad_loss / divisor)  # [N]
        for (chunk, rows, g), out in zip(_chunks(logits, lse.dtype), grad.split(_rows(logits))):
            g.copy_(chunk).sub_(lse[rows, None]).exp_()  # softmax
            g[torch.arange(g.shape[0], device=g.device), torch.where(valid[rows], labels[rows], 0)] -= 1
            out.copy_(g.mul_(weight[rows, None]))
        return grad, None, None, None


def _rows(x: torch.Tensor) -> int:
    return max(1, CHUNK_ELEMENTS // x.shape[-1])


def _chunks(x: torch.Tensor, dtype: torch.dtype):
    """(chunk of x's rows, their slice, a dtype buffer of the chunk's shape): one buffer for every chunk."""
    n = _rows(x)
    buf = torch.empty(min(n, x.shape[0]), x.shape[-1], dtype=dtype, device=x.device)
    for i in range(0, x.shape[0], n):
        chunk = x[i:i + n]
        yield chunk, slice(i, i + chunk.shape[0]), buf[:chunk.shape[0]]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy for logits [N, V] and class labels [N], reduction "mean" or "sum", in fp32 for logits
    of 16 or 32 bits (as F.cross_entropy on logits.float()), in fp64 for fp64."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction {reduction!r}: this cross_entropy takes 'mean' or 'sum'")
    return CrossEntropy.apply(logits, labels, ignore_index, reduction == "mean")
