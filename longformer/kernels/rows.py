"""Per-token work on CPU a chunk of rows at a time: a layer's per-token part without autograd, and the linear
layers of kernels/linear.py in training."""
import math

import torch

# Tokens per chunk. A chunk's tensors ([1,024, 3,072] fp32 activations: 12 MB in longformer-base) are reused
# from the heap and mostly stay in cache, where a whole sequence's (50 MB at 4,096 tokens) is a fresh mapping
# from the OS every time, its pages faulted in at first touch: measured 169 against 195 ms for a layer's
# feed-forward alone, and 3 against 35 ms for a gelu alone.
CHUNK_ROWS = 1024


def row_slices(n: int, device: torch.device) -> list[slice]:
    """Slices of n rows: CHUNK_ROWS at a time on CPU (outside torch.compile and export), all at once elsewhere,
    and always at least one slice (empty where n is 0)."""
    if (device.type != "cpu" or torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or n <= CHUNK_ROWS):  # last: a symbolic n compared would be a guard in export's graph
        return [slice(0, n)]
    return [slice(i, min(i + CHUNK_ROWS, n)) for i in range(0, n, CHUNK_ROWS)]


def in_row_chunks(fn, *xs: torch.Tensor) -> torch.Tensor:
    """fn(*xs) for xs [*rows, *] and an fn that treats each row alone; without autograd on CPU, CHUNK_ROWS rows
    at a time, as fn(*[n, *]) and the results concatenated."""
    x = xs[0]
    slices = row_slices(math.prod(x.shape[:-1]), x.device)  # not Size.numel(), which export would specialize
    if torch.is_grad_enabled() or len(slices) == 1:
        return fn(*xs)
    flat = [t.flatten(0, -2) for t in xs]  # [*rows, C] -> [N, C]
    out = torch.cat([fn(*(t[s] for t in flat)) for s in slices])
    return out.view(*x.shape[:-1], *out.shape[1:])
