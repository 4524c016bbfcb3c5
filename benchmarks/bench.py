"""This project against HF transformers, same machine, same run: forward and masked-LM training step.

The tables of docs/benchmarks.md, each made by one command (its results file, and a plot beside it):

    python benchmarks/bench.py --out benchmarks/results-cpu-MODEL.json
        CPU (MODEL: the CPU's, e.g. epyc): forward and training step at 1,024 / 4,096 / 16,384 tokens, fp32 and
        bf16, HF against ours and ours with gradient checkpointing (HF's training skipped above 4,096 tokens:
        ~4x our memory). About an hour on 2 cores of an AMD EPYC.
    python benchmarks/bench.py --lengths 4096 --dtypes fp32 --impls ours ours+gpu-plan ours+blocks ours+attn0
                               --out benchmarks/results-cpu-MODEL-kernels.json
        "What makes it fast" on CPU: our CPU plan against the GPU plan run on CPU (none of the CPU kernels), the
        band in blocks of w through SDPA, and no attention dropout (13 minutes there).
    PYTHONPATH=. python benchmarks/bench.py --device cuda --dtypes tf32 bf16 --impls hf ours ours+compile
                                            --out benchmarks/results-h100.json
        GPU: the same table on a GPU; benchmarks/gpu_check.py runs it with the CUDA test suite.
    python benchmarks/bench.py --table benchmarks/results-cpu-MODEL.json
        prints a results file's rows as docs/benchmarks.md shows them (tests/test_benchmarks_page.py checks the
        page against its files).

Options: --lengths, --dtypes, --modes, --batches, --impls choose the rows; --flagperf adds FlagPerf's setting
(batch 16 x 1,024 tokens, fp32 training); --keep-heap runs every worker with glibc's heap never trimmed.

Base config (12 layers, 768 wide, window 512), batch 1 (or --batches), global attention on the first token;
forward is the encoder (LongformerModel), a training step is LongformerForMaskedLM's forward + backward with
15% of the tokens predicted (ours computes the vocabulary logits only there, HF everywhere). dtypes: fp32,
tf32 (fp32 with TensorFloat-32 matmuls, CUDA), bf16 and fp16 (autocast). On CPU each (implementation,
length, batch, dtype, mode) runs in a fresh worker process, so that its peak RSS is its own; on CUDA one
worker per implementation runs them all, resetting the peak-allocated counter for each. With --alternate (CPU)
every implementation's worker of a configuration stays alive and they take one step each in turn, the order
rotating each round, so that the machine's drift over minutes (10-15% on a shared VM) falls on all alike.
Timings are medians of --repeats runs after one warm-up. MFU is the useful model FLOPs (model_flops) per second
over the matmul speed (matmul_speed) that the worker measured just before its steps (with --alternate, before
each step: the median of the steps' fractions). The JSON's meta records the machine, the versions and the commit.
"""
import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            type_vocab_size=1, layer_norm_eps=1e-5, attention_window=512, pad_token_id=1)
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def set_tf32(on: bool):
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def matmul_speed(device, dtype):
    """The machine's measured speed for a model-shaped matmul ([rows x 768] @ [768 x 3072]), FLOP/s: the fastest
    of matmul_speeds' ways."""
    return max(matmul_speeds(device, dtype).values())


def matmul_speeds(device, dtype):
    """{way: FLOP/s} for a model-shaped matmul, each the fastest of three rounds after a warm-up: torch.matmul
    writing into one preallocated result (on CPU a fresh result of 50 MB is a new mapping from the OS whose page
    faults, 10 ms of a 97 ms matmul on a 2-core EPYC, are no matmul time), and on CPU oneDNN's linear op on a
    weight packed for it, 1,024 rows at a time (results from the heap). torch.matmul sends fp32 to MKL, which
    on AMD CPUs runs at half oneDNN's speed: the fastest way is the machine's speed."""
    rows, reps = (16384, 50) if device == "cuda" else (4096, 10)
    set_tf32(dtype == "tf32")
    a = torch.randn(rows, 768, device=device, dtype=DTYPES[dtype])
    w = torch.randn(3072, 768, device=device, dtype=DTYPES[dtype])
    out = torch.empty(rows, 3072, device=device, dtype=DTYPES[dtype])
    ways = {"torch.matmul": lambda: torch.matmul(a, w.t(), out=out)}
    onednn = hasattr(torch.ops.mkldnn, "_linear_pointwise") and (
        dtype == "fp32" or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if device == "cpu" and onednn:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1024)
        ways["onednn linear"] = lambda: [torch.ops.mkldnn._linear_pointwise(a[i:i + 1024], packed, None, "none", [], "")
                                         for i in range(0, rows, 1024)]
    speeds = {}
    for way, run in ways.items():
        rounds = []
        for _ in range(4):  # the first round warms up
            sync(device)
            t = time.perf_counter()
            for _ in range(reps):
                run()
            sync(device)
            rounds.append(2 * rows * 768 * 3072 * reps / (time.perf_counter() - t))
        speeds[way] = max(rounds[1:])
    return speeds


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def build(impl, L, mode, config, device):
    impl = impl.partition("@")[0]  # ours@TREE: ours, imported from TREE (run_worker's PYTHONPATH)
    with torch.device(device):  # initialised where it runs: seconds saved per model on a GPU
        if impl == "hf":
            import transformers
            transformers.logging.set_verbosity_error()
            cfg = transformers.LongformerConfig(**config, max_position_embeddings=L + 2)
            return (transformers.LongformerForMaskedLM(cfg) if mode == "train"
                    else transformers.LongformerModel(cfg, add_pooling_layer=False))
        import longformer
        # "ours"; "ours+ckpt" / "ours+sel": full / selective checkpointing; "ours+attn0": no attention dropout;
        # "ours+compile": torch.compile'd; "ours+gpu-plan": the cuda plan (on CPU: none of the CPU kernels);
        # "ours+blocks": the band in blocks of w through SDPA
        checkpointing = {"ours+ckpt": True, "ours+sel": "selective"}.get(impl, False)
        extra = {"attention_probs_dropout_prob": 0.0} if impl == "ours+attn0" else {}
        # max_global_tokens: global slots fixed at compile time, so that the count is never read back
        cfg = longformer.LongformerConfig(**{**config, **extra}, max_position_embeddings=L + 2)
        model = (longformer.LongformerForMaskedLM(cfg) if mode == "train"
                 else longformer.LongformerModel(cfg, add_pooling_layer=False))
        if checkpointing:
            model.gradient_checkpointing_enable(checkpointing)
        if impl == "ours+compile":
            model.settings.max_global_tokens = 1
        if impl == "ours+gpu-plan":
            model.settings.plan = "cuda"
        if impl == "ours+blocks":
            model.settings.attention_backend = "sdpa"
        if impl == "ours+compile":
            torch._dynamo.reset()  # a fresh compile for each configuration: no recompilation for dynamic shapes
            model.compile()
        return model


def median_time(fn, repeats, warmups=1):
    """Median seconds of fn() over repeats calls, after warmups calls (fn synchronizes a GPU itself)."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_inputs(L, batch, vocab_size, device):
    """input_ids, global_attention_mask (the first token) and MLM labels (15% of the tokens) for one step."""
    ids = torch.randint(3, vocab_size - 1, (batch, L), device=device)
    gm = torch.zeros_like(ids)
    gm[:, 0] = 1
    labels = torch.full_like(ids, -100)
    picked = torch.rand(ids.shape, device=device) < 0.15
    labels[picked] = ids[picked]
    return ids, gm, labels


def make_step(model, impl, mode, inputs, dtype, device):
    """A function running one forward (no gradients) or one training step (forward + backward), synchronized."""
    ids, gm, labels = inputs
    autocast = torch.autocast(device, dtype=DTYPES[dtype], enabled=dtype in ("bf16", "fp16"))

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
    return step


def prepare(impl, L, batch, dtype, mode, device, config):
    """The step function of one configuration, its model built and seeded as for every row."""
    torch.manual_seed(0)
    model = build(impl, L, mode, config, device).train(mode == "train")
    return make_step(model, impl, mode, make_inputs(L, batch, config["vocab_size"], device), dtype, device)


def measure(impl, L, batch, dtype, mode, repeats, device, config):
    """One configuration: {"times": [...], "peak_bytes": ...}."""
    # The machine's matmul speed now, for this row's MFU: on a shared VM it drifts by ±10% within a run.
    matmul = matmul_speed(device, dtype)  # sets TF32 for dtype
    step = prepare(impl, L, batch, dtype, mode, device, config)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"times": times[1:], "first_s": times[0], "peak_bytes": peak,  # the first step compiles
            "matmul_tflops": matmul / 1e12}


def worker(spec):
    """Every configuration of spec in this process; prints one JSON line per configuration."""
    if spec.get("alternate"):
        return alternating_worker(spec)
    for L, batch, dtype, mode in spec["configs"]:
        try:
            result = measure(spec["impl"], L, batch, dtype, mode, spec["repeats"], spec["device"], spec["config"])
        except torch.OutOfMemoryError:
            result = {"error": "out of memory"}
        if spec["device"] == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(result), flush=True)


def alternating_worker(spec):
    """One configuration's steps on command (CPU): prints {"first_s"} after the warm-up step, then for each line
    on stdin the matmul speed measured just before one step and the step's time, and at the end of stdin its
    peak RSS."""
    (L, batch, dtype, mode), device = spec["configs"][0], spec["device"]
    step = prepare(spec["impl"], L, batch, dtype, mode, device, spec["config"])
    t = time.perf_counter()
    step()
    print(json.dumps({"first_s": time.perf_counter() - t}), flush=True)
    for _ in sys.stdin:
        matmul = matmul_speed(device, dtype)
        t = time.perf_counter()
        step()
        print(json.dumps({"time": time.perf_counter() - t, "matmul_tflops": matmul / 1e12}), flush=True)
    print(json.dumps({"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)


# glibc's malloc returns freed memory at the top of its heap to the OS, and the next step faults it in again,
# page by page. These settings keep it (blocks under 32 MB from the heap, which is never trimmed): measured on
# the 2-core EPYC, our bf16 forward at 4,096 tokens 1.38 -> 1.22 s and fp32 4.08 -> 3.77 s with the same peak
# memory; HF's bf16 forward 3.60 -> 3.67 s. Environment variables of glibc, read when a process starts.
KEEP_HEAP = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}


def worker_env(impl: str, keep_heap: bool) -> dict:
    """A worker's environment: KEEP_HEAP's allocator settings where keep_heap; for "NAME@TREE", longformer imported
    from the checkout TREE (another commit's worktree: its speed and this one's in one run)."""
    env = {**os.environ, **(KEEP_HEAP if keep_heap else {})}
    tree = impl.partition("@")[2]
    if tree:
        if not os.path.isdir(os.path.join(tree, "longformer")):
            raise SystemExit(f"{impl}: {tree} holds no longformer/ package (make one: git worktree add {tree} REV)")
        env["PYTHONPATH"] = os.path.abspath(tree)
    return env


def run_worker(impl, configs, repeats, device, config, keep_heap=False):
    """Results of configs [(L, batch, dtype, mode), ...] for impl, from a worker process (with KEEP_HEAP's
    allocator settings where keep_heap)."""
    spec = dict(impl=impl, configs=configs, repeats=repeats, device=device, config=config)
    env = worker_env(impl, keep_heap)
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:  # killed (CPU out of memory) or crashed: the configuration it was on failed
        reason = "out of memory" if done.returncode in (-9, 137) or "out of memory" in done.stderr else \
            (done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1][:160]
        results.append({"error": reason})
    results += [{"error": "not run: the worker stopped at an earlier configuration"}] * (len(configs) - len(results))
    for r in results:
        if "times" in r:
            r["median_s"] = statistics.median(r["times"])
    return results


def run_alternating(impls, config_row, repeats, config, keep_heap=False):
    """{impl: result} for one configuration on CPU, the implementations' steps alternating: a worker process
    each, alive together (each warmed up in turn), each taking one step in turn, repeats rounds, the order
    rotating from round to round. The machine's speed drifts by 10-15% over minutes; this way the drift falls
    on every implementation alike."""
    workers, results = {}, {}
    for impl in impls:
        spec = dict(impl=impl, configs=[config_row], repeats=repeats, device="cpu", config=config, alternate=True)
        env = worker_env(impl, keep_heap)
        log = tempfile.TemporaryFile("w+")  # stderr, read only if the worker fails (a pipe left unread could fill)
        proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        workers[impl] = proc, log
        results[impl] = _reply(proc, log)
        results[impl].update(times=[], step_matmul_tflops=[])
    for round_ in range(repeats):
        # The order rotates each round: a process stepping right after another (HF's, with 3-4x our memory) ran
        # slower, so that the one always after HF read 1.18x its neighbour where one process alternating them
        # measured 1.06x.
        names = list(workers)[round_ % len(workers):] + list(workers)[:round_ % len(workers)]
        for impl in names:
            proc, log = workers[impl]
            if "error" in results[impl]:
                continue
            proc.stdin.write("step\n")
            proc.stdin.flush()
            reply = _reply(proc, log)
            if "error" in reply:
                results[impl].update(reply)
            else:
                results[impl]["times"].append(reply["time"])
                results[impl]["step_matmul_tflops"].append(reply["matmul_tflops"])
    for impl, (proc, log) in workers.items():
        if "error" not in results[impl]:
            proc.stdin.close()
            results[impl].update(_reply(proc, log))
        proc.kill()
        proc.wait()
        log.close()
        r = results[impl]
        if r["times"] and "error" not in r:
            r["median_s"] = statistics.median(r["times"])
            r["matmul_tflops"] = statistics.median(r["step_matmul_tflops"])
    return results


def _reply(proc, log) -> dict:
    """The worker's next JSON line (other lines of its output skipped), or {"error": why} where it stopped."""
    for line in iter(proc.stdout.readline, ""):
        if line.startswith("{"):
            return json.loads(line)
    code = proc.wait()
    log.seek(0)
    if code in (-9, 137):
        return {"error": "out of memory"}
    return {"error": (log.read().strip().splitlines() or [f"exit code {code}"])[-1][:160]}


def driver_version() -> str | None:
    """The NVIDIA driver's version, from nvidia-smi (None where it is absent)."""
    if not shutil.which("nvidia-smi"):
        return None
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None


def commit() -> str | None:
    """The checkout's commit, with "+changes" where longformer/ or benchmarks/ differ from it (None outside git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "longformer", "benchmarks/bench.py"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+changes" if dirty else "")


def environment(device, dtypes):
    """What the numbers were measured on, and the measured matmul speed per dtype (TFLOP/s)."""
    import transformers
    cpu_model = None
    if os.path.exists("/proc/cpuinfo"):
        cpu_model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                          if line.startswith("model name")), None)
    meta = {"device": device, "cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model,
            "amx": os.path.exists("/proc/cpuinfo") and "amx_bf16" in open("/proc/cpuinfo").read(),
            "commit": commit(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "gpu": None}
    if device == "cuda":
        meta.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), driver=driver_version())
    from longformer.plan import BACKEND_NAMES, choose_backends
    name = {backend: n for n, backend in BACKEND_NAMES.items()}
    meta["sdpa_backends"] = ",".join(name[b] for b in choose_backends(device))
    speeds = {d: matmul_speeds(device, d) for d in dtypes}
    meta["matmul_tflops"] = {d: max(s.values()) / 1e12 for d, s in speeds.items()}
    meta["matmul_tflops_by_way"] = {d: {way: v / 1e12 for way, v in s.items()} for d, s in speeds.items()}
    set_tf32(False)
    return meta


IMPLS = ("hf", "ours", "ours+ckpt", "ours+sel", "ours+attn0", "ours+compile", "ours+gpu-plan", "ours+blocks")
TRAIN_ONLY = ("ours+ckpt", "ours+sel", "ours+attn0")


def implementation(name: str) -> str:
    if name.partition("@")[0] not in IMPLS:
        raise argparse.ArgumentTypeError(f"{name!r}: choose from {', '.join(IMPLS)}, each optionally @TREE")
    return name


def run_benchmark(device, configs, impls, repeats, out, config=BASE, hf_max_train=None, keep_heap=False,
                  alternate=False, log=print):
    """Measure every configuration with every implementation; rows saved to out (JSON) as they come.
    alternate (CPU): each configuration's implementations step in turn (run_alternating)."""
    from longformer.files import atomic_write_text
    meta = environment(device, sorted({c[2] for c in configs}))
    meta["config"] = config
    meta["malloc_env"] = KEEP_HEAP if keep_heap else None
    meta["alternate"] = alternate
    log(f"# {meta}")
    log(TABLE_HEADER)
    jobs = {}  # impl -> the configurations it runs
    for L, batch, dtype, mode in configs:
        for impl in impls:
            skip = (impl.partition("@")[0] in TRAIN_ONLY and mode != "train") or \
                (impl == "hf" and mode == "train" and hf_max_train and L > hf_max_train)
            if not skip:
                jobs.setdefault(impl, []).append((L, batch, dtype, mode))
    rows = {c: {"length": c[0], "batch": c[1], "dtype": c[2], "mode": c[3]} for c in configs}
    if hf_max_train:
        for c, row in rows.items():
            if c[3] == "train" and c[0] > hf_max_train:
                row["hf"] = {"error": f"not run: over --hf-max-train-length {hf_max_train}"}
    runs = {c: [i for i in impls if c in jobs.get(i, [])] for c in configs}  # the implementations each row runs

    def record(c, results):  # {impl: result} of configuration c
        for impl, result in results.items():
            if "median_s" in result:
                result["mfu"] = mfu(model_flops(c[0], c[1], c[3], c=config), result)
            rows[c][impl] = result
        if all(i in rows[c] for i in runs[c]):
            for name in impls:
                if name != "hf" and name in rows[c]:
                    log(table_line(rows[c], name))
        # after every result, so that an interrupted run keeps what it measured
        atomic_write_text(out, json.dumps({"meta": meta, "rows": list(rows.values())}, indent=1))

    if device == "cpu" and alternate:
        for c in configs:
            record(c, run_alternating(runs[c], c, repeats, config, keep_heap))
        return meta, list(rows.values())
    # CPU: a process per configuration (peak RSS cannot be reset); CUDA: one per implementation.
    groups = [(impl, [c]) for c in configs for impl in runs[c]] if device == "cpu" \
        else [(impl, cs) for impl, cs in jobs.items()]
    for impl, cs in groups:
        for c, result in zip(cs, run_worker(impl, cs, repeats, device, config, keep_heap)):
            record(c, {impl: result})
    return meta, list(rows.values())


def mfu(flops, result):
    """Useful FLOPs per second over the matmul speed: the median over steps of each step's own fraction where
    each step had its matmul speed measured just before it (alternate), else the median time's fraction."""
    speeds = result.get("step_matmul_tflops")
    if speeds:
        return statistics.median(flops / t / (s * 1e12) for t, s in zip(result["times"], speeds))
    return flops / result["median_s"] / (result["matmul_tflops"] * 1e12)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--modes", nargs="+", default=["forward", "train"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impls", nargs="+", default=["hf", "ours", "ours+ckpt"], type=implementation,
                   help=f"of {', '.join(IMPLS)}. Training steps only: ours+ckpt / ours+sel (full / selective "
                        "gradient checkpointing), ours+attn0 (attention dropout 0, for the cost of dropout); "
                        "ours+compile is torch.compile'd (its first step, left out of the median, compiles). "
                        "NAME@TREE: NAME imported from the checkout TREE, e.g. ours@../before from "
                        "`git worktree add ../before REV`: two commits in one run")
    p.add_argument("--hf-max-train-length", type=int, default=None,
                   help="skip HF training above this length (CPU default 4096: HF needs ~4x its 4096 memory)")
    p.add_argument("--flagperf", action="store_true", help="add FlagPerf's setting: batch 16 x 1024 tokens, fp32")
    p.add_argument("--keep-heap", action="store_true",
                   help="run every worker (HF's and ours) with glibc's heap never trimmed (KEEP_HEAP)")
    p.add_argument("--alternate", action="store_true",
                   help="CPU: each configuration's implementations alive together, stepping in turn (their memory "
                        "at once: HF's fp32 training at 4,096 tokens needs 12 GB of it)")
    p.add_argument("--out", default="benchmarks/results.json")
    p.add_argument("--plot", metavar="RESULTS_JSON", nargs="+",
                   help="only draw these results files' rows, together, to a PNG beside the first")
    p.add_argument("--table", metavar="RESULTS_JSON", help="only print a results file as docs/benchmarks.md's table")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.plot:
        return print(f"wrote {plot(*args.plot) or 'nothing: no rows of batch 1'}")
    if args.table:
        with open(args.table) as f:
            return print("\n".join(markdown_table(json.load(f))))
    configs = [(L, b, d, m) for m in args.modes for d in args.dtypes for b in args.batches for L in args.lengths]
    if args.flagperf:
        configs.append((1024, 16, "tf32" if args.device == "cuda" else "fp32", "train"))
    hf_max_train = args.hf_max_train_length or (4096 if args.device == "cpu" else None)
    run_benchmark(args.device, configs, args.impls, args.repeats, args.out, hf_max_train=hf_max_train,
                  keep_heap=args.keep_heap, alternate=args.alternate)
    try:
        drawn = plot(args.out)
        print(f"wrote {drawn}" if drawn else "(no rows of batch 1: no plot)")
    except ImportError:
        print("(pip install matplotlib for a plot of these results)")


TABLE_HEADER = (f"{'mode':8} {'dtype':5} {'batch x L':>10} {'variant':>12} | {'HF s':>7} {'ours s':>7} {'speed-up':>8} | "
                f"{'HF GB':>6} {'ours GB':>7} {'mem':>5} | {'ours tok/s':>10} {'HF MFU':>6} {'our MFU':>7}")


def table_line(row, name):
    """One printed row: HF against one of our variants."""
    hf, ours, L, batch = row.get("hf", {}), row[name], row["length"], row["batch"]
    fmt = lambda r, k, f: f(r[k]) if k in r else "-"  # noqa: E731
    gb = lambda b: f"{b / 2**30:.1f}"  # noqa: E731
    ratio = f"{hf['median_s'] / ours['median_s']:.2f}x" if "median_s" in hf and "median_s" in ours else "-"
    mem = f"{ours['peak_bytes'] / hf['peak_bytes']:.2f}" if "peak_bytes" in hf and "peak_bytes" in ours else "-"
    return (f"{row['mode']:8} {row['dtype']:5} {f'{batch}x{L}':>10} {name:>12} | {fmt(hf, 'median_s', '{:.2f}'.format):>7} "
            f"{fmt(ours, 'median_s', '{:.2f}'.format):>7} {ratio:>8} | {fmt(hf, 'peak_bytes', gb):>6} "
            f"{fmt(ours, 'peak_bytes', gb):>7} {mem:>5} | {fmt(ours, 'median_s', lambda s: f'{batch * L / s:.0f}'):>10} "
            f"{fmt(hf, 'mfu', '{:.0%}'.format):>6} {fmt(ours, 'mfu', '{:.0%}'.format):>7}"
            + (f"   HF: {hf['error']}" if "error" in hf else "") + (f"   ours: {ours['error']}" if "error" in ours else ""))


def markdown_table(results: dict) -> list[str]:
    """A results file's rows as docs/benchmarks.md shows them: one line per (row, variant of ours), against HF where
    HF ran; times in s, memory in GB, MFU in %."""
    impls = list(dict.fromkeys(k for r in results["rows"] for k, v in r.items() if isinstance(v, dict) and k != "hf"))
    with_hf = any("hf" in r for r in results["rows"])
    lines = ["| step | dtype | batch × tokens | variant | HF s | ours s | speed-up | HF tokens/s | ours tokens/s "
             "| HF GB | ours GB | memory | HF MFU | our MFU |" if with_hf else
             "| step | dtype | batch × tokens | variant | s | tokens/s | GB | MFU |", "|" + " --- |" * (14 if with_hf else 8)]
    cell = lambda r, f: f(r) if "median_s" in r else "-"  # noqa: E731  (a result that did not run: -)
    seconds = lambda r: f"{r['median_s']:.3f}"  # noqa: E731
    gb = lambda r: f"{r['peak_bytes'] / 2**30:.2f}"  # noqa: E731
    share = lambda r: f"{r['mfu']:.0%}"  # noqa: E731
    for row in results["rows"]:
        hf = row.get("hf", {})
        tokens = row["batch"] * row["length"]
        rate = lambda r: f"{tokens / r['median_s']:,.0f}"  # noqa: E731
        for name in impls:
            ours = row.get(name)
            if not ours:
                continue
            both = "median_s" in hf and "median_s" in ours
            head = [f"| {row['mode']}", row["dtype"], f"{row['batch']} × {row['length']:,}", name]
            if not with_hf:  # the variants alone
                lines.append(" | ".join(head + [cell(ours, f) for f in (seconds, rate, gb, share)]) + " |")
                continue
            lines.append(" | ".join(head + [
                cell(hf, seconds), cell(ours, seconds), f"{hf['median_s'] / ours['median_s']:.2f}×" if both else "-",
                cell(hf, rate), cell(ours, rate), cell(hf, gb), cell(ours, gb),
                f"{ours['peak_bytes'] / hf['peak_bytes']:.2f}" if both else "-", cell(hf, share), cell(ours, share)]) + " |")
    return lines


def plot(*results_json: str) -> str | None:
    """Time per token and peak memory against length, HF and ours, per mode and dtype (rows of batch 1); the
    PNG's path, or None where there are no such rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = []
    for path in results_json:
        with open(path) as f:
            data = json.load(f)
        rows += [r for r in data["rows"] if r["batch"] == 1]
    if not rows:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    impls = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, dict) and k not in ("hf", "ours")))
    cycle = [matplotlib.colors.to_hex(c) for c in plt.rcParams["axes.prop_cycle"].by_key()["color"]]
    others = [c for c in cycle if c not in ("#d62728", "#1f77b4")]  # tab:red and tab:blue are HF's and ours
    colors = {"hf": "tab:red", "ours": "tab:blue", **dict(zip(impls, others * 2))}
    for mode, style in (("forward", "-"), ("train", "--")):
        for dtype, marker in (("fp32", "o"), ("tf32", "^"), ("bf16", "s")):
            for impl, color in colors.items():
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
    layers = meta.get("config", BASE)["num_hidden_layers"]
    fig.suptitle(f"longformer-base{'' if layers == 12 else f' ({layers} layers)'} on "
                 f"{meta.get('gpu') or meta.get('cpu_model')} ({meta['device']}, "
                 f"{meta['threads']} threads), torch {meta['torch']}, transformers {meta['transformers']}")
    fig.tight_layout()
    out = os.path.splitext(results_json[0])[0] + ".png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    main()
