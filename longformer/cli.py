"""What the training scripts share on the command line: checked numbers and the training loop's flags."""
import argparse
import dataclasses
import os
import sys
import time

from .plan import ATTENTION_BACKENDS
from .trainer import DEVICES, PRECISIONS, REPORT_TO, TrainArgs


def number(kind, low=None, strict=False):
    """An argparse type: an int or float, at least (or, strict, above) low."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if low is not None and (value < low or (strict and value == low)):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {low}")
        return value
    return parse


def checkpointing_mode(text):
    """--gradient-checkpointing's value: 'selective' (with no value: every layer, whole)."""
    if text != "selective":
        raise argparse.ArgumentTypeError(f"{text!r}: give no value (whole layers recomputed) or 'selective'")
    return text


def add_model_arguments(parser: argparse.ArgumentParser, init_help: str):
    """--init, --tokenizer and --cache-dir; returns the group, for a script's own model options."""
    g = parser.add_argument_group("model")
    g.add_argument("--init", help=init_help)
    g.add_argument("--tokenizer", help="tokenizer folder or Hub name (default: --init's)")
    g.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "longformer"),
                   help="where tokenized text and the demo tokenizer are kept between runs")
    return g


FLAG_HELP = {"num_workers": "processes collating the next batches while a step runs (default -1: up to 4 on a GPU, "
                           "1 on CPU; 0: in the training process)"}


def add_training_arguments(parser: argparse.ArgumentParser):
    """--out/--resume/--overwrite, the model's run-time options, and every TrainArgs field as a flag."""
    g = parser.add_argument_group("training")
    g.add_argument("--out", help="run directory (default: runs/NAME-DATE-TIME)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="delete what --out holds and start afresh")
    g.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)
    g.add_argument("--gradient-checkpointing", nargs="?", const=True, default=False, type=checkpointing_mode,
                   metavar="selective", help="recompute every layer's activations in the backward pass; "
                   "'selective': keep the linear layers' outputs and recompute the rest (less memory, ~5%% slower)")
    defaults = TrainArgs(out="")
    for f in dataclasses.fields(TrainArgs):
        if f.name == "out":
            continue
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            g.add_argument("--" + f.name.replace("_", "-"), action="store_true")
            continue
        kind = {int: number(int, -1 if f.name == "num_workers" else 0), float: number(float, 0)}.get(type(value), str)
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=value, help=FLAG_HELP.get(f.name),
                       choices={"precision": list(PRECISIONS), "device": list(DEVICES),
                                "report_to": list(REPORT_TO)}.get(f.name))


def train_args(args: argparse.Namespace, name: str) -> TrainArgs:
    args.out = args.out or os.path.join("runs", time.strftime(f"{name}-%Y%m%d-%H%M%S"))
    return TrainArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainArgs)})


def run_settings(args: argparse.Namespace) -> dict:
    """What identifies a run (for run.json and --resume's check)."""
    return {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}


def run_command(main):
    """Run a command's main(): a user's mistake (a missing folder or file, a value the checks refuse: OSError,
    ValueError) is printed as one line, with exit status 2; a traceback is for bugs (LONGFORMER_TRACEBACK=1 shows
    one for these too)."""
    try:
        return main()
    except (OSError, ValueError) as e:
        if os.environ.get("LONGFORMER_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
