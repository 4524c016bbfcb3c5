"""Task: what a training job supplies to the loop (longformer/trainer.py)."""
import torch


class Task:
    """What a training job supplies. A batch is a dict of tensors holding at least the model's inputs."""

    def collate(self, examples: list, seed: int) -> dict:
        raise NotImplementedError

    def collate_eval(self, examples: list, seed: int) -> dict:
        """Validation batches; the same as training batches unless a task scores whole documents."""
        return self.collate(examples, seed)

    def count(self, batch: dict) -> torch.Tensor:
        """How many things this batch predicts: the loss is a sum over them, divided by the global count."""
        raise NotImplementedError

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def eval_sums(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Sums over the batch (loss, correct, count, per-class counts, ...), added up over batches and ranks."""
        raise NotImplementedError

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def tokens(self, batch: dict) -> torch.Tensor:
        """The batch's real tokens, a 0-d tensor: summed by the loop and read back once per log interval."""
        return batch["attention_mask"].sum()
