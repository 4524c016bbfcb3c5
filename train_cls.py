"""Fine-tune a Longformer on long documents: document classification, or token classification of
discourse elements (Kaggle's Feedback Prize - Evaluating Student Writing).

    python train_cls.py                                                  # embedded demo, no downloads
    python train_cls.py --init CKPT --data reviews.csv --text-column review --label-column stars
    python train_cls.py --init CKPT --data aclImdb/train --val-data aclImdb/test --max-length 4096
    python train_cls.py --init longformer-base-1k-pretrained --data feedback-prize/ --max-length 1024 \
        --predict feedback-prize/test                                    # writes submission.csv
    python train_cls.py --init RUN_DIR --predict new.csv                 # predictions only

The task is guessed from --data: a folder holding train.csv and train/ is Feedback Prize (token
classification); anything else is document classification. Runs on the same loop as train_mlm.py
(torch.distributed, autocast, accumulation, resume).
"""
import argparse
import csv
import os

import numpy as np
import torch
import torch.nn.functional as F

import longformer
from longformer import demo, feedback
from longformer.cli import add_model_arguments, add_training_arguments, number, run_settings, train_args
from longformer.data import hold_out, read_labelled
from longformer.tokenizer import copy_tokenizer_files
from longformer.trainer import Task, setup_distributed, to_device, train

DEMO = dict(max_length=512, batch_size=16, lr=1e-3, adam_beta2=0.98, warmup=0.1, max_steps=300, eval_every=50,
            log_every=10)


# -- document classification ------------------------------------------------------------------------

class DocumentTask(Task):
    """One label per document (or several, multi_label), read from <s>, which has global attention."""

    def __init__(self, labels: list[str], pad_id: int, multi_label: bool, global_first: bool = True):
        self.labels, self.pad_id, self.multi_label, self.global_first = labels, pad_id, multi_label, global_first

    def collate(self, examples, seed=0):
        longest = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), longest), self.pad_id, dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, :len(e["input_ids"])] = torch.as_tensor(e["input_ids"])
        batch = {"input_ids": ids, "attention_mask": ids.ne(self.pad_id).long()}
        batch["global_attention_mask"] = torch.zeros_like(ids)
        batch["global_attention_mask"][:, 0] = int(self.global_first)
        if "label" in examples[0]:
            batch["labels"] = torch.as_tensor(np.stack([e["label"] for e in examples]))
        return batch

    def logits(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     global_attention_mask=batch["global_attention_mask"]).logits.float()

    def count(self, batch):
        return torch.tensor(batch["labels"].numel())

    def _loss(self, logits, labels):
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
        return F.cross_entropy(logits, labels, reduction="sum")

    def loss_sum(self, model, batch):
        return self._loss(self.logits(model, batch), batch["labels"])

    def predict(self, logits):
        """[B, K] bool: the labels each document gets."""
        if self.multi_label:
            return logits > 0
        return F.one_hot(logits.argmax(-1), len(self.labels)).bool()

    def eval_sums(self, model, batch):
        logits, labels = self.logits(model, batch), batch["labels"]
        pred = self.predict(logits)
        truth = labels.bool() if self.multi_label else F.one_hot(labels, len(self.labels)).bool()
        return {"loss": self._loss(logits, labels), "items": torch.tensor(labels.numel()),
                "correct": (pred == truth).all(-1).sum(), "documents": torch.tensor(len(labels)),
                "tp": (pred & truth).sum(0), "fp": (pred & ~truth).sum(0), "fn": (~pred & truth).sum(0)}

    def metrics(self, sums):
        tp, fp, fn = sums["tp"], sums["fp"], sums["fn"]
        f1 = feedback.f1_scores(tp.numpy(), fp.numpy(), fn.numpy(), self.labels)
        return {"loss": float(sums["loss"] / sums["items"]), "accuracy": float(sums["correct"] / sums["documents"]),
                "macro_f1": f1.pop("macro_f1"), **{f"f1[{k}]": v for k, v in f1.items()}}


def encode_documents(texts, tokenizer, max_length, label_ids=None):
    """<s> text </s>, cut to max_length (keeping the closing </s>)."""
    eos = tokenizer.token_to_id("</s>")
    out = []
    for i, enc in enumerate(tokenizer.encode_batch(texts)):
        ids = enc.ids if len(enc.ids) <= max_length else enc.ids[:max_length - 1] + [eos]
        example = {"index": i, "input_ids": np.asarray(ids, dtype=np.int64)}
        if label_ids is not None:
            example["label"] = label_ids[i]
        out.append(example)
    return out


def label_targets(labels, names, multi_label, where):
    index = {n: i for i, n in enumerate(names)}
    targets = []
    for found in labels:
        unknown = [l for l in found if l not in index]
        if unknown:
            raise SystemExit(f"label {unknown[0]!r} in {where} was never seen in training (training labels: "
                             f"{', '.join(names)})")
        if multi_label:
            t = np.zeros(len(names), dtype=np.float32)
            t[[index[l] for l in found]] = 1
        else:
            t = np.int64(index[found[0]])
        targets.append(t)
    return targets


# -- token classification (Feedback Prize) -----------------------------------------------------------

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


# -- command line -----------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help=".csv, .jsonl, a folder of class sub-folders, or a Feedback Prize folder "
                                  "(train.csv + train/); none: the embedded demo")
    g.add_argument("--val-data", help="validation set in the same form (default: hold out --val-fraction)")
    g.add_argument("--val-fraction", type=number(float, 0, strict=True), default=0.1)
    g.add_argument("--task", choices=("auto", "doc", "token"), default="auto")
    g.add_argument("--text-column", default="text")
    g.add_argument("--label-column", default="label")
    g.add_argument("--multi-label", action="store_true", help="several labels per document: sigmoid + BCE")
    g.add_argument("--no-global-attention", action="store_true",
                   help="document task: no global token (to see what global attention brings)")
    g.add_argument("--max-length", type=number(int, 8), default=4096, help="tokens per document or window")
    g.add_argument("--overlap", type=number(int, 0), default=128, help="token task: tokens shared by neighbouring windows")
    g.add_argument("--min-span-words", type=number(int, 1), default=1, help="token task: shortest element kept")
    g.add_argument("--predict", help="texts to label after training (same forms; for the token task a folder of "
                                     "<id>.txt essays)")
    g.add_argument("--predictions", help="where --predict writes (default: OUT/predictions.csv or OUT/submission.csv)")
    add_model_arguments(p, "HF-format checkpoint (allenai/longformer-base-4096, a train_mlm.py run, ...)")
    add_training_arguments(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    first, _ = p.parse_known_args(argv)
    if not first.data and not first.init:
        p.set_defaults(**DEMO)
    args = p.parse_args(argv)
    if args.data and not args.init:
        p.error("--data needs --init: the checkpoint to fine-tune")
    if not args.data and args.init and not args.predict:
        p.error("--init without --data: give --predict to label texts with it, or --data to train it")
    if args.task == "auto":  # Feedback Prize's layout, or (predicting only) a token-classification checkpoint
        if args.data:
            is_token = os.path.isfile(os.path.join(args.data, "train.csv")) and os.path.isdir(os.path.join(args.data, "train"))
        else:
            is_token = bool(args.init) and _is_token_model(args.init)
        args.task = "token" if is_token else "doc"
    return args


def _is_token_model(directory):
    return "LongformerForTokenClassification" in longformer.LongformerConfig.from_pretrained(directory).extra.get(
        "architectures", [])


def load_model(cls, args, id2label, **overrides):
    model = cls.from_pretrained(args.init, id2label=id2label, **overrides)
    model.config.attention_backend = args.attention_backend
    model.config.gradient_checkpointing = args.gradient_checkpointing
    if args.max_length > model.config.max_length:
        raise SystemExit(f"--max-length {args.max_length} is longer than the model's position table "
                         f"({model.config.max_length} tokens)")
    return model


def doc_job(args, tokenizer):
    if not args.data:
        print("no --data: the embedded demo. Each document is ~450 tokens of Python docstrings with one sentence, "
              "'This passage is filed under <topic>.', in its last 40%; the label is the topic. <s> sees only "
              "128 tokens through the windows of 4 layers, so only global attention can find it.")
        texts, labels = demo.topic_documents(demo.corpus())
    else:
        texts, labels = read_labelled(args.data, args.text_column, args.label_column, args.multi_label)
    if args.val_data:
        val_texts, val_labels = read_labelled(args.val_data, args.text_column, args.label_column, args.multi_label)
    else:
        train_pairs, val_pairs = hold_out(list(zip(texts, labels)), args.val_fraction, args.seed)
        texts, labels = [t for t, _ in train_pairs], [l for _, l in train_pairs]
        val_texts, val_labels = [t for t, _ in val_pairs], [l for _, l in val_pairs]
    names = sorted({l for found in labels for l in found})
    targets = label_targets(labels, names, args.multi_label, "training")
    val_targets = label_targets(val_labels, names, args.multi_label, "the validation set")
    print(f"{len(texts)} training and {len(val_texts)} validation documents, labels: {', '.join(names)}")
    id2label = dict(enumerate(names))
    problem = "multi_label_classification" if args.multi_label else "single_label_classification"
    if args.init:
        model = load_model(longformer.LongformerForSequenceClassification, args, id2label, problem_type=problem)
    else:
        config = demo.demo_config(tokenizer.get_vocab_size(), args.max_length)
        config.id2label, config.problem_type = id2label, problem
        model = longformer.LongformerForSequenceClassification(config)
    task = DocumentTask(names, tokenizer.token_to_id("<pad>"), args.multi_label, not args.no_global_attention)
    return model, task, encode_documents(texts, tokenizer, args.max_length, targets), \
        encode_documents(val_texts, tokenizer, args.max_length, val_targets)


def token_job(args, tokenizer):
    essays = feedback.read_essays(args.data)
    if args.val_data:
        val = feedback.read_essays(args.val_data)
    else:
        essays, val = hold_out(essays, args.val_fraction, args.seed)
    kinds = {cls for e in essays + val for cls, _ in e.spans}
    classes = list(feedback.CLASSES) + sorted(kinds - set(feedback.CLASSES))
    labels = feedback.bio_labels(classes)
    model = load_model(longformer.LongformerForTokenClassification, args, dict(enumerate(labels)))
    task = TokenTask(labels, tokenizer, args.max_length, args.overlap, args.min_span_words)
    train_set = task.training_examples(essays)
    print(f"{len(essays)} training essays -> {len(train_set)} windows of up to {args.max_length} tokens; "
          f"{len(val)} validation essays")
    return model, task, train_set, val


def predict(args, model, task, tokenizer):
    """Label --predict with the trained (or --init) model; writes a CSV."""
    _, _, device = setup_distributed(args.device)
    model.to(device).eval()
    default = "submission.csv" if isinstance(task, TokenTask) else "predictions.csv"
    path = args.predictions or os.path.join(args.out or ".", default)
    with torch.no_grad():
        if isinstance(task, TokenTask):
            essays = [feedback.Essay(i, t) for i, t in feedback.read_essay_texts(args.predict).items()]
            found = {}
            for s in range(0, len(essays), args.batch_size):
                _, spans = task.essay_spans(model, to_device(task.collate_eval(essays[s:s + args.batch_size]), device))
                found.update({essay.id: sp for essay, sp in spans})
            feedback.write_submission(path, found)
        else:
            texts = read_unlabelled(args.predict, args.text_column)
            examples = encode_documents(texts, tokenizer, args.max_length)
            with open(path, "w", newline="", encoding="utf-8") as f:
                out = csv.writer(f)
                out.writerow(["index", "label", *[f"p[{l}]" for l in task.labels]])
                for s in range(0, len(examples), args.batch_size):
                    logits = task.logits(model, to_device(task.collate(examples[s:s + args.batch_size]), device))
                    probs = logits.sigmoid() if task.multi_label else logits.softmax(-1)
                    for i, (row, chosen) in enumerate(zip(probs.tolist(), task.predict(logits).tolist())):
                        label = "|".join(l for l, c in zip(task.labels, chosen) if c)
                        out.writerow([s + i, label, *[f"{p:.4f}" for p in row]])
    print(f"wrote {path}")


def read_unlabelled(path, text_column):
    if os.path.isdir(path):
        return [open(os.path.join(path, f), encoding="utf-8").read() for f in sorted(os.listdir(path)) if f.endswith(".txt")]
    return read_labelled(path, text_column, label_column=None)[0]


def per_class_report(metrics):
    rows = [(k[3:-1], v) for k, v in metrics.items() if k.startswith("f1[")]
    if rows:
        print("per-class F1:\n" + "\n".join(f"  {name:24s} {v:.4f}" for name, v in rows))


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    tokenizer_dir = args.tokenizer or args.init
    if not args.data and not args.init:
        tokenizer_dir = demo.demo_tokenizer(demo.corpus(), args.cache_dir)
    if tokenizer_dir is None:
        raise SystemExit("no tokenizer: give --tokenizer DIR")
    tokenizer = longformer.load_tokenizer(tokenizer_dir)
    if not args.data and args.init:  # predictions only
        model_cls = longformer.LongformerForTokenClassification if args.task == "token" else \
            longformer.LongformerForSequenceClassification
        model = model_cls.from_pretrained(args.init)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        task = TokenTask(labels, tokenizer, args.max_length, args.overlap, args.min_span_words) \
            if args.task == "token" else DocumentTask(labels, tokenizer.token_to_id("<pad>"),
                                                      model.config.problem_type == "multi_label_classification")
        return predict(args, model, task, tokenizer)

    model, task, train_set, val_set = (token_job if args.task == "token" else doc_job)(args, tokenizer)
    settings = train_args(args, "cls")
    if args.task == "token" or (settings.target_metric == "accuracy" and args.multi_label):
        settings.target_metric = "macro_f1"
    metrics = train(model, task, train_set, val_set, settings, run_settings(args), resume=args.resume,
                    overwrite=args.overwrite)
    if int(os.environ.get("RANK", 0)) == 0:
        copy_tokenizer_files(tokenizer_dir, args.out)
        per_class_report(metrics)
        if args.predict:
            predict(args, model, task, tokenizer)


if __name__ == "__main__":
    main()
