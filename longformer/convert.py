"""RoBERTa -> Longformer, the Longformer paper's recipe: copy the learned position embeddings until the new
table is full, and start the global projections as copies of the local ones. The same tool extends an
existing Longformer to a longer maximum length (its positions are tiled the same way).

    python -m longformer.convert SRC OUT [--max-positions 4096] [--attention-window 512]
"""
import argparse
import contextlib
import json
import os

import torch

from .checkpoint import canonical, load_state_dict_hf, read_state_dict
from .config import LongformerConfig
from .files import atomic_write_text
from .hub import resolve
from .model import LongformerForMaskedLM, LongformerModel
from .tokenizer import copy_tokenizer_files

SOURCE_TYPES = ("roberta", "longformer", "xlm-roberta", "camembert")


def tile_positions(table: torch.Tensor, pad_token_id: int, rows: int) -> torch.Tensor:
    """[old_rows, C] -> [rows, C]: the first pad_token_id + 1 rows kept, the learned ones repeated after them."""
    start = pad_token_id + 1
    learned = table[start:]
    new = table.new_empty(rows, table.shape[1])
    new[:start] = table[:start]
    for i in range(start, rows, len(learned)):
        new[i:i + len(learned)] = learned[:rows - i]
    return new


def convert_roberta(src_dir: str, out_dir: str, max_positions: int = 4096, attention_window: int | None = 512):
    """Write to out_dir a Longformer for inputs of up to max_positions tokens, made from src_dir (a folder, or a
    Hub name such as "FacebookAI/roberta-base").

    attention_window=None keeps a Longformer source's windows. Returns the new config.
    """
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir!r} exists and is not empty; choose a new directory")
    name, src_dir = src_dir, resolve(src_dir, "model")
    with contextlib.suppress(FileNotFoundError):  # its tokenizer too, where it has one (the same snapshot folder)
        resolve(name, "tokenizer")
    with open(os.path.join(src_dir, "config.json")) as f:
        src = json.load(f)
    kind = src.get("model_type")
    if kind not in SOURCE_TYPES:
        raise ValueError(f"{src_dir!r} holds a {kind!r} model; convert takes one of {', '.join(SOURCE_TYPES)}")
    state = {canonical(k): v for k, v in read_state_dict(src_dir).items()}
    pad = src.get("pad_token_id", 1)
    old = state["embeddings.position_embeddings.weight"]
    rows = max_positions + pad + 1
    if rows <= old.shape[0]:
        raise ValueError(f"{src_dir!r} already covers {old.shape[0] - pad - 1} tokens; "
                         f"--max-positions must be larger to extend it")
    state["embeddings.position_embeddings.weight"] = tile_positions(old, pad, rows)
    layers = src["num_hidden_layers"]
    for i in range(layers):
        prefix = f"encoder.layer.{i}.attention.self."
        for proj in ("query", "key", "value"):
            for param in ("weight", "bias"):
                state.setdefault(f"{prefix}{proj}_global.{param}", state[f"{prefix}{proj}.{param}"].clone())

    fields = {k: v for k, v in src.items() if k not in ("architectures", "position_embedding_type", "transformers_version")}
    fields.update(model_type="longformer", max_position_embeddings=rows)
    if attention_window is not None or kind != "longformer":
        fields["attention_window"] = [attention_window or 512] * layers
    config = LongformerConfig.from_dict(fields)
    cls = LongformerForMaskedLM if any(k.startswith("lm_head.") for k in state) else LongformerModel
    model = cls(config)
    load_state_dict_hf(model, state)
    model.save_pretrained(out_dir)

    copy_tokenizer_files(src_dir, out_dir)
    tok_config = os.path.join(out_dir, "tokenizer_config.json")
    if os.path.isfile(tok_config):
        with open(tok_config) as f:
            tc = json.load(f)
        tc["model_max_length"] = max_positions
        atomic_write_text(tok_config, json.dumps(tc, indent=2) + "\n")
    return config


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m longformer.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="HF-format RoBERTa (or Longformer) checkpoint: a folder or a Hub name")
    parser.add_argument("out", help="new directory for the Longformer checkpoint")
    parser.add_argument("--max-positions", type=int, default=4096, help="longest input, in tokens (default 4096)")
    parser.add_argument("--attention-window", type=int, default=None,
                        help="full window for every layer (default: 512, or the source's for a Longformer)")
    args = parser.parse_args(argv)
    config = convert_roberta(args.src, args.out, args.max_positions, args.attention_window)
    print(f"wrote {args.out}: Longformer for {config.max_length} tokens, windows {sorted(set(config.attention_window))}")


if __name__ == "__main__":
    from .cli import run_command
    run_command(main)
