"""A run's directory (--out): run.json, and checkpoints that are written atomically, verified when read,
and pruned.

    OUT/run.json                       the settings; the same command with the same settings continues the run
    OUT/checkpoints/step-N/            an HF-format model, trainer_state.pt and checkpoint.json (step, a hash
                                       of the settings, every file's size and SHA-256), written last
    OUT/checkpoints/latest, best       the name of the newest checkpoint, and of the best one (--keep-best)

A checkpoint is written under a temporary name and renamed, and only then do the pointers move, so a crash
at any moment (SIGKILL, a full disk) leaves the previous checkpoint whole and pointed to. Reading checks the
sizes and checksums: a damaged checkpoint is named, and the newest whole one is used instead.
"""
import hashlib
import json
import os
import pickle
import shutil

import torch

from .files import atomic_torch_save, atomic_write_text

RESUME_MAY_CHANGE = ("stop_after", "log_every", "num_workers", "predict", "predictions", "cache_dir", "device",
                     "keep_checkpoints", "report_to", "compile")
LOWER_IS_BETTER = ("loss", "perplexity")


# -- run.json ----------------------------------------------------------------------------------------

def read_out(out: str, run: dict, resume: bool, overwrite: bool) -> str:
    """What to do with --out, decided by every rank from the files alone: "new" (start a run there), "continue"
    (the same settings: the same command continues the run), or "finished". Other settings, or files that
    are not a run, are refused."""
    run_file = os.path.join(out, "run.json")
    if overwrite and not resume:
        return "new"
    if not os.path.isfile(run_file):
        if resume:
            raise SystemExit(f"--resume: {out!r} holds no run to resume (no run.json)")
        if os.path.isdir(out) and os.listdir(out):
            raise SystemExit(f"{out!r} already holds files that are not a run (no run.json): choose a new --out, "
                             f"or replace them with --overwrite")
        return "new"
    with open(run_file) as f:
        saved = json.load(f)
    changed = {k: (saved.get(k), v) for k, v in run.items()  # settings that do not change the training may
               if k not in RESUME_MAY_CHANGE and saved.get(k) != v}  # differ
    if changed:
        raise SystemExit(f"{out!r} holds a run with other settings ("
                         + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                         + "): choose a new --out, or replace it with --overwrite")
    return "finished" if os.path.isfile(os.path.join(out, "model.safetensors")) else "continue"


def start_out(out: str, run: dict):
    """A new run: an empty --out (what was there is deleted: --overwrite) holding run.json."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "run.json"), json.dumps(run, indent=2) + "\n")


def settings_hash(run: dict) -> str:
    """What a checkpoint must have been trained with: the settings that change the training."""
    kept = {k: v for k, v in run.items() if k not in RESUME_MAY_CHANGE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


# -- checkpoints -------------------------------------------------------------------------------------

def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def pointed_checkpoint(out: str, name: str = "latest") -> str | None:
    """The checkpoint a pointer (latest, best) names, unverified."""
    path = os.path.join(out, "checkpoints", name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return os.path.join(out, "checkpoints", f.read().strip())


def checkpoint_problem(path: str, run_hash: str | None = None) -> str | None:
    """Why the checkpoint at path cannot be used (missing, damaged, another run's), or None if it is whole."""
    record_file = os.path.join(path, "checkpoint.json")
    try:
        with open(record_file) as f:
            record = json.load(f)
    except FileNotFoundError:
        if all(os.path.isfile(os.path.join(path, f)) for f in ("trainer_state.pt", "model.safetensors")):
            return None  # written before checkpoints recorded their checksums: nothing to check against
        return f"{record_file} is missing" if os.path.isdir(path) else f"{path} is missing"
    except (OSError, json.JSONDecodeError) as e:
        return f"{record_file} is unreadable ({e})"
    if run_hash and record.get("settings_hash") != run_hash:
        return "it was written by a run with other settings"
    for name, expected in record["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != expected["size"]:
            return f"{name} is {os.path.getsize(file):,} bytes, not {expected['size']:,}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _steps(out: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint folder, newest first."""
    root = os.path.join(out, "checkpoints")
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith("step-") and name[5:].isdigit():
            found.append((int(name[5:]), os.path.join(root, name)))
    return sorted(found, reverse=True)


def latest_checkpoint(out: str, run_hash: str | None = None, say=print) -> str | None:
    """The checkpoint to continue from: the one `latest` names if it is whole, else the newest whole one
    (each damaged one is named through say). None if the run has none yet."""
    pointed = pointed_checkpoint(out, "latest")
    candidates = ([pointed] if pointed else []) + [p for _, p in _steps(out) if p != pointed]
    for path in candidates:
        problem = checkpoint_problem(path, run_hash)
        if problem is None:
            return path
        say(f"checkpoint {path} is not usable ({problem}): skipped")
    if candidates:
        raise SystemExit(f"no whole checkpoint in {out}/checkpoints (each is listed above): start again with "
                         f"--overwrite, or restore a checkpoint from a copy")
    return None


def save_checkpoint(out: str, payload: dict, model, run_hash: str, keep: int, is_best: bool = False):
    """checkpoints/step-N/: the model (HF format), payload as trainer_state.pt, checkpoint.json last; then the
    `latest` pointer (and `best`, when is_best), then the oldest beyond `keep` are removed (never the best). A failed write (full disk, no permission) is a clear error, and what was there stays."""
    step = payload["state"]["step"]
    name, root = f"step-{step}", os.path.join(out, "checkpoints")
    tmp, final = os.path.join(root, f".{name}.tmp"), os.path.join(root, name)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        atomic_torch_save(os.path.join(tmp, "trainer_state.pt"), payload)
        files = {f: {"size": os.path.getsize(os.path.join(tmp, f)), "sha256": _sha256(os.path.join(tmp, f))}
                 for f in sorted(os.listdir(tmp))}
        atomic_write_text(os.path.join(tmp, "checkpoint.json"),
                          json.dumps({"step": step, "settings_hash": run_hash, "files": files}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(os.path.join(root, "latest"), name)
        if is_best:
            atomic_write_text(os.path.join(root, "best"), name)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = pointed_checkpoint(out, "latest")
        raise SystemExit(f"could not write checkpoint {name} in {root}: {e.strerror or e}. "
                         + (f"The previous checkpoint, {kept}, is whole and still the one the same command "
                            f"continues from. " if kept else "")
                         + "Free some space or fix the permissions, then run the same command again") from e
    prune(out, keep)


def remove_partial_checkpoints(out: str):
    """The temporary folders of checkpoint writes that a crash cut short."""
    root = os.path.join(out, "checkpoints")
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith(".step-") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def prune(out: str, keep: int):
    """Remove all but the newest `keep` checkpoints, the latest and the best."""
    pinned = {pointed_checkpoint(out, "latest"), pointed_checkpoint(out, "best")}
    for _, path in _steps(out)[keep:]:
        if path not in pinned:
            shutil.rmtree(path, ignore_errors=True)


def is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def load_checkpoint(path):
    """The trainer state and HF state dict of a checkpoint, or a clear error if it is damaged."""
    from .checkpoint import read_state_dict
    state_file = os.path.join(path, "trainer_state.pt")
    try:
        # weights_only: tensors and plain containers only; a pickled object that would run code is refused.
        trainer = torch.load(state_file, map_location="cpu", weights_only=True)
        weights = read_state_dict(path)
    except pickle.UnpicklingError as e:
        raise SystemExit(f"{state_file} holds objects other than tensors and plain containers, which loading could "
                         f"turn into running code: refused. Use checkpoints this library wrote ({e})") from e
    except Exception as e:  # truncated zip, bad safetensors header, missing file
        raise SystemExit(f"checkpoint {path!r} is damaged or incomplete ({type(e).__name__}: {e}). Delete it and "
                         f"point checkpoints/latest at an earlier one, or start again with --overwrite") from e
    return trainer, weights
