"""Which of torch's scaled_dot_product_attention kernels run the band blocks, chosen on purpose per device.

Left to itself, SDPA picks a kernel by its own priority list, which changes between torch versions and GPUs
(torch >= 2.10 tries cuDNN first on H100 for a masked call). The defaults below say what we run:

- cuda: the memory-efficient kernel, then math. It takes any additive mask and dropout. cuDNN takes them too,
  and on an H100 (torch 2.11, cuDNN 9.19) its bf16 training step of longformer-base at 8 x 4,096 tokens was
  faster (146-155 against 181 ms eager); it stays out of the default until the whole test suite has passed
  with it on a GPU (one CUDA run with it first had a failure not yet identified). `cudnn,efficient,math` to
  try it; fp32 falls through to the memory-efficient kernel (cuDNN takes no fp32). Flash takes no mask.
- cpu: the CPU flash kernel (it takes masks), then math; in fp32 without dropout only (banded.sliding_window_attention).
- other devices: flash, efficient, math (torch's classic order).

Override, first match wins: config.sdpa_backends (e.g. from_pretrained(..., sdpa_backends="cudnn,efficient")),
then the environment variable LONGFORMER_SDPA_BACKENDS, then the defaults. Names: flash, efficient, cudnn, math.
The first backend that accepts the call runs it (sdpa_kernel with set_priority=True).
"""
import os

from torch.nn.attention import SDPBackend

BACKEND_NAMES = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
DEFAULT_BACKENDS = {"cuda": "efficient,math", "cpu": "flash,math"}
ENV_VAR = "LONGFORMER_SDPA_BACKENDS"


def parse_backends(names: str) -> tuple[SDPBackend, ...]:
    """'efficient,math' -> (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH); a clear error for anything else."""
    chosen = [n.strip().lower() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BACKEND_NAMES]
    if unknown or not chosen:
        raise ValueError(f"SDPA backends {names!r}: give a comma-separated list of {', '.join(BACKEND_NAMES)}, "
                         f"in order of preference (e.g. 'efficient,math')")
    return tuple(BACKEND_NAMES[n] for n in chosen)


_parsed: dict[str, tuple[SDPBackend, ...]] = {}  # a plain dict: torch.compile traces through it (not lru_cache)


def choose_backends(device_type: str, configured: str | None = None) -> tuple[SDPBackend, ...]:
    """The backends for a device type, in order of preference."""
    names = configured or os.environ.get(ENV_VAR) or DEFAULT_BACKENDS.get(device_type, "flash,efficient,math")
    if names not in _parsed:
        _parsed[names] = parse_backends(names)
    return _parsed[names]
