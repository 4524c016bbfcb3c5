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
# The QA demo's facts: one of each category per context, the question asks for one category.
FACTS = {"colour": ("crimson", "amber", "violet", "teal", "olive", "scarlet", "indigo", "maroon"),
         "city": ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Quito", "Dakar", "Perth"),
         "animal": ("otter", "falcon", "badger", "lynx", "heron", "walrus", "gecko", "bison")}


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


def qa_examples(docs: Sequence[str], n: int, words_per_doc: int = 500, seed: int = 0):
    """A QA task that only global attention on the question solves. Each context is a run of docstring text
    (about 1,000 tokens) with three sentences "The colour is X.", "The city is Y.", "The animal is Z." placed
    anywhere in it; the question asks for one of the three. A token of a fact sees the question, far beyond
    the sliding windows' reach, only through global attention: without it, a third of the answers at best."""
    from .tasks.spans import QAExample
    rng = np.random.default_rng(seed)
    words = " ".join(docs).split()
    out = []
    for i in range(n):
        start = int(rng.integers(0, len(words) - words_per_doc))
        chunk = words[start:start + words_per_doc]
        values = {category: str(rng.choice(options)) for category, options in FACTS.items()}
        at = sorted(rng.choice(words_per_doc, size=len(FACTS), replace=False), reverse=True)
        for a, category in zip(at, rng.permutation(list(FACTS))):
            chunk[a:a] = [f"The {category} is {values[category]}."]
        context = " ".join(chunk)
        asked = str(rng.choice(list(FACTS)))
        answer_start = context.index(f"The {asked} is ") + len(f"The {asked} is ")
        out.append(QAExample(f"demo-{seed}-{i}", f"What is the {asked}?", context, [(answer_start, values[asked])]))
    return out


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """Read once per process: the tokenizer and the documents of a demo both come from it."""
    return tuple(stdlib_documents())
