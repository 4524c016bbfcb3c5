"""Atomic file writes: a crash mid-write leaves the old file (or none), never a truncated one."""
import os

import torch
from safetensors.torch import save_file


def atomic_write(path: str, write):
    """write(tmp) makes the file under a temporary name; it replaces path only if write returns."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def atomic_save_safetensors(path: str, tensors: dict, metadata: dict | None = None):
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_torch_save(path: str, obj):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
