"""Token shards: streaming readers, the layout on disk, workers, resuming after SIGKILL, bad input, and the
blocks cut from them (documents / single / concat packing)."""
import filecmp
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
from tokenizers import ByteLevelBPETokenizer

import longformer
from longformer.prepare_data import iter_documents, prepare
from longformer.shards import TokenBlocks, pack_starts, read_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a long document model window token global attention reads writes learns sees each every".split()


def make_text(n_docs, seed=0, low=3, high=120):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(low, high)))) + "." for _ in range(n_docs)]


def train_tokenizer(directory, vocab_size=300, seed=0):
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(make_text(50, seed), vocab_size=vocab_size,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    os.makedirs(directory, exist_ok=True)
    tok.save_model(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def write_jsonl(path, docs):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return str(path)


def files_of(directory):
    return sorted(f for f in os.listdir(directory) if f != ".lock")


def same_files(a, b):
    assert files_of(a) == files_of(b)
    for f in files_of(a):
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f


def test_readers(tmp_path):
    stats = {"empty_documents": 0, "replaced_bytes": {}}
    (tmp_path / "wiki.txt").write_text(" = Title = \n\nFirst paragraph\nstill first.\n\n\n  \nSecond.\n")
    assert list(iter_documents(str(tmp_path / "wiki.txt"), "text", stats)) == [
        "= Title =", "First paragraph\nstill first.", "Second."]
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n{"text": "  "}\n{"text": null}\n')
    assert list(iter_documents(str(tmp_path / "d.jsonl"), "text", stats)) == ["one", "two"]
    assert stats["empty_documents"] == 2
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "one"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: no 'text' field \(found: body\)"):
        list(iter_documents(str(tmp_path / "bad.jsonl"), "text", stats))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(SystemExit, match="broken.jsonl:2: not JSON"):
        list(iter_documents(str(tmp_path / "broken.jsonl"), "text", stats))
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "b.txt").write_text("bee")
    (tmp_path / "folder" / "sub" / "a.txt").write_bytes(b"ay \xff\xfe ay")  # not UTF-8
    (tmp_path / "folder" / "empty.txt").write_text("\n")
    stats = {"empty_documents": 0, "replaced_bytes": {}}
    assert list(iter_documents(str(tmp_path / "folder"), "text", stats)) == ["bee", "ay \ufffd\ufffd ay"]
    assert stats == {"empty_documents": 1, "replaced_bytes": {str(tmp_path / "folder" / "sub" / "a.txt"): 2}}
    (tmp_path / "nofiles").mkdir()
    with pytest.raises(SystemExit, match="without .txt files"):
        list(iter_documents(str(tmp_path / "nofiles"), "text", stats))


def test_parquet(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    docs = make_text(30)
    pq.write_table(pa.table({"body": docs + [""], "n": list(range(31))}), tmp_path / "d.parquet")
    stats = {"empty_documents": 0, "replaced_bytes": {}}
    assert list(iter_documents(str(tmp_path / "d.parquet"), "body", stats)) == docs
    assert stats["empty_documents"] == 1
    with pytest.raises(SystemExit, match="no column 'text' .*body, n"):
        list(iter_documents(str(tmp_path / "d.parquet"), "text", stats))
    manifest = prepare(str(tmp_path / "d.parquet"), str(tmp_path / "out"), tok, text_field="body", progress=False)
    assert manifest["train"]["documents"] + manifest["val"]["documents"] == 30 and manifest["empty_documents"] == 1


def test_layout_holds_every_document_once(tmp_path, tok):
    docs = make_text(300)
    source = write_jsonl(tmp_path / "d.jsonl", docs + [""])
    manifest = prepare(source, str(tmp_path / "out"), tok, val_fraction=0.1, shard_chars=5000, progress=False)
    out = str(tmp_path / "out")
    assert len(manifest["shards"]) > 5 and manifest["dtype"] == "uint16" and manifest["empty_documents"] == 1
    assert manifest == read_manifest(out, manifest["tokenizer"]["sha256"])
    tokenizer = longformer.load_tokenizer(tok)
    expected = [tokenizer.encode(d).ids for d in docs]
    found = {"train": [], "val": []}
    for shard in manifest["shards"]:
        for split in found:
            tokens = np.load(os.path.join(out, f"{shard['name']}-{split}-tokens.npy"))
            offsets = np.load(os.path.join(out, f"{shard['name']}-{split}-offsets.npy"))
            assert tokens.dtype == np.uint16 and offsets[0] == 0 and offsets[-1] == len(tokens)
            found[split] += [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    assert sorted(found["train"] + found["val"]) == sorted(expected)  # every document once, whole
    assert 0.08 < len(found["val"]) / len(docs) < 0.12
    assert manifest["train"]["tokens"] == sum(map(len, found["train"]))
    # The same command again: nothing to do, the same files.
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in files_of(out)}
    assert prepare(source, out, tok, val_fraction=0.1, shard_chars=5000, progress=False) == manifest
    assert before == {f: os.path.getmtime(os.path.join(out, f)) for f in files_of(out)}


def test_two_workers_write_the_same_bytes_as_one(tmp_path, tok):
    source = write_jsonl(tmp_path / "d.jsonl", make_text(400))
    for n in (1, 2):
        prepare(source, str(tmp_path / f"w{n}"), tok, workers=n, shard_chars=4000, progress=False)
    same_files(tmp_path / "w1", tmp_path / "w2")


def test_killed_run_then_the_same_command_gives_the_same_shards(tmp_path, tok):
    source = write_jsonl(tmp_path / "d.jsonl", make_text(3000, high=60))
    cmd = [sys.executable, "-m", "longformer.prepare_data", source, None, "--tokenizer", tok, "--workers", "2",
           "--shard-chars", "2000"]
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    subprocess.run(cmd[:4] + [whole] + cmd[5:], check=True, cwd=ROOT, capture_output=True)
    n_shards = len(json.load(open(os.path.join(whole, "manifest.json")))["shards"])
    rng = random.Random(0)
    for attempt in range(3):  # killed at a random shard, three times over, then finished
        proc = subprocess.Popen(cmd[:4] + [killed] + cmd[5:], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        target = os.path.join(killed, f"shard-{rng.randrange(n_shards // 2):05d}.json")
        while not os.path.exists(target) and proc.poll() is None:
            time.sleep(0.001)
        time.sleep(rng.random() * 0.02)
        proc.kill()
        proc.wait()
        assert not os.path.exists(os.path.join(killed, "manifest.json")), "finished before the kill"
    subprocess.run(cmd[:4] + [killed] + cmd[5:], check=True, cwd=ROOT, capture_output=True)
    same_files(whole, killed)


def test_bad_input_and_mismatched_shards(tmp_path, tok):
    source = write_jsonl(tmp_path / "d.jsonl", make_text(100))
    out = str(tmp_path / "out")
    manifest = prepare(source, out, tok, progress=False)
    with pytest.raises(SystemExit, match="other settings .*--overwrite"):
        prepare(source, out, tok, seed=5, progress=False)
    other_tok = train_tokenizer(tmp_path / "tok2", vocab_size=280, seed=1)
    sha = prepare(source, str(tmp_path / "o2"), other_tok, progress=False)["tokenizer"]["sha256"]
    with pytest.raises(SystemExit, match="another tokenizer .*prepare the data again"):
        read_manifest(out, sha)
    shard = os.path.join(out, "shard-00000-train-tokens.npy")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    with pytest.raises(SystemExit, match="shard-00000-train-tokens.npy is .* bytes, but the manifest says"):
        read_manifest(out)
    assert prepare(source, out, tok, progress=False, overwrite=True) == manifest  # rebuilt, identical
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not token shards .*notes.txt"):
        prepare(source, str(tmp_path / "mine"), tok, progress=False)
    write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(SystemExit, match="holds no text .*2 empty"):
        prepare(str(tmp_path / "empty.jsonl"), str(tmp_path / "e"), tok, progress=False)
    with pytest.raises(SystemExit, match="no manifest.json"):
        read_manifest(str(tmp_path / "e"))


def test_full_disk_is_named_and_the_same_command_finishes(tmp_path, tok, monkeypatch):
    from longformer import prepare_data
    source = write_jsonl(tmp_path / "d.jsonl", make_text(300))
    prepare(source, str(tmp_path / "whole"), tok, shard_chars=3000, progress=False)
    calls = []

    def full_after_some(path, array, save=prepare_data._save_npy):
        calls.append(path)
        if len(calls) > 9:
            raise OSError(28, "No space left on device")
        save(path, array)
    monkeypatch.setattr(prepare_data, "_save_npy", full_after_some)
    with pytest.raises(SystemExit, match="writing shard-00002 to .* failed: No space left on device.*continues from"):
        prepare(source, str(tmp_path / "out"), tok, shard_chars=3000, progress=False)
    monkeypatch.undo()
    prepare(source, str(tmp_path / "out"), tok, shard_chars=3000, progress=False)
    same_files(tmp_path / "whole", tmp_path / "out")


def test_pack_starts():
    # block of 10: [3, 4] fill 7; 5 does not fit -> new block; 12 is long -> two blocks (10 + 2); 6 joins the 2
    assert pack_starts(np.array([3, 4, 5, 12, 6]), 10, single=False).tolist() == [0, 7, 12, 22]
    assert pack_starts(np.array([3, 4, 5, 12, 6]), 10, single=True).tolist() == [0, 3, 7, 12, 22, 24]


@pytest.mark.parametrize("packing", ["documents", "single", "concat"])
def test_blocks(tmp_path, tok, packing):
    docs = make_text(200, high=40)
    out = str(tmp_path / "out")
    prepare(write_jsonl(tmp_path / "d.jsonl", docs), out, tok, val_fraction=0.0, shard_chars=1500, progress=False)
    L = 48
    blocks = TokenBlocks(out, "train", L, packing)
    tokenizer = longformer.load_tokenizer(tok)
    encoded = [tokenizer.encode(d).ids for d in docs]
    stream = [i for e in encoded for i in e]
    seen, pieces = [], []
    for i in range(len(blocks)):
        b = blocks[i]
        n = int(b["attention_mask"].sum())
        ids = b["input_ids"][:n].tolist()
        assert b["attention_mask"][:n].all() and (b["input_ids"][n:] == 1).all()
        assert ((b["special_tokens_mask"] == 1) == np.isin(b["input_ids"], [0, 1, 2])).all()
        seen += ids
        if packing == "documents":
            doc = b["document_ids"]
            assert doc[0] == 0 and (np.diff(doc) >= 0).all() and (n == L or doc[n] == doc[n - 1] + 1)
            pieces += [ids[a:e] for a, e in zip(*_runs(doc[:n]))]
        elif packing == "single":
            pieces.append(ids)
    if packing == "concat":
        assert len(blocks) == len(stream) // L and seen == stream[:len(blocks) * L]
        return
    assert seen == stream  # every token once, in order
    # Every piece is a whole document, or a document cut only at block ends (those longer than L, or, with
    # documents packing, ones that met a full block: never one that would have fitted).
    joined, k = [], 0
    for p in pieces:
        if joined and joined[-1] != encoded[k - 1]:
            joined[-1] = joined[-1] + p
        else:
            joined.append(p)
            k += 1
    assert joined == encoded
    assert all(len(p) == L for p, q in zip(pieces, pieces[1:]) if p[-1] != 2)  # a cut only where a block is full


def _runs(doc):
    change = np.flatnonzero(np.diff(doc)) + 1
    return np.concatenate([[0], change]), np.concatenate([change, [len(doc)]])
