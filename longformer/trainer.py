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
    num_workers: int = -1  # processes collating the next batches while a step runs; -1: as fits the device


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
    # fused: one kernel for all parameters instead of several per parameter tensor, and it skips a step on the
    # device where told to (found_inf), with no read-back
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                             fused=True)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


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


def default_workers(device: torch.device) -> int:
    """Collating processes when --num-workers is not given: on a GPU, up to 4 of this process's share of the
    cores (the GPU computes); on CPU one, which waits more than it works beside the step's own threads."""
    if device.type != "cuda":
        return 1
    share = (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(4, share - 1))


# -- the loop --------------------------------------------------------------------------------------

def train(model, task: Task, train_set, val_set, args: TrainArgs, run: dict, resume=False, overwrite=False):
    """Train model on train_set (a sequence of examples), evaluating on val_set. Returns the last metrics."""
    r = start_run(model, task, train_set, val_set, args, run, resume, overwrite)
    if r is None:
        return {}
    metrics = evaluate_and_log(r, val_set) if r.state["step"] == 0 else {}  # where the run starts: a baseline
    signals, window, done_here = StopSignals(), Window(r), 0
    bar = tqdm(total=r.total, initial=r.state["step"], disable=not r.master, dynamic_ncols=True, unit="step")
    try:
        for batches, tokens in step_batches(r, train_set):
            window.add(train_step(r, batches), tokens)
            step, done_here = r.state["step"], done_here + 1
            bar.update(1)
            evaluating = step == r.total or (step % args.eval_every == 0 if args.eval_every
                                             else step % r.steps_per_epoch == 0)
            # One process stops at the step its signal came in; ranks agree on it when they read their results.
            stopping = bool(args.stop_after and done_here >= args.stop_after) or (r.world == 1 and
                                                                                 signals.received is not None)
            signalled = False
            if step % args.log_every == 0 or evaluating or stopping:
                signalled = window.flush(signals, bar)
            if evaluating:
                metrics = evaluate_and_log(r, val_set, bar)
                save(r)
                window.restart()
                if args.target and metrics.get(args.target_metric, -math.inf) >= args.target:
                    r.say(f"reached {args.target_metric} {metrics[args.target_metric]:.4f} >= {args.target}", bar)
                    break
            if (stopping or signalled) and step < r.total:  # a signal on another rank counts as SIGTERM here
                signum = signals.received or (signal.SIGTERM if signalled else None)
                return stop_early(r, signum, done_here, metrics, saved=evaluating)
    finally:
        bar.close()
        signals.restore()
    return finish(r, metrics)


def train_step(r: "Run", batches: list) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches, with nothing read back to the host: the step is skipped
    on the device where its loss or gradient norm is not finite. Returns this rank's [loss sum, count it is over,
    loss not finite, gradient norm not finite] on the device."""
    args, ddp = r.args, r.ddp
    # The loss is a sum over what the step predicts, divided by the global count once the count has arrived, on the
    # gradients; until then a scale that is the same on every rank keeps them in fp16's range.
    scale = 1.0 / r.global_batch
    loss = torch.zeros((), device=r.device, dtype=torch.float64)
    try:
        for i, batch in enumerate(batches):
            distributed = dist.is_initialized() and i < len(batches) - 1  # DDP reduces the last micro-step only
            with ddp.no_sync() if distributed else nullcontext():
                with r.autocast:
                    loss_sum = r.task.loss_sum(ddp, batch)
                    if injected_nan(r.state["step"] + 1):
                        loss_sum = loss_sum * float("nan")
                r.scaler.scale(loss_sum * scale).backward()
            loss += loss_sum.detach().double()
    except torch.OutOfMemoryError as e:
        raise SystemExit(out_of_memory_hint(args, batches[0]["input_ids"].shape[1])) from e
    local = torch.stack([loss, sum(r.task.count(b) for b in batches).double(), (~loss.isfinite()).double()])
    total = local[1:].clone()  # [count, ranks whose loss is not finite], summed over ranks behind DDP's reduction
    if dist.is_initialized():
        dist.all_reduce(total, async_op=True).wait()  # on a GPU the stream waits, not the host
    r.scaler.unscale_(r.optimizer)
    grads = [p.grad for p in r.model.parameters() if p.grad is not None]
    # DDP averaged the ranks' gradients: times the world size, over the global count, they are sum / count.
    torch._foreach_mul_(grads, (r.world / scale / total[0].clamp_min(1)).to(grads[0].dtype))
    grad_norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), args.clip or math.inf)
    grad_bad = ~grad_norm.isfinite()
    if r.scaler.is_enabled():  # fp16: the scaler skips steps with overflowing gradients itself, finding its scale
        r.scaler.step(r.optimizer)
    else:  # fused AdamW skips the step on the device where found_inf is 1, as GradScaler has it do
        r.optimizer.grad_scale, r.optimizer.found_inf = None, (grad_bad | (total[1] > 0)).float()
        r.optimizer.step()
    r.scaler.update()
    r.optimizer.zero_grad(set_to_none=True)
    r.scheduler.step()
    r.state["step"] += 1
    r.state["samples"] += r.global_batch
    return torch.cat([local, grad_bad.double().view(1)])


class StepBatches(torch.utils.data.Dataset):
    """Item k: this rank's micro-batches of optimizer step k, collated, and their token count: a pure function of
    the seed, the epoch and the step, so that a resumed run reads what an uninterrupted one read, whichever
    process collates it."""

    def __init__(self, r: "Run", examples):
        self.task, self.examples, self.args, self.rank, self.world = r.task, examples, r.args, r.rank, r.world
        self.steps_per_epoch, self.global_batch, self.order = r.steps_per_epoch, r.global_batch, (None, None)

    def __getitem__(self, step: int):
        a = self.args
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        if self.order[0] != epoch:
            self.order = (epoch, epoch_order(len(self.examples), a.seed, epoch))
        first = self.order[1][in_epoch * self.global_batch:(in_epoch + 1) * self.global_batch]
        starts = [(i * self.world + self.rank) * a.batch_size for i in range(a.grad_accum)]
        batches = [self.task.collate([self.examples[int(j)] for j in first[s:s + a.batch_size]], seed=a.seed * 7919
                                     + epoch) for s in starts]
        return batches, sum(self.task.tokens(b) for b in batches)


def step_batches(r: "Run", examples):
    """(micro-batches on the device, tokens) of the steps from state["step"] on, collated ahead by --num-workers
    processes while the current step runs (into pinned memory, for the copy to a GPU)."""
    workers = r.args.num_workers if r.args.num_workers >= 0 else default_workers(r.device)
    # A generator of its own: the loader draws its workers' seed from it, not from torch's global one, whose state
    # the checkpoints carry (dropout draws from it) and where an extra draw would break a bit-identical resume.
    loader = torch.utils.data.DataLoader(StepBatches(r, examples), batch_size=None, num_workers=workers,
                                         sampler=range(r.state["step"], r.total), pin_memory=r.device.type == "cuda",
                                         prefetch_factor=2 if workers else None, generator=torch.Generator())
    for batches, tokens in loader:
        yield [to_device(b, r.device) for b in batches], tokens


class Window:
    """The steps since the last read-back. Their results stay on the device until flush reads them, once per log
    interval (and before an evaluation or a stop), in one all-reduce across ranks that carries the stop signals."""

    def __init__(self, r: "Run"):
        self.r = r
        self.restart()

    def restart(self):
        self.results, self.tokens, self.start = [], [], time.perf_counter()

    def add(self, result: torch.Tensor, tokens: torch.Tensor):
        self.results.append(result)
        self.tokens.append(tokens)

    def flush(self, signals: StopSignals, bar) -> bool:
        """Log the window's steps (and any skipped ones); whether any rank received a stop signal."""
        r, n = self.r, len(self.results)
        extra = torch.tensor([float(sum(self.tokens)), float(signals.received is not None)], dtype=torch.float64)
        values = all_sum(torch.cat([torch.stack(self.results).flatten(), extra.to(r.device)])).tolist()
        elapsed = time.perf_counter() - self.start  # after the read-back, which waited for the steps to finish
        r.state["train_time"] += elapsed
        r.state["tokens"] += int(values[-2])
        losses = []
        rows = [values[i:i + 4] for i in range(0, 4 * n, 4)]  # each step's train_step result, summed over ranks
        for step, (loss_sum, count, loss_bad, grad_bad) in enumerate(rows, r.state["step"] - n + 1):
            losses.append(loss_sum / max(count, 1))
            if loss_bad or grad_bad:  # fp16's overflowing gradients are part of finding its scale: not fatal
                count_bad_step(r, step, fatal=bool(loss_bad) or not r.scaler.is_enabled())
            else:
                r.state["bad_in_a_row"] = 0
        loss, tok_s, lr = sum(losses) / n, values[-2] / max(elapsed, 1e-9), r.scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        r.log({"step": r.state["step"], "epoch": r.state["step"] / r.steps_per_epoch, "loss": loss, "lr": lr,
               "tokens_per_s": tok_s})
        self.restart()
        return values[-1] > 0


def count_bad_step(r: "Run", step: int, fatal: bool):
    """A step that was not applied (non-finite loss or gradient norm); stop after --max-bad-steps in a row."""
    s = r.state
    s["bad_steps"] = s.get("bad_steps", 0) + 1
    s["bad_in_a_row"] = s.get("bad_in_a_row", 0) + int(fatal)
    r.log({"step": step, "skipped": "non-finite loss or gradient norm", "bad_steps": s["bad_steps"]})
    if s["bad_in_a_row"] >= r.args.max_bad_steps:
        args = r.args
        raise SystemExit(f"stopped at step {step}: {s['bad_in_a_row']} steps in a row had a non-finite loss or "
                         f"gradient norm ({s['bad_steps']} skipped in all). The last good checkpoint is kept: "
                         f"{pointed_checkpoint(args.out) or 'none yet'}. Try a lower --lr (now {args.lr}), --precision "
                         f"bf16 rather than fp16, or gradient clipping (--clip, now {args.clip})")


# -- the run: start, evaluation, checkpoints, the end ----------------------------------------------------

@dataclass
class Run:
    """What the pieces of a run share. state (the step, counts, the best evaluation) is checkpointed."""
    args: TrainArgs
    task: Task
    model: torch.nn.Module
    ddp: torch.nn.Module  # the model, or the model in DDP under torch.distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: torch.autocast
    device: torch.device
    rank: int
    world: int
    run_hash: str
    steps_per_epoch: int
    total: int
    state: dict
    board: object = None  # a tensorboard SummaryWriter, on rank 0

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step, over every rank and micro-step."""
        return self.args.batch_size * self.args.grad_accum * self.world

    def say(self, text: str, bar=None):
        if self.master:
            (bar.write if bar else print)(text)

    def log(self, record: dict):
        """A line of OUT/metrics.jsonl (and tensorboard's scalars), from rank 0."""
        if not self.master:
            return
        with open(os.path.join(self.args.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board and "step" in record:
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.board.add_scalar(k, v, record["step"])


def start_run(model, task, train_set, val_set, args: TrainArgs, run: dict, resume: bool, overwrite: bool):
    """The process group, --out, the model on its device, the optimizer, and the newest checkpoint's state where
    the run continues. None where the run in --out is finished."""
    rank, world, device = setup_distributed(args.device)
    what = read_out(args.out, run, resume, overwrite)
    barrier()  # every rank has read --out before the first one changes it
    if what == "finished":
        if rank == 0:
            print(f"the run in {args.out} is finished (its final model is there): nothing to do")
        return None
    if rank == 0:
        if what == "new":
            start_out(args.out, run)
        else:
            remove_partial_checkpoints(args.out)
    barrier()
    torch.manual_seed(args.seed + rank)
    model.to(device)
    if args.compile:
        model.compile()  # in place: the state dict's names stay the model's own
    steps_per_epoch = len(train_set) // (args.batch_size * args.grad_accum * world)
    if steps_per_epoch == 0:
        raise SystemExit(f"the training set has {len(train_set)} examples, fewer than one global batch "
                         f"({args.batch_size} x {args.grad_accum} accumulation x {world} processes)")
    if len(val_set) < world:
        raise SystemExit(f"the validation set has {len(val_set)} examples, fewer than the {world} processes")
    if args.keep_checkpoints < 1:
        raise SystemExit("--keep-checkpoints must be at least 1: the run continues from its newest checkpoint")
    total = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    optimizer = make_optimizer(model, args)
    r = Run(args, task, model, model, optimizer, linear_schedule(optimizer, int(args.warmup * total), total),
            torch.amp.GradScaler(device.type, enabled=args.precision == "fp16"),
            torch.autocast(device.type, dtype=PRECISIONS[args.precision], enabled=args.precision != "fp32"),
            device, rank, world, settings_hash(run), steps_per_epoch, total,
            {"step": 0, "samples": 0, "tokens": 0, "train_time": 0.0})
    resume_from_checkpoint(r)
    if dist.is_initialized():  # unused parameters: the global projections idle without global tokens
        r.ddp = DDP(model, find_unused_parameters=True)
    r.board = tensorboard_writer(args) if r.master else None
    return r


def resume_from_checkpoint(r: Run):
    ckpt = latest_checkpoint(r.args.out, r.run_hash, say=print if r.master else lambda *a: None)
    if not ckpt:
        return
    r.say(f"continuing the run in {r.args.out} from {ckpt}")
    from .checkpoint import load_state_dict_hf
    saved, weights = load_checkpoint(ckpt)
    load_state_dict_hf(r.model, weights)
    r.optimizer.load_state_dict(saved["optimizer"])
    r.scheduler.load_state_dict(saved["scheduler"])
    r.scaler.load_state_dict(saved["scaler"])
    r.state = saved["state"]
    set_rng_state(saved["rng"][r.rank])


def save(r: Run):
    """A checkpoint of the step just taken: weights, optimizer, schedule, state and every rank's random state."""
    rngs = [None] * r.world
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if r.master:
        payload = {"optimizer": r.optimizer.state_dict(), "scheduler": r.scheduler.state_dict(),
                   "scaler": r.scaler.state_dict(), "state": r.state, "rng": rngs}
        save_checkpoint(r.args.out, payload, r.model, r.run_hash, r.args.keep_checkpoints,
                        is_best=r.state.get("best_step") == r.state["step"])
    barrier()


def evaluate(r: Run, val_set) -> dict:
    """The task's metrics over val_set, each rank a share of it, summed across ranks in one all-reduce."""
    args, model = r.args, r.model
    model.eval()
    sums = {}
    with torch.no_grad(), r.autocast:
        for start in range(r.rank * args.batch_size, len(val_set), r.world * args.batch_size):
            idx = range(start, min(start + args.batch_size, len(val_set)))
            batch = to_device(r.task.collate_eval([val_set[i] for i in idx], seed=args.seed), r.device)
            for k, v in r.task.eval_sums(model, batch).items():
                sums[k] = sums.get(k, 0) + v.detach().double().cpu()
    keys = sorted(sums)  # the sums flattened into one vector, then cut back into shape
    flat = all_sum(torch.cat([sums[k].reshape(-1) for k in keys]).to(r.device)).cpu()
    totals = dict(zip(keys, flat.split([sums[k].numel() for k in keys])))
    model.train()
    return r.task.metrics({k: v.reshape(sums[k].shape) for k, v in totals.items()})


def evaluate_and_log(r: Run, val_set, bar=None) -> dict:
    """Evaluate, print and log the metrics, and note the best step for --keep-best."""
    metrics, step, keep = evaluate(r, val_set), r.state["step"], r.args.keep_best
    if keep and keep not in metrics:
        raise SystemExit(f"--keep-best {keep}: this task's evaluation gives {', '.join(metrics)}")
    where = f"step {step} (epoch {step / r.steps_per_epoch:.2f})" if step else "before training"
    r.say(f"{where}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), bar)
    r.log({"step": step, "epoch": step / r.steps_per_epoch, **{f"eval_{k}": v for k, v in metrics.items()}})
    if step and keep and is_better(keep, metrics[keep], r.state.get("best_value")):
        r.state["best_value"], r.state["best_step"] = metrics[keep], step
    return metrics


def stop_early(r: Run, signum: int | None, done_here: int, metrics: dict, saved: bool):
    """--stop-after (signum None), or a stop signal: a checkpoint of this step (unless one was just written); the
    same command continues the run. A signal exits non-zero, so that a scheduler requeues the job."""
    if not saved:
        save(r)
    if signum is not None:
        if r.master:
            print(f"{signal.Signals(signum).name}: stopped at step {r.state['step']} with a checkpoint; the same "
                  f"command continues the run", file=sys.stderr)
        raise SystemExit(128 + signum)
    r.say(f"stopped after {done_here} steps; the same command (or --resume) continues the run")
    return metrics


def finish(r: Run, metrics: dict) -> dict:
    """The final model in HF format in --out, and the run's throughput."""
    s = r.state
    summary = {"samples_per_s": s["samples"] / max(s["train_time"], 1e-9),
               "tokens_per_s": s["tokens"] / max(s["train_time"], 1e-9), "steps": s["step"],
               "train_time_s": s["train_time"]}
    if r.master:
        r.model.save_pretrained(r.args.out)
        print(f"done: {summary['steps']} steps, {summary['samples_per_s']:.2f} samples/s, "
              f"{summary['tokens_per_s']:,.0f} tokens/s; model in {r.args.out}")
    r.log({"summary": summary, **{f"final_{k}": v for k, v in metrics.items()}})
    if r.board:
        r.board.close()
    barrier()
    return metrics


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
