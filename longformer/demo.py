"""The embedded demos: text every Python has (the standard library's docstrings), a tokenizer trained on
it, and a small Longformer whose window is a fraction of its input, so that no download is needed."""
import functools
import os
from collections.abc import Sequence

import numpy as np

from .config import LongformerConfig
from .data import stdlib_documents
from .tokenizer import SPECIAL_TOKENS

# 4 layers, 128 wide, window 64 (each token sees 32 on each side): through all layers, a token's view
# reaches 4 x 32 = 128 tokens, far less than the demos' inputs.
DEMO_MODEL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                  attention_window=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TOPICS = ("zebra", "violin", "glacier")  # words that docstrings do not use


def demo_config(vocab_size: int, max_length: int) -> LongformerConfig:
    return LongformerConfig(vocab_size=vocab_size, max_position_embeddings=max_length + 2, **DEMO_MODEL)


def demo_tokenizer(docs: Sequence[str], cache_dir: str) -> str:
    """A 2,048-token byte-level BPE trained on the demo corpus; cached, as the corpus is the same each time."""
    from tokenizers import ByteLevelBPETokenizer
    directory = os.path.join(cache_dir, f"demo-tokenizer-{len(docs)}-{sum(len(d) for d in docs)}")
    if not os.path.isfile(os.path.join(directory, "vocab.json")):
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(docs, vocab_size=2048, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                show_progress=False)
        os.makedirs(directory, exist_ok=True)
        bpe.save_model(directory)
    return directory


def topic_documents(docs: Sequence[str], words_per_doc: int = 280, seed: int = 0):
    """A classification task that only global attention solves. Each example is a run of docstring text
    with a short paragraph, "This passage is filed under <topic>." said 6 times, placed somewhere in its
    last 40%: far beyond what <s> sees through the sliding windows alone. The label is the topic. Every
    passage comes once with each topic, so the text around the paragraph says nothing about the label."""
    rng = np.random.default_rng(seed)
    words = " ".join(docs).split()
    texts, labels = [], []
    for start in range(0, len(words) - words_per_doc, words_per_doc):
        for topic in TOPICS:
            chunk = words[start:start + words_per_doc]
            at = int(rng.integers(int(0.6 * words_per_doc), words_per_doc))
            chunk[at:at] = f"This passage is filed under {topic}. ".split() * 6
            texts.append(" ".join(chunk))
            labels.append([topic])
    return texts, labels


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """Read once per process: the tokenizer and the documents of a demo both come from it."""
    return tuple(stdlib_documents())
