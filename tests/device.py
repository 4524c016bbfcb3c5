"""The device the tests run on: LONGFORMER_TEST_DEVICE=cuda python -m pytest tests (default cpu).

On CUDA, TF32 is off, so that fp32 parity with HF is compared at fp32 precision, not TF32's ~1e-3.
"""
import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("LONGFORMER_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":
    if not torch.cuda.is_available():
        raise pytest.UsageError("LONGFORMER_TEST_DEVICE=cuda, but torch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def on_device(*tensors):
    """The tensors moved to DEVICE (one tensor, or a tuple; None stays None)."""
    moved = tuple(None if t is None else t.to(DEVICE) for t in tensors)
    return moved[0] if len(moved) == 1 else moved
