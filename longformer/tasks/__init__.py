"""The training jobs: each supplies the loop (longformer/trainer.py) with its batching, loss, evaluation sums
and metrics, and the reading of its data. One module per task; a new task is a Task subclass in a new module."""
from .base import Task
from .documents import DocumentTask, encode_documents, label_targets, read_unlabelled
from .mlm import MLMTask
from .tokens import TokenTask

__all__ = ["DocumentTask", "MLMTask", "Task", "TokenTask", "encode_documents", "label_targets", "read_unlabelled"]
