"""Document classification: one label per document (or several), read from <s>; accuracy and per-class F1."""
import os

import numpy as np
import torch
import torch.nn.functional as F

from .. import feedback
from ..data import read_labelled
from .base import Task


class DocumentTask(Task):
    """One label per document (or several, multi_label), read from <s>, which has global attention."""

    def __init__(self, labels: list[str], pad_id: int, multi_label: bool, global_first: bool = True):
        self.labels, self.pad_id, self.multi_label, self.global_first = labels, pad_id, multi_label, global_first

    def collate(self, examples, seed=0):
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), self.pad_id, dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, :len(e["input_ids"])] = torch.as_tensor(e["input_ids"])
        batch = {"input_ids": ids, "attention_mask": ids.ne(self.pad_id).long()}
        batch["global_attention_mask"] = torch.zeros_like(ids)
        batch["global_attention_mask"][:, 0] = int(self.global_first)
        if "label" in examples[0]:
            batch["labels"] = torch.as_tensor(np.stack([e["label"] for e in examples]))
        return batch

    def logits(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     global_attention_mask=batch["global_attention_mask"]).logits.float()

    def count(self, batch):
        return torch.tensor(batch["labels"].numel())

    def _loss(self, logits, labels):
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
        return F.cross_entropy(logits, labels, reduction="sum")

    def loss_sum(self, model, batch):
        return self._loss(self.logits(model, batch), batch["labels"])

    def predict(self, logits):
        """[B, K] bool: the labels each document gets."""
        if self.multi_label:
            return logits > 0
        return F.one_hot(logits.argmax(-1), len(self.labels)).bool()

    def eval_sums(self, model, batch):
        logits, labels = self.logits(model, batch), batch["labels"]
        pred = self.predict(logits)
        truth = labels.bool() if self.multi_label else F.one_hot(labels, len(self.labels)).bool()
        return {"loss": self._loss(logits, labels), "items": torch.tensor(labels.numel()),
                "correct": (pred == truth).all(-1).sum(), "documents": torch.tensor(len(labels)),
                "tp": (pred & truth).sum(0), "fp": (pred & ~truth).sum(0), "fn": (~pred & truth).sum(0)}

    def metrics(self, sums):
        tp, fp, fn = sums["tp"], sums["fp"], sums["fn"]
        f1 = feedback.f1_scores(tp.numpy(), fp.numpy(), fn.numpy(), self.labels)
        return {"loss": float(sums["loss"] / sums["items"]), "accuracy": float(sums["correct"] / sums["documents"]),
                "macro_f1": f1.pop("macro_f1"), **{f"f1[{k}]": v for k, v in f1.items()}}


def encode_documents(texts, tokenizer, max_length, label_ids=None):
    """<s> text </s>, cut to max_length (keeping the closing </s>)."""
    eos = tokenizer.token_to_id("</s>")
    out = []
    for i, enc in enumerate(tokenizer.encode_batch(texts)):
        ids = enc.ids if len(enc.ids) <= max_length else enc.ids[:max_length - 1] + [eos]
        example = {"index": i, "input_ids": np.asarray(ids, dtype=np.int64)}
        if label_ids is not None:
            example["label"] = label_ids[i]
        out.append(example)
    return out


def label_targets(labels, names, multi_label, where):
    index = {n: i for i, n in enumerate(names)}
    targets = []
    for found in labels:
        unknown = [l for l in found if l not in index]
        if unknown:
            raise SystemExit(f"label {unknown[0]!r} in {where} was never seen in training (training labels: "
                             f"{', '.join(names)})")
        if multi_label:
            t = np.zeros(len(names), dtype=np.float32)
            t[[index[l] for l in found]] = 1
        else:
            t = np.int64(index[found[0]])
        targets.append(t)
    return targets


def read_unlabelled(path, text_column):
    if os.path.isdir(path):
        return [open(os.path.join(path, f), encoding="utf-8").read() for f in sorted(os.listdir(path)) if f.endswith(".txt")]
    return read_labelled(path, text_column, label_column=None)[0]
