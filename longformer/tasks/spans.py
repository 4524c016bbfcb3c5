"""Extractive question answering over long contexts (SQuAD's format, which TriviaQA and HotpotQA are converted
to): each example is cut into overlapping windows <s> question </s></s> context part </s>, the question global;
the answer is the best span over all windows of an example; scored with SQuAD's exact match and F1."""
import collections
import json
import re
import string
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..feedback import windows as overlapping_windows
from .base import Task


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[tuple[int, str]] = field(default_factory=list)  # (start character, text)


# -- reading --------------------------------------------------------------------------------------

def _answers(raw, where):
    """SQuAD's [{"text", "answer_start"}] or HF datasets' {"text": [...], "answer_start": [...]}."""
    if isinstance(raw, dict):
        raw = [{"text": t, "answer_start": s} for t, s in zip(raw.get("text", []), raw.get("answer_start", []))]
    try:
        return [(int(a["answer_start"]), str(a["text"])) for a in raw]
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"{where}: answers must hold text and answer_start ({type(e).__name__}: {e})") from e


def _example(row: dict, context: str | None, where: str) -> QAExample:
    for key in ("id", "question") + (("context",) if context is None else ()):
        if key not in row:
            raise SystemExit(f"{where}: no {key!r} field (fields: {', '.join(row)})")
    return QAExample(str(row["id"]), row["question"], row["context"] if context is None else context,
                     _answers(row.get("answers", []), where))


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{where}: not valid JSON ({e})") from e


def read_qa(path: str) -> tuple[list[QAExample], dict]:
    """Examples from SQuAD-format JSON (data/paragraphs/qas) or .jsonl (id, question, context, answers), and
    counts of what was skipped: answers whose offsets do not match their text (looked for near the offset
    first), examples left without an answer in training."""
    skipped = collections.Counter()
    examples = []
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for n, line in enumerate(f, 1):
                if line.strip():
                    examples.append(_example(_json(line, f"{path}:{n}"), None, f"{path}:{n}"))
        else:
            data = _json(f.read(), path)
            if "data" not in data:
                raise SystemExit(f"{path}: not SQuAD's format (no 'data' list); use .jsonl for one example per line")
            for a, article in enumerate(data["data"]):
                for p, paragraph in enumerate(article.get("paragraphs", [])):
                    where = f"{path}: data[{a}].paragraphs[{p}]"
                    if "context" not in paragraph:
                        raise SystemExit(f"{where}: no 'context' field")
                    examples += [_example(qa, paragraph["context"], f"{where}.qas[{q}]")
                                 for q, qa in enumerate(paragraph.get("qas", []))]
    for ex in examples:
        fixed = []
        for start, text in ex.answers:
            if ex.context[start:start + len(text)] != text:
                near = ex.context.find(text, max(0, start - 20))  # SQuAD's offsets are sometimes a few characters off
                if near < 0 or abs(near - start) > 20:
                    skipped["answers whose offsets do not match their text"] += 1
                    continue
                start = near
            fixed.append((start, text))
        ex.answers = fixed
    return examples, skipped


# -- the metric (SQuAD's) ------------------------------------------------------------------------------

def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def exact_match(prediction: str, golds: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds)) if golds else \
        float(normalize_answer(prediction) == "")


def f1(prediction: str, golds: list[str]) -> float:
    def one(gold):
        p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
        if not p or not g:
            return float(p == g)
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)
    return max(one(g) for g in golds) if golds else float(normalize_answer(prediction) == "")


class SpanTask(Task):
    """Start and end of the answer, per window; an example's prediction is its best span over all windows."""

    def __init__(self, tokenizer, max_length: int, overlap: int, global_question: bool = True,
                 max_answer_tokens: int = 30, n_best: int = 20):
        self.tok, self.max_length, self.overlap = tokenizer, max_length, overlap
        self.global_question, self.max_answer_tokens, self.n_best = global_question, max_answer_tokens, n_best
        self.bos, self.eos, self.pad = (tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))

    def encode(self, examples: list[QAExample]):
        """Per example: question ids, context ids, context character offsets. Examples whose question leaves no
        room for the context are dropped and counted."""
        out, skipped = [], collections.Counter()
        questions = self.tok.encode_batch([e.question for e in examples], add_special_tokens=False)
        contexts = self.tok.encode_batch([e.context for e in examples], add_special_tokens=False)
        for ex, q, c in zip(examples, questions, contexts):
            if len(q.ids) + 4 >= self.max_length:
                skipped[f"questions longer than --max-length {self.max_length} allows (with 4 special tokens "
                        f"and room for context)"] += 1
                continue
            out.append((ex, np.asarray(q.ids, dtype=np.int64), np.asarray(c.ids, dtype=np.int64), c.offsets))
        return out, skipped

    def windows(self, encoded):
        """(row ids, number of tokens before the context, context token range) for each window of an example."""
        ex, q, c, _ = encoded
        size = self.max_length - len(q) - 4
        before = len(q) + 3  # <s> question </s></s>
        for s, e in overlapping_windows(len(c), size, max(1, size - self.overlap)):
            yield np.concatenate([[self.bos], q, [self.eos, self.eos], c[s:e], [self.eos]]), before, (s, e)

    def answer_tokens(self, encoded):
        """Context token range [first, last] of the first answer, or None."""
        ex, _, c, offsets = encoded
        if not ex.answers:
            return None
        start, text = ex.answers[0]
        end = start + len(text)
        inside = [i for i, (a, b) in enumerate(offsets) if b > start and a < end]
        return (inside[0], inside[-1]) if inside else None

    def training_examples(self, encoded_examples):
        """One row per window; the answer's positions in it, or <s> (0) where the window does not hold it."""
        rows = []
        for enc in encoded_examples:
            answer = self.answer_tokens(enc)
            for ids, before, (s, e) in self.windows(enc):
                inside = answer is not None and s <= answer[0] and answer[1] < e
                start, end = (before + answer[0] - s, before + answer[1] - s) if inside else (0, 0)
                rows.append({"input_ids": ids, "question_tokens": before - 2, "start": start, "end": end})
        return rows

    def _batch(self, rows):
        ids = torch.full((len(rows), max(len(r["input_ids"]) for r in rows)), self.pad, dtype=torch.long)
        glob = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r["input_ids"])] = torch.as_tensor(r["input_ids"])
            glob[i, :r["question_tokens"] + 1] = int(self.global_question)  # <s> and the question, as HF's default
        return {"input_ids": ids, "attention_mask": ids.ne(self.pad).long(), "global_attention_mask": glob,
                "start_positions": torch.tensor([r["start"] for r in rows]),
                "end_positions": torch.tensor([r["end"] for r in rows])}

    def collate(self, rows, seed=0):
        return self._batch(rows)

    def collate_eval(self, encoded_examples, seed=0):
        """Whole examples: all their windows, and which example and context range each window holds."""
        rows, places = self.training_examples(encoded_examples), []
        for n, enc in enumerate(encoded_examples):
            places += [(n, before, span) for _, before, span in self.windows(enc)]
        return {**self._batch(rows), "places": places, "examples": encoded_examples}

    def count(self, batch):
        return torch.tensor(2 * len(batch["input_ids"]))  # a start and an end per window

    def _logits(self, model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    global_attention_mask=batch["global_attention_mask"])
        return out.start_logits.float(), out.end_logits.float()

    @staticmethod
    def _loss(start, end, batch):
        return F.cross_entropy(start, batch["start_positions"], reduction="sum") + \
            F.cross_entropy(end, batch["end_positions"], reduction="sum")

    def loss_sum(self, model, batch):
        return self._loss(*self._logits(model, batch), batch)

    def best_spans(self, start_logits, end_logits, batch) -> list[str]:
        """Per example of the batch: the text of its best span (n-best starts x ends, end >= start, at most
        max_answer_tokens, inside the context) over all its windows; '' when none qualifies."""
        best = [(-np.inf, "") for _ in batch["examples"]]
        starts, ends = start_logits.cpu().numpy(), end_logits.cpu().numpy()
        for w, (n, before, (s, e)) in enumerate(batch["places"]):
            ex, _, _, offsets = batch["examples"][n]
            lo, hi = before, before + (e - s)  # the window's context positions
            top_s = lo + np.argsort(-starts[w, lo:hi])[:self.n_best]
            top_e = lo + np.argsort(-ends[w, lo:hi])[:self.n_best]
            for i in top_s:
                for j in top_e:
                    if i <= j < i + self.max_answer_tokens and starts[w, i] + ends[w, j] > best[n][0]:
                        a, b = offsets[s + i - lo][0], offsets[s + j - lo][1]
                        best[n] = (starts[w, i] + ends[w, j], ex.context[a:b])
        return [text.strip() for _, text in best]

    def predict(self, model, batch) -> list[str]:
        return self.best_spans(*self._logits(model, batch), batch)

    def eval_sums(self, model, batch):
        start, end = self._logits(model, batch)
        loss = self._loss(start, end, batch)
        predictions = self.best_spans(start, end, batch)
        golds = [[text for _, text in enc[0].answers] for enc in batch["examples"]]
        return {"loss": loss, "positions": self.count(batch), "examples": torch.tensor(len(golds)),
                "exact_match": torch.tensor(sum(exact_match(p, g) for p, g in zip(predictions, golds))),
                "f1": torch.tensor(sum(f1(p, g) for p, g in zip(predictions, golds)))}

    def metrics(self, sums):
        n = max(float(sums["examples"]), 1.0)
        return {"loss": float(sums["loss"] / sums["positions"]), "exact_match": float(sums["exact_match"]) / n,
                "f1": float(sums["f1"]) / n}
