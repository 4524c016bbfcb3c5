"""One command that checks the whole CUDA path on a GPU machine, run in place (no install, no network):

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu-check/             # on a GPU, within ~8 minutes
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --quick --out /tmp/check   # the same path on CPU

Steps, each written to --out as soon as it ends (so that a run cut short keeps what it did):
  env    environment.json: GPU, driver, torch, CUDA, cuDNN, transformers, the SDPA backends in use
  tests  tests.txt: the test suite with LONGFORMER_TEST_DEVICE set to --device, one pytest per test file
         (--test-workers at a time, --tests-timeout each), so that a file that hangs or fails is named
  train  train.txt: `python -m torch.distributed.run --nproc_per_node 1 train_mlm.py` (the demo) in bf16, on
         NCCL (gloo on CPU), stopped after 3 steps and resumed to 6
  bench  bench.json (+ bench.png): HF against ours, forward and training step at 1k/4k/16k tokens, fp32 with
         TF32 and bf16, batch 1 and a batch of 64k tokens, and FlagPerf's setting (16 x 1024 tokens, fp32/TF32)
and summary.md, which gathers them. --quick (for CPU) runs a 2-layer model at 512 tokens, bf16 in the forward
only, full batches in fp32 and a FlagPerf-shaped batch of 2 x 1024, one timed run each, so that the path runs in a few minutes.
--steps picks a subset.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, ROOT)
import bench  # noqa: E402

STEPS = ("env", "tests", "train", "bench")


def run_logged(cmd, log_path, timeout, env=None):
    """Run cmd with its output in log_path; (return code or 'timeout', seconds, last lines)."""
    t = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout,
                                env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    with open(log_path) as f:
        tail = f.read().splitlines()[-3:]
    return rc, time.perf_counter() - t, tail


def check_env(args):
    import longformer.plan as plans
    meta = {"python": sys.version.split()[0], "torch": torch.__version__, "device": args.device,
            "sdpa_backends": [b.name for b in plans.choose_backends(args.device)],
            "sdpa_backends_env": os.environ.get(plans.ENV_VAR)}
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        meta["transformers"] = None
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count(),
                    compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), nccl=".".join(map(str, torch.cuda.nccl.version())))
        meta["driver"] = bench.driver_version()
    else:
        meta["cpu_threads"] = torch.get_num_threads()
    with open(os.path.join(args.out, "environment.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return "environment", "\n".join(f"- {k}: {v}" for k, v in meta.items())


def check_tests(args):
    """One pytest process per test file, --test-workers at a time, each with its own time limit: a file that
    hangs or fails is named, and what the others found is kept (tests.txt gains each file's log as it ends)."""
    files = sorted(f for f in os.listdir(os.path.join(ROOT, "tests")) if f.startswith("test_") and f.endswith(".py"))
    log_path = os.path.join(args.out, "tests.txt")
    open(log_path, "w").close()
    lock = threading.Lock()

    def run_file(name):
        part = os.path.join(args.out, f".{name}.txt")
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-W", "ignore",
               os.path.join("tests", name)]
        rc, secs, tail = run_logged(cmd, part, args.tests_timeout, env={"LONGFORMER_TEST_DEVICE": args.device})
        with open(part) as f:
            text = f.read()
        os.remove(part)
        failed = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
        status = ("passed" if rc == 0 else f"FAILED (exit {rc})") + f", {secs:.0f} s: {tail[-1] if tail else ''}"
        with lock:
            with open(log_path, "a") as f:
                f.write(f"==== {name}: {status}\n{text}\n")
        return name, rc, status, failed

    t = time.perf_counter()
    with ThreadPoolExecutor(max(1, args.test_workers)) as pool:  # each file's fixed torchrun ports are its own
        results = list(pool.map(run_file, files))
    ok = all(rc == 0 for _, rc, _, _ in results)
    lines = [f"- {name}: {status}" + "".join(f"\n  - {x}" for x in failed) for name, _, status, failed in results]
    return "tests", f"`LONGFORMER_TEST_DEVICE={args.device} python -m pytest tests/FILE`, {len(files)} files, " \
                    f"{args.test_workers} at a time: {'all passed' if ok else 'FAILURES'} in " \
                    f"{time.perf_counter() - t:.0f} s\n\n" + "\n".join(lines)


def check_train(args):
    """The demo under torchrun (one process: NCCL's collectives and DDP run), bf16, stopped and resumed."""
    log_path = os.path.join(args.out, "train.txt")
    with tempfile.TemporaryDirectory() as tmp:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29561"]
        cmd = [*launcher, os.path.join(ROOT, "train_mlm.py"), "--device", args.device, "--precision", "bf16",
               "--max-steps", "6", "--eval-every", "3", "--log-every", "1", "--batch-size", "8",
               "--out", os.path.join(tmp, "run"), "--cache-dir", os.path.join(tmp, "cache")]
        rc1, s1, _ = run_logged([*cmd, "--stop-after", "3"], log_path + ".1", args.train_timeout)
        rc2, s2, _ = run_logged([*cmd, "--resume"], log_path + ".2", args.train_timeout)
        evals = []
        metrics_path = os.path.join(tmp, "run", "metrics.jsonl")
        if os.path.isfile(metrics_path):
            evals = [json.loads(line) for line in open(metrics_path) if "eval_loss" in line]
        finished = os.path.isfile(os.path.join(tmp, "run", "model.safetensors"))
    with open(log_path, "w") as f:  # the two logs as one file
        for part in (log_path + ".1", log_path + ".2"):
            f.write(open(part).read() + "\n")
            os.remove(part)
    ok = rc1 == 0 and rc2 == 0 and finished
    curve = ", ".join(f"step {e['step']}: {e['eval_loss']:.3f}" for e in evals)
    return "training (torchrun, bf16, stop + resume)", \
        f"{'passed' if ok else 'FAILED'}: first part exit {rc1} ({s1:.0f} s), resumed part exit {rc2} ({s2:.0f} s), " \
        f"final model {'written' if finished else 'missing'}. Validation loss: {curve or 'none logged'}."


def bench_configs(args):
    """(length, batch, dtype, mode) rows of the table, and the model config they run."""
    if args.quick:  # bf16 for the forward only: CPUs without bf16 instructions emulate it, 10-50x slower
        config = {**bench.BASE, "num_hidden_layers": 2}
        lengths, fill_tokens, dtypes, fill_dtype, flagperf = [512], 2048, ["fp32", "bf16"], "fp32", (1024, 2)
    else:
        config = bench.BASE
        lengths, fill_tokens, dtypes, fill_dtype, flagperf = [1024, 4096, 16384], 65536, ["tf32", "bf16"], "bf16", (1024, 16)
    configs = [(L, 1, d, m) for m in ("forward", "train") for d in dtypes for L in lengths
               if not (args.quick and m == "train" and d == "bf16")]
    configs += [(L, fill_tokens // L, fill_dtype, m) for m in ("forward", "train") for L in lengths]
    configs.append((flagperf[0], flagperf[1], dtypes[0], "train"))
    return configs, config


def check_bench(args):
    configs, config = bench_configs(args)
    lines = []
    json_path = os.path.join(args.out, "bench.json")
    _, rows = bench.run_benchmark(args.device, configs, ["hf", "ours"], args.repeats, json_path, config=config,
                                  log=lambda line: (lines.append(line), print(line, flush=True)))
    try:
        bench.plot(json_path)  # bench.png beside it
    except ImportError:
        pass
    L, B, dtype, _ = configs[-1]
    fp = next(r for r in rows if (r["length"], r["batch"], r["dtype"], r["mode"]) == (L, B, dtype, "train"))
    per_s = {impl: B / fp[impl]["median_s"] for impl in ("hf", "ours") if "median_s" in fp.get(impl, {})}
    flag = ", ".join(f"{impl} {v:.1f} samples/s" for impl, v in per_s.items())
    if len(per_s) == 2:
        flag += f" ({per_s['ours'] / per_s['hf']:.2f}x)"
    text = f"{config['num_hidden_layers']} layers, {config['hidden_size']} wide, window {config['attention_window']}; " \
           f"tokens/s = batch x L / median step time; MFU against this run's matmul speed for the row's dtype " \
           f"(TFLOP/s: {', '.join(f'{k} {v:.2f}' for k, v in json.load(open(json_path))['meta']['matmul_tflops'].items())}).\n\n" \
           f"```\n" + "\n".join(lines[1:]) + "\n```\n\n" \
           f"FlagPerf's setting ({B} x {L} tokens, {dtype}, training step): {flag or 'not measured'}."
    return "benchmark: HF against ours", text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the summary and raw results (created)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="a small model and few rows: the path, not the numbers")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--repeats", type=int, help="timed runs per row, after a warm-up (default 3; 1 with --quick)")
    p.add_argument("--tests-timeout", type=int, default=300, help="seconds for each test file")
    p.add_argument("--train-timeout", type=int, default=120)
    p.add_argument("--test-workers", type=int, default=4, help="test files run at a time")
    args = p.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - set(STEPS)
    if unknown:
        p.error(f"unknown --steps {', '.join(sorted(unknown))}; choose from {', '.join(STEPS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device: run on a GPU machine, or use --device cpu --quick")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    sections = []
    for step in steps:
        t = time.perf_counter()
        print(f"== {step}", flush=True)
        title, text = {"env": check_env, "tests": check_tests, "train": check_train, "bench": check_bench}[step](args)
        sections.append(f"## {title} ({time.perf_counter() - t:.0f} s)\n\n{text}\n")
        print(sections[-1], flush=True)
        summary = f"# gpu_check: --device {args.device}{' --quick' if args.quick else ''} " \
                  f"({time.strftime('%Y-%m-%d %H:%M')}, {time.perf_counter() - start:.0f} s)\n\n" + "\n".join(sections)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(summary)
    print(f"wrote {os.path.join(args.out, 'summary.md')}")


if __name__ == "__main__":
    main()
