"""Training data: read documents, tokenize once (cached), pack into blocks, and mask for MLM.

Masking is seeded per example (by the run's seed, the epoch and the example's index), so an example gets
the same mask however the data is sharded across processes: the key to exact multi-process equivalence
and exact resumption.
"""
import ast
import glob
import hashlib
import json
import os
import re
import sysconfig

import numpy as np
import torch

# -- documents -----------------------------------------------------------------------------------

def read_documents(path: str, text_field: str = "text") -> list[str]:
    """A folder of .txt files (one document each), a .jsonl with a text field, or a text file whose
    documents are separated by blank lines (as wikitext)."""
    if not os.path.exists(path):
        raise SystemExit(f"--data {path!r} does not exist")
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
        if not files:
            raise SystemExit(f"--data {path!r} is a folder without .txt files (one document per file expected)")
        docs = [open(f, encoding="utf-8", errors="replace").read() for f in files]
    elif path.endswith(".jsonl"):
        docs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    if text_field not in record:
                        raise SystemExit(f"{path}:{n}: no {text_field!r} field (fields: {', '.join(record)})")
                    docs.append(record[text_field])
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            docs = re.split(r"\n\s*\n", f.read())
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise SystemExit(f"--data {path!r} holds no text")
    return docs


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


# -- tokenizing and packing ----------------------------------------------------------------------

def tokenize_documents(docs: list[str], tokenizer, cache_dir: str | None) -> list[np.ndarray]:
    """Each document as <s> ... </s> token ids; cached by the hash of the texts and the tokenizer."""
    key = hashlib.sha256(tokenizer.to_str().encode())
    for d in docs:
        key.update(d.encode())
        key.update(b"\0")
    path = os.path.join(cache_dir, f"tokens-{key.hexdigest()[:24]}.npz") if cache_dir else None
    if path and os.path.isfile(path):
        with np.load(path) as z:
            return np.split(z["ids"], z["offsets"][1:-1])
    encoded = [np.asarray(e.ids, dtype=np.int32) for e in tokenizer.encode_batch(docs)]
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        offsets = np.cumsum([0] + [len(e) for e in encoded])
        tmp = f"{path}.{os.getpid()}.npz"
        np.savez(tmp, ids=np.concatenate(encoded), offsets=offsets)
        os.replace(tmp, path)
    return encoded


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

    def __getitem__(self, i):
        return {"index": i, "input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "special_tokens_mask": self.special_tokens_mask[i]}


def check_vocabulary(largest_id: int, vocab_size: int, where: str):
    """A clear error, before training, for token ids the model's embedding table has no row for."""
    if largest_id >= vocab_size:
        raise SystemExit(f"{where} holds token id {largest_id}, but the model's vocabulary has {vocab_size} ids "
                         f"(0..{vocab_size - 1}): use the tokenizer the model was trained with, or a model whose "
                         f"vocab_size covers the data")


def pack_blocks(encoded: list[np.ndarray], seq_len: int, special_ids) -> BlockDataset:
    """Concatenate the documents (each already <s> ... </s>) and cut into blocks of seq_len tokens."""
    flat = np.concatenate(encoded) if encoded else np.zeros(0, np.int32)
    n = len(flat) // seq_len
    if n == 0:
        raise SystemExit(f"the text gives {len(flat)} tokens, less than one block of --seq-len {seq_len}")
    ids = flat[:n * seq_len].reshape(n, seq_len)
    return BlockDataset(ids, special_tokens_mask=np.isin(ids, list(special_ids)))


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
    """Stack blocks and mask each with its own generator (seed, example index)."""
    ids, labels = [], []
    for ex in examples:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(ex["index"]))
        x = torch.as_tensor(ex["input_ids"])
        maskable = ~torch.as_tensor(ex["special_tokens_mask"]).bool() & torch.as_tensor(ex["attention_mask"]).bool()
        m, l = mask_tokens(x, maskable, gen, mask_id, vocab_size, prob)
        ids.append(m)
        labels.append(l)
    return {"input_ids": torch.stack(ids), "labels": torch.stack(labels),
            "attention_mask": torch.stack([torch.as_tensor(ex["attention_mask"]) for ex in examples])}


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
