"""Training data: hold-out splits, the demo's documents, pre-cut blocks (FlagPerf's .npz), MLM masking, and
labelled documents for classification. Token shards and packing: prepare_data.py and shards.py.

Masking is seeded per example (by the run's seed, the epoch and the example's index), so an example gets
the same mask however the data is sharded across processes: the key to exact multi-process equivalence
and exact resumption.
"""
import ast
import glob
import json
import os
import re
import sysconfig

import numpy as np
import torch

# -- documents -----------------------------------------------------------------------------------

def hold_out(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random fraction of the items (documents, essays) held out whole."""
    if len(items) < 2:
        raise SystemExit("need at least 2 documents to hold some out for validation; give --val-data instead")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = min(len(items) - 1, max(1, round(val_fraction * len(items))))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def stdlib_documents(limit_chars: int = 6_000_000) -> list[str]:
    """Text that every Python has: the docstrings of the standard library, one document per module."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if "site-packages" not in f and f"{os.sep}test" not in f and "idle_test" not in f)
    docs, total = [], 0
    for f in files:
        try:
            tree = ast.parse(open(f, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
        text = "\n\n".join(d for n in nodes if (d := ast.get_docstring(n)))
        if len(text) > 200:
            docs.append(text)
            total += len(text)
            if total >= limit_chars:
                break
    return docs


# -- pre-cut blocks ---------------------------------------------------------------------------------

class BlockDataset:
    """Fixed-length blocks of token ids: input_ids, attention_mask, special_tokens_mask, each [N, L]."""

    def __init__(self, input_ids, attention_mask=None, special_tokens_mask=None):
        self.input_ids = np.asarray(input_ids, dtype=np.int64)
        self.attention_mask = (np.ones_like(self.input_ids) if attention_mask is None
                               else np.asarray(attention_mask, dtype=np.int64))
        self.special_tokens_mask = (np.zeros_like(self.input_ids) if special_tokens_mask is None
                                    else np.asarray(special_tokens_mask, dtype=np.int64))

    def __len__(self):
        return len(self.input_ids)

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def largest_id(self) -> int:
        return int(self.input_ids.max(initial=0))

    def __getitem__(self, i):
        return {"index": i, "input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "special_tokens_mask": self.special_tokens_mask[i]}


def check_vocabulary(largest_id: int, vocab_size: int, where: str):
    """A clear error, before training, for token ids the model's embedding table has no row for."""
    if largest_id >= vocab_size:
        raise SystemExit(f"{where} holds token id {largest_id}, but the model's vocabulary has {vocab_size} ids "
                         f"(0..{vocab_size - 1}): use the tokenizer the model was trained with, or a model whose "
                         f"vocab_size covers the data")


def read_npz_pair(directory: str) -> tuple[BlockDataset, BlockDataset]:
    """FlagPerf's pre-tokenized wikitext-2: train_dataset.npz / eval_dataset.npz with input_ids,
    attention_mask and special_tokens_mask, each [N, 1024]."""
    sets = []
    for name in ("train_dataset.npz", "eval_dataset.npz"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise SystemExit(f"{directory!r} lacks {name} (FlagPerf's layout: train_dataset.npz + eval_dataset.npz)")
        with np.load(path) as z:
            missing = {"input_ids", "attention_mask", "special_tokens_mask"} - set(z.files)
            if missing:
                raise SystemExit(f"{path} lacks the arrays {sorted(missing)}")
            if len(z["input_ids"]) == 0:
                raise SystemExit(f"{path} holds no examples")
            sets.append(BlockDataset(z["input_ids"], z["attention_mask"], z["special_tokens_mask"]))
    return sets[0], sets[1]


# -- masked language modelling -------------------------------------------------------------------

def mask_tokens(ids: torch.Tensor, maskable: torch.Tensor, generator, mask_id: int, vocab_size: int,
                prob: float = 0.15):
    """BERT's dynamic masking of one example: each maskable token is chosen with probability prob; a chosen
    token becomes <mask> 80% of the time, a random token 10%, and stays itself 10%.
    Returns (input_ids, labels) with labels -100 where nothing is predicted."""
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & maskable
    labels = torch.where(chosen, ids, -100)
    r = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    ids = torch.where(chosen & (r < 0.8), mask_id, ids)
    ids = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, ids)
    return ids, labels


def collate_mlm(examples: list[dict], seed: int, mask_id: int, vocab_size: int, prob: float = 0.15) -> dict:
    """Stack blocks (with their document_ids, where packed) and mask each with its own generator (seed, example
    index)."""
    ids, labels = [], []
    for ex in examples:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(ex["index"]))
        x = torch.as_tensor(ex["input_ids"])
        maskable = ~torch.as_tensor(ex["special_tokens_mask"]).bool() & torch.as_tensor(ex["attention_mask"]).bool()
        m, l = mask_tokens(x, maskable, gen, mask_id, vocab_size, prob)
        ids.append(m)
        labels.append(l)
    batch = {"input_ids": torch.stack(ids), "labels": torch.stack(labels),
             "attention_mask": torch.stack([torch.as_tensor(ex["attention_mask"]) for ex in examples])}
    if "document_ids" in examples[0]:  # packed documents
        batch["document_ids"] = torch.stack([torch.as_tensor(ex["document_ids"]) for ex in examples])
    return batch


# -- labelled documents (classification) ------------------------------------------------------------

def read_labelled(path: str, text_column: str = "text", label_column: str | None = "label",
                  multi_label: bool = False) -> tuple[list[str], list[list[str]]]:
    """Texts and their labels from a .csv or .jsonl (columns named), or from a folder with one sub-folder per
    class of .txt files (aclImdb's layout). Multi-label: a list in .jsonl, or labels joined by "|" or ",".
    label_column=None reads texts to be labelled: every label list is empty."""
    if not os.path.exists(path):
        raise SystemExit(f"{path!r} does not exist")
    texts, labels, where = [], [], []
    if os.path.isdir(path):
        classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        if not classes:
            raise SystemExit(f"{path!r} has no class sub-folders (expected {path}/<label>/*.txt)")
        for cls in classes:
            for f in sorted(glob.glob(os.path.join(path, cls, "*.txt"))):
                texts.append(open(f, encoding="utf-8", errors="replace").read())
                labels.append([cls])
                where.append(f)
    else:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                rows = [(n, json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]
        elif path.endswith(".csv"):
            import csv
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(enumerate(csv.DictReader(f), 2))
        else:
            raise SystemExit(f"{path!r}: expected a .csv, a .jsonl, or a folder of class sub-folders")
        for n, row in rows:
            for column, what in ((text_column, "--text-column"), (label_column, "--label-column")):
                if column is not None and column not in row:
                    raise SystemExit(f"{path}:{n}: no column {column!r} (set {what}); columns: {', '.join(row)}")
            value = row[label_column] if label_column is not None else []
            if isinstance(value, list):
                found = [str(v) for v in value]
            elif multi_label:
                found = [v.strip() for v in re.split(r"[|,]", str(value)) if v.strip()]
            else:
                found = [str(value).strip()]
            texts.append(row[text_column] or "")
            labels.append(found)
            where.append(f"{path}:{n}")
    for text, label, place in zip(texts, labels, where):
        if not text.strip():
            raise SystemExit(f"{place}: empty document")
        if label_column is not None and (not label or not all(label)):
            raise SystemExit(f"{place}: no label")
        if len(label) > 1 and not multi_label:
            raise SystemExit(f"{place}: several labels {label}; pass --multi-label")
    if not texts:
        raise SystemExit(f"{path!r} holds no documents")
    return texts, labels
