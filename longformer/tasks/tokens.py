"""Token classification of discourse elements (Kaggle's Feedback Prize): BIO tags over overlapping windows,
scored per essay with the competition's metric."""
import numpy as np
import torch
import torch.nn.functional as F

from .. import feedback
from .base import Task


class TokenTask(Task):
    """BIO tags per token over overlapping windows; scored per essay with the competition's metric."""

    def __init__(self, labels, tokenizer, max_length: int, overlap: int, min_words: int):
        self.labels, self.label2id = labels, {l: i for i, l in enumerate(labels)}
        self.classes = sorted({l[2:] for l in labels if l != "O"}, key=lambda c: labels.index("B-" + c))
        self.tok = tokenizer
        self.size, self.overlap, self.min_words = max_length - 2, overlap, min_words
        self.bos, self.eos, self.pad = (tokenizer.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))

    def encode(self, essay):
        """Token ids, the word of each token, and (for essays with elements) each token's tag."""
        enc = self.tok.encode(essay.text, add_special_tokens=False)
        words = feedback.token_word_index(enc.offsets, essay.words, len(essay.text))
        tags = feedback.token_labels(words, feedback.word_labels(essay, self.label2id), self.label2id)
        return np.asarray(enc.ids, dtype=np.int64), words, tags

    def windows(self, n_tokens):
        return feedback.windows(n_tokens, self.size, max(1, self.size - self.overlap))

    def training_examples(self, essays):
        examples = []
        for essay in essays:
            ids, _, tags = self.encode(essay)
            for s, e in self.windows(len(ids)):
                examples.append({"index": len(examples), "input_ids": np.concatenate([[self.bos], ids[s:e], [self.eos]]),
                                 "labels": np.concatenate([[-100], tags[s:e], [-100]])})
        return examples

    def _pad(self, rows, value):
        out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.as_tensor(r)
        return out

    def collate(self, examples, seed=0):
        ids = self._pad([e["input_ids"] for e in examples], self.pad)
        return {"input_ids": ids, "attention_mask": ids.ne(self.pad).long(),
                "labels": self._pad([e["labels"] for e in examples], -100)}

    def collate_eval(self, essays, seed=0):
        """Whole essays: all their windows, and where each window's tokens belong."""
        rows, labels, places, encoded = [], [], [], []
        for n, essay in enumerate(essays):
            ids, words, tags = self.encode(essay)
            encoded.append((essay, words))
            for s, e in self.windows(len(ids)):
                rows.append(np.concatenate([[self.bos], ids[s:e], [self.eos]]))
                labels.append(np.concatenate([[-100], tags[s:e], [-100]]))
                places.append((n, s, e))
        ids = self._pad(rows, self.pad)
        return {"input_ids": ids, "attention_mask": ids.ne(self.pad).long(), "labels": self._pad(labels, -100),
                "places": places, "essays": encoded}

    def count(self, batch):
        return batch["labels"].ne(-100).sum()

    def loss_sum(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum")

    def essay_spans(self, model, batch):
        """Per essay: the predicted elements, from tag probabilities averaged over the windows."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        probs = [np.zeros((len(words), len(self.labels))) for _, words in batch["essays"]]
        sums = [np.zeros((len(words), len(self.labels))) for _, words in batch["essays"]]
        seen = [np.zeros(len(words)) for _, words in batch["essays"]]
        token_probs = logits.softmax(-1).cpu().numpy()
        for w, (n, s, e) in enumerate(batch["places"]):
            sums[n][s:e] += token_probs[w, 1:1 + e - s]
            seen[n][s:e] += 1
        spans = []
        for n, (essay, words) in enumerate(batch["essays"]):
            probs = sums[n] / np.maximum(seen[n], 1)[:, None]
            first = feedback.first_token_of_words(words, len(essay.words))
            tags = [self.labels[int(probs[t].argmax())] if t >= 0 else "O" for t in first]
            spans.append((essay, feedback.decode_spans(tags, self.min_words)))
        return logits, spans

    def eval_sums(self, model, batch):
        logits, spans = self.essay_spans(model, batch)
        tp, fp, fn = (np.zeros(len(self.classes), dtype=np.int64) for _ in range(3))
        for essay, predicted in spans:
            counts = feedback.match_counts(predicted, essay.spans, self.classes)
            tp, fp, fn = tp + counts[0], fp + counts[1], fn + counts[2]
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
        return {"loss": loss, "tokens": self.count(batch), "tp": torch.as_tensor(tp), "fp": torch.as_tensor(fp),
                "fn": torch.as_tensor(fn)}

    def metrics(self, sums):
        f1 = feedback.f1_scores(sums["tp"].numpy(), sums["fp"].numpy(), sums["fn"].numpy(), self.classes)
        return {"loss": float(sums["loss"] / sums["tokens"]), "macro_f1": f1.pop("macro_f1"),
                **{f"f1[{k}]": v for k, v in f1.items()}}
