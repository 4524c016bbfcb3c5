"""Masked-LM pretraining: 15% of the tokens predicted (80/10/10), loss and accuracy over them."""
import math

import torch

from ..data import collate_mlm
from ..kernels.cross_entropy import cross_entropy
from .base import Task


class MLMTask(Task):
    def __init__(self, mask_id: int, vocab_size: int, mask_prob: float):
        self.mask_id, self.vocab_size, self.mask_prob = mask_id, vocab_size, mask_prob

    def collate(self, examples, seed):
        return collate_mlm(examples, seed, self.mask_id, self.vocab_size, self.mask_prob)

    def count(self, batch):
        return batch["labels"].ne(-100).sum()

    def _scores(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                       document_ids=batch.get("document_ids"), logits_at_labels_only=True).logits  # [predicted, vocab]
        return logits, batch["labels"][batch["labels"].ne(-100)]  # cross_entropy works in fp32 itself

    def loss_sum(self, model, batch):
        logits, target = self._scores(model, batch)
        return cross_entropy(logits, target, reduction="sum")

    def eval_sums(self, model, batch):
        logits, target = self._scores(model, batch)
        return {"loss": cross_entropy(logits, target, reduction="sum"),
                "correct": (logits.argmax(-1) == target).sum(), "count": torch.tensor(len(target))}

    def metrics(self, sums):
        count = max(float(sums["count"]), 1.0)
        loss = float(sums["loss"]) / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "accuracy": float(sums["correct"]) / count}
