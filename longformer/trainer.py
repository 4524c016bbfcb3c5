"""One training loop for every script, in the spirit of nanoGPT's: torch.distributed (DDP), autocast,
gradient accumulation, clipping, AdamW, linear warm-up and decay, evaluation reduced across ranks,
rank-0 logging and atomic checkpoints that resume exactly.

A task (longformer/tasks/: masked LM, documents, tokens, spans) supplies what differs: how a batch is made
and what it is scored on. Launch one process with `python script.py`, or several with
`python -m torch.distributed.run`.
"""
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .run_files import (is_better, latest_checkpoint, load_checkpoint, pointed_checkpoint, read_out,
                        remove_partial_checkpoints, save_checkpoint, settings_hash, start_out)
from .tasks.base import Task

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
REPORT_TO = ("none", "tensorboard")


@dataclass
class TrainArgs:
    out: str
    epochs: float = 1.0
    max_steps: int = 0  # optimizer steps; 0 = as many as `epochs` take
    batch_size: int = 8  # examples per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 5e-5
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup: float = 0.1  # fraction of the steps spent warming up
    clip: float = 1.0  # gradient norm clip; 0 = off
    precision: str = "fp32"  # fp32, bf16 (autocast), fp16 (autocast + GradScaler)
    eval_every: int = 0  # steps; 0 = at the end of each epoch
    log_every: int = 10
    seed: int = 0
    target: float = 0.0  # stop once the evaluation's target_metric reaches this (0 = never)
    target_metric: str = "accuracy"
    stop_after: int = 0  # end this invocation after this many steps; the same command continues (0 = never)
    max_bad_steps: int = 10  # stop after this many steps in a row with a non-finite loss or gradient norm
    device: str = "auto"  # auto (cuda when torch sees a GPU), cpu, cuda
    keep_checkpoints: int = 2  # the newest checkpoints kept (at least 1)
    keep_best: str = ""  # also keep the best checkpoint by this evaluation metric (loss, accuracy, f1, ...)
    report_to: str = "none"  # none, or tensorboard (OUT/tensorboard; pip install tensorboard)
    compile: bool = False  # torch.compile the model (its first steps take a minute or two to compile)


# -- distributed set-up -------------------------------------------------------------------------

def pick_device(device: str = "auto") -> torch.device:
    """auto: the GPU of this process's LOCAL_RANK when torch sees one, else the CPU."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device: install a CUDA build of torch, "
                         "or train with --device cpu")
    if local >= torch.cuda.device_count():
        raise SystemExit(f"process {local} on this node has no GPU of its own ({torch.cuda.device_count()} "
                         f"visible): start at most that many processes per node (--nproc_per_node)")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def setup_distributed(device: str = "auto"):
    """(rank, world, device). Under torchrun (RANK set) a process group, even for one process, so that its
    collectives (NCCL on GPUs, gloo on CPU) run as in a larger job; plain `python` is one process without."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    dev = pick_device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
        if restarted and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            dist.init_process_group(backend, store=attempt_store(world), rank=rank, world_size=world)
        else:
            dist.init_process_group(backend)
    return rank, world, dev


def leave():
    """End a script whose work is done and written, with status 0. Under torchrun the interpreter's own
    teardown aborts (std::terminate in a C++ static destructor) in about one exit in ten on this machine with
    torch 2.13, at the commit before ours as well, and destroying the process group first did not prevent it;
    torchrun then reports a failed worker. Nothing is left to tear down, so under torchrun the process ends
    here."""
    if dist.is_torchelastic_launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def attempt_store(world: int):
    """torchrun's store, with keys of this restart attempt only. torchrun keeps one store across the restarts
    of --max-restarts, and without a prefix the restarted workers read the addresses that the dead ones left
    there: they fail to connect, or wait for them."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    return dist.PrefixStore(f"longformer/attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def barrier():
    if dist.is_initialized():
        dist.barrier()


class StopSignals:
    """SIGTERM and SIGINT ask the loop to finish its step, write a checkpoint and exit (a preempted job is
    requeued and continues); a second signal exits at once."""

    def __init__(self):
        self.received = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# -- optimisation ----------------------------------------------------------------------------------

def make_optimizer(model, args: TrainArgs):
    """AdamW; biases and LayerNorm weights are not decayed."""
    no_decay = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    no_decay |= {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": args.weight_decay},
              {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
    # fused: one kernel for all parameters on a GPU instead of several per parameter tensor
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                             fused=params[0].is_cuda)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def skip_bad_step(args: TrainArgs, state: dict, log, fatal: bool, bar):
    """Count a step that was not applied (non-finite loss or gradient norm); stop after --max-bad-steps in a row."""
    state["bad_steps"] = state.get("bad_steps", 0) + 1
    state["bad_in_a_row"] = state.get("bad_in_a_row", 0) + int(fatal)
    log({"step": state["step"] + 1, "skipped": "non-finite loss or gradient norm", "bad_steps": state["bad_steps"]})
    if state["bad_in_a_row"] >= args.max_bad_steps:
        bar.close()
        raise SystemExit(f"stopped at step {state['step'] + 1}: {state['bad_in_a_row']} steps in a row had a "
                         f"non-finite loss or gradient norm ({state['bad_steps']} skipped in all). The last good "
                         f"checkpoint is kept: {pointed_checkpoint(args.out) or 'none yet'}. Try a lower --lr (now "
                         f"{args.lr}), --precision bf16 rather than fp16, or gradient clipping (--clip, now {args.clip})")


def tensorboard_writer(args: TrainArgs):
    """A SummaryWriter in OUT/tensorboard for --report-to tensorboard, else None."""
    if args.report_to != "tensorboard":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise SystemExit(f"--report-to tensorboard needs the tensorboard package: pip install tensorboard ({e})")
    return SummaryWriter(os.path.join(args.out, "tensorboard"))


def injected_nan(step: int) -> bool:
    """Test hook: LONGFORMER_TEST_NAN_STEPS="3,5" (or "all") makes those steps' loss NaN."""
    steps = os.environ.get("LONGFORMER_TEST_NAN_STEPS", "")
    return steps == "all" or str(step) in steps.split(",")


def out_of_memory_hint(args: TrainArgs, seq_len) -> str:
    return (f"a batch of {args.batch_size} x {seq_len} tokens does not fit in memory: lower --batch-size "
            f"(and raise --grad-accum by the same factor to keep the global batch), add --gradient-checkpointing, "
            f"or train with --precision bf16")


# -- the loop --------------------------------------------------------------------------------------

def train(model, task: Task, train_set, val_set, args: TrainArgs, run: dict, resume=False, overwrite=False):
    """Train model on train_set (a sequence of examples), evaluating on val_set. Returns the last metrics."""
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    what = read_out(args.out, run, resume, overwrite)
    barrier()  # every rank has read --out before the first one changes it
    if what == "finished":
        if master:
            print(f"the run in {args.out} is finished (its final model is there): nothing to do")
        return {}
    if what == "new" and master:
        start_out(args.out, run)
    if what == "continue" and master:
        remove_partial_checkpoints(args.out)
    barrier()
    torch.manual_seed(args.seed + rank)
    model.to(device)
    if args.compile:
        model.compile()  # in place: the state dict's names stay the model's own
    global_batch = args.batch_size * args.grad_accum * world
    steps_per_epoch = len(train_set) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"the training set has {len(train_set)} examples, fewer than one global batch "
                         f"({args.batch_size} x {args.grad_accum} accumulation x {world} processes)")
    if len(val_set) < world:
        raise SystemExit(f"the validation set has {len(val_set)} examples, fewer than the {world} processes")
    if args.keep_checkpoints < 1:
        raise SystemExit("--keep-checkpoints must be at least 1: the run continues from its newest checkpoint")
    total = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    optimizer = make_optimizer(model, args)
    scheduler = linear_schedule(optimizer, int(args.warmup * total), total)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    autocast = torch.autocast(device.type, dtype=PRECISIONS[args.precision], enabled=args.precision != "fp32")
    state = {"step": 0, "samples": 0, "tokens": 0, "train_time": 0.0}

    run_hash = settings_hash(run)
    ckpt = latest_checkpoint(args.out, run_hash, say=print if master else lambda *a: None)
    if ckpt:
        if master:
            print(f"continuing the run in {args.out} from {ckpt}")
        from .checkpoint import load_state_dict_hf
        saved, weights = load_checkpoint(ckpt)
        load_state_dict_hf(model, weights)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = saved["state"]
        set_rng_state(saved["rng"][rank])
    distributed = dist.is_initialized()
    ddp = DDP(model, find_unused_parameters=True) if distributed else model  # global projections idle without global tokens
    metrics, stop, done_here, saved_at = {}, False, 0, state["step"]

    board = tensorboard_writer(args) if master else None

    def log(record):
        if master:
            with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            if board and "step" in record:
                for k, v in record.items():
                    if k not in ("step", "epoch") and isinstance(v, (int, float)):
                        board.add_scalar(k, v, record["step"])

    def evaluate():
        model.eval()
        sums = {}
        with torch.no_grad(), autocast:
            for start in range(rank * args.batch_size, len(val_set), world * args.batch_size):
                idx = range(start, min(start + args.batch_size, len(val_set)))
                batch = to_device(task.collate_eval([val_set[i] for i in idx], seed=args.seed), device)
                for k, v in task.eval_sums(model, batch).items():
                    sums[k] = sums.get(k, 0) + v.detach().double().cpu()
        # One all-reduce for everything: the sums flattened into one vector, then cut back into shape.
        keys = sorted(sums)
        flat = all_sum(torch.cat([sums[k].reshape(-1) for k in keys]).to(device)).cpu()
        totals = dict(zip(keys, flat.split([sums[k].numel() for k in keys])))
        model.train()
        return task.metrics({k: v.reshape(sums[k].shape) for k, v in totals.items()})

    def checkpoint():
        nonlocal saved_at
        saved_at = state["step"]
        rngs = [None] * world
        if distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if master:
            payload = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "scaler": scaler.state_dict(), "state": state, "rng": rngs}
            save_checkpoint(args.out, payload, model, run_hash, args.keep_checkpoints,
                            is_best=state.get("best_step") == state["step"])
        barrier()

    if state["step"] == 0:  # where the run starts, so that progress has a baseline
        metrics = evaluate()
        if args.keep_best and args.keep_best not in metrics:
            raise SystemExit(f"--keep-best {args.keep_best}: this task's evaluation gives {', '.join(metrics)}")
        if master:
            print("before training: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        log({"step": 0, "epoch": 0.0, **{f"eval_{k}": v for k, v in metrics.items()}})
    model.train()
    signals = StopSignals()
    bar = tqdm(total=total, initial=state["step"], disable=not master, dynamic_ncols=True, unit="step")
    window_tokens, window_start, window_loss = 0, time.perf_counter(), []
    while state["step"] < total and not stop:
        epoch, in_epoch = divmod(state["step"], steps_per_epoch)
        order = epoch_order(len(train_set), args.seed, epoch)
        first = order[in_epoch * global_batch:(in_epoch + 1) * global_batch]
        micro = [first[(i * world + rank) * args.batch_size:(i * world + rank + 1) * args.batch_size]
                 for i in range(args.grad_accum)]
        t0 = time.perf_counter()
        batches = [to_device(task.collate([train_set[int(i)] for i in m], seed=args.seed * 7919 + epoch), device)
                   for m in micro]
        n_global = all_sum(sum(task.count(b) for b in batches).to(device, torch.float64)).clamp_min(1)
        step_loss = torch.zeros((), device=device, dtype=torch.float64)
        try:
            for i, batch in enumerate(batches):
                sync = nullcontext() if not distributed or i == len(batches) - 1 else ddp.no_sync()
                with sync:
                    with autocast:
                        loss_sum = task.loss_sum(ddp, batch)
                        if injected_nan(state["step"] + 1):
                            loss_sum = loss_sum * float("nan")
                    # DDP averages gradients over ranks; scaling by world makes the result sum/global count.
                    scaler.scale(loss_sum * (world / n_global.float())).backward()
                step_loss += loss_sum.detach().double()
        except torch.OutOfMemoryError as e:
            raise SystemExit(out_of_memory_hint(args, batches[0]["input_ids"].shape[1])) from e
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip or math.inf)
        # One host sync. A non-finite loss, or (fp32, bf16) gradient norm, means the step is not applied. fp16's
        # scaler skips steps with overflowing gradients by itself, as part of finding its scale: counted, not fatal.
        loss_ok, grad_ok = (bool(torch.isfinite(t)) for t in (all_sum(step_loss.clone()), grad_norm))
        if loss_ok and (grad_ok or scaler.is_enabled()):
            scaler.step(optimizer)
        if not (loss_ok and grad_ok):
            skip_bad_step(args, state, log, fatal=not loss_ok or not scaler.is_enabled(), bar=bar)
        else:
            state["bad_in_a_row"] = 0
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        state["train_time"] += time.perf_counter() - t0
        n_tokens = all_sum(torch.tensor(float(sum(task.tokens(b) for b in batches)), device=device))
        state["step"] += 1
        state["samples"] += global_batch
        state["tokens"] += int(n_tokens)
        window_tokens += int(n_tokens)
        window_loss.append(float(all_sum(step_loss) / n_global))
        done_here += 1
        bar.update(1)

        if state["step"] % args.log_every == 0 or state["step"] == total:
            tok_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            loss = sum(window_loss) / len(window_loss)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", tok_s=f"{tok_s:,.0f}")
            log({"step": state["step"], "epoch": state["step"] / steps_per_epoch, "loss": loss,
                 "lr": scheduler.get_last_lr()[0], "tokens_per_s": tok_s})
            window_tokens, window_start, window_loss = 0, time.perf_counter(), []

        epoch_end = state["step"] % steps_per_epoch == 0
        if (args.eval_every and state["step"] % args.eval_every == 0) or (not args.eval_every and epoch_end) \
                or state["step"] == total:
            metrics = evaluate()
            if master:
                bar.write(f"step {state['step']} (epoch {state['step'] / steps_per_epoch:.2f}): "
                          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            log({"step": state["step"], "epoch": state["step"] / steps_per_epoch,
                 **{f"eval_{k}": v for k, v in metrics.items()}})
            if args.target and metrics.get(args.target_metric, -math.inf) >= args.target:
                if master:
                    bar.write(f"reached {args.target_metric} {metrics[args.target_metric]:.4f} >= {args.target}")
                stop = True
            if args.keep_best and is_better(args.keep_best, metrics[args.keep_best], state.get("best_value")):
                state["best_value"], state["best_step"] = metrics[args.keep_best], state["step"]
            checkpoint()
            window_start = time.perf_counter()
        signalled = signals.received is not None
        if distributed:  # every rank stops at the same step, whichever received the signal
            signalled = bool(all_sum(torch.tensor(float(signalled), device=device)) > 0)
        if (signalled or (args.stop_after and done_here >= args.stop_after)) and not stop and state["step"] < total:
            if saved_at != state["step"]:
                checkpoint()
            bar.close()
            signals.restore()
            if signalled:
                signum = signals.received or signal.SIGTERM
                if master:
                    print(f"{signal.Signals(signum).name}: stopped at step {state['step']} with a checkpoint; the same "
                          f"command continues the run", file=sys.stderr)
                raise SystemExit(128 + signum)  # non-zero, so that a scheduler requeues the job
            if master:
                print(f"stopped after {done_here} steps; the same command (or --resume) continues the run")
            return metrics
    bar.close()
    signals.restore()
    summary = {"samples_per_s": state["samples"] / max(state["train_time"], 1e-9),
               "tokens_per_s": state["tokens"] / max(state["train_time"], 1e-9),
               "steps": state["step"], "train_time_s": state["train_time"]}
    if master:
        model.save_pretrained(args.out)
        print(f"done: {summary['steps']} steps, {summary['samples_per_s']:.2f} samples/s, "
              f"{summary['tokens_per_s']:,.0f} tokens/s; model in {args.out}")
    log({"summary": summary, **{f"final_{k}": v for k, v in metrics.items()}})
    if board:
        board.close()
    barrier()
    return metrics


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
