"""What packing saves on short documents: useful (real) tokens per second of masked-LM training, with whole
documents packed into each block (--packing documents) against one document per block, padded (single).

    python benchmarks/packing.py [--seq-len 512] [--steps 40] [--out benchmarks/results-packing.json]

The documents are the paragraphs of the demo corpus (Python's docstrings, blank-line separated), a few
dozen tokens each; the model is the demo's (4 layers, 128 wide, window 64). Both runs use train_mlm.py with
the same settings but --packing, in this process's machine, one after the other.
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from longformer import demo  # noqa: E402
from longformer.prepare_data import prepare  # noqa: E402
from longformer.shards import TokenBlocks  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results-packing.json"))
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="packing-")
    cache = os.path.join(work, "cache")
    tokenizer = demo.demo_tokenizer(demo.corpus(), cache)
    corpus = os.path.join(work, "paragraphs.txt")
    with open(corpus, "w") as f:
        f.write("\n\n".join(demo.corpus()))
    config = os.path.join(work, "config")
    demo.demo_config(2048, args.seq_len).save_pretrained(config)
    shards = os.path.join(work, "shards")
    manifest = prepare(corpus, shards, tokenizer, val_fraction=0.02, progress=False)
    lengths = np.concatenate([np.diff(np.load(os.path.join(shards, f"{s['name']}-train-offsets.npy")))
                              for s in manifest["shards"]])
    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
               "documents": len(lengths), "mean_tokens": float(lengths.mean()),
               "median_tokens": float(np.median(lengths)), "rows": []}
    for packing in ("documents", "single"):
        blocks = TokenBlocks(shards, "train", args.seq_len, packing, manifest)
        real = float((blocks.ends - blocks.starts).sum()) / (len(blocks) * args.seq_len)
        done = subprocess.run([
            sys.executable, "train_mlm.py", "--data", shards, "--config", config, "--seq-len", str(args.seq_len),
            "--packing", packing, "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
            "--max-val-blocks", "16", "--lr", "1e-3", "--out", os.path.join(work, f"run-{packing}"),
            "--cache-dir", cache], cwd=ROOT, capture_output=True, text=True, check=True)
        found = re.search(r"done: \d+ steps, ([\d.,]+) samples/s, ([\d,]+) tokens/s", done.stdout)
        row = {"packing": packing, "blocks": len(blocks), "real_token_fraction": round(real, 3),
               "samples_per_s": float(found.group(1).replace(",", "")),
               "useful_tokens_per_s": int(found.group(2).replace(",", ""))}
        print(row, flush=True)
        results["rows"].append(row)
    docs, single = results["rows"]
    results["speedup"] = round(docs["useful_tokens_per_s"] / single["useful_tokens_per_s"], 2)
    print(f"documents packing: {results['speedup']}x the useful tokens/s of one document per block")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
