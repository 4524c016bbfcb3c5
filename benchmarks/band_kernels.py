"""One layer's band attention on CPU, kernel by kernel, for block and group sizes: where longformer/plan.py's
FLASH_BLOCK, EXPLICIT_BLOCK and GROUP_BYTES come from.

    python benchmarks/band_kernels.py [--length 4096] [--window 512] [--blocks 32 64 128] [--groups-mb 1 2 4]

Per configuration, ms a layer (longformer-base's 12 heads of 64, global attention on the first token, medians
of 5 after a warm-up, one process): the flash kernel's forward without autograd (fp32), and the explicit
kernel's forward without autograd and training step (forward + backward, attention dropout 0.1), in fp32 and
bf16.
"""
import argparse
import dataclasses
import os
import sys

import torch

from longformer import plan as plans
from longformer.attention import AttentionMasks
from longformer.attention.self_attention import BANDS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import median_time  # noqa: E402


def layer_band(L: int, w: int, dtype, kernel: str, train: bool, block: int, group_bytes: int, H: int = 12,
               D: int = 64):
    """A function running one layer's band through `kernel` ("flash" or "explicit") in blocks of `block`."""
    g = torch.Generator().manual_seed(0)
    is_global = torch.zeros(1, L, dtype=torch.bool)
    is_global[0, 0] = True
    masks = AttentionMasks(torch.ones(1, L, dtype=torch.bool), is_global)
    q, k, v = (torch.randn(1, L, H, D, generator=g, dtype=dtype, requires_grad=train) for _ in range(3))
    glob = tuple(x[:, :1].detach().clone().requires_grad_(train) for x in (k, v))
    plan = plans.make_plan("cpu", dtype, None, train, train, None, plans.Settings())
    plan = dataclasses.replace(plan, band=kernel, block=block, group_bytes=group_bytes)
    grad = torch.randn(1, L, H, D, generator=g, dtype=dtype)

    def run():
        with torch.set_grad_enabled(train):
            out = BANDS[kernel](q, k, v, w, masks, glob, 0.1 if train else 0.0, plan)
            if train:
                out.backward(grad)
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=512, help="attention_window (w is half of it)")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--groups-mb", type=int, nargs="+", default=[1, 2, 4], help="GROUP_BYTES in MB")
    args = p.parse_args()
    w = args.window // 2
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    cases = [("flash", "fp32", False)] + [("explicit", d, t) for d in dtypes for t in (False, True)]
    for kernel, dtype, train in cases:
        for block in args.blocks:
            for mb in args.groups_mb if kernel == "explicit" else [None]:
                run = layer_band(args.length, w, dtypes[dtype], kernel, train, block, (mb or 2) << 20)
                ms = median_time(run, 5) * 1e3
                what = f"{kernel} {dtype} {'train' if train else 'forward'}"
                print(f"{what:22} block {block:3d}{f', groups of {mb} MB' if mb else '':17}: {ms:6.1f} ms", flush=True)


if __name__ == "__main__":
    main()
