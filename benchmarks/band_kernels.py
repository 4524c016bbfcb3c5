"""One layer's band attention on CPU, kernel by kernel, for block and group sizes: where kernels/strided.py's
BLOCKS and GROUP_BYTES come from.

    python benchmarks/band_kernels.py [--length 4096] [--window 512] [--blocks 32 64 128] [--groups-mb 1 2 4]

Per configuration, ms a layer (longformer-base's 12 heads of 64, global attention on the first token, medians
of 5 after a warm-up, one process): the flash kernel's forward without autograd (fp32), and the explicit
kernel's forward without autograd and training step (forward + backward, attention dropout 0.1), in fp32 and
bf16.
"""
import argparse
import os
import sys

import torch

from longformer.attention import AttentionMasks
from longformer.kernels import strided

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import median_time  # noqa: E402


def layer_band(L: int, w: int, dtype, kernel: str, train: bool, H: int = 12, D: int = 64):
    """A function running one layer's band through `kernel` at the current BLOCKS and GROUP_BYTES."""
    g = torch.Generator().manual_seed(0)
    is_global = torch.zeros(1, L, dtype=torch.bool)
    is_global[0, 0] = True
    masks = AttentionMasks(torch.ones(1, L, dtype=torch.bool), is_global)
    q, k, v = (torch.randn(1, L, H, D, generator=g, dtype=dtype, requires_grad=train) for _ in range(3))
    k_global, v_global = (x[:, :1].detach().clone().requires_grad_(train) for x in (k, v))
    mask, allowed = masks.band_mask(w, dtype, kernel), masks.global_allowed()
    grad = torch.randn(1, L, H, D, generator=g, dtype=dtype)

    def run():
        with torch.set_grad_enabled(train):
            out = strided.strided_band_attention(kernel, q, k, v, w, mask, k_global, v_global, allowed,
                                                 0.1 if train else 0.0)
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
                strided.BLOCKS[kernel] = block
                if mb:
                    strided.GROUP_BYTES = mb << 20
                ms = median_time(layer_band(args.length, w, dtypes[dtype], kernel, train), 5) * 1e3
                what = f"{kernel} {dtype} {'train' if train else 'forward'}"
                print(f"{what:22} block {block:3d}{f', groups of {mb} MB' if mb else '':17}: {ms:6.1f} ms", flush=True)


if __name__ == "__main__":
    main()
