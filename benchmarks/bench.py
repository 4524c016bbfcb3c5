"""This project against HF transformers, same machine, same run: forward and masked-LM training step.

    python benchmarks/bench.py                      # CPU: 1024/4096/16384 tokens, fp32 and bf16
    python benchmarks/bench.py --device cuda        # the same table on a GPU
    python benchmarks/bench.py --flagperf           # + FlagPerf's setting: batch 16 x 1024, fp32 training

Base config (12 layers, 768 wide, window 512), batch 1, global attention on the first token; forward is the
encoder (LongformerModel), a training step is LongformerForMaskedLM's forward + backward with 15% of the
tokens predicted (ours computes the vocabulary logits only there, HF everywhere). Each
(implementation, length, dtype, mode) runs in a fresh worker process, HF first and ours right after, so the
peak memory is that process's alone (CPU: peak RSS, weights included; CUDA: peak allocated). Timings are
medians of --repeats runs after one warm-up. Writes a JSON file of all rows and prints a table.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            type_vocab_size=1, layer_norm_eps=1e-5, attention_window=512, pad_token_id=1)


def model_flops(L, batch, mode, masked_fraction=0.15, c=BASE):
    """Useful FLOPs of one step (same count for both implementations): linears, the band, the MLM head."""
    C, I, V, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    w = c["attention_window"] // 2
    per_layer = 2 * L * (4 * C * C + 2 * C * I) + 4 * L * min(2 * w + 1, L) * C
    fwd = batch * n * per_layer
    if mode == "forward":
        return fwd
    head = 2 * int(masked_fraction * L) * batch * C * (C + V)
    return 3 * (fwd + head)


def matmul_speed(device, dtype):
    """The machine's measured speed for a model-shaped matmul (4096 x 768 @ 768 x 3072), FLOP/s."""
    a = torch.randn(4096, 768, device=device, dtype=dtype)
    w = torch.randn(3072, 768, device=device, dtype=dtype)
    for _ in range(3):
        F.linear(a, w)
    sync(device)
    t, reps = time.perf_counter(), 10
    for _ in range(reps):
        F.linear(a, w)
    sync(device)
    return 2 * 4096 * 768 * 3072 * reps / (time.perf_counter() - t)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def worker(impl, L, batch, dtype, mode, repeats, device):
    """One configuration in this process; prints a JSON line with its timings and peak memory."""
    torch.manual_seed(0)
    if impl == "hf":
        import transformers
        transformers.logging.set_verbosity_error()
        cfg = transformers.LongformerConfig(**BASE, max_position_embeddings=L + 2)
        model = (transformers.LongformerForMaskedLM(cfg) if mode == "train"
                 else transformers.LongformerModel(cfg, add_pooling_layer=False))
    else:  # "ours", or "ours+ckpt": with gradient checkpointing
        import longformer
        cfg = longformer.LongformerConfig(**BASE, max_position_embeddings=L + 2,
                                          gradient_checkpointing=impl == "ours+ckpt")
        model = (longformer.LongformerForMaskedLM(cfg) if mode == "train"
                 else longformer.LongformerModel(cfg, add_pooling_layer=False))
    model.to(device).train(mode == "train")
    ids = torch.randint(3, 50000, (batch, L), device=device)
    gm = torch.zeros_like(ids)
    gm[:, 0] = 1
    labels = torch.full_like(ids, -100)
    picked = torch.rand(ids.shape, device=device) < 0.15
    labels[picked] = ids[picked]
    autocast = torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32),
                              enabled=dtype != "fp32")

    def step():
        if mode == "forward":
            with torch.no_grad(), autocast:
                model(ids, global_attention_mask=gm)
        else:
            extra = {} if impl == "hf" else {"logits_at_labels_only": True}
            with autocast:
                loss = model(ids, global_attention_mask=gm, labels=labels, **extra).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        sync(device)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"times": times[1:], "peak_bytes": peak}))


def run_worker(impl, L, batch, dtype, mode, repeats, device):
    cmd = [sys.executable, __file__, "--worker", impl, str(L), str(batch), dtype, mode, str(repeats), device]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        reason = "out of memory" if done.returncode in (-9, 137) or "out of memory" in done.stderr else \
            done.stderr.strip().splitlines()[-1][:120]
        return {"error": reason}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["median_s"] = statistics.median(result["times"])
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", default=["forward", "train"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impls", nargs="+", default=["hf", "ours", "ours+ckpt"],
                   help="ours+ckpt (gradient checkpointing) runs for training steps only")
    p.add_argument("--hf-max-train-length", type=int, default=None,
                   help="skip HF training above this length (CPU default 4096: HF needs ~4x its 4096 memory)")
    p.add_argument("--flagperf", action="store_true", help="add FlagPerf's setting: batch 16 x 1024 tokens, fp32")
    p.add_argument("--out", default="benchmarks/results.json")
    p.add_argument("--plot", metavar="RESULTS_JSON", nargs="+",
                   help="only draw these results files' rows, together, to a PNG beside the first")
    p.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, L, batch, dtype, mode, repeats, device = args.worker
        return worker(impl, int(L), int(batch), dtype, mode, int(repeats), device)
    if args.plot:
        return print(f"wrote {plot(*args.plot)}")

    hf_max_train = args.hf_max_train_length or (4096 if args.device == "cpu" else 1 << 30)
    speed = {d: matmul_speed(args.device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[d])
             for d in args.dtypes}
    configs = [(L, 1, d, m) for m in args.modes for d in args.dtypes for L in args.lengths]
    if args.flagperf:
        configs.append((1024, 16, "fp32", "train"))
    import transformers
    meta = {"device": args.device, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "torch": torch.__version__,
            "transformers": transformers.__version__, "matmul_tflops": {d: s / 1e12 for d, s in speed.items()},
            "cpu_model": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                               if line.startswith("model name")), None) if os.path.exists("/proc/cpuinfo") else None}
    rows = []
    print(f"# {meta}")
    header = f"{'mode':8} {'dtype':5} {'batch x L':>10} {'variant':>9} | {'HF s':>7} {'ours s':>7} {'speed-up':>8} | " \
             f"{'HF GB':>6} {'ours GB':>7} {'mem':>5} | {'ours tok/s':>10} {'HF MFU':>6} {'our MFU':>7}"
    print(header)
    for L, batch, dtype, mode in configs:
        row = {"length": L, "batch": batch, "dtype": dtype, "mode": mode}
        for impl in args.impls:
            if impl == "ours+ckpt" and mode != "train":
                continue
            if impl == "hf" and mode == "train" and L > hf_max_train:
                row[impl] = {"error": f"not run: over --hf-max-train-length {hf_max_train}"}
                continue
            row[impl] = run_worker(impl, L, batch, dtype, mode, args.repeats, args.device)
            if "median_s" in row[impl]:
                row[impl]["mfu"] = model_flops(L, batch, mode) / row[impl]["median_s"] / speed[dtype]
        rows.append(row)
        with open(args.out, "w") as f:  # after every row, so that an interrupted run keeps what it measured
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        for name in args.impls:
            if name != "hf" and name in row:
                print(table_line(row, name), flush=True)
    try:
        print(f"wrote {plot(args.out)}")
    except ImportError:
        print("(pip install matplotlib for a plot of these results)")


def table_line(row, name):
    """One printed row: HF against one of our variants."""
    hf, ours, L, batch = row.get("hf", {}), row[name], row["length"], row["batch"]
    fmt = lambda r, k, f: f(r[k]) if k in r else "-"  # noqa: E731
    gb = lambda b: f"{b / 2**30:.1f}"  # noqa: E731
    ratio = f"{hf['median_s'] / ours['median_s']:.2f}x" if "median_s" in hf and "median_s" in ours else "-"
    mem = f"{ours['peak_bytes'] / hf['peak_bytes']:.2f}" if "peak_bytes" in hf and "peak_bytes" in ours else "-"
    return (f"{row['mode']:8} {row['dtype']:5} {f'{batch}x{L}':>10} {name:>9} | {fmt(hf, 'median_s', '{:.2f}'.format):>7} "
            f"{fmt(ours, 'median_s', '{:.2f}'.format):>7} {ratio:>8} | {fmt(hf, 'peak_bytes', gb):>6} "
            f"{fmt(ours, 'peak_bytes', gb):>7} {mem:>5} | {fmt(ours, 'median_s', lambda s: f'{batch * L / s:.0f}'):>10} "
            f"{fmt(hf, 'mfu', '{:.0%}'.format):>6} {fmt(ours, 'mfu', '{:.0%}'.format):>7}"
            + (f"   HF: {hf['error']}" if "error" in hf else "") + (f"   ours: {ours['error']}" if "error" in ours else ""))


def plot(*results_json: str) -> str:
    """Time per token and peak memory against length, HF and ours, per mode and dtype."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = []
    for path in results_json:
        with open(path) as f:
            data = json.load(f)
        rows += [r for r in data["rows"] if r["batch"] == 1]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode, style in (("forward", "-"), ("train", "--")):
        for dtype, marker in (("fp32", "o"), ("bf16", "s")):
            for impl, color in (("hf", "tab:red"), ("ours", "tab:blue"), ("ours+ckpt", "tab:green")):
                pts = sorted(((r["length"], r[impl]) for r in rows if r["mode"] == mode and r["dtype"] == dtype
                              and "median_s" in r.get(impl, {})), key=lambda p: p[0])
                if not pts:
                    continue
                label = f"{'HF' if impl == 'hf' else impl} {mode} {dtype}"
                ax_t.plot([L for L, _ in pts], [1e3 * v["median_s"] / L for L, v in pts], style, marker=marker,
                          color=color, label=label)
                ax_m.plot([L for L, _ in pts], [v["peak_bytes"] / 2**30 for _, v in pts], style, marker=marker,
                          color=color, label=label)
    for ax, ylabel in ((ax_t, "ms per token"), (ax_m, "peak memory (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens (batch 1)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_m.legend(fontsize=7, ncol=2)
    meta = data["meta"]
    fig.suptitle(f"longformer-base on {meta.get('gpu') or meta.get('cpu_model')} ({meta['device']}, "
                 f"{meta['threads']} threads), torch {meta['torch']}, transformers {meta['transformers']}")
    fig.tight_layout()
    out = os.path.splitext(results_json[0])[0] + ".png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    main()
