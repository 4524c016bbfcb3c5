"""Fine-tune a Longformer on long documents: document classification, token classification of discourse
elements (Kaggle's Feedback Prize - Evaluating Student Writing), or extractive question answering (spans).

    python train_cls.py                                                  # embedded demo, no downloads
    python train_cls.py --init CKPT --data reviews.csv --text-column review --label-column stars
    python train_cls.py --init CKPT --data aclImdb/train --val-data aclImdb/test --max-length 4096
    python train_cls.py --init longformer-base-1k-pretrained --data feedback-prize/ --max-length 1024 \
        --predict feedback-prize/test                                    # writes submission.csv
    python train_cls.py --init RUN_DIR --predict new.csv                 # predictions only
    python train_cls.py --task qa                                        # embedded QA demo: needs global attention
    python train_cls.py --task qa --init CKPT --data train-v1.1.json --val-data dev-v1.1.json --max-length 4096

The task is guessed from --data: a folder holding train.csv and train/ is Feedback Prize (token
classification); anything else is document classification; --task qa reads SQuAD-format JSON or .jsonl.
Each task is a module of longformer/tasks/. Runs on the same loop as train_mlm.py (torch.distributed,
autocast, accumulation, resume).
"""
import argparse
import collections
import csv
import json
import os

import torch

import longformer
from longformer import demo, feedback
from longformer.cli import (add_model_arguments, add_training_arguments, number, run_command, run_settings,
                            train_args)
from longformer.data import check_vocabulary, hold_out, read_labelled
from longformer.files import atomic_write_text
from longformer.tasks import DocumentTask, TokenTask, encode_documents, label_targets, read_unlabelled
from longformer.tasks.spans import SpanTask, read_qa
from longformer.tokenizer import copy_tokenizer_files
from longformer.trainer import leave, pick_device, to_device, train

DEMO = dict(max_length=512, batch_size=16, lr=1e-3, adam_beta2=0.98, warmup=0.1, max_steps=300, eval_every=50,
            log_every=10)
DEMO_QA = dict(max_length=1024, batch_size=8, lr=1e-3, adam_beta2=0.98, warmup=0.1, max_steps=500, eval_every=100,
               log_every=10)


# -- command line -----------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", help=".csv, .jsonl, a folder of class sub-folders, or a Feedback Prize folder "
                                  "(train.csv + train/); none: the embedded demo")
    g.add_argument("--val-data", help="validation set in the same form (default: hold out --val-fraction)")
    g.add_argument("--val-fraction", type=number(float, 0, strict=True), default=0.1)
    g.add_argument("--task", choices=("auto", "doc", "token", "qa"), default="auto")
    g.add_argument("--text-column", default="text")
    g.add_argument("--label-column", default="label")
    g.add_argument("--multi-label", action="store_true", help="several labels per document: sigmoid + BCE")
    g.add_argument("--no-global-attention", action="store_true",
                   help="document and qa tasks: no global token (to see what global attention brings)")
    g.add_argument("--max-length", type=number(int, 8), default=4096, help="tokens per document or window")
    g.add_argument("--overlap", type=number(int, 0), default=128,
                   help="token and qa tasks: tokens shared by neighbouring windows")
    g.add_argument("--max-answer-tokens", type=number(int, 1), default=30, help="qa task: longest answer predicted")
    g.add_argument("--n-best", type=number(int, 1), default=20, help="qa task: starts and ends tried per window")
    g.add_argument("--min-span-words", type=number(int, 1), default=1, help="token task: shortest element kept")
    g.add_argument("--predict", help="texts to label after training (same forms; for the token task a folder of "
                                     "<id>.txt essays)")
    g.add_argument("--predictions", help="where --predict writes (default: OUT/predictions.csv or OUT/submission.csv)")
    add_model_arguments(p, "HF-format checkpoint: a folder or a Hub name (allenai/longformer-base-4096, a train_mlm.py "
                           "run, ...)")
    add_training_arguments(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    first, _ = p.parse_known_args(argv)
    if not first.data and not first.init:
        p.set_defaults(**(DEMO_QA if first.task == "qa" else DEMO))
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
    model.settings.attention_backend = args.attention_backend
    model.gradient_checkpointing_enable(args.gradient_checkpointing)
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


def qa_job(args, tokenizer):
    if not args.data:
        print("no --data: the embedded QA demo. Each context is ~1,000 tokens of Python docstrings with three "
              "sentences 'The colour is X.', 'The city is Y.', 'The animal is Z.' anywhere in it; the question "
              "asks for one of them. Tokens see 128 tokens through the windows of 4 layers: only global attention "
              "on the question tells a fact whether it is the one asked for.")
        train_examples, val_examples = demo.qa_examples(demo.corpus(), 2400, seed=0), \
            demo.qa_examples(demo.corpus(), 200, seed=1)
        skipped = collections.Counter()
    else:
        examples, skipped = read_qa(args.data)
        if args.val_data:
            val_examples, val_skipped = read_qa(args.val_data)
            skipped += val_skipped
            train_examples = examples
        else:
            train_examples, val_examples = hold_out(examples, args.val_fraction, args.seed)
    task = SpanTask(tokenizer, args.max_length, args.overlap, not args.no_global_attention, args.max_answer_tokens,
                    args.n_best)
    train_encoded, train_skipped = task.encode(train_examples)
    val_set, val_skipped = task.encode(val_examples)
    unanswered = sum(1 for e in train_examples if not e.answers)
    for reason, n in (skipped + train_skipped + val_skipped).items():
        print(f"skipped: {n} {reason}")
    if unanswered:
        print(f"note: {unanswered} training examples have no answer: all their windows point at <s>")
    train_set = task.training_examples(train_encoded)
    print(f"{len(train_encoded)} training questions -> {len(train_set)} windows of up to {args.max_length} tokens; "
          f"{len(val_set)} validation questions")
    if args.init:
        model = load_model(longformer.LongformerForQuestionAnswering, args, {0: "start", 1: "end"})
    else:
        model = longformer.LongformerForQuestionAnswering(demo.demo_config(tokenizer.get_vocab_size(), args.max_length))
    return model, task, train_set, val_set


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


def predict(args, model, task, tokenizer, val_set=None):
    """Label --predict with the trained (or --init) model; writes a CSV (predictions.json for QA: --predict,
    or else the validation questions)."""
    device = pick_device(args.device)
    model.to(device).eval()
    default = {TokenTask: "submission.csv", SpanTask: "predictions.json"}.get(type(task), "predictions.csv")
    path = args.predictions or os.path.join(args.out or ".", default)
    with torch.no_grad():
        if isinstance(task, SpanTask):  # SQuAD's predictions file: {question id: answer text}
            examples, skipped = read_qa(args.predict) if args.predict else (None, {})
            encoded = task.encode(examples)[0] if examples is not None else val_set
            answers = {}
            for s in range(0, len(encoded), args.batch_size):
                part = encoded[s:s + args.batch_size]
                texts = task.predict(model, to_device(task.collate_eval(part), device))
                answers.update({enc[0].id: t for enc, t in zip(part, texts)})
            atomic_write_text(path, json.dumps(answers, indent=1, ensure_ascii=False) + "\n")
        elif isinstance(task, TokenTask):
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
        if args.task == "qa":
            model = longformer.LongformerForQuestionAnswering.from_pretrained(args.init)
            task = SpanTask(tokenizer, args.max_length, args.overlap, not args.no_global_attention,
                            args.max_answer_tokens, args.n_best)
            return predict(args, model, task, tokenizer)
        model_cls = longformer.LongformerForTokenClassification if args.task == "token" else \
            longformer.LongformerForSequenceClassification
        model = model_cls.from_pretrained(args.init)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        task = TokenTask(labels, tokenizer, args.max_length, args.overlap, args.min_span_words) \
            if args.task == "token" else DocumentTask(labels, tokenizer.token_to_id("<pad>"),
                                                      model.config.problem_type == "multi_label_classification")
        return predict(args, model, task, tokenizer)

    model, task, train_set, val_set = {"token": token_job, "qa": qa_job, "doc": doc_job}[args.task](args, tokenizer)
    check_vocabulary(tokenizer.get_vocab_size() - 1, model.config.vocab_size, f"the tokenizer ({tokenizer_dir})")
    settings = train_args(args, "cls")
    if args.task == "token" or (settings.target_metric == "accuracy" and args.multi_label):
        settings.target_metric = "macro_f1"
    if args.task == "qa" and settings.target_metric == "accuracy":
        settings.target_metric = "exact_match"
    metrics = train(model, task, train_set, val_set, settings, run_settings(args), resume=args.resume,
                    overwrite=args.overwrite)
    if int(os.environ.get("RANK", 0)) == 0:
        copy_tokenizer_files(tokenizer_dir, args.out)
        per_class_report(metrics)
        if args.predict or args.task == "qa":
            predict(args, model, task, tokenizer, val_set)


if __name__ == "__main__":
    run_command(main)
    leave()
