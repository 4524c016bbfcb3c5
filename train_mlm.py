"""Masked-LM pretraining of a Longformer, on one process or many.

    python train_mlm.py                                   # the embedded demo: no downloads, ~8 min on 2 CPU cores
    python train_mlm.py --init CKPT --data essays/ --recipe feedback-prize-mlm
    python -m torch.distributed.run --nproc_per_node 3 train_mlm.py --init CKPT --data essays/ --recipe feedback-prize-mlm
    python train_mlm.py --config longformer-base/config.json --data wikitext2_npz/ --recipe flagperf

Settings come from the built-in defaults, then the --recipe file (longformer/recipes/NAME.json), then the
command line. The run's directory (--out) gets run.json, metrics.jsonl, resumable checkpoints and, at the
end, the model in HF format with its tokenizer.
"""
import argparse
import json
import os

import torch

import longformer
from longformer import demo
from longformer.data import check_vocabulary, read_npz_pair
from longformer.prepare_data import prepare_cached, tokenizer_info
from longformer.shards import PACKINGS, TokenBlocks, read_manifest
from longformer.cli import (add_model_arguments, add_training_arguments, number, run_command, run_settings,
                            train_args)
from longformer.tokenizer import copy_tokenizer_files
from longformer.tasks import MLMTask
from longformer.trainer import leave, train

RECIPES = os.path.join(os.path.dirname(longformer.__file__), "recipes")
# The embedded demo: a small Longformer (longformer/demo.py) whose window (64) is a quarter of its 256 tokens.
DEMO = dict(seq_len=256, batch_size=16, lr=1e-3, adam_beta2=0.98, warmup=0.05, weight_decay=0.01, max_steps=1000,
            eval_every=100, log_every=10, precision="fp32")


# -- arguments ------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help=f"named settings: {', '.join(sorted(f[:-5] for f in os.listdir(RECIPES)))}")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="token shards (python -m longformer.prepare_data), or text tokenized at start-up "
                                  "into --cache-dir: a folder of .txt files, a text file (blank-line separated), a "
                                  ".jsonl or a .parquet; or a folder with FlagPerf's train_dataset.npz/eval_dataset.npz "
                                  "(none: the embedded demo)")
    g.add_argument("--val-data", help="validation documents, as --data (shards: their training split; default: "
                                      "hold out --val-fraction of --data's documents)")
    g.add_argument("--val-fraction", type=number(float, 0, strict=True), default=0.05)
    g.add_argument("--max-val-blocks", type=number(int, 0), default=2000,
                   help="evaluate on at most this many blocks, evenly spaced over the validation split (0: all)")
    g.add_argument("--text-field", default="text", help="the .jsonl field or .parquet column holding the text")
    g.add_argument("--seq-len", type=number(int, 1, False), default=1024)
    g.add_argument("--packing", choices=PACKINGS, default="documents",
                   help="documents: whole documents fill each block and never attend to each other; single: one "
                        "document per block, padded; concat: documents run together and cut every --seq-len tokens")
    g.add_argument("--mask-prob", type=number(float, 0, strict=True), default=0.15)
    g = add_model_arguments(p, "HF-format checkpoint to start from, a folder or a Hub name (a Longformer, or a "
                               "converted RoBERTa)")
    g.add_argument("--config", help="config.json (or its folder) for a randomly initialised model")
    add_training_arguments(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.recipe:
        path = os.path.join(RECIPES, f"{first.recipe}.json")
        if not os.path.isfile(path):
            parser.error(f"unknown --recipe {first.recipe!r}; known: {', '.join(sorted(f[:-5] for f in os.listdir(RECIPES)))}")
        recipe = {k: v for k, v in json.load(open(path)).items() if not k.startswith("_")}
        parser.set_defaults(**recipe)
    elif not first.data:
        parser.set_defaults(**DEMO)
    args = parser.parse_args(argv)
    if args.init and args.config:
        parser.error("give --init (a checkpoint) or --config (random initialisation), not both")
    if args.data and not (args.init or args.config):
        parser.error("--data needs a model: --init CHECKPOINT or --config CONFIG")
    return args


# -- building the run ------------------------------------------------------------------------------

def build(args):
    """(model, tokenizer folder or None, train set, validation set, <mask> id or None)."""
    tokenizer_dir = args.tokenizer or args.init
    if not args.data:
        print("no --data: the embedded demo (Python's own docstrings, a small Longformer, window 64 < 256 tokens)")
        tokenizer_dir = demo.demo_tokenizer(demo.corpus(), args.cache_dir)
        config = demo.demo_config(longformer.load_tokenizer(tokenizer_dir).get_vocab_size(), args.seq_len)
        model = longformer.LongformerForMaskedLM(config)
    elif args.init:
        model = longformer.LongformerForMaskedLM.from_pretrained(args.init)
        config = model.config
    else:
        config = longformer.LongformerConfig.from_pretrained(args.config)
        model = longformer.LongformerForMaskedLM(config)
    model.settings.attention_backend = args.attention_backend
    model.gradient_checkpointing_enable(args.gradient_checkpointing)
    if args.data and os.path.isfile(os.path.join(args.data, "train_dataset.npz")):
        train_set, val_set = read_npz_pair(args.data)
        if train_set.seq_len != args.seq_len:
            print(f"note: the .npz blocks are {train_set.seq_len} tokens; --seq-len {args.seq_len} does not apply")
        if train_set.seq_len > config.max_length:
            raise SystemExit(f"the .npz blocks ({train_set.seq_len} tokens) are longer than the model allows "
                             f"({config.max_length})")
        return model, tokenizer_dir, train_set, val_set, None
    if args.seq_len > config.max_length:  # (.npz blocks have their own length, checked above)
        raise SystemExit(f"--seq-len {args.seq_len} is longer than the model's position table "
                         f"({config.max_length} tokens): lower it, or extend the model with python -m longformer.convert")
    val_fraction = 0.0 if args.val_data else args.val_fraction
    data, manifest = token_shards(args.data or demo.corpus(), tokenizer_dir, args, val_fraction)
    train_set = TokenBlocks(data, "train", args.seq_len, args.packing, manifest)
    if args.val_data:
        val_data, val_manifest = token_shards(args.val_data, tokenizer_dir, args, 0.0)
        val_set = TokenBlocks(val_data, "train", args.seq_len, args.packing, val_manifest, args.max_val_blocks)
    else:
        val_set = TokenBlocks(data, "val", args.seq_len, args.packing, manifest, args.max_val_blocks)
    if not args.val_data and manifest["val"]["documents"] == 0:
        raise SystemExit(f"{data} holds no validation documents (prepared with --val-fraction 0): give --val-data")
    for name, n in (("training", len(train_set)), ("validation", len(val_set))):
        if n == 0:
            raise SystemExit(f"the {name} data gives no block of --seq-len {args.seq_len} tokens"
                             + (" with --packing concat: use --packing documents" if args.packing == "concat" else ""))
    print(f"{manifest['train']['documents']:,} training documents -> {len(train_set):,} blocks of {args.seq_len} "
          f"tokens ({args.packing} packing); {len(val_set):,} validation blocks")
    return model, tokenizer_dir, train_set, val_set, manifest["tokenizer"]["mask_id"]


def token_shards(source, tokenizer_dir, args, val_fraction) -> tuple[str, dict]:
    """(folder, manifest) of token shards: source itself if it is one, else text tokenized into the cache."""
    if isinstance(source, str) and os.path.isfile(os.path.join(source, "manifest.json")):
        sha = tokenizer_info(longformer.load_tokenizer(tokenizer_dir))["sha256"] if tokenizer_dir else None
        return source, read_manifest(source, sha)
    if tokenizer_dir is None:
        raise SystemExit("text data needs a tokenizer: --tokenizer DIR (or --init a checkpoint that has one)")
    return prepare_cached(source, args.cache_dir, tokenizer_dir, val_fraction, args.seed, args.text_field)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # the same random initialisation on every rank and in every run
    model, tokenizer_dir, train_set, val_set, mask_id = build(args)
    for name, blocks in (("the training data", train_set), ("the validation data", val_set)):
        check_vocabulary(blocks.largest_id, model.config.vocab_size, f"{name} ({args.data or 'the demo'})")
    if mask_id is None:
        mask_id = model.config.vocab_size - 1  # RoBERTa's <mask> is its last id
        print(f"no tokenizer given: <mask> taken to be id {mask_id}, the vocabulary's last (as in RoBERTa)")
    task = MLMTask(mask_id, model.config.vocab_size, args.mask_prob)
    settings = train_args(args, "mlm")
    train(model, task, train_set, val_set, settings, run_settings(args), resume=args.resume, overwrite=args.overwrite)
    if tokenizer_dir and int(os.environ.get("RANK", 0)) == 0:
        copy_tokenizer_files(tokenizer_dir, args.out)


if __name__ == "__main__":
    run_command(main)
    leave()
