"""Feedback Prize - Evaluating Student Writing: essays, their discourse elements, and the competition metric.

An essay's words are its whitespace-separated pieces (Python's str.split), and a discourse element is a
class plus the indices of its words (the `predictionstring`). The model labels tokens with BIO tags
(B-Claim, I-Claim, ..., O); a token takes the tag of the word that holds its first character, and a word
is predicted from its first token.
"""
import csv
import os
import re
from dataclasses import dataclass, field

import numpy as np

CLASSES = ("Lead", "Position", "Claim", "Counterclaim", "Rebuttal", "Evidence", "Concluding Statement")


def bio_labels(classes=CLASSES) -> list[str]:
    return ["O"] + [f"{p}-{c}" for c in classes for p in ("B", "I")]


@dataclass
class Essay:
    id: str
    text: str
    spans: list[tuple[str, list[int]]] = field(default_factory=list)  # (class, word indices)

    @property
    def words(self) -> list[tuple[int, int]]:
        """Character span of each whitespace-separated word."""
        return [(m.start(), m.end()) for m in re.finditer(r"\S+", self.text)]


def read_essay_texts(folder: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise SystemExit(f"no essay folder {folder!r}")
    texts = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".txt"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                texts[name[:-4]] = f.read()
    if not texts:
        raise SystemExit(f"{folder!r} holds no .txt essays")
    return texts


def read_essays(directory: str) -> list[Essay]:
    """directory/train.csv (id, discourse_type, predictionstring, ...) and directory/train/<id>.txt."""
    table = os.path.join(directory, "train.csv")
    texts = read_essay_texts(os.path.join(directory, "train"))
    essays: dict[str, Essay] = {}
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"id", "discourse_type", "predictionstring"} - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"{table} lacks the columns {sorted(missing)}")
        for row_number, row in enumerate(reader, 2):
            essay_id = row["id"]
            if essay_id not in texts:
                raise SystemExit(f"{table}:{row_number}: essay {essay_id!r} has no train/{essay_id}.txt")
            essay = essays.setdefault(essay_id, Essay(essay_id, texts[essay_id]))
            if not essay.text.strip():
                raise SystemExit(f"train/{essay_id}.txt is empty")
            try:
                words = [int(w) for w in row["predictionstring"].split()]
            except ValueError:
                raise SystemExit(f"{table}:{row_number}: predictionstring is not a list of word indices")
            n_words = len(essay.text.split())
            if not words or min(words) < 0 or max(words) >= n_words:
                raise SystemExit(f"{table}:{row_number}: predictionstring {row['predictionstring'][:60]!r} is out of "
                                 f"range: essay {essay_id} has {n_words} words (indices 0..{n_words - 1})")
            essay.spans.append((row["discourse_type"], words))
    if not essays:
        raise SystemExit(f"{table} has no rows")
    return list(essays.values())


# -- words <-> tokens --------------------------------------------------------------------------------

def token_word_index(offsets, words, text_length: int) -> np.ndarray:
    """For each token (character offsets start, end), the word holding its first non-space character; -1 for
    special and whitespace-only tokens."""
    char_word = np.full(text_length + 1, -1, dtype=np.int64)
    for i, (s, e) in enumerate(words):
        char_word[s:e] = i
    out = np.full(len(offsets), -1, dtype=np.int64)
    for t, (s, e) in enumerate(offsets):
        hits = char_word[s:e][char_word[s:e] >= 0]
        if len(hits):
            out[t] = hits[0]
    return out


def word_labels(essay: Essay, label2id: dict[str, int]) -> np.ndarray:
    labels = np.zeros(len(essay.words), dtype=np.int64)  # O
    for cls, idx in essay.spans:
        labels[idx] = label2id[f"I-{cls}"]
        labels[idx[0]] = label2id[f"B-{cls}"]
    return labels


def token_labels(token_words: np.ndarray, labels_of_words: np.ndarray, label2id: dict[str, int]) -> np.ndarray:
    """A word's first token gets the word's tag, later tokens of a B word its I tag; -100 off words."""
    id2label = {v: k for k, v in label2id.items()}
    out = np.full(len(token_words), -100, dtype=np.int64)
    previous = -1
    for t, w in enumerate(token_words):
        if w < 0:
            continue
        tag = labels_of_words[w]
        if w == previous and id2label[tag].startswith("B-"):
            tag = label2id["I-" + id2label[tag][2:]]
        out[t] = tag
        previous = w
    return out


def windows(n_tokens: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Overlapping [start, end) ranges covering n_tokens: each `size` long, starting `stride` apart."""
    if n_tokens <= size:
        return [(0, n_tokens)]
    starts = list(range(0, n_tokens - size, stride)) + [n_tokens - size]
    return [(s, s + size) for s in starts]


def first_token_of_words(token_words: np.ndarray, n_words: int) -> np.ndarray:
    first = np.full(n_words, -1, dtype=np.int64)
    for t in range(len(token_words) - 1, -1, -1):
        if token_words[t] >= 0:
            first[token_words[t]] = t
    return first


# -- spans and the metric ------------------------------------------------------------------------------

def decode_spans(word_tags: list[str], min_words: int = 1) -> list[tuple[str, list[int]]]:
    """Word tags -> discourse elements. B-x opens an element; I-x continues an element of class x (or opens
    one after O or another class); O closes. Elements shorter than min_words are dropped."""
    spans, current = [], None
    for i, tag in enumerate(word_tags):
        if tag == "O":
            current = None
            continue
        kind, cls = tag.split("-", 1)
        if kind == "B" or current is None or current[0] != cls:
            current = (cls, [])
            spans.append(current)
        current[1].append(i)
    return [s for s in spans if len(s[1]) >= min_words]


def match_counts(predicted, truth, classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The competition's matching for one essay: a prediction and a truth of the same class match when each
    covers at least half of the other's words; each is matched once, best overlap first.
    Returns true positives, false positives, false negatives per class."""
    tp, fp, fn = (np.zeros(len(classes), dtype=np.int64) for _ in range(3))
    for c, cls in enumerate(classes):
        preds = [set(w) for k, w in predicted if k == cls]
        trues = [set(w) for k, w in truth if k == cls]
        pairs = []
        for i, p in enumerate(preds):
            for j, t in enumerate(trues):
                inter = len(p & t)
                if inter / len(t) >= 0.5 and inter / len(p) >= 0.5:
                    pairs.append((max(inter / len(t), inter / len(p)), i, j))
        used_p, used_t = set(), set()
        for _, i, j in sorted(pairs, reverse=True):
            if i not in used_p and j not in used_t:
                used_p.add(i)
                used_t.add(j)
        tp[c] = len(used_p)
        fp[c] = len(preds) - len(used_p)
        fn[c] = len(trues) - len(used_t)
    return tp, fp, fn


def f1_scores(tp, fp, fn, classes) -> dict[str, float]:
    """F1 = TP / (TP + (FP + FN) / 2) per class, and their mean over the classes that occur in the truth."""
    scores = {}
    for c, cls in enumerate(classes):
        denominator = tp[c] + 0.5 * (fp[c] + fn[c])
        scores[cls] = float(tp[c] / denominator) if denominator else float("nan")
    present = [scores[cls] for c, cls in enumerate(classes) if tp[c] + fn[c] > 0]
    scores["macro_f1"] = float(np.mean(present)) if present else float("nan")
    return scores


def write_submission(path: str, essays_spans: dict[str, list[tuple[str, list[int]]]]):
    """id,class,predictionstring: one row per predicted element."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["id", "class", "predictionstring"])
        for essay_id, spans in essays_spans.items():
            for cls, words in spans:
                out.writerow([essay_id, cls, " ".join(map(str, words))])
    os.replace(tmp, path)
