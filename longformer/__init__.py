"""A from-scratch, pure-PyTorch Longformer that loads HF/RoBERTa checkpoints and matches HF transformers."""
from .config import LongformerConfig
from .model import (LongformerForMaskedLM, LongformerForMultipleChoice, LongformerForQuestionAnswering,
                    LongformerForSequenceClassification, LongformerForTokenClassification, LongformerModel,
                    LongformerPreTrainedModel)

__all__ = ["LongformerConfig", "LongformerModel", "LongformerForMaskedLM", "LongformerForSequenceClassification",
           "LongformerForTokenClassification", "LongformerForQuestionAnswering", "LongformerForMultipleChoice",
           "LongformerPreTrainedModel"]
from .tokenizer import load_tokenizer

__all__ += ["load_tokenizer", "convert_roberta"]


def __getattr__(name):
    # Imported on first use, so that `python -m longformer.convert` runs the module fresh.
    if name == "convert_roberta":
        from .convert import convert_roberta
        return convert_roberta
    raise AttributeError(f"module 'longformer' has no attribute {name!r}")
