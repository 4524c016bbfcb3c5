"""Memory and throughput of prepare_data and of training on its shards, against the size of the corpus.

    python benchmarks/corpus_scale.py [--sizes-gb 0.5 2] [--workers 1 2] [--dir /tmp/corpus-scale]
                                      [--out benchmarks/results-corpus-scale.json]

For each size: a generated corpus (blank-line separated documents of words drawn from the demo's text,
lengths log-normal around 3,000 characters) is tokenized with the demo tokenizer by
`python -m longformer.prepare_data` with each --workers count; peak memory is sampled every 0.1 s over the
whole process tree (workers included). Then `train_mlm.py --data SHARDS` trains the demo model for
--train-steps steps of 8 x 1,024 tokens with documents packing, and its peak memory is recorded. Memory is
the proportional set size (PSS: resident pages, those shared between processes split between them), all
of it and its anonymous part (the processes' own memory, without the pages of memory-mapped files).
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from longformer import demo  # noqa: E402


def tree_memory(pid: int) -> tuple[int, int]:
    """(all, anonymous) proportional set size of pid and all its descendants, in bytes: resident pages, those
    shared between processes split between them (forked workers share most of theirs with the parent, which
    RSS would count twice). Anonymous pages are the processes' own memory; the rest are files' pages, such as
    the memory-mapped shards (page cache, which the kernel reclaims under pressure)."""
    children, pss = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
                rollup = open(f"/proc/{entry}/smaps_rollup").read()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            pss[int(entry)] = [int(m.group(1)) * 1024 if m else 0 for m in
                               (re.search(rf"^{key}:\s+(\d+) kB", rollup, re.M) for key in ("Pss", "Pss_Anon"))]
    total, anon, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        total, anon = total + pss.get(p, [0, 0])[0], anon + pss.get(p, [0, 0])[1]
        todo += children.get(p, [])
    return total, anon


def run_sampled(cmd: list[str]) -> tuple[float, dict, str]:
    """(seconds, peak memory of the process tree in MB {"pss", "anon"}, output) of a command."""
    start, peak = time.time(), {"pss": 0, "anon": 0}
    with open(os.devnull, "w") as devnull:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=devnull, text=True)
        while proc.poll() is None:
            total, anon = tree_memory(proc.pid)
            peak = {"pss": max(peak["pss"], round(total / 2**20)), "anon": max(peak["anon"], round(anon / 2**20))}
            time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-2000:]}")
    return time.time() - start, peak, out


def make_corpus(path: str, size_bytes: int, seed: int = 0):
    """Documents of demo words (log-normal lengths, mean about 3,000 characters), written in chunks."""
    words = np.array(" ".join(demo.corpus()).split())
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "w") as f:
        while written < size_bytes:
            lengths = np.clip(rng.lognormal(np.log(450), 0.8, size=1000).astype(int), 5, 20000)
            drawn = words[rng.integers(0, len(words), size=int(lengths.sum()))]
            docs = [" ".join(d) for d in np.split(drawn, np.cumsum(lengths)[:-1])]
            chunk = "\n\n".join(docs) + "\n\n"
            f.write(chunk)
            written += len(chunk.encode())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 2.0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--train-steps", type=int, default=50)
    p.add_argument("--dir", default="/tmp/corpus-scale")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results-corpus-scale.json"))
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    cache = os.path.join(args.dir, "cache")
    tokenizer = demo.demo_tokenizer(demo.corpus(), cache)
    config_dir = os.path.join(args.dir, "config")
    demo.demo_config(2048, 1024).save_pretrained(config_dir)
    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "rows": []}
    for size in args.sizes_gb:
        corpus = os.path.join(args.dir, f"corpus-{size}gb.txt")
        make_corpus(corpus, int(size * 1e9))
        for workers in args.workers:
            shards = os.path.join(args.dir, f"shards-{size}gb-{workers}")
            shutil.rmtree(shards, ignore_errors=True)
            seconds, peak, out = run_sampled([sys.executable, "-m", "longformer.prepare_data", corpus, shards,
                                              "--tokenizer", tokenizer, "--workers", str(workers)])
            manifest = json.load(open(os.path.join(shards, "manifest.json")))
            tokens = manifest["train"]["tokens"] + manifest["val"]["tokens"]
            row = {"step": "prepare_data", "corpus_gb": size, "workers": workers, "seconds": round(seconds, 1),
                   "peak_pss_mb": peak["pss"], "peak_anon_mb": peak["anon"], "tokens": tokens,
                   "tokens_per_s": round(tokens / seconds),
                   "mb_text_per_s": round(os.path.getsize(corpus) / 1e6 / seconds, 2)}
            print(row, flush=True)
            results["rows"].append(row)
        run_dir = os.path.join(args.dir, f"run-{size}gb")
        shutil.rmtree(run_dir, ignore_errors=True)
        seconds, peak, out = run_sampled([
            sys.executable, "train_mlm.py", "--data", shards, "--config", config_dir, "--seq-len", "1024",
            "--batch-size", "8", "--max-steps", str(args.train_steps), "--max-val-blocks", "64", "--log-every", "10",
            "--out", run_dir, "--cache-dir", cache])
        blocks = int(re.search(r"-> ([\d,]+) blocks", out).group(1).replace(",", ""))
        row = {"step": "train_mlm", "corpus_gb": size, "train_steps": args.train_steps, "blocks": blocks,
               "seconds": round(seconds, 1), "peak_pss_mb": peak["pss"], "peak_anon_mb": peak["anon"]}
        print(row, flush=True)
        results["rows"].append(row)
        for workers in args.workers:
            shutil.rmtree(os.path.join(args.dir, f"shards-{size}gb-{workers}"), ignore_errors=True)
        os.remove(corpus)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
