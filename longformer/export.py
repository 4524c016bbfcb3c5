"""Export a Longformer for serving: ONNX, checked in onnxruntime before it is written, or a torch.export program.

    python -m longformer.export CKPT model.onnx                          # any head; batch, length, global count dynamic
    python -m longformer.export CKPT model.onnx --max-global-tokens 64   # a fixed-shape graph: 64 global slots
    python -m longformer.export CKPT model.pt2 --format torch-export

The exported graph takes input_ids, attention_mask and global_attention_mask ([batch, length], int64; multiple
choice [batch, choices, length]) and returns the head's outputs (last_hidden_state; logits; QA's start_logits and
end_logits). Lengths need not be a multiple of the window, and each example may have any number of global tokens,
up to all of them: the graph sizes its global slots from the mask when it runs. With --max-global-tokens N it has
N static slots instead, and an example with more than N global tokens gets NaN outputs, never a plausible number.
`OnnxLongformer` runs an exported ONNX file with the PyTorch classes' default global tokens and a clear error for
an input the graph cannot take. onnx, onnxscript and onnxruntime are an optional extra:
pip install "longformer[export]".
"""
import argparse
import contextlib
import json
import os
import sys

import numpy as np
import torch

from .files import atomic_write
from .model import (LongformerForMaskedLM, LongformerForMultipleChoice, LongformerForQuestionAnswering,
                    LongformerForSequenceClassification, LongformerForTokenClassification, LongformerModel,
                    _segment_global_mask)

HEADS = {cls.__name__: cls for cls in (LongformerModel, LongformerForMaskedLM, LongformerForSequenceClassification,
                                       LongformerForTokenClassification, LongformerForQuestionAnswering,
                                       LongformerForMultipleChoice)}
INPUTS = ("input_ids", "attention_mask", "global_attention_mask")
TOLERANCE = 1e-4
DYNAMIC = "dynamic"  # the max_global_tokens metadata of a graph that sizes its global slots at run time


def output_names(model) -> list[str]:
    if isinstance(model, LongformerModel):
        return ["last_hidden_state"]
    if isinstance(model, LongformerForQuestionAnswering):
        return ["start_logits", "end_logits"]
    return ["logits"]


def _input_rank(model) -> int:
    return 3 if isinstance(model, LongformerForMultipleChoice) else 2


class _Exportable(torch.nn.Module):
    """The model with the three inputs as positional tensors and its outputs (output_names) as a tuple."""

    def __init__(self, model):
        super().__init__()
        self.model, self.names = model, output_names(model)

    def forward(self, input_ids, attention_mask, global_attention_mask):
        out = self.model(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask)
        return tuple(getattr(out, name) for name in self.names)


@contextlib.contextmanager
def _export_settings(model, max_global_tokens: int | None):
    """Eval mode, global slots sized at run time (or max_global_tokens static ones), and the plan's own band (the
    exported plan's: plain matmul and softmax, which every runtime has); the model's settings are restored
    afterwards."""
    settings = model.settings
    saved = settings.attention_backend, settings.max_global_tokens, model.training
    settings.attention_backend, settings.max_global_tokens = "auto", max_global_tokens
    model.eval()
    try:
        yield _Exportable(model).eval()
    finally:
        settings.attention_backend, settings.max_global_tokens = saved[:2]
        model.train(saved[2])


def _example(model):
    """A padded batch of 2 x (2 windows + 3) tokens with one global token each (2 x 2 choices for multiple
    choice): shapes to trace with."""
    L = min(2 * max(model.config.attention_window) + 3, model.config.max_length)
    shape = (2, 2, L) if _input_rank(model) == 3 else (2, L)
    ids = torch.randint(3, model.config.vocab_size, shape)
    am = torch.ones_like(ids)
    am[1, ..., L // 2:] = 0
    gm = torch.zeros_like(ids)
    gm[..., 0] = 1
    return ids, am, gm


def _dynamic_shapes(model):
    dims = {i: torch.export.Dim.DYNAMIC for i in range(_input_rank(model))}
    return {name: dims for name in INPUTS}


def _size_oblivious():
    """Trace as if every size could be any value >= 2, rather than adding guards that a size is not 1 (the
    metadata of a slice, whether a view is contiguous): the graph must hold for one example and one block."""
    import torch.fx.experimental._config as fx_config
    return fx_config.patch(backed_size_oblivious=True)


def export_program(model, max_global_tokens: int | None = None) -> torch.export.ExportedProgram:
    """torch.export of the model, batch, length and the number of global tokens dynamic (or max_global_tokens
    static slots)."""
    with _export_settings(model, max_global_tokens) as wrapped, torch.no_grad(), _size_oblivious():
        return torch.export.export(wrapped, _example(model), dynamic_shapes=_dynamic_shapes(model))


def global_counts(max_global_tokens: int | None) -> list:
    """The global tokens per example that the check runs: 0, 1, 2, 7 and "all" (every real token), or with
    static slots 0, 1 and the slot count."""
    if max_global_tokens is None:
        return [0, 1, 2, 7, "all"]
    return sorted({0, min(1, max_global_tokens), max_global_tokens})


def _batch(model, L: int, rows, g):
    """rows: (length, global count) per example -> input_ids, attention_mask, global_attention_mask [N, L], the
    global tokens at random positions among the real ones."""
    ids = torch.randint(3, model.config.vocab_size, (len(rows), L), generator=g)
    am = (torch.arange(L)[None] < torch.tensor([n for n, _ in rows])[:, None]).long()
    ids[am == 0] = model.config.pad_token_id
    gm = torch.zeros_like(ids)
    for b, (n, count) in enumerate(rows):
        gm[b, torch.randperm(n, generator=g)[:n if count == "all" else count]] = 1
    return ids, am, gm


def check_batches(model, max_global_tokens: int | None = None, seed: int = 0):
    """Batches unlike the traced one, at lengths 1, w and 3w + 5 (w the widest one-sided window, within the
    position table): one example for each of global_counts alone, then six examples of three lengths (padding)
    with all those counts mixed. Multiple choice gets the same rows as choices: [1, 1, L] and [3, 2, L]."""
    g = torch.Generator().manual_seed(seed)
    w = max(model.config.attention_window) // 2
    counts = global_counts(max_global_tokens)
    for L in sorted({1, w, min(3 * w + 5, model.config.max_length)}):
        lengths = [L, max(1, L // 2), max(1, L - 1)]
        mixed = [(lengths[i % 3], counts[i % len(counts)]) for i in range(6)]
        for rows in [[(L, c)] for c in counts] + [mixed]:
            batch = _batch(model, L, rows, g)
            if _input_rank(model) == 3:
                batch = tuple(t.view(-1, min(2, len(rows)), L) for t in batch)
            yield batch


def compare(model, run, max_global_tokens: int | None = None) -> float:
    """The largest difference between run(ids, am, gm) (a sequence of numpy or torch outputs) and the model in
    PyTorch, over check_batches. With static slots, also that an example with one global token more than the
    slots gets NaN outputs (ExportCheckFailed if not)."""
    worst = 0.0
    model_was_training = model.training
    model.eval()
    names = output_names(model)
    with torch.no_grad():
        for ids, am, gm in check_batches(model, max_global_tokens):
            out = model(ids, attention_mask=am, global_attention_mask=gm)
            for name, got in zip(names, run(ids, am, gm), strict=True):
                expected, got = getattr(out, name), torch.as_tensor(np.asarray(got))
                if got.shape != expected.shape:
                    raise ExportCheckFailed(f"the exported model returned {name} of shape {tuple(got.shape)} for a "
                                            f"batch of {tuple(ids.shape)}, PyTorch {tuple(expected.shape)}")
                worst = max(worst, float((got - expected).abs().max()))
        if max_global_tokens is not None:
            _check_overflow(model, run, max_global_tokens)
    model.train(model_was_training)
    return worst


def _check_overflow(model, run, slots: int):
    """Two examples, the first with slots + 1 global tokens: its outputs must be NaN, the second's finite."""
    L = min(slots + 1, model.config.max_length)
    if slots + 1 > L:
        return  # no input of this model can have more global tokens than the slots
    ids, am, gm = _batch(model, L, [(L, slots + 1), (L, 0)], torch.Generator().manual_seed(0))
    if _input_rank(model) == 3:
        ids, am, gm = (t.view(1, 2, L) for t in (ids, am, gm))
    for name, got in zip(output_names(model), run(ids, am, gm)):
        got = torch.as_tensor(np.asarray(got)).reshape(2, -1)  # [example or choice, outputs]
        if not (got[0].isnan().all() and got[1].isfinite().all()):
            raise ExportCheckFailed(f"an example with {slots + 1} global tokens in a graph of {slots} slots did not "
                                    f"get NaN {name} (or its neighbour did)")


class ExportCheckFailed(RuntimeError):
    pass


def _ort_session(path: str):
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError('running ONNX models needs onnxruntime: pip install "longformer[export]"') from e
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])


def _run_onnx(session, ids, am, gm):
    feed = {name: np.asarray(t, dtype=np.int64) for name, t in zip(INPUTS, (ids, am, gm))}
    return session.run(None, feed)


def export_onnx(model, path: str, max_global_tokens: int | None = None, tolerance: float = TOLERANCE) -> float:
    """Write model as ONNX to path, after checking it in onnxruntime against PyTorch on batches other than
    the traced one. A model that disagrees by more than tolerance is not written (ExportCheckFailed).
    Returns the largest difference measured."""
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise ImportError('ONNX export needs onnx, onnxscript and onnxruntime: pip install "longformer[export]"') from e
    with _export_settings(model, max_global_tokens) as wrapped, torch.no_grad(), _size_oblivious():
        program = torch.onnx.export(wrapped, _example(model), dynamo=True, dynamic_shapes=_dynamic_shapes(model),
                                    input_names=list(INPUTS), output_names=output_names(model), verbose=False)
    cfg = model.config
    program.model.metadata_props.update({
        "longformer_head": type(model).__name__,
        "max_global_tokens": DYNAMIC if max_global_tokens is None else str(max_global_tokens),
        "max_length": str(cfg.max_length), "pad_token_id": str(cfg.pad_token_id),
        "sep_token_id": str(cfg.sep_token_id)})
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
    """An exported ONNX Longformer in onnxruntime, called like the PyTorch model (numpy or torch inputs, numpy
    outputs: one array, or QA's (start_logits, end_logits)), with the PyTorch classes' default global tokens and
    clear errors for what the graph cannot take."""

    def __init__(self, path: str):
        self.session = _ort_session(path)
        meta = self.session.get_modelmeta().custom_metadata_map
        if "max_global_tokens" not in meta:
            raise ValueError(f"{path} was not written by longformer.export (no max_global_tokens in its metadata)")
        self.head = meta["longformer_head"]
        slots = meta["max_global_tokens"]
        self.max_global_tokens = None if slots == DYNAMIC else int(slots)
        self.max_length, self.pad_token_id = int(meta["max_length"]), int(meta["pad_token_id"])
        self.sep_token_id = int(meta.get("sep_token_id", 2))
        self.rank = 3 if self.head == "LongformerForMultipleChoice" else 2

    def __call__(self, input_ids, attention_mask=None, global_attention_mask=None):
        ids = np.asarray(input_ids, dtype=np.int64)
        shape = "[batch, choices, length]" if self.rank == 3 else "[batch, length]"
        if ids.ndim != self.rank or ids.shape[-1] == 0:
            raise ValueError(f"input_ids must be {shape} with length >= 1, got shape {ids.shape}")
        if ids.shape[-1] > self.max_length:
            raise ValueError(f"input of {ids.shape[-1]} tokens is longer than this model's position table allows "
                             f"({self.max_length}): truncate it")
        am = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        gm = self._default_global(ids) if global_attention_mask is None else np.asarray(global_attention_mask,
                                                                                          dtype=np.int64)
        counts = ((gm != 0) & (am != 0)).sum(-1)
        if self.max_global_tokens is not None and (counts > self.max_global_tokens).any():
            where = tuple(int(i) for i in np.unravel_index(int(counts.argmax()), counts.shape))
            name = f"example {where[0]}" + (f", choice {where[1]}," if len(where) == 2 else "")
            raise ValueError(f"{name} has {int(counts[where])} global tokens, but this model was exported with "
                             f"--max-global-tokens {self.max_global_tokens}: export it again with a larger value, or "
                             f"without the option")
        outputs = _run_onnx(self.session, ids, am, gm)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _default_global(self, ids: np.ndarray) -> np.ndarray:
        """As the PyTorch classes: <s> for sequence classification, the question for QA, the choice for multiple
        choice, none otherwise."""
        if self.head == "LongformerForSequenceClassification":
            gm = np.zeros_like(ids)
            gm[:, 0] = 1
            return gm
        if self.head in ("LongformerForQuestionAnswering", "LongformerForMultipleChoice"):
            rows = torch.from_numpy(ids).reshape(-1, ids.shape[-1])
            choices = ids.shape[1] if self.rank == 3 else None
            question_first = self.head == "LongformerForQuestionAnswering"
            return _segment_global_mask(rows, self.sep_token_id, question_first, choices).numpy().reshape(ids.shape)
        return np.zeros_like(ids)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="HF-format checkpoint (config.json + weights): a folder or a Hub name")
    p.add_argument("out", help="the file to write (.onnx, or .pt2 for torch-export)")
    p.add_argument("--format", choices=["onnx", "torch-export"], default="onnx")
    p.add_argument("--head", choices=list(HEADS), help="the class to export (default: the checkpoint's own)")
    p.add_argument("--max-global-tokens", type=int, metavar="N",
                   help="a fixed-shape graph with N global slots per example, where an example with more gets NaN "
                        "outputs (default: the graph sizes them from the mask, any number per example)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest difference allowed by the check")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    if args.max_global_tokens is not None and args.max_global_tokens < 0:
        p.error("--max-global-tokens must be >= 0")
    if os.path.exists(args.out) and not args.overwrite:
        p.error(f"{args.out} exists: choose another name, or --overwrite")
    from .config import LongformerConfig
    from .hub import resolve
    checkpoint = resolve(args.checkpoint, "model")  # once: the config and the weights are read from the folder
    config = LongformerConfig.from_pretrained(checkpoint)
    own = (config.extra.get("architectures") or ["LongformerModel"])[0]
    head = args.head or own
    if head not in HEADS:
        p.error(f"{own} cannot be exported (exportable: {', '.join(HEADS)}); --head LongformerModel exports its "
                f"encoder")
    model = HEADS[head].from_pretrained(checkpoint)
    if args.format == "onnx":
        worst = export_onnx(model, args.out, args.max_global_tokens, args.tolerance)
    else:
        program = export_program(model, args.max_global_tokens)
        worst = compare(model, lambda *t: program.module()(*t), args.max_global_tokens)
        if not worst <= args.tolerance:
            sys.exit(f"the exported program differs from eager PyTorch by {worst:.2e}: {args.out} not written")
        atomic_write(args.out, lambda tmp: torch.export.save(program, tmp))
    print(json.dumps({"wrote": args.out, "head": head, "format": args.format,
                      "max_global_tokens": DYNAMIC if args.max_global_tokens is None else args.max_global_tokens,
                      "checked_max_abs_diff": worst}))


if __name__ == "__main__":
    from .cli import run_command
    run_command(main)
