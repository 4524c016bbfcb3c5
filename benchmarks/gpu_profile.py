"""Where our GPU training step spends its time, and what the choices left open cost (about 5 minutes on an H100):

    PYTHONPATH=. python benchmarks/gpu_profile.py --out gpu-profile/

Steps, each written to --out as it ends:
  profile   profile.txt: torch.profiler's table of the bf16 masked-LM training step at --length x --batch
            (global attention on <s>, dropout 0.1), ours (eager, compiled) and HF's, by GPU time; wall time against
            its summed kernel time says whether it waits on the GPU or on Python's launches
  backends  backends.json: our step and forward with each SDPA backend order (LONGFORMER_SDPA_BACKENDS)
  compile   compile.txt: torch.compile's graph breaks on a 2-layer model (no global tokens, global tokens
            with max_global_tokens, the MLM loss), and the compiled full model's step against eager
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

DEVICE = "cuda"


def timed(step):
    return bench.median_time(step, repeats=5, warmups=2)


def profile_step(args, impl):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    model = bench.build(impl, args.length, "train", bench.BASE, DEVICE).train()
    inputs = bench.make_inputs(args.length, args.batch, bench.BASE["vocab_size"], DEVICE)
    step = bench.make_step(model, impl, "train", inputs, "bf16", DEVICE)
    wall = timed(step)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
    events = prof.key_averages()
    # Kernels only: an operator's row also carries the time of the kernels it launched.
    kernel_s = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 2 / 1e6
    table = events.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70)
    del model
    torch.cuda.empty_cache()
    return (f"## {impl}: bf16 training step, {args.batch} x {args.length} tokens\n"
            f"wall {wall * 1e3:.1f} ms a step, kernels {kernel_s * 1e3:.1f} ms a step "
            f"({kernel_s / wall:.0%} of the wall time busy)\n\n{table}\n")


def check_profile(args):
    text = "".join(profile_step(args, impl) for impl in ("ours", "ours+compile", "hf"))
    with open(os.path.join(args.out, "profile.txt"), "w") as f:
        f.write(text)
    return "\n".join(line for line in text.splitlines() if line.startswith(("## ours", "## hf", "wall")))


def check_backends(args):
    rows, before = [], os.environ.get("LONGFORMER_SDPA_BACKENDS")
    for order in ("efficient,math", "cudnn,efficient,math"):
        os.environ["LONGFORMER_SDPA_BACKENDS"] = order
        for L, batch, mode in ((args.length, args.batch, "train"), (args.length, 1, "forward"), (16384, 1, "forward")):
            try:
                r = bench.measure("ours", L, batch, "bf16", mode, 5, DEVICE, bench.BASE)
                rows.append({"order": order, "mode": mode, "batch": batch, "length": L,
                             "median_s": statistics.median(r["times"]), "peak_gb": r["peak_bytes"] / 2**30})
            except Exception as e:  # a backend that refuses the call: recorded, not fatal
                rows.append({"order": order, "mode": mode, "batch": batch, "length": L, "error": repr(e)[:300]})
            torch.cuda.empty_cache()
    os.environ.pop("LONGFORMER_SDPA_BACKENDS")
    if before is not None:
        os.environ["LONGFORMER_SDPA_BACKENDS"] = before
    with open(os.path.join(args.out, "backends.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return "\n".join(f"{r['order']:22} {r['mode']:8} {r['batch']}x{r['length']}: "
                     + (f"{r['median_s'] * 1e3:.1f} ms, {r['peak_gb']:.2f} GB" if "median_s" in r else r["error"])
                     for r in rows)


def graph_breaks(config, inputs, with_global, mlm):
    import longformer
    torch._dynamo.reset()
    model = (longformer.LongformerForMaskedLM if mlm else longformer.LongformerModel)(config).to(DEVICE).train()
    model.settings.max_global_tokens = 1
    ids, gm, labels = inputs
    kw = {"global_attention_mask": gm} if with_global else {}
    if mlm:
        kw.update(labels=labels, logits_at_labels_only=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(ids, **kw)
    reasons = sorted({str(getattr(b, "reason", b))[:200] for b in explained.break_reasons})
    return f"{explained.graph_break_count} graph breaks, {explained.graph_count} graphs" + \
        "".join(f"\n    {r}" for r in reasons)


def check_compile(args):
    import longformer
    lines = []
    small = longformer.LongformerConfig(**{**bench.BASE, "num_hidden_layers": 2}, max_position_embeddings=args.length + 2)
    inputs = bench.make_inputs(args.length, 2, bench.BASE["vocab_size"], DEVICE)
    for name, with_global, mlm in (("encoder, no global tokens", False, False),
                                   ("encoder, global on <s>", True, False), ("masked LM, global on <s>", True, True)):
        try:
            lines.append(f"{name}: {graph_breaks(small, inputs, with_global, mlm)}")
        except Exception as e:
            lines.append(f"{name}: explain failed: {repr(e)[:300]}")
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = longformer.LongformerConfig(**bench.BASE, max_position_embeddings=args.length + 2)
    model = longformer.LongformerForMaskedLM(config).to(DEVICE).train()
    model.settings.max_global_tokens = 1
    inputs = bench.make_inputs(args.length, args.batch, bench.BASE["vocab_size"], DEVICE)
    eager = timed(bench.make_step(model, "ours", "train", inputs, "bf16", DEVICE))
    t = time.perf_counter()
    compiled = torch.compile(model)
    step = bench.make_step(compiled, "ours", "train", inputs, "bf16", DEVICE)
    try:
        step()
        compile_s = time.perf_counter() - t
        lines.append(f"full model, bf16 step {args.batch} x {args.length}: eager {eager * 1e3:.1f} ms, compiled "
                     f"{timed(step) * 1e3:.1f} ms (compiling took {compile_s:.0f} s)")
    except Exception as e:
        lines.append(f"full model compile failed: {repr(e)[:500]}")
    with open(os.path.join(args.out, "compile.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


STEPS = {"profile": check_profile, "backends": check_backends, "compile": check_compile}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", default=",".join(STEPS))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.steps.split(","):
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        print(STEPS[name](args), f"\n({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
