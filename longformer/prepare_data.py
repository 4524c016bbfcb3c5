"""Tokenize a corpus once, into token shards that training reads memory-mapped.

    python -m longformer.prepare_data SRC OUT --tokenizer DIR [--workers N] [--val-fraction F] [--seed S]

SRC: a folder of .txt files (one document each), a .jsonl (one document per line, in --text-field), a
.parquet (a text column; needs pyarrow), or a text file whose documents are separated by blank lines.
Memory does not depend on the corpus: documents are read as a stream, tokenized shard by shard (about
--shard-chars characters of text each) in N worker processes, and written as

    OUT/shard-00000-train-tokens.npy   every training document's <s> ... </s> ids, one flat uint16 array
                                       (uint32 when the vocabulary has more than 65,536 ids)
    OUT/shard-00000-train-offsets.npy  int64 [documents + 1]: where each document starts, then the end
    OUT/shard-00000-val-*.npy          the same for the documents held out for validation (whole documents)
    OUT/shard-00000.json               the shard's record, written last: a shard without one is incomplete
    OUT/manifest.json                  written when every shard is: settings, tokenizer hash, counts, sizes

Every file is written under a temporary name and renamed, so a killed run never leaves a file that looks
complete. Running the same command again keeps the finished shards and does the rest; the result is the same
bytes as an uninterrupted run (documents, their split and their order depend only on the input and --seed).
Undecodable bytes are replaced by U+FFFD and counted per file; empty documents are skipped and counted.
"""
import argparse
import codecs
import fcntl
import glob
import hashlib
import json
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from .files import atomic_write, atomic_write_text
from .tokenizer import load_tokenizer

FORMAT = "longformer-token-shards/1"
SHARD_CHARS = 64_000_000  # characters of text per shard: its tokens are held in memory while it is written
BATCH_CHARS = 1_000_000   # characters per task sent to a worker


# -- reading documents as a stream -----------------------------------------------------------------

_replaced = Counter()  # undecodable bytes seen by the "longformer-count" error handler, per file being read


def _count_and_replace(error: UnicodeDecodeError):
    _replaced["current"] += error.end - error.start
    return "\ufffd", error.end


codecs.register_error("longformer-count", _count_and_replace)


def _open_text(path: str):
    return open(path, encoding="utf-8", errors="longformer-count")


def source_files(path: str) -> list[str]:
    """The files a source is read from, in reading order."""
    if not os.path.exists(path):
        raise SystemExit(f"{path!r} does not exist")
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
        if not files:
            raise SystemExit(f"{path!r} is a folder without .txt files (one document per file expected)")
        return files
    return [path]


def iter_documents(path: str, text_field: str, stats: dict) -> Iterator[str]:
    """The non-empty documents of a source, stripped, in order. stats gets "empty_documents" and
    "replaced_bytes" ({file: undecodable bytes replaced by U+FFFD})."""
    for file in source_files(path):
        _replaced.clear()
        for doc in _file_documents(file, text_field, whole=os.path.isdir(path)):
            doc = doc.strip()
            if doc:
                yield doc
            else:
                stats["empty_documents"] += 1
        if _replaced["current"]:
            stats["replaced_bytes"][file] = _replaced["current"]


def _file_documents(path: str, text_field: str, whole: bool) -> Iterator[str]:
    if whole:  # a file of a folder: one document
        with _open_text(path) as f:
            yield f.read()
    elif path.endswith(".jsonl"):
        with _open_text(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield _jsonl_text(line, text_field, f"{path}:{n}")
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit(f"{path}: reading .parquet needs pyarrow: pip install 'longformer[parquet]'")
        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise SystemExit(f"{path}: no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)}); "
                             f"set --text-field")
        for batch in table.iter_batches(columns=[text_field], batch_size=1024):
            yield from (text or "" for text in batch.column(0).to_pylist())
    else:  # documents separated by blank lines (as wikitext), read line by line
        lines = []
        with _open_text(path) as f:
            for line in f:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines)
                    lines = []
        if lines:
            yield "".join(lines)


def _jsonl_text(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{where}: not JSON ({e.msg}); a .jsonl holds one JSON object per line")
    if not isinstance(record, dict) or text_field not in record:
        found = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise SystemExit(f"{where}: no {text_field!r} field (found: {found}); set --text-field")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise SystemExit(f"{where}: the {text_field!r} field is a {type(text).__name__}, not text")
    return text or ""


def source_fingerprint(path: str) -> list:
    """What identifies a source's content without reading it: its files' names, sizes and times."""
    return [[os.path.relpath(f, path) if os.path.isdir(path) else os.path.abspath(f), os.path.getsize(f),
             int(os.path.getmtime(f))] for f in source_files(path)]


# -- tokenizing --------------------------------------------------------------------------------------

_worker_tokenizer = None


def _start_worker(tokenizer_json: str):
    global _worker_tokenizer
    from tokenizers import Tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode(texts: list[str], tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    """texts -> (lengths [n] int64, all their ids concatenated, uint32): compact to send between processes."""
    encoded = [np.asarray(e.ids, dtype=np.uint32) for e in (tokenizer or _worker_tokenizer).encode_batch(texts)]
    return np.array([len(e) for e in encoded], dtype=np.int64), np.concatenate(encoded)


def _groups(docs: Iterable[str], chars_per_group: int) -> Iterator[list[str]]:
    """Consecutive documents, about chars_per_group characters a group (shards, and the batches sent to workers):
    the boundaries depend only on the text."""
    group, chars = [], 0
    for d in docs:
        group.append(d)
        chars += len(d)
        if chars >= chars_per_group:
            yield group
            group, chars = [], 0
    if group:
        yield group


# -- writing ---------------------------------------------------------------------------------------------

def _save_npy(path: str, array: np.ndarray):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    atomic_write(path, write)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def tokenizer_info(tokenizer) -> dict:
    return {"sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
            "vocab_size": tokenizer.get_vocab_size(),
            **{name: tokenizer.token_to_id(token) for name, token in
               (("bos_id", "<s>"), ("eos_id", "</s>"), ("pad_id", "<pad>"), ("mask_id", "<mask>"))}}


def _write_shard(out: str, name: str, docs_lengths: np.ndarray, ids: np.ndarray, val_fraction: float, seed: int,
                 index: int, dtype, settings_hash: str) -> dict:
    """Split the shard's documents (a seeded random val_fraction held out whole), write them, record them."""
    n = len(docs_lengths)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n >= 2:
        n_val = min(n - 1, max(1, n_val))
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng([seed, index]).permutation(n)[:n_val]] = True
    record = {"name": name, "settings_hash": settings_hash, "files": {}}
    for split, chosen in (("train", ~is_val), ("val", is_val)):
        tokens = ids[np.repeat(chosen, docs_lengths)].astype(dtype)
        offsets = np.concatenate([[0], np.cumsum(docs_lengths[chosen])]).astype(np.int64)
        for kind, array in (("tokens", tokens), ("offsets", offsets)):
            file = f"{name}-{split}-{kind}.npy"
            _save_npy(os.path.join(out, file), array)
            record["files"][file] = os.path.getsize(os.path.join(out, file))
        record[split] = {"documents": int(chosen.sum()), "tokens": len(tokens),
                         "largest_id": int(tokens.max(initial=0))}
    atomic_write_text(os.path.join(out, f"{name}.json"), json.dumps(record, indent=1))
    return record


def _finished_shard(out: str, name: str, settings_hash: str) -> dict | None:
    """The record of a shard an earlier run finished with the same settings, if its files are whole."""
    record = _read_json(os.path.join(out, f"{name}.json")) or {}
    whole = all(os.path.isfile(os.path.join(out, f)) and os.path.getsize(os.path.join(out, f)) == size
                for f, size in record.get("files", {}).items())
    return record if whole and record.get("settings_hash") == settings_hash else None


class _Lock:
    """An exclusive lock on OUT, released when the process ends however it ends: one writer at a time
    (the ranks of a training run all prepare the same cache; the first does it, the others then find it done)."""

    def __init__(self, out: str):
        os.makedirs(out, exist_ok=True)
        self.file = open(os.path.join(out, ".lock"), "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that is preparing {out}", flush=True)
            fcntl.flock(self.file, fcntl.LOCK_EX)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def _tokenize_shards(docs: Iterable[str], out: str, tokenizer, workers: int, dtype, val_fraction: float,
                     seed: int, shard_chars: int, settings_hash: str, progress: bool) -> list[dict]:
    """Tokenize and write every shard that an earlier run did not finish; returns all shards' records."""
    pool = (multiprocessing.get_context("fork").Pool(workers, _start_worker, (tokenizer.to_str(),))
            if workers > 1 else None)
    bar = tqdm(desc="tokenizing", unit=" docs", disable=not progress, mininterval=1)
    records, tokens, start = [], 0, time.time()
    try:
        for index, texts in enumerate(_groups(docs, shard_chars)):
            name = f"shard-{index:05d}"
            record = _finished_shard(out, name, settings_hash)
            if record is not None:  # finished by an earlier run
                bar.update(len(texts))
                records.append(record)
                continue
            batches = list(_groups(texts, BATCH_CHARS))
            results = pool.imap(_encode, batches) if pool else (_encode(b, tokenizer) for b in batches)
            lengths, ids = [], []
            for batch, (n, i) in zip(batches, results):
                lengths.append(n)
                ids.append(i)
                tokens += len(i)
                bar.update(len(batch))
                bar.set_postfix_str(f"{tokens / max(time.time() - start, 1e-9):,.0f} tokens/s", refresh=False)
            try:
                records.append(_write_shard(out, name, np.concatenate(lengths), np.concatenate(ids), val_fraction,
                                            seed, index, dtype, settings_hash))
            except OSError as e:
                raise SystemExit(f"writing {name} to {out} failed: {e.strerror or e}. Free some space (or choose "
                                 f"another OUT); the same command then continues from {name}")
    finally:
        bar.close()
        if pool:
            pool.terminate()
    return records


def _strip(texts: Iterable[str], stats: dict) -> Iterator[str]:
    for text in texts:
        if text.strip():
            yield text.strip()
        else:
            stats["empty_documents"] += 1


OURS = ("manifest.json", ".lock")


def _is_ours(name: str) -> bool:
    return name in OURS or name.startswith("shard-") or ".tmp" in name


def _check_out(out: str, settings_hash: str, overwrite: bool):
    """Refuse (or, with overwrite, clear) an OUT holding other files, or shards made with other settings; remove
    the partial files of a killed run."""
    names = [f for f in os.listdir(out) if f != ".lock"]
    foreign = [f for f in names if not _is_ours(f)]
    if foreign:
        raise SystemExit(f"{out} holds files that are not token shards ({', '.join(sorted(foreign)[:3])}): give an "
                         f"empty or new folder as OUT")
    records = [f for f in names if f == "manifest.json" or f.startswith("shard-") and f.endswith(".json")]
    other = [f for f in records if _settings_of(os.path.join(out, f)) != settings_hash]
    if other and not overwrite:
        raise SystemExit(f"{out} holds token shards made with other settings (another source, tokenizer, "
                         f"--val-fraction, --seed or --shard-chars; {other[0]}): give another OUT, or --overwrite "
                         f"to replace them")
    for f in names:
        if ".tmp" in f or other:
            os.remove(os.path.join(out, f))


def _settings_of(path: str) -> str | None:
    return (_read_json(path) or {}).get("settings_hash")


def _read_json(path: str) -> dict | None:
    try:
        return json.load(open(path))
    except (OSError, json.JSONDecodeError):
        return None


def prepare(source, out: str, tokenizer_dir: str, workers: int = 1, val_fraction: float = 0.01, seed: int = 0,
            text_field: str = "text", shard_chars: int = SHARD_CHARS, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Tokenize source (a path, or a sequence of texts) into token shards in out; returns the manifest.

    A finished out with the same settings is returned as it is; one with other settings is refused unless
    overwrite. workers > 1 tokenizes in that many processes; 1 tokenizes in this one (with the tokenizers
    library's own threads, unless TOKENIZERS_PARALLELISM=false)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    info = tokenizer_info(tokenizer)
    if isinstance(source, str):
        what = {"source": os.path.abspath(source), "files": source_fingerprint(source), "text_field": text_field}
    else:
        source = list(source)
        what = {"source": "texts", "sha256": _digest(source)}
    settings = {"format": FORMAT, **what, "tokenizer": info["sha256"], "val_fraction": val_fraction, "seed": seed,
                "shard_chars": shard_chars}
    settings_hash = _digest(settings)
    manifest_path = os.path.join(out, "manifest.json")
    with _Lock(out):
        if _settings_of(manifest_path) == settings_hash:
            return json.load(open(manifest_path))
        _check_out(out, settings_hash, overwrite)
        dtype = np.uint16 if info["vocab_size"] <= 1 << 16 else np.uint32
        stats = {"empty_documents": 0, "replaced_bytes": {}}
        docs = iter_documents(source, text_field, stats) if isinstance(source, str) else _strip(source, stats)
        shards = _tokenize_shards(docs, out, tokenizer, workers, dtype, val_fraction, seed, shard_chars,
                                  settings_hash, progress)
        if not shards:
            raise SystemExit(f"{what['source']!r} holds no text ({stats['empty_documents']} empty documents)")
        manifest = {"format": FORMAT, "settings": settings, "settings_hash": settings_hash, "tokenizer": info,
                    "dtype": np.dtype(dtype).name, "shards": shards,
                    **{split: {key: sum(s[split][key] for s in shards) for key in ("documents", "tokens")}
                       for split in ("train", "val")},
                    "empty_documents": stats["empty_documents"], "replaced_bytes": stats["replaced_bytes"]}
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return manifest


def prepare_cached(source, cache_dir: str, tokenizer_dir: str, val_fraction: float, seed: int,
                   text_field: str = "text") -> tuple[str, dict]:
    """(folder, manifest): source tokenized into a folder of cache_dir named for what it holds; made again
    (not refused) when the source files have changed since."""
    sha = tokenizer_info(load_tokenizer(tokenizer_dir))["sha256"]
    name = os.path.abspath(source) if isinstance(source, str) else _digest(list(source))
    out = os.path.join(cache_dir, f"tokens-{_digest([name, sha, val_fraction, seed, text_field])[:20]}")
    manifest = prepare(source, out, tokenizer_dir, 1, val_fraction, seed, text_field, overwrite=True)
    print(summary(manifest))
    return out, manifest


def summary(manifest: dict) -> str:
    """What a person wants to know after preparing: counts, and what was skipped or repaired."""
    lines = [f"{manifest['train']['documents']:,} training documents ({manifest['train']['tokens']:,} tokens), "
             f"{manifest['val']['documents']:,} validation documents ({manifest['val']['tokens']:,} tokens), "
             f"{len(manifest['shards'])} shard(s) of {manifest['dtype']}"]
    if manifest["empty_documents"]:
        lines.append(f"{manifest['empty_documents']:,} empty documents skipped")
    for file, n in list(manifest["replaced_bytes"].items())[:10]:
        lines.append(f"{file}: {n:,} undecodable bytes (not UTF-8) replaced by U+FFFD")
    if len(manifest["replaced_bytes"]) > 10:
        lines.append(f"... and {len(manifest['replaced_bytes']) - 10} more files with undecodable bytes "
                     f"(all listed in manifest.json)")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SRC")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (tokenizer.json, or vocab.json + merges.txt)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes (default: all cores)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for validation, per shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-field", default="text", help="the .jsonl field or .parquet column holding the text")
    p.add_argument("--shard-chars", type=int, default=SHARD_CHARS, help="characters of text per shard")
    p.add_argument("--overwrite", action="store_true", help="replace shards made with other settings")
    args = p.parse_args(argv)
    if args.workers < 1 or args.shard_chars < 1 or not 0 <= args.val_fraction < 1:
        p.error("--workers and --shard-chars must be >= 1, and --val-fraction in [0, 1)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one worker = one core
    start = time.time()
    manifest = prepare(args.source, args.out, args.tokenizer, args.workers, args.val_fraction, args.seed,
                       args.text_field, args.shard_chars, args.overwrite)
    print(summary(manifest))
    print(f"done in {time.time() - start:.0f} s: {args.out}")


if __name__ == "__main__":
    from .cli import run_command
    run_command(main)
