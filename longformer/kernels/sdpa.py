"""Which of torch's scaled_dot_product_attention kernels run the band blocks, chosen on purpose per device.

Left to itself, SDPA picks a kernel by its own priority list, which changes between torch versions and GPUs
(torch >= 2.10 tries cuDNN first on H100 for a masked call). The defaults below say what we run:

- cuda: the memory-efficient kernel, then math. It takes any additive mask and dropout. cuDNN is left out
  by default: it has had a NaN-gradient bug for rows whose scores are all very negative (pytorch#196678);
  our masks no longer have such rows, so `cudnn,efficient,math` is worth measuring. Flash takes no mask.
- cpu: the CPU flash kernel (it takes masks), then math.
- other devices: flash, efficient, math (torch's classic order).

Override, first match wins: config.sdpa_backends (e.g. from_pretrained(..., sdpa_backends="cudnn,efficient")),
then the environment variable LONGFORMER_SDPA_BACKENDS, then the defaults. Names: flash, efficient, cudnn, math.
The first backend that accepts the call runs it (sdpa_kernel with set_priority=True).
"""
import functools
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


@functools.lru_cache(maxsize=None)
def _resolve(device_type: str, names: str | None) -> tuple[SDPBackend, ...]:
    return parse_backends(names or DEFAULT_BACKENDS.get(device_type, "flash,efficient,math"))


def choose_backends(device_type: str, configured: str | None = None) -> tuple[SDPBackend, ...]:
    """The backends for a device type, in order of preference."""
    return _resolve(device_type, configured or os.environ.get(ENV_VAR) or None)
