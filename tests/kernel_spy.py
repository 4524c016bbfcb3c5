"""Which kernels a forward (and backward) really ran, seen from outside the library: torch functions called
(TorchFunctionMode), aten ops dispatched (TorchDispatchMode), and the autograd graph's nodes. Nothing in the
library is patched; a plan's kernels are told apart by what only they leave behind."""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

FLASH_FOR_CPU = "aten._scaled_dot_product_flash_attention_for_cpu"
ONEDNN_LINEAR = "mkldnn._linear_pointwise"
EXPLICIT_MATMUL = "aten.baddbmm.out"  # ExplicitBand's forward writes every group's output through it
SDPA_FLAGS = {"flash": torch.backends.cuda.flash_sdp_enabled, "math": torch.backends.cuda.math_sdp_enabled,
              "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
              "cudnn": torch.backends.cuda.cudnn_sdp_enabled}


class KernelSpy:
    """with KernelSpy() as spy: run a forward; spy.graph(output) after it; then spy.observed()."""

    def __init__(self):
        self.ops, self.sdpa_calls, self.grad_fns = set(), [], set()
        spy = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is F.scaled_dot_product_attention:
                    spy.sdpa_calls.append(frozenset(name for name, on in SDPA_FLAGS.items() if on()))
                return func(*args, **(kwargs or {}))

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func)
                spy.ops.add(name.rsplit(".", 1)[0] if not name.endswith(".out") else name)
                return func(*args, **(kwargs or {}))

        self._modes = [Functions(), Ops()]

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)

    def graph(self, *outputs):
        """Record the names of the autograd nodes behind outputs."""
        todo = [t.grad_fn for t in outputs if t is not None and t.grad_fn is not None]
        seen = set()
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            self.grad_fns.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)

    def observed(self) -> dict:
        """The kernels that ran, in the terms of a Plan's fields."""
        if self.sdpa_calls:
            band = "blocks+sdpa"
        elif EXPLICIT_MATMUL in self.ops or "ExplicitBandBackward" in self.grad_fns:
            band = "explicit"
        elif FLASH_FOR_CPU in self.ops:
            band = "flash"
        else:
            band = "matmul-softmax"  # the blocks without SDPA, or the dense reference
        return {"band": band, "sdpa": set(self.sdpa_calls), "onednn": ONEDNN_LINEAR in self.ops,
                "act_linear": "ActLinearBackward" in self.grad_fns,
                "keep_output_layer_norm": "OutputLayerNormBackward" in self.grad_fns,
                "tied_lookup": "TiedLookupBackward" in self.grad_fns,
                "bit_dropout": "BitDropoutBackward" in self.grad_fns}


def expected(plan, masked_lm: bool, dropout: bool = False) -> dict:
    """What KernelSpy.observed must say for a forward (and, where plan.grad, its backward) under plan."""
    from longformer.plan import BACKEND_NAMES
    names = {v: k for k, v in BACKEND_NAMES.items()}
    band = {"flash": "flash", "explicit": "explicit", "dense": "matmul-softmax"}.get(
        plan.band, "blocks+sdpa" if plan.sdpa else "matmul-softmax")
    return {"band": band, "sdpa": {frozenset(names[b] for b in plan.sdpa)} if band == "blocks+sdpa" else set(),
            "onednn": plan.linear == "onednn",
            "act_linear": plan.grad and plan.linear != "traced",
            "keep_output_layer_norm": plan.grad and plan.layer_norm == "keep-output",
            "tied_lookup": masked_lm and plan.grad and plan.tied_lookup,
            "bit_dropout": dropout and plan.grad and plan.dropout == "bits"}
