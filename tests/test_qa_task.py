"""The QA task: SQuAD's metric, windows over long contexts, answers mapped to tokens and back to characters,
reading SQuAD JSON and .jsonl, bad input, and train_cls.py --task qa end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer

import longformer
from device import DEVICE
from longformer.tasks.spans import QAExample, SpanTask, exact_match, f1, normalize_answer, read_qa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = ("The glacier moved slowly. Zoë paid 12,50 € for the naïve café's tea; the violin was older than "
        "the river, and an old map showed the way north past the hills.")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT] * 20 + ["Who paid? What was older? Where did the map point?"] * 5,
                            vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                            show_progress=False)
    bpe.save_model(str(d))
    return longformer.load_tokenizer(str(d)), d


def test_squad_metric_hand_made_cases():
    assert normalize_answer("The  Violin!") == "violin" and normalize_answer("an old map") == "old map"
    assert exact_match("the violin", ["Violin."]) == 1.0
    assert exact_match("violin case", ["violin"]) == 0.0
    assert f1("violin case", ["violin"]) == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert f1("old map north", ["a map", "the old map showed"]) == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert exact_match("map", ["the river", "a map"]) == 1.0  # any gold answer counts
    assert exact_match("", ["violin"]) == 0.0 and f1("", ["violin"]) == 0.0  # an empty prediction
    assert exact_match("", []) == 1.0 and f1("anything", []) == 0.0  # no answer: only the empty one is right
    assert f1("a , the", ["the"]) == 1.0  # both normalise to nothing


def test_answers_map_to_tokens_and_back_across_windows(tok):
    """Contexts of 1, 2 and many windows; answers that a window boundary cuts are found whole in a neighbour;
    predictions map back to the right characters (non-ASCII included)."""
    tokenizer, _ = tok
    window_counts, cut = set(), 0
    for answer in ("naïve café", "violin", "12,50 €", "north past the hills"):
        ex = QAExample("q", "Who paid?", TEXT, [(TEXT.index(answer), answer)])
        for max_length in range(14, 72, 3):
            task = SpanTask(tokenizer, max_length, overlap=6, max_answer_tokens=12)
            (enc,), _ = task.encode([ex])
            first, last = task.answer_tokens(enc)
            rows, windows = task.training_examples([enc]), list(task.windows(enc))
            window_counts.add(len(windows))
            cut += sum(s <= first < e <= last or s <= last < e and first < s for _, _, (s, e) in windows)
            assert any(r["start"] > 0 for r in rows), (answer, max_length)  # some window holds all of it
            batch = task.collate_eval([enc])
            # logits that point at each window's answer (or nowhere): the best span is the answer's text
            start, end = torch.full(batch["input_ids"].shape, -5.0), torch.full(batch["input_ids"].shape, -5.0)
            for w, r in enumerate(rows):
                if r["start"] > 0:
                    start[w, r["start"]], end[w, r["end"]] = 5.0, 5.0
            assert task.best_spans(start, end, batch) == [answer]
    assert {1, 2} <= window_counts and max(window_counts) >= 4
    assert cut > 0  # some windows did cut an answer


def test_reading_squad_json_and_jsonl_and_bad_input(tmp_path, tok):
    squad = {"data": [{"title": "t", "paragraphs": [{"context": TEXT, "qas": [
        {"id": "a", "question": "Who paid?", "answers": [{"text": "Zoë", "answer_start": TEXT.index("Zoë")}]},
        {"id": "b", "question": "What was older?", "answers": [{"text": "violin", "answer_start": TEXT.index("violin") + 3}]},
        {"id": "c", "question": "Where?", "answers": [{"text": "south", "answer_start": 5}]}]}]}]}
    (tmp_path / "s.json").write_text(json.dumps(squad))
    examples, skipped = read_qa(str(tmp_path / "s.json"))
    assert [e.id for e in examples] == ["a", "b", "c"]
    assert examples[1].answers == [(TEXT.index("violin"), "violin")]  # an offset a few characters off is found
    assert examples[2].answers == [] and skipped == {"answers whose offsets do not match their text": 1}
    with open(tmp_path / "s.jsonl", "w") as f:
        f.write(json.dumps({"id": "a", "question": "Who paid?", "context": TEXT,
                            "answers": {"text": ["Zoë"], "answer_start": [TEXT.index("Zoë")]}}) + "\n")
        f.write(json.dumps({"id": "b", "context": TEXT}) + "\n")
    with pytest.raises(SystemExit, match="s.jsonl:2: no 'question' field"):
        read_qa(str(tmp_path / "s.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"id": "a", "question": "Who?"\n')
    with pytest.raises(SystemExit, match="broken.jsonl:1: not valid JSON"):
        read_qa(str(tmp_path / "broken.jsonl"))
    (tmp_path / "bad.json").write_text(json.dumps({"version": 1}))
    with pytest.raises(SystemExit, match="not SQuAD's format"):
        read_qa(str(tmp_path / "bad.json"))
    tokenizer, _ = tok
    long_question = QAExample("long", " ".join(["Who paid?"] * 20), TEXT, [])
    kept, skipped = SpanTask(tokenizer, 24, 4).encode([long_question, examples[0]])
    assert [k[0].id for k in kept] == ["a"] and sum(skipped.values()) == 1
    assert "questions longer than --max-length 24" in next(iter(skipped))


def test_train_cls_qa_end_to_end_and_hf_loads(tmp_path, tok):
    """A tiny QA fine-tune from a checkpoint: predictions.json for the validation questions, a checkpoint HF loads."""
    tokenizer, tok_dir = tok
    config = longformer.LongformerConfig(vocab_size=400, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, attention_window=8, max_position_embeddings=66)
    torch.manual_seed(0)
    longformer.LongformerModel(config).save_pretrained(str(tmp_path / "base"))
    for f in os.listdir(tok_dir):
        os.link(os.path.join(tok_dir, f), tmp_path / "base" / f)
    rng = np.random.default_rng(0)
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(24):
            answer = str(rng.choice(["violin", "glacier", "river", "map"]))
            f.write(json.dumps({"id": f"q{i}", "question": "What was older?", "context": TEXT,
                                "answers": [{"text": answer, "answer_start": TEXT.index(answer)}]}) + "\n")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train_cls.py"), "--device", DEVICE.type, "--task", "qa",
                           "--init", str(tmp_path / "base"), "--data", str(tmp_path / "train.jsonl"), "--max-length", "24",
                           "--overlap", "4", "--batch-size", "4", "--max-steps", "3", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "exact_match" in done.stdout
    predictions = json.load(open(tmp_path / "run" / "predictions.json"))
    held_out = int(done.stdout.split(" validation questions")[0].split()[-1])
    assert held_out >= 1 and len(predictions) == held_out and all(isinstance(v, str) for v in predictions.values())
    from conftest import transformers
    hf = transformers.LongformerForQuestionAnswering.from_pretrained(str(tmp_path / "run")).eval()
    ours = longformer.LongformerForQuestionAnswering.from_pretrained(str(tmp_path / "run")).eval()
    ids = torch.tensor([[0, 5, 6, 2, 2, 7, 8, 9, 2]])
    torch.testing.assert_close(ours(ids).start_logits, hf(ids).start_logits, atol=1e-5, rtol=0)
