"""train_cls.py: data formats, labels through save/load, word/token alignment, the Feedback Prize metric,
HF loading of the fine-tuned models, and bad input."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer

import longformer
from conftest import transformers
from device import DEVICE
from longformer import feedback
from longformer.data import read_labelled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "students should write essays because evidence supports every claim although some disagree".split()


def essay_text(rng, n=60):
    return " ".join(rng.choice(WORDS, size=n)) + "."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Longformer checkpoint with its tokenizer: what a user would pass to --init."""
    root = tmp_path_factory.mktemp("cls")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([" ".join(WORDS)] * 50 + ["naïve café — ünïcödé  tabs\tand\nlines"] * 5,
                            vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                            show_progress=False)
    config = longformer.LongformerConfig(vocab_size=300, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, attention_window=8, max_position_embeddings=130)
    torch.manual_seed(0)
    longformer.LongformerModel(config).save_pretrained(str(root / "base"))
    tok.save_model(str(root / "base"))
    return root


def run(*args, ok=True):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train_cls.py"), "--device", DEVICE.type, *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    if ok:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def hf_matches(out_dir, cls_name, ids):
    ours = getattr(longformer, cls_name).from_pretrained(str(out_dir)).eval().to(DEVICE)
    hf = getattr(transformers, cls_name).from_pretrained(str(out_dir)).eval().to(DEVICE)
    ids = ids.to(DEVICE)
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    return ours, hf


# -- document classification --------------------------------------------------------------------------

def write_docs(tmp_path, n=24):
    rng = np.random.default_rng(0)
    rows = [{"body": essay_text(rng, 30), "stars": ["good", "bad", "so-so"][i % 3]} for i in range(n)]
    with open(tmp_path / "docs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["body", "stars"])
        w.writeheader()
        w.writerows(rows)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"text": r["body"], "label": r["stars"]}) + "\n")
    for r in rows:
        os.makedirs(tmp_path / "folder" / r["stars"], exist_ok=True)
    for i, r in enumerate(rows):
        (tmp_path / "folder" / r["stars"] / f"{i}.txt").write_text(r["body"])
    return rows


def test_readers_agree_across_formats(tmp_path):
    rows = write_docs(tmp_path)
    csv_texts, csv_labels = read_labelled(str(tmp_path / "docs.csv"), "body", "stars")
    jsonl_texts, jsonl_labels = read_labelled(str(tmp_path / "docs.jsonl"))
    folder_texts, folder_labels = read_labelled(str(tmp_path / "folder"))
    assert csv_texts == jsonl_texts == [r["body"] for r in rows] and csv_labels == jsonl_labels
    assert sorted(zip(folder_texts, map(tuple, folder_labels))) == sorted(zip(csv_texts, map(tuple, csv_labels)))
    (tmp_path / "multi.jsonl").write_text('{"text": "a b", "label": ["x", "y"]}\n{"text": "c", "label": "x|z"}\n')
    assert read_labelled(str(tmp_path / "multi.jsonl"), multi_label=True)[1] == [["x", "y"], ["x", "z"]]


def test_document_classification_labels_round_trip_and_hf_loads(base, tmp_path):
    write_docs(tmp_path)
    out = tmp_path / "run"
    run("--init", base / "base", "--data", tmp_path / "docs.csv", "--text-column", "body", "--label-column", "stars",
        "--max-length", "64", "--batch-size", "4", "--max-steps", "3", "--out", out, "--predict", tmp_path / "docs.csv",
        "--cache-dir", tmp_path / "cache")
    config = json.load(open(out / "config.json"))
    assert config["id2label"] == {"0": "bad", "1": "good", "2": "so-so"} and config["label2id"]["so-so"] == 2
    ours, hf = hf_matches(out, "LongformerForSequenceClassification", torch.randint(3, 300, (2, 40)))
    assert ours.config.id2label == {0: "bad", 1: "good", 2: "so-so"} and hf.config.id2label[2] == "so-so"
    predictions = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(predictions) == 24 and predictions[0]["label"] in ("bad", "good", "so-so")
    # predictions only, from the fine-tuned run
    again = run("--init", out, "--predict", tmp_path / "docs.jsonl", "--predictions", tmp_path / "p.csv",
                "--max-length", "64")
    assert "wrote" in again.stdout and len(list(csv.DictReader(open(tmp_path / "p.csv")))) == 24


def test_multi_label(base, tmp_path):
    lines = [{"text": f"essay {i} " + " ".join(WORDS[i % 5:i % 5 + 6]), "label": ["a", "b"] if i % 2 else ["a"]}
             for i in range(16)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    run("--init", base / "base", "--data", tmp_path / "m.jsonl", "--multi-label", "--max-length", "64",
        "--batch-size", "4", "--max-steps", "2", "--out", tmp_path / "run")
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert config["problem_type"] == "multi_label_classification" and config["id2label"] == {"0": "a", "1": "b"}


@pytest.mark.parametrize("extra,message", [
    (("--label-column", "rating"), "no column 'rating' (set --label-column)"),
    (("--val-data", "VAL"), "label 'awful' in the validation set was never seen in training"),
    (("--data", "EMPTY"), "empty document"),
])
def test_document_bad_input(base, tmp_path, extra, message):
    write_docs(tmp_path)
    (tmp_path / "val.csv").write_text("body,stars\nsome text,awful\n")
    (tmp_path / "empty.csv").write_text("body,stars\n  ,good\n")
    args = ["--init", base / "base", "--data", tmp_path / "docs.csv", "--text-column", "body", "--label-column",
            "stars", "--max-length", "64", "--max-steps", "1", "--out", tmp_path / "o"]
    swap = {"VAL": tmp_path / "val.csv", "EMPTY": tmp_path / "empty.csv"}
    for k, v in zip(extra[::2], extra[1::2]):
        args += [k, swap.get(v, v)]
    done = run(*args, ok=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-1500:]


# -- Feedback Prize ---------------------------------------------------------------------------------

def test_alignment_irregular_whitespace_and_non_ascii(base):
    tok = longformer.load_tokenizer(str(base / "base"))
    essay = feedback.Essay("x", "  naïve café\t\tstudents —  ünïcödé\n\nwrite   essays ", [("Claim", [1, 2]), ("Lead", [4])])
    words = essay.words
    assert [essay.text[s:e] for s, e in words] == essay.text.split()
    enc = tok.encode(essay.text, add_special_tokens=False)
    token_words = feedback.token_word_index(enc.offsets, words, len(essay.text))
    for w, (s, e) in enumerate(words):  # each word is covered by its tokens, and only by them
        pieces = [enc.offsets[t] for t in range(len(token_words)) if token_words[t] == w]
        assert pieces and min(p[0] for p in pieces) == s and max(p[1] for p in pieces) == e, essay.text[s:e]
    label2id = {l: i for i, l in enumerate(feedback.bio_labels())}
    tags = feedback.token_labels(token_words, feedback.word_labels(essay, label2id), label2id)
    first = feedback.first_token_of_words(token_words, len(words))
    names = [feedback.bio_labels()[tags[t]] for t in first]
    assert names == ["O", "B-Claim", "I-Claim", "O", "B-Lead", "O", "O"]
    later = [t for t in range(len(tags)) if token_words[t] == 1 and t != first[1]]
    assert all(feedback.bio_labels()[tags[t]] == "I-Claim" for t in later)  # a B word's later tokens are I


def test_windows_cover_and_overlap():
    assert feedback.windows(5, 8, 6) == [(0, 5)]
    w = feedback.windows(20, 8, 6)
    assert w == [(0, 8), (6, 14), (12, 20)]


def score(pred, truth, classes=("Claim", "Lead")):
    tp, fp, fn = feedback.match_counts(pred, truth, classes)
    return feedback.f1_scores(tp, fp, fn, classes), (tp.tolist(), fp.tolist(), fn.tolist())


def test_metric_exact_match():
    f1, _ = score([("Claim", [1, 2, 3])], [("Claim", [1, 2, 3])])
    assert f1["Claim"] == 1.0 and f1["macro_f1"] == 1.0 and math.isnan(f1["Lead"])


def test_metric_half_overlap_threshold():
    f1, counts = score([("Claim", [0, 1, 2, 3])], [("Claim", [2, 3, 4, 5])])  # 2/4 both ways: a match
    assert counts == ([1, 0], [0, 0], [0, 0]) and f1["Claim"] == 1.0
    f1, counts = score([("Claim", [0, 1, 2, 3])], [("Claim", [2, 3, 4, 5, 6])])  # 2/5 of the truth: none
    assert counts == ([0, 0], [1, 0], [1, 0]) and f1["Claim"] == 0.0
    f1, counts = score([("Claim", list(range(10)))], [("Claim", [0, 1, 2, 3])])  # 4/10 of the prediction: none
    assert counts == ([0, 0], [1, 0], [1, 0])


def test_metric_prediction_over_two_truths_and_class_mismatch():
    f1, counts = score([("Claim", [0, 1, 2, 3])], [("Claim", [0, 1]), ("Claim", [2, 3])])
    assert counts == ([1, 0], [0, 0], [1, 0]) and f1["Claim"] == pytest.approx(1 / 1.5)
    f1, counts = score([("Lead", [0, 1])], [("Claim", [0, 1])])  # right words, wrong class
    assert counts == ([0, 0], [0, 1], [1, 0]) and f1["macro_f1"] == 0.0  # Lead has no truth: not averaged


def test_metric_empty_classes():
    f1, _ = score([], [])
    assert math.isnan(f1["macro_f1"])
    f1, _ = score([("Claim", [5])], [("Lead", [0, 1])])
    assert f1["Lead"] == 0.0 and f1["Claim"] == 0.0 and f1["macro_f1"] == 0.0


def test_decode_spans():
    tags = ["O", "B-Claim", "I-Claim", "I-Claim", "B-Claim", "I-Lead", "O", "I-Claim"]
    assert feedback.decode_spans(tags) == [("Claim", [1, 2, 3]), ("Claim", [4]), ("Lead", [5]), ("Claim", [7])]
    assert feedback.decode_spans(tags, min_words=2) == [("Claim", [1, 2, 3])]


def write_feedback(root, n=6):
    rng = np.random.default_rng(1)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = []
    for i in range(n):
        text = essay_text(rng, 90)
        (root / "train" / f"E{i}.txt").write_text(text)
        rows += [(f"E{i}", "Lead", " ".join(map(str, range(0, 10)))), (f"E{i}", "Claim", " ".join(map(str, range(20, 45))))]
    for i in range(2):
        (root / "test" / f"T{i}.txt").write_text(essay_text(rng, 70))
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "discourse_id", "discourse_type", "predictionstring"])
        for essay_id, cls, words in rows:
            w.writerow([essay_id, "1", cls, words])


def test_feedback_prize_end_to_end_and_hf_loads(base, tmp_path):
    write_feedback(tmp_path / "fp")
    out = tmp_path / "run"
    done = run("--init", base / "base", "--data", tmp_path / "fp", "--max-length", "48", "--overlap", "16",
               "--batch-size", "4", "--max-steps", "2", "--out", out, "--predict", tmp_path / "fp" / "test")
    assert "macro_f1" in done.stdout + done.stderr and "per-class F1" in done.stdout
    config = json.load(open(out / "config.json"))
    assert config["id2label"]["1"] == "B-Lead" and len(config["id2label"]) == 15
    hf_matches(out, "LongformerForTokenClassification", torch.randint(3, 300, (2, 40)))
    with open(out / "submission.csv") as f:
        assert f.readline().strip() == "id,class,predictionstring"
        for row in csv.DictReader(open(out / "submission.csv")):
            assert row["id"] in ("T0", "T1") and row["class"] in feedback.CLASSES
            assert all(0 <= int(w) < 70 for w in row["predictionstring"].split())


@pytest.mark.parametrize("damage,message", [
    ("no_text", "essay 'E0' has no train/E0.txt"),
    ("out_of_range", "is out of range: essay E1 has 90 words (indices 0..89)"),
    ("empty", "train/E2.txt is empty"),
])
def test_feedback_bad_input(base, tmp_path, damage, message):
    root = tmp_path / "fp"
    write_feedback(root)
    if damage == "no_text":
        os.remove(root / "train" / "E0.txt")
    elif damage == "out_of_range":
        with open(root / "train.csv", "a") as f:
            f.write("E1,9,Claim,88 89 90 91\n")
    else:
        (root / "train" / "E2.txt").write_text("   \n")
    done = run("--init", base / "base", "--data", root, "--max-length", "48", "--max-steps", "1",
               "--out", tmp_path / "o", ok=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-1500:]
