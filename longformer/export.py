"""Export a Longformer for serving: ONNX, checked in onnxruntime before it is written, or a torch.export program.

    python -m longformer.export CKPT model.onnx                       # any head; batch and length dynamic
    python -m longformer.export CKPT model.onnx --max-global-tokens 64   # e.g. a question's tokens for QA
    python -m longformer.export CKPT model.pt2 --format torch-export

The exported graph takes input_ids, attention_mask and global_attention_mask ([batch, length], int64) and
returns the head's main output (last_hidden_state, or logits). Lengths need not be a multiple of the window,
and global tokens may differ per example, up to a static number of slots per example (--max-global-tokens):
the graph holds no branch on tensor values. `OnnxLongformer` runs an exported ONNX file with the checks the
graph cannot make (too many global tokens, too long an input), and the defaults of the PyTorch classes.
onnx, onnxscript and onnxruntime are an optional extra: pip install "longformer[export]".
"""
import argparse
import contextlib
import json
import os
import sys

import numpy as np
import torch

from .files import atomic_write
from .model import (LongformerForMaskedLM, LongformerForSequenceClassification, LongformerForTokenClassification,
                    LongformerModel)

HEADS = {cls.__name__: cls for cls in (LongformerModel, LongformerForMaskedLM, LongformerForSequenceClassification,
                                       LongformerForTokenClassification)}
INPUTS = ("input_ids", "attention_mask", "global_attention_mask")
TOLERANCE = 1e-4


def output_name(model) -> str:
    return "last_hidden_state" if isinstance(model, LongformerModel) else "logits"


class _Exportable(torch.nn.Module):
    """The model with the three inputs as positional tensors and its main output as the only one."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, global_attention_mask):
        return self.model(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask)[0]


@contextlib.contextmanager
def _export_settings(model, max_global_tokens: int):
    """Eval mode, global tokens in max_global_tokens static slots, and the explicit attention kernel (plain
    matmul and softmax, which every runtime has); the model's own settings are restored afterwards."""
    cfg = model.config
    saved = cfg.attention_backend, cfg.max_global_tokens, model.training
    cfg.attention_backend, cfg.max_global_tokens = "chunked", max_global_tokens
    model.eval()
    try:
        yield _Exportable(model).eval()
    finally:
        cfg.attention_backend, cfg.max_global_tokens = saved[:2]
        model.train(saved[2])


def _example(model):
    """A padded batch of 2 x (2 windows + 3) tokens with one global token each: shapes to trace with."""
    L = min(2 * max(model.config.attention_window) + 3, model.config.max_length)
    ids = torch.randint(3, model.config.vocab_size, (2, L))
    am = torch.ones_like(ids)
    am[1, L // 2:] = 0
    gm = torch.zeros_like(ids)
    gm[:, 0] = 1
    return ids, am, gm


def _dynamic_shapes():
    dims = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    return {name: dims for name in INPUTS}


def _size_oblivious():
    """Trace as if every size could be any value >= 2, rather than adding guards that a size is not 1 (the
    metadata of a slice, whether a view is contiguous): the graph must hold for one example and one block."""
    import torch.fx.experimental._config as fx_config
    return fx_config.patch(backed_size_oblivious=True)


def export_program(model, max_global_tokens: int = 1) -> torch.export.ExportedProgram:
    """torch.export of the model, batch and length dynamic."""
    with _export_settings(model, max_global_tokens) as wrapped, torch.no_grad(), _size_oblivious():
        return torch.export.export(wrapped, _example(model), dynamic_shapes=_dynamic_shapes())


def check_batches(model, max_global_tokens: int, seed: int = 0):
    """Batches unlike the traced one: lengths 1, w and 3w + 5 (w the widest one-sided window, within the
    position table); one example with 0, 1 and max_global_tokens global tokens in turn, and three examples of
    different lengths (padding) with those counts."""
    g = torch.Generator().manual_seed(seed)
    w = max(model.config.attention_window) // 2
    counts = sorted({0, min(1, max_global_tokens), max_global_tokens})
    for L in sorted({1, w, min(3 * w + 5, model.config.max_length)}):
        shapes = [([L], [c]) for c in counts] + [([L, max(1, L // 2), max(1, L - 1)], counts[-1:] + counts[:2])]
        for lengths, n_global in shapes:
            B = len(lengths)
            ids = torch.randint(3, model.config.vocab_size, (B, L), generator=g)
            am = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
            ids[am == 0] = model.config.pad_token_id
            gm = torch.zeros_like(ids)
            for b in range(B):
                gm[b, torch.randperm(lengths[b], generator=g)[:n_global[b % len(n_global)]]] = 1
            yield ids, am, gm


def compare(model, run, max_global_tokens: int) -> float:
    """The largest difference between run(ids, am, gm) (numpy or torch) and the model in PyTorch, over
    check_batches."""
    worst = 0.0
    model_was_training = model.training
    model.eval()
    with torch.no_grad():
        for ids, am, gm in check_batches(model, max_global_tokens):
            expected = model(ids, attention_mask=am, global_attention_mask=gm)[0]
            got = torch.as_tensor(np.asarray(run(ids, am, gm)))
            if got.shape != expected.shape:
                raise ExportCheckFailed(f"the exported model returned shape {tuple(got.shape)} for a batch of "
                                        f"{tuple(ids.shape)}, PyTorch {tuple(expected.shape)}")
            worst = max(worst, float((got - expected).abs().max()))
    model.train(model_was_training)
    return worst


class ExportCheckFailed(RuntimeError):
    pass


def _ort_session(path: str):
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError('running ONNX models needs onnxruntime: pip install "longformer[export]"') from e
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def _run_onnx(session, ids, am, gm):
    feed = {name: t.numpy() for name, t in zip(INPUTS, (ids, am, gm))}
    return session.run(None, feed)[0]


def export_onnx(model, path: str, max_global_tokens: int = 1, tolerance: float = TOLERANCE) -> float:
    """Write model as ONNX to path, after checking it in onnxruntime against PyTorch on batches other than
    the traced one. A model that disagrees by more than tolerance is not written (ExportCheckFailed).
    Returns the largest difference measured."""
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise ImportError('ONNX export needs onnx, onnxscript and onnxruntime: pip install "longformer[export]"') from e
    with _export_settings(model, max_global_tokens) as wrapped, torch.no_grad(), _size_oblivious():
        program = torch.onnx.export(wrapped, _example(model), dynamo=True, dynamic_shapes=_dynamic_shapes(),
                                    input_names=list(INPUTS), output_names=[output_name(model)], verbose=False)
    program.model.metadata_props.update({
        "longformer_head": type(model).__name__, "max_global_tokens": str(max_global_tokens),
        "max_length": str(model.config.max_length), "pad_token_id": str(model.config.pad_token_id)})
    worst = 0.0

    def write_checked(tmp):
        nonlocal worst
        program.save(tmp)
        session = _ort_session(tmp)
        worst = compare(model, lambda *t: _run_onnx(session, *t), max_global_tokens)
        if not worst <= tolerance:
            raise ExportCheckFailed(f"onnxruntime differs from PyTorch by {worst:.2e} (tolerance {tolerance:.0e}): "
                                    f"{path} not written")

    atomic_write(path, write_checked)
    return worst


class OnnxLongformer:
    """An exported ONNX Longformer in onnxruntime, called like the PyTorch model (numpy or torch inputs,
    numpy output), with the checks the graph itself cannot make."""

    def __init__(self, path: str):
        self.session = _ort_session(path)
        meta = self.session.get_modelmeta().custom_metadata_map
        if "max_global_tokens" not in meta:
            raise ValueError(f"{path} was not written by longformer.export (no max_global_tokens in its metadata)")
        self.head = meta["longformer_head"]
        self.max_global_tokens, self.max_length = int(meta["max_global_tokens"]), int(meta["max_length"])
        self.pad_token_id = int(meta["pad_token_id"])

    def __call__(self, input_ids, attention_mask=None, global_attention_mask=None) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {ids.shape}")
        if ids.shape[1] > self.max_length:
            raise ValueError(f"input of {ids.shape[1]} tokens is longer than this model's position table allows "
                             f"({self.max_length}): truncate it")
        am = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if global_attention_mask is None:  # the PyTorch classes' default: <s> global for classification
            gm = np.zeros_like(ids)
            if self.head == "LongformerForSequenceClassification":
                gm[:, 0] = 1
        else:
            gm = np.asarray(global_attention_mask, dtype=np.int64)
        counts = ((gm != 0) & (am != 0)).sum(1)
        if (counts > self.max_global_tokens).any():
            row = int(counts.argmax())
            raise ValueError(f"example {row} has {int(counts[row])} global tokens, but this model was exported with "
                             f"--max-global-tokens {self.max_global_tokens}: export it again with a larger value")
        return self.session.run(None, dict(zip(INPUTS, (ids, am, gm))))[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="HF-format checkpoint folder (config.json + weights)")
    p.add_argument("out", help="the file to write (.onnx, or .pt2 for torch-export)")
    p.add_argument("--format", choices=["onnx", "torch-export"], default="onnx")
    p.add_argument("--head", choices=list(HEADS), help="the class to export (default: the checkpoint's own)")
    p.add_argument("--max-global-tokens", type=int, default=1,
                   help="global-token slots per example in the graph (default 1: <s>)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest difference allowed by the check")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    if args.max_global_tokens < 0:
        p.error("--max-global-tokens must be >= 0")
    if os.path.exists(args.out) and not args.overwrite:
        p.error(f"{args.out} exists: choose another name, or --overwrite")
    from .config import LongformerConfig
    config = LongformerConfig.from_pretrained(args.checkpoint)
    own = (config.extra.get("architectures") or ["LongformerModel"])[0]
    head = args.head or own
    if head not in HEADS:
        p.error(f"{own} cannot be exported yet (exportable: {', '.join(HEADS)}); --head LongformerModel exports its "
                f"encoder")
    model = HEADS[head].from_pretrained(args.checkpoint)
    if args.format == "onnx":
        worst = export_onnx(model, args.out, args.max_global_tokens, args.tolerance)
    else:
        program = export_program(model, args.max_global_tokens)
        worst = compare(model, lambda *t: program.module()(*t), args.max_global_tokens)
        if not worst <= args.tolerance:
            sys.exit(f"the exported program differs from eager PyTorch by {worst:.2e}: {args.out} not written")
        atomic_write(args.out, lambda tmp: torch.export.save(program, tmp))
    print(json.dumps({"wrote": args.out, "head": head, "format": args.format,
                      "max_global_tokens": args.max_global_tokens, "checked_max_abs_diff": worst}))


if __name__ == "__main__":
    main()
