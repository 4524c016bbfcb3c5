"""The kernel plan: which implementation of each op one forward pass runs, decided here and nowhere else.

The model is a different program on CPU in eager mode, on a GPU, and under torch.compile or torch.export. Rather
than each module looking at the device, the dtype, grad mode and torch's tracing state for itself, the forward
makes one Plan from them (for_forward, make_plan) and hands it to every module it calls. The plans, PLANS, are
tabled in docs/attention.md (pinned by tests/test_plan.py): cpu-inference and cpu-training (CPU, eager, without
and with autograd), cuda (any other device, eager), compiled and exported (inside torch.compile, torch.export).
Settings.plan runs a named plan on any device: "cuda" runs whole on CPU, with stand-ins (CPU_STAND_INS) for the
kernels that have no CPU implementation, named in Plan.stand_ins.
"""
import os
from dataclasses import dataclass, fields

import torch
from torch.nn.attention import SDPBackend

PLANS = ("cpu-inference", "cpu-training", "cuda", "compiled", "exported")
# The band paths a user may choose (Settings.attention_backend): "auto" is the plan's own.
ATTENTION_BACKENDS = ("auto", "sdpa", "chunked", "dense")

# The CPU kernels' tuning, measured one layer of longformer-base at 4,096 tokens on a 2-core EPYC
# (benchmarks/band_kernels.py). Queries per block: flash 61-66 ms for blocks of 32, 59-62 for 64, 66-77 for 128;
# explicit in training with dropout, blocks of 64 / 128 in groups of 2 MB: bf16 133 / 136 ms (4 MB: 139 / 141;
# blocks of w = 256: 197-202), fp32 249 / 257 (4 MB: 284 / 266; blocks of w: 330-354).
FLASH_BLOCK = 32
EXPLICIT_BLOCK = 64
# The explicit kernel's groups of blocks: every head's scores of a group take about this, and stay in cache.
GROUP_BYTES = 2 << 20
# Tokens per chunk of the per-token work (kernels/rows.py). A chunk's tensors ([1,024, 3,072] fp32 activations:
# 12 MB in longformer-base) are reused from the heap and mostly stay in cache, where a whole sequence's (50 MB at
# 4,096 tokens) is a fresh mapping from the OS every time: 169 against 195 ms for a layer's feed-forward alone.
CHUNK_ROWS = 1024

# SDPA kernels for the blocks band, chosen on purpose: left to itself SDPA picks by a priority list that changes
# between torch versions and GPUs. cuda: the memory-efficient kernel takes any additive mask and dropout; cuDNN
# takes them too, and on an H100 (torch 2.11) its bf16 training step of longformer-base at 8 x 4,096 tokens was
# faster (146-155 against 181 ms), but stays out of the default until the whole suite has passed with it on a GPU.
# cpu: the fused flash kernel (it takes masks). Override: Settings.sdpa_backends, then $LONGFORMER_SDPA_BACKENDS.
BACKEND_NAMES = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
DEFAULT_BACKENDS = {"cuda": "efficient,math", "cpu": "flash,math"}
ENV_VAR = "LONGFORMER_SDPA_BACKENDS"
# Kernels with no CPU implementation, and what runs in their place when a GPU plan runs on CPU.
CPU_STAND_INS = {SDPBackend.EFFICIENT_ATTENTION: SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION: SDPBackend.MATH}

_onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# The dtypes oneDNN's linear op runs: bf16 only where the CPU has bf16 instructions.
ONEDNN_DTYPES = () if not _onednn else (
    (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,))
FLASH_WITH_LSE = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


@dataclass(frozen=True)
class Plan:
    """One forward's choices. The first fields name the kernels; the last say what they run under."""
    name: str
    band: str  # "flash" | "explicit" (kernels/strided.py), "blocks" (kernels/banded.py), "dense" (the reference)
    block: int  # queries per band block of flash and explicit (blocks: the window)
    sdpa: tuple[SDPBackend, ...] | None  # the blocks band's SDPA kernels in order; None: matmul, softmax, matmul
    linear: str  # "onednn" (oneDNN's linear op), "torch" (F.linear), "traced" (plain F.linear, no ActLinear)
    layer_norm: str  # "keep-output" (kernels/layer_norm.OutputLayerNorm) | "torch"
    dropout: str  # "bits" (kernels/dropout.BitDropout) | "torch"
    row_chunk: int | None  # tokens per chunk of the per-token work; None: all at once
    group_bytes: int  # the explicit band's groups of blocks
    tied_lookup: bool  # the masked-LM decoder hands its weight gradient to the lookup's (kernels/tied.py)
    autocast: torch.dtype | None  # autocast's dtype, or None
    grad: bool  # autograd records this forward
    tracing: str | None  # None, "compile" or "export": what masks.py may read back, and how
    read_back: bool  # values may be read to the host without waiting for a device: the input checks
    stand_ins: tuple[str, ...] = ()  # kernels run in place of the plan's own on this device


@dataclass
class Settings:
    """A model's run-time choices (model.settings), apart from its architecture (model.config).

    attention_backend: "auto" (the plan's band), "sdpa" (the blocks band through SDPA), "chunked" (the blocks with
    an explicit softmax), "dense" (the L x L reference: tests only). sdpa_backends: SDPA's kernels for the blocks
    band, e.g. "cudnn,efficient" (None: $LONGFORMER_SDPA_BACKENDS, else the device's defaults). plan: a name
    of PLANS to run on any device (None: the one for where and how the forward runs). gradient_checkpointing:
    False, True, or "selective" (keep the linear layers' outputs, recompute the rest). max_global_tokens: a static
    count of global slots per example (None: as many as the batch needs, read from the mask once a forward); set,
    torch.compile sees one graph with global tokens too, and an exported graph has that many slots."""
    attention_backend: str = "auto"
    sdpa_backends: str | None = None
    plan: str | None = None
    gradient_checkpointing: bool | str = False
    max_global_tokens: int | None = None

    def __setattr__(self, name, value):
        _check_setting(name, value)
        super().__setattr__(name, value)


SETTINGS = tuple(f.name for f in fields(Settings))


def _check_setting(name, value):
    def fail(expected):
        raise ValueError(f"{name}={value!r}: {expected}")

    if name == "attention_backend" and value not in ATTENTION_BACKENDS:
        fail(f"choose one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "plan" and value is not None and value not in PLANS:
        fail(f"choose one of {', '.join(PLANS)}, or None for the plan of where the model runs")
    if name == "gradient_checkpointing" and value not in (False, True, "selective"):
        fail("give False, True or 'selective'")
    if name == "max_global_tokens" and value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0):
        fail("give a non-negative integer, or None")
    if name == "sdpa_backends" and value is not None:
        parse_backends(value)


def parse_backends(names: str) -> tuple[SDPBackend, ...]:
    """'efficient,math' -> (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH); a clear error for anything else."""
    chosen = [n.strip().lower() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BACKEND_NAMES]
    if unknown or not chosen:
        raise ValueError(f"SDPA backends {names!r}: give a comma-separated list of {', '.join(BACKEND_NAMES)}, "
                         f"in order of preference (e.g. 'efficient,math')")
    return tuple(BACKEND_NAMES[n] for n in chosen)


def choose_backends(device_type: str, configured: str | None = None) -> tuple[SDPBackend, ...]:
    """The SDPA kernels for a device type, in order of preference: configured, else the environment variable,
    else the defaults."""
    names = configured or os.environ.get(ENV_VAR) or DEFAULT_BACKENDS.get(device_type, "flash,efficient,math")
    return parse_backends(names)


def for_forward(settings: Settings, x: torch.Tensor, param: torch.Tensor, trainable: bool,
                attention_dropout: bool) -> Plan:
    """The plan of the forward about to run on x (input ids or embeddings), for a model whose parameters are like
    param: where it runs, under which autocast and grad mode, whether torch is tracing it."""
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    tracing = "export" if torch.compiler.is_exporting() else "compile" if torch.compiler.is_compiling() else None
    grad = torch.is_grad_enabled() and (trainable or x.requires_grad)
    return make_plan(device, autocast or param.dtype, autocast, grad, attention_dropout, tracing, settings)


def make_plan(device: str, dtype: torch.dtype, autocast: torch.dtype | None, grad: bool, attention_dropout: bool,
              tracing: str | None, settings: Settings) -> Plan:
    """device type; dtype the matmuls', autocast's or None; grad: autograd records; attention_dropout: the band
    drops probabilities; tracing: None, "compile" or "export". Read here, under torch.compile the settings are
    guarded: a change compiles again."""
    return _make(device, dtype, autocast, grad, attention_dropout, tracing, settings.attention_backend,
                 settings.sdpa_backends or os.environ.get(ENV_VAR), settings.plan)


_plans: dict = {}


@torch.compiler.assume_constant_result  # torch.compile runs it as it traces and takes the plan as a constant
def _make(*key) -> Plan:
    if key not in _plans:
        _plans[key] = _build(*key)
    return _plans[key]


def _build(device, dtype, autocast, grad, attention_dropout, tracing, backend, sdpa_names, forced) -> Plan:
    name = {"export": "exported", "compile": "compiled"}.get(tracing) or forced or (
        ("cpu-training" if grad else "cpu-inference") if device == "cpu" else "cuda")
    cpu_eager = name.startswith("cpu")
    if cpu_eager and device != "cpu":
        raise ValueError(f"plan {name!r} runs on CPU only (its flash band and oneDNN linear layers have no {device} "
                         f"kernels): use plan 'cuda', or None")
    if backend == "dense":
        band = "dense"
    elif backend in ("sdpa", "chunked") or not cpu_eager:
        band = "blocks"
    elif name == "cpu-inference" and dtype == torch.float32 and not (attention_dropout or grad) and FLASH_WITH_LSE:
        band = "flash"
    else:
        band = "explicit"
    sdpa, stand_ins = None, ()
    # The exported plan's blocks: plain matmul and softmax, which every runtime has.
    if band == "blocks" and backend != "chunked" and not (name == "exported" and backend == "auto"):
        sdpa = choose_backends("cuda" if name == "cuda" and device == "cpu" else device, sdpa_names)
        if device == "cpu":
            stand_ins = tuple(f"SDPA {b.name} -> {CPU_STAND_INS[b].name} (no CPU kernel)"
                              for b in sdpa if b in CPU_STAND_INS)
            sdpa = tuple(dict.fromkeys(CPU_STAND_INS.get(b, b) for b in sdpa))
    traced = name in ("compiled", "exported")
    return Plan(name=name, band=band, block=FLASH_BLOCK if band == "flash" else EXPLICIT_BLOCK, sdpa=sdpa,
                linear="traced" if traced else "onednn" if (
                    cpu_eager and dtype in ONEDNN_DTYPES and torch.backends.mkldnn.enabled) else "torch",
                layer_norm="keep-output" if name == "cpu-training" else "torch",
                dropout="bits" if cpu_eager else "torch", row_chunk=CHUNK_ROWS if cpu_eager else None,
                group_bytes=GROUP_BYTES, tied_lookup=grad and not traced, autocast=autocast, grad=grad,
                tracing={"compiled": "compile", "exported": "export"}.get(name), read_back=cpu_eager,
                stand_ins=stand_ins)
