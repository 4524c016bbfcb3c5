"""How large a block of queries the band should take: the core of one layer's band attention (key windows,
scores, softmax, output; forward) for blocks of w, w/2 and w/4 queries, each against 2w + block keys.

    python benchmarks/band_blocks.py [--window 512] [--length 4096] [--dtypes fp32 bf16]

Blocks of w queries score 3w keys for 2w + 1 useful ones; smaller blocks waste less but copy more key
windows (2w + block keys for every block). Groups of blocks as the CPU kernel takes them (GROUP_BYTES of
scores), longformer-base's 12 heads of 64, one process; medians of 7 after a warm-up.
"""
import argparse
import os
import sys

import torch

from longformer.kernels.banded import GROUP_BYTES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import median_time  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def band_core(L: int, w: int, block: int, dtype, H: int = 12, D: int = 64, G: int = 1):
    """A function computing one layer's band attention forward in groups of blocks of `block` queries."""
    nb, r = L // block, w // block
    S = (2 * w + block + G + 7) // 8 * 8
    keys = torch.randn(H, L + 2 * w, D, dtype=dtype)  # head-major, w zero-padded on either side
    q = torch.randn(H, nb, block, D, dtype=dtype)
    mask = torch.zeros(1, nb, block, S, dtype=dtype)
    per_group = max(1, GROUP_BYTES // (H * block * S * q.element_size()))

    def run():
        for c0 in range(0, nb, per_group):
            c1 = min(c0 + per_group, nb)
            n = c1 - c0
            xb = keys[:, c0 * block:(c1 + 2 * r) * block].unflatten(1, (n + 2 * r, block))
            parts = [xb[:, i:i + n] for i in range(2 * r + 1)] + [keys.new_zeros(H, n, S - (2 * r + 1) * block, D)]
            k, v = torch.cat(parts, 2), torch.cat(parts, 2)
            probs = torch.softmax(torch.matmul(q[:, c0:c1], k.transpose(-1, -2)).add_(mask[:, c0:c1]), -1)
            torch.matmul(probs, v)
    return run, S


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=512, help="attention_window (w is half of it)")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    args = p.parse_args()
    w = args.window // 2
    for name in args.dtypes:
        for block in (w, w // 2, w // 4):
            run, S = band_core(args.length, w, block, DTYPES[name])
            print(f"{name} block {block:4d} ({S} key slots): {median_time(run, 7) * 1e3:6.1f} ms a layer")


if __name__ == "__main__":
    main()
