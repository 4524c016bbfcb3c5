"""Per-token work a chunk of rows at a time (plan.row_chunk, on CPU): a layer's per-token part without autograd,
and the linear layers of kernels/linear.py in training."""
import math

import torch


def row_slices(n: int, chunk: int | None) -> list[slice]:
    """Slices of n rows, chunk at a time (all at once where chunk is None), and always at least one slice (empty
    where n is 0)."""
    if chunk is None or n <= chunk:  # chunk first: a symbolic n compared would be a guard in export's graph
        return [slice(0, n)]
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def in_row_chunks(fn, chunk: int | None, *xs: torch.Tensor) -> torch.Tensor:
    """fn(*xs) for xs [*rows, *] and an fn that treats each row alone, chunk rows at a time (all at once for None)
    as fn(*[n, *]) and the results concatenated. For work outside autograd: autograd would keep every chunk."""
    x = xs[0]
    slices = row_slices(math.prod(x.shape[:-1]), chunk)  # not Size.numel(), which export would specialize
    if len(slices) == 1:
        return fn(*xs)
    flat = [t.flatten(0, -2) for t in xs]  # [*rows, C] -> [N, C]
    out = torch.cat([fn(*(t[s] for t in flat)) for s in slices])
    return out.view(*x.shape[:-1], *out.shape[1:])
