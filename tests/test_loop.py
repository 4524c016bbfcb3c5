"""The training loop runs at the speed of its step: no host synchronisation inside the steps between two log
intervals, and the next batches collated while the current step runs."""
import json
import os
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

import longformer
from longformer import trainer
from longformer.data import BlockDataset
from longformer.tasks import MLMTask
from longformer.trainer import Task, TrainArgs, train

PACKAGE = os.path.dirname(os.path.abspath(longformer.__file__))
SYNCS = ("item", "__bool__", "__float__", "__int__", "tolist")


def tiny_mlm():
    torch.manual_seed(0)
    config = longformer.LongformerConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, attention_window=8, max_position_embeddings=40)
    return longformer.LongformerForMaskedLM(config)


def who(frame) -> str:
    """The first file of this package on the stack, from frame outwards: the trainer's (the loop and the tasks)
    or the model's; "other" for calls from neither (pytest, torch's own threads)."""
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(PACKAGE):
            name = os.path.relpath(path, PACKAGE)
            place = f"{name}:{frame.f_code.co_name}"
            return ("trainer " if name == "trainer.py" or name.startswith("tasks") else "model ") + place
        frame = frame.f_back
    return "other"


@pytest.fixture
def process_group(monkeypatch):
    """A gloo process group of one, as torchrun makes it, so that the loop's all-reduces run."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29561"}.items():
        monkeypatch.setenv(k, v)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_no_host_sync_between_log_intervals(tmp_path, monkeypatch, process_group):
    """Every read-back (Tensor.item, bool, float, int, tolist, cuda.synchronize) and every blocking all-reduce,
    by the step it happens in: the trainer makes none in the steps between two log intervals (every 4th)."""
    events, now = [], {"step": 0}
    step = trainer.train_step

    def counted_step(r, batches):
        now["step"] = r.state["step"] + 1
        return step(r, batches)

    def spy(name, original):
        def call(*args, **kwargs):
            if not (name == "all_reduce" and kwargs.get("async_op")):
                events.append((now["step"], name, who(sys._getframe(1))))
            return original(*args, **kwargs)
        return call

    monkeypatch.setattr(trainer, "train_step", counted_step)
    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", spy("synchronize", torch.cuda.synchronize))
    monkeypatch.setattr(dist, "all_reduce", spy("all_reduce", dist.all_reduce))
    data = BlockDataset(np.random.default_rng(0).integers(3, 59, (32, 24)))
    args = TrainArgs(out=str(tmp_path / "run"), batch_size=2, grad_accum=2, max_steps=8, log_every=4, eval_every=8,
                     lr=1e-3)
    train(tiny_mlm(), MLMTask(59, 60, 0.15), data, data, args, {})
    assert dist.is_initialized()  # the all-reduces ran
    between = [e for e in events if e[0] % 4 and e[0] > 0]
    assert [e for e in between if e[2].startswith("trainer")] == []
    assert [e for e in between if e[2] == "other"] == []
    # What remains between log intervals is the model's, on CPU only (docs/training.md lists them).
    assert {e[2] for e in between} <= {"model model.py:check_ids", "model kernels/layer_norm.py:forward",
                                       "model kernels/dropout.py:draw_keep"}
    assert any(e[2].startswith("trainer") for e in events if e[0] == 4)  # the read-back at the log step


class Sleepy(Task):
    """Collation that takes `collate_s` (a heavy tokenisation), and a step that takes `step_s`."""

    def __init__(self, collate_s: float, step_s: float):
        self.collate_s, self.step_s = collate_s, step_s

    def collate(self, examples, seed):
        time.sleep(self.collate_s)
        return {"input_ids": torch.zeros(len(examples), 4, dtype=torch.long),
                "attention_mask": torch.ones(len(examples), 4, dtype=torch.long)}

    def count(self, batch):
        return torch.tensor(len(batch["input_ids"]))

    def loss_sum(self, model, batch):
        time.sleep(self.step_s)
        return model(torch.ones(len(batch["input_ids"]), 2)).sum()

    def eval_sums(self, model, batch):
        return {"count": torch.tensor(1.0)}

    def metrics(self, sums):
        return {k: float(v) for k, v in sums.items()}


def seconds_per_step(tmp_path, name, task, **args) -> float:
    """The loop's own measure (train_time_s over the steps, evaluations left out) of 16 steps."""
    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda d: os.makedirs(d, exist_ok=True)  # the checkpoints hold the trainer's state only
    train(model, task, BlockDataset(np.zeros((64, 4))), BlockDataset(np.zeros((1, 4))),
          TrainArgs(out=str(tmp_path / name), batch_size=1, max_steps=16, log_every=4, **args), {})
    records = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    summary = [r["summary"] for r in records if "summary" in r][-1]
    return summary["train_time_s"] / summary["steps"]


def test_slow_collation_is_hidden_behind_the_step(tmp_path):
    """A collation as long as the step: with the default workers the loop runs at about the step's speed; with
    none (--num-workers 0) each step waits for its batch."""
    alone = seconds_per_step(tmp_path, "alone", Sleepy(0.0, 0.2))
    prefetched = seconds_per_step(tmp_path, "default", Sleepy(0.2, 0.2))
    inline = seconds_per_step(tmp_path, "inline", Sleepy(0.2, 0.2), num_workers=0)
    assert prefetched <= 1.3 * alone, (prefetched, alone)
    assert inline >= 1.7 * alone, (inline, alone)  # what the workers hide
