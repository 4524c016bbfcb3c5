"""train_mlm.py and the shared loop: data readers, masking, 2-process equivalence, exact resume, bad input."""
import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import ByteLevelBPETokenizer

import longformer
from device import DEVICE
from longformer.data import BlockDataset, mask_tokens, read_npz_pair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the a long document model window token global attention reads writes learns sees each every".split()


def make_text(n_docs, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(30, 80)))) + "." for _ in range(n_docs)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A folder of essays, a tokenizer trained on them and a tiny config without dropout."""
    root = tmp_path_factory.mktemp("mlm")
    (root / "essays").mkdir()
    for i, doc in enumerate(make_text(40)):
        (root / "essays" / f"{i:03d}.txt").write_text(doc)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(make_text(40), vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                            show_progress=False)
    (root / "tok").mkdir()
    tok.save_model(str(root / "tok"))
    config = longformer.LongformerConfig(vocab_size=300, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, attention_window=8, max_position_embeddings=66,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config.save_pretrained(str(root / "cfg"))
    return root


def train_cmd(setup, out, *extra, launcher=None):
    base = [sys.executable, os.path.join(ROOT, "train_mlm.py"), "--data", str(setup / "essays"), "--config",
            str(setup / "cfg"), "--tokenizer", str(setup / "tok"), "--seq-len", "32", "--out", str(out),
            "--cache-dir", str(setup / "cache"), "--lr", "1e-3", "--warmup", "0.2", "--val-fraction", "0.2",
            "--log-every", "1", "--seed", "3", "--device", DEVICE.type, *extra]
    return launcher + base[1:] if launcher else base  # torchrun takes the script, not the interpreter


def run(cmd, ok=True):
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if ok:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def evals(out):
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return [l for l in lines if "eval_loss" in l]


def test_two_processes_equal_one_with_the_same_global_batch(setup, tmp_path):
    """And one process under torchrun (a process group of one, DDP) equals plain python."""
    # NCCL needs a GPU per process: with fewer than two, the distributed arithmetic is checked on CPU (gloo).
    device = ("--device", "cpu") if DEVICE.type == "cuda" and torch.cuda.device_count() < 2 else ()
    run(train_cmd(setup, tmp_path / "one", "--batch-size", "4", "--max-steps", "3", *device))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--master_port", "29533", "--nproc_per_node"]
    run(train_cmd(setup, tmp_path / "two", "--batch-size", "2", "--max-steps", "3", *device,
                  launcher=torchrun + ["2"]))
    run(train_cmd(setup, tmp_path / "one-torchrun", "--batch-size", "4", "--max-steps", "3", *device,
                  launcher=torchrun + ["1"]))
    one = weights(tmp_path / "one")
    for other in ("two", "one-torchrun"):
        for k, v in weights(tmp_path / other).items():
            torch.testing.assert_close(one[k], v, atol=2e-6, rtol=1e-5)
        assert evals(tmp_path / "one")[-1]["eval_loss"] == pytest.approx(evals(tmp_path / other)[-1]["eval_loss"],
                                                                          rel=1e-5)
    torch.manual_seed(3)  # the run's own initialisation: training must have moved away from it
    start = longformer.LongformerForMaskedLM(longformer.LongformerConfig.from_pretrained(str(setup / "cfg")))
    assert (one["lm_head.dense.weight"] - start.lm_head.dense.weight.detach()).abs().max() > 1e-4


def test_accumulation_equals_a_bigger_batch(setup, tmp_path):
    run(train_cmd(setup, tmp_path / "big", "--batch-size", "4", "--max-steps", "2"))
    run(train_cmd(setup, tmp_path / "acc", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "2"))
    big, acc = weights(tmp_path / "big"), weights(tmp_path / "acc")
    for k in big:
        torch.testing.assert_close(big[k], acc[k], atol=2e-6, rtol=1e-5)


def test_resume_reaches_the_same_parameters_and_metrics(setup, tmp_path):
    """--stop-after, then the same command again (no --resume needed): bit-identical to an uninterrupted run;
    a third time, the run says it is finished."""
    common = ("--batch-size", "2", "--max-steps", "8", "--eval-every", "2")
    run(train_cmd(setup, tmp_path / "whole", *common))
    first = run(train_cmd(setup, tmp_path / "split", *common, "--stop-after", "3"))
    assert "the same command (or --resume) continues the run" in first.stdout + first.stderr
    assert not os.path.exists(tmp_path / "split" / "model.safetensors")
    second = run(train_cmd(setup, tmp_path / "split", *common))
    assert "continuing the run in" in second.stdout
    whole, split = weights(tmp_path / "whole"), weights(tmp_path / "split")
    for k in whole:
        torch.testing.assert_close(whole[k], split[k], atol=0, rtol=0)
    assert [e["eval_loss"] for e in evals(tmp_path / "whole")] == [e["eval_loss"] for e in evals(tmp_path / "split")]
    again = run(train_cmd(setup, tmp_path / "split", *common, "--resume"))
    assert "is finished" in again.stdout
    # the finished run is a checkpoint both libraries load
    longformer.LongformerForMaskedLM.from_pretrained(str(tmp_path / "split"))
    assert os.path.isfile(tmp_path / "split" / "vocab.json")


def test_resume_with_dropout_draws_the_same_masks(setup, tmp_path):
    """Attention and hidden dropout 0.1: a run stopped and continued ends bit-identical to one that was not,
    so the continued run draws the dropout decisions the uninterrupted one drew."""
    config = longformer.LongformerConfig.from_pretrained(str(setup / "cfg"))
    config.attention_probs_dropout_prob = config.hidden_dropout_prob = 0.1
    config.save_pretrained(str(tmp_path / "cfg"))
    common = ("--batch-size", "2", "--max-steps", "6", "--eval-every", "3", "--config", str(tmp_path / "cfg"))
    run(train_cmd(setup, tmp_path / "whole", *common))
    run(train_cmd(setup, tmp_path / "split", *common, "--stop-after", "3"))
    run(train_cmd(setup, tmp_path / "split", *common))
    whole, split = weights(tmp_path / "whole"), weights(tmp_path / "split")
    for k in whole:
        torch.testing.assert_close(whole[k], split[k], atol=0, rtol=0)


def test_sigterm_at_a_random_step_then_the_same_command(setup, tmp_path):
    """SIGTERM: the step finishes, a checkpoint is written, exit 143; the same command ends bit-identical to an
    uninterrupted run."""
    common = ("--batch-size", "2", "--max-steps", "120", "--eval-every", "40")  # steps left to catch the signal
    run(train_cmd(setup, tmp_path / "whole", *common))
    at = random.Random().randint(2, 40)
    proc = subprocess.Popen(train_cmd(setup, tmp_path / "cut", *common), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(l).get("step", 0) >= at and "loss" in l for l in open(metrics)):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (at, out[-1000:], err[-2000:])
    assert "SIGTERM: stopped at step" in err and not (tmp_path / "cut" / "model.safetensors").exists()
    run(train_cmd(setup, tmp_path / "cut", *common))
    whole, cut = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    for k in whole:
        torch.testing.assert_close(whole[k], cut[k], atol=0, rtol=0, msg=f"SIGTERM after step {at}: {k}")


def test_damaged_checkpoint_and_other_runs_are_refused(setup, tmp_path):
    out = tmp_path / "run"
    run(train_cmd(setup, out, "--batch-size", "2", "--max-steps", "6", "--eval-every", "2", "--stop-after", "2"))
    latest = open(out / "checkpoints" / "latest").read().strip()
    with open(out / "checkpoints" / latest / "trainer_state.pt", "r+b") as f:
        f.truncate(100)
    done = run(train_cmd(setup, out, "--batch-size", "2", "--max-steps", "6", "--eval-every", "2", "--resume"), ok=False)
    assert done.returncode != 0 and "trainer_state.pt is 100 bytes" in done.stdout
    assert "no whole checkpoint in" in done.stderr
    reseal(out / "checkpoints" / latest)  # sizes and checksums that match: the loader's own check speaks
    done = run(train_cmd(setup, out, "--batch-size", "2", "--max-steps", "6", "--eval-every", "2", "--resume"), ok=False)
    assert done.returncode != 0 and "damaged or incomplete" in done.stderr
    done = run(train_cmd(setup, out, "--batch-size", "2", "--max-steps", "6"), ok=False)
    assert done.returncode != 0 and "holds a run with other settings (eval_every: 2 -> 0)" in done.stderr
    assert (out / "run.json").exists()
    done = run(train_cmd(setup, out, "--batch-size", "3", "--max-steps", "6", "--eval-every", "2", "--resume"), ok=False)
    assert "batch_size: 2 -> 3" in done.stderr


def test_non_finite_steps_are_skipped_then_stop_the_run(setup, tmp_path):
    """A NaN loss at one step: skipped, logged, and the run goes on. NaN at every step from the third on: the
    run stops after --max-bad-steps, naming the step and the kept checkpoint, which loads (the hook:
    LONGFORMER_TEST_NAN_STEPS)."""
    common = ("--batch-size", "2", "--max-steps", "6", "--eval-every", "2")
    env = {**os.environ, "LONGFORMER_TEST_NAN_STEPS": "3"}
    done = subprocess.run(train_cmd(setup, tmp_path / "one", *common), capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(l) for l in open(tmp_path / "one" / "metrics.jsonl")]
    assert [r["step"] for r in records if "skipped" in r] == [3]
    assert all(math.isfinite(v) for v in weights(tmp_path / "one")["lm_head.dense.weight"].flatten().tolist())
    env["LONGFORMER_TEST_NAN_STEPS"] = ",".join(map(str, range(3, 7)))
    done = subprocess.run(train_cmd(setup, tmp_path / "all", *common, "--max-bad-steps", "3"), capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env=env)
    assert done.returncode != 0
    assert "stopped at step 5: 3 steps in a row had a non-finite loss" in done.stderr, done.stderr[-2000:]
    kept = str(tmp_path / "all" / "checkpoints" / "step-4")  # steps 3 and 4 were skipped: its weights are step 2's
    assert f"The last good checkpoint is kept: {kept}" in done.stderr and "lower --lr" in done.stderr
    model = longformer.LongformerForMaskedLM.from_pretrained(kept)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    from longformer.run_files import load_checkpoint
    assert load_checkpoint(kept)[0]["state"]["bad_steps"] == 2


def reseal(checkpoint):
    """Rewrite a checkpoint's checkpoint.json to match its files as they are now."""
    record = json.load(open(checkpoint / "checkpoint.json"))
    for name in record["files"]:
        data = open(checkpoint / name, "rb").read()
        record["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "checkpoint.json").write_text(json.dumps(record))


def test_keep_checkpoints_and_the_best(setup, tmp_path):
    out = tmp_path / "run"
    run(train_cmd(setup, out, "--batch-size", "2", "--max-steps", "6", "--eval-every", "1", "--keep-checkpoints", "1",
                  "--keep-best", "loss", "--lr", "0.3"))  # a high lr: the best is not the last
    losses = {e["step"]: e["eval_loss"] for e in evals(out) if e["step"] > 0}
    best = min(losses, key=losses.get)
    assert best < 6 and open(out / "checkpoints" / "best").read() == f"step-{best}"
    assert sorted(os.listdir(out / "checkpoints")) == ["best", "latest", f"step-{best}", "step-6"]
    done = run(train_cmd(setup, tmp_path / "x", "--max-steps", "1", "--keep-best", "f1"), ok=False)
    assert "--keep-best f1: this task's evaluation gives loss, perplexity, accuracy" in done.stderr


def test_a_damaged_newest_checkpoint_is_named_and_an_older_whole_one_used(setup, tmp_path):
    common = ("--batch-size", "2", "--max-steps", "8", "--eval-every", "2")
    run(train_cmd(setup, tmp_path / "whole", *common))
    out = tmp_path / "split"
    run(train_cmd(setup, out, *common, "--stop-after", "6"))
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-4", "step-6"]
    weights_file = out / "checkpoints" / "step-6" / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 1  # one bit flipped: the same size
    weights_file.write_bytes(bytes(data))
    done = run(train_cmd(setup, out, *common))
    assert "step-6 is not usable (model.safetensors does not match its checksum): skipped" in done.stdout
    assert f"from {out / 'checkpoints' / 'step-4'}" in done.stdout
    whole, split = weights(tmp_path / "whole"), weights(out)
    for k in whole:
        torch.testing.assert_close(whole[k], split[k], atol=0, rtol=0)


def test_a_failed_checkpoint_write_keeps_the_previous_one(setup, tmp_path, monkeypatch):
    """A full disk during a save: a clear error; the previous checkpoint is whole and still `latest`, and the
    same command continues from it."""
    sys.path.insert(0, ROOT)
    import train_mlm
    from longformer import run_files
    saves = []

    def disk_full_at_the_second(path, obj, save=run_files.atomic_torch_save):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        save(path, obj)
    monkeypatch.setattr(run_files, "atomic_torch_save", disk_full_at_the_second)
    out = tmp_path / "run"
    argv = train_cmd(setup, out, "--batch-size", "2", "--max-steps", "6", "--eval-every", "2")[2:]
    with pytest.raises(SystemExit, match=r"could not write checkpoint step-4 in .*: No space left on device\. The "
                                         r"previous checkpoint, .*step-2, is whole"):
        train_mlm.main(argv)
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-2"]
    assert run_files.checkpoint_problem(str(out / "checkpoints" / "step-2")) is None
    monkeypatch.undo()
    done = run(train_cmd(setup, out, "--batch-size", "2", "--max-steps", "6", "--eval-every", "2"))
    assert "step-2" in done.stdout and os.path.isfile(out / "model.safetensors")


def test_sigkill_during_checkpoint_writes_never_leaves_latest_partial(setup, tmp_path):
    """Killed 20 times at random moments of a checkpoint write: `latest` always names a whole checkpoint, the
    same command always continues, and the run ends bit-identical to one that was never killed."""
    from longformer.run_files import checkpoint_problem, pointed_checkpoint
    common = ("--batch-size", "2", "--max-steps", "30", "--eval-every", "1")
    run(train_cmd(setup, tmp_path / "whole", *common))
    out, folder, rng, mid_write = tmp_path / "killed", tmp_path / "killed" / "checkpoints", random.Random(), 0
    def partial():
        return {f for f in os.listdir(folder) if f.startswith(".step-")} if folder.is_dir() else set()

    for _ in range(20):
        left = partial()  # by the previous kill: the run removes it when it starts
        proc = subprocess.Popen(train_cmd(setup, out, *common), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while proc.poll() is None and left & partial():
            time.sleep(0.0005)
        while proc.poll() is None and not partial():
            time.sleep(0.0005)  # until the write of a new checkpoint begins (its temporary folder)
        time.sleep(rng.random() * 0.01)  # a write takes a few milliseconds here
        proc.kill()
        proc.wait()
        mid_write += bool(partial())
        latest = pointed_checkpoint(str(out))
        assert latest is None or checkpoint_problem(latest) is None, latest
    assert mid_write >= 3, f"only {mid_write} of 20 kills came during a write"
    run(train_cmd(setup, out, *common))
    whole, killed = weights(tmp_path / "whole"), weights(out)
    for k in whole:
        torch.testing.assert_close(whole[k], killed[k], atol=0, rtol=0)


def child_pids(pid):
    """The processes whose parent is pid (from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return children


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_elastic_restart_after_a_worker_is_killed(setup, tmp_path):
    """torchrun --max-restarts 1, one of 2 workers killed with SIGKILL at a random step: the run finishes by
    itself (the restarted workers continue from the latest checkpoint), bit-identical to an uninterrupted run.
    The output goes to files: a pipe nobody reads fills up and blocks the writer (torchrun's report of the
    killed worker is long), which once looked like a hang of the restart."""
    device = ("--device", "cpu") if DEVICE.type == "cuda" and torch.cuda.device_count() < 2 else ()
    common = ("--batch-size", "2", "--max-steps", "12", "--eval-every", "2", *device)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", "localhost:29541"]
    run(train_cmd(setup, tmp_path / "whole", *common, launcher=torchrun))
    at = random.Random().randint(3, 9)
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        cmd = train_cmd(setup, tmp_path / "cut", *common, launcher=torchrun + ["--max-restarts", "1"])
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err)
        metrics, killed = tmp_path / "cut" / "metrics.jsonl", None
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and killed is None:
            if metrics.exists() and any(json.loads(l).get("step", 0) >= at and "loss" in l for l in open(metrics)):
                workers = child_pids(proc.pid)
                if len(workers) == 2:
                    killed = workers[-1]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.01)
        proc.wait(timeout=240)
    output, errors = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert killed is not None, "the run ended before a worker could be killed"
    assert proc.returncode == 0, (at, output[-1000:], errors[-3000:])
    assert "continuing the run in" in output
    whole, cut = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    for k in whole:
        torch.testing.assert_close(whole[k], cut[k], atol=0, rtol=0, msg=f"worker killed after step {at}: {k}")


def test_report_to_tensorboard(setup, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    run(train_cmd(setup, out, "--batch-size", "2", "--max-steps", "3", "--eval-every", "1", "--report-to",
                  "tensorboard"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "tokens_per_s", "eval_loss", "eval_accuracy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval_loss")] == [0, 1, 2, 3]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]


class RunsCode:
    """Unpickling this runs code (it creates a file): what a hostile trainer_state.pt would hold."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_trainer_state_that_would_run_code_is_refused(setup, tmp_path):
    out = tmp_path / "run"
    run(train_cmd(setup, out, "--batch-size", "2", "--max-steps", "4", "--stop-after", "2"))
    latest = open(out / "checkpoints" / "latest").read().strip()
    marker = tmp_path / "code-ran"
    torch.save({"state": RunsCode(str(marker))}, out / "checkpoints" / latest / "trainer_state.pt")
    reseal(out / "checkpoints" / latest)  # whoever can write the state can write its checksums too
    done = run(train_cmd(setup, out, "--batch-size", "2", "--max-steps", "4", "--resume"), ok=False)
    assert done.returncode != 0 and "objects other than tensors and plain containers" in done.stderr
    assert not marker.exists()


def test_token_ids_outside_the_vocabulary_are_named(setup, tmp_path):
    ids = np.random.default_rng(0).integers(3, 290, (6, 16))
    ids[4, 7] = 305  # the setup's vocabulary has 300 ids
    for name in ("train_dataset.npz", "eval_dataset.npz"):
        np.savez(tmp_path / name, input_ids=ids, attention_mask=np.ones_like(ids), special_tokens_mask=np.zeros_like(ids))
    cmd = [sys.executable, os.path.join(ROOT, "train_mlm.py"), "--data", str(tmp_path), "--config", str(setup / "cfg"),
           "--out", str(tmp_path / "run"), "--device", DEVICE.type, "--max-steps", "1"]
    done = run(cmd, ok=False)
    assert done.returncode != 0
    assert "holds token id 305, but the model's vocabulary has 300 ids (0..299)" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("args,message", [
    (("--data", "/nonexistent"), "does not exist"),
    (("--lr", "abc"), "'abc' is not a number"),
    (("--lr", "-1"), "-1 must be >= 0"),
    (("--seq-len", "100"), "--seq-len 100 is longer than the model's position table (64 tokens)"),
])
def test_bad_input(setup, tmp_path, args, message):
    done = run(train_cmd(setup, tmp_path / "bad", *args), ok=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "bad" / "run.json").exists() or message.startswith("-")


def test_empty_data(setup, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("  \n")
    done = run(train_cmd(setup, tmp_path / "o", "--data", str(tmp_path / "empty")), ok=False)
    assert "holds no text" in done.stderr


def test_out_of_memory_is_explained():
    from longformer.trainer import Task, TrainArgs, train

    class Exploding(Task):
        def collate(self, examples, seed):
            return {"input_ids": torch.zeros(len(examples), 8, dtype=torch.long),
                    "attention_mask": torch.ones(len(examples), 8, dtype=torch.long)}

        def count(self, batch):
            return torch.tensor(1)

        def loss_sum(self, model, batch):
            raise torch.OutOfMemoryError("CUDA out of memory")

        def eval_sums(self, model, batch):
            return {"count": torch.tensor(1.0)}

        def metrics(self, sums):
            return {k: float(v) for k, v in sums.items()}

    import tempfile
    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda d: None
    data = BlockDataset(np.zeros((8, 8)))
    with pytest.raises(SystemExit, match="lower --batch-size .* --grad-accum"):
        train(model, Exploding(), data, data, TrainArgs(out=tempfile.mkdtemp() + "/o", batch_size=2), {})


def test_masking_follows_80_10_10_and_spares_special_tokens():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    ids = torch.randint(5, 1000, (n,))
    maskable = torch.rand(n, generator=g) > 0.1  # 10% special or padding
    masked, labels = mask_tokens(ids, maskable, g, mask_id=4, vocab_size=1000)
    chosen = labels.ne(-100)
    assert not chosen[~maskable].any() and torch.equal(masked[~maskable], ids[~maskable])
    assert torch.equal(labels[chosen], ids[chosen])
    frac = chosen.sum() / maskable.sum()
    assert abs(frac - 0.15) < 0.005
    n_chosen = chosen.sum()
    to_mask = (masked[chosen] == 4).sum() / n_chosen
    kept = (masked[chosen] == ids[chosen]).sum() / n_chosen
    assert abs(to_mask - 0.8) < 0.01 and abs(kept - 0.1 - 0.001) < 0.01  # random may hit the same id: ~1/1000
    assert abs(1 - to_mask - kept - 0.1) < 0.01


def test_flagperf_npz_pair(tmp_path):
    ids = np.random.default_rng(0).integers(3, 100, (5, 16))
    special = np.zeros_like(ids)
    special[:, [0, -1]] = 1
    for name in ("train_dataset.npz", "eval_dataset.npz"):
        np.savez(tmp_path / name, input_ids=ids, attention_mask=np.ones_like(ids), special_tokens_mask=special)
    train, val = read_npz_pair(str(tmp_path))
    assert len(train) == 5 and train.seq_len == 16 and train[2]["special_tokens_mask"][0] == 1
    np.savez(tmp_path / "eval_dataset.npz", input_ids=ids)
    with pytest.raises(SystemExit, match="lacks the arrays"):
        read_npz_pair(str(tmp_path))


def test_plot_draws_the_curves(tmp_path):
    pytest.importorskip("matplotlib")
    from longformer.plot import plot
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(0, 50, 10):
            f.write(json.dumps({"step": step, "loss": 5 - step / 20, "lr": 1e-3, "tokens_per_s": 100.0}) + "\n")
            f.write(json.dumps({"step": step, "eval_loss": 5 - step / 25, "eval_accuracy": step / 100}) + "\n")
    out = plot(str(tmp_path))
    assert out.endswith("curves.png") and open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_prepared_shards_train_without_a_tokenizer(setup, tmp_path):
    """--data a shard folder: <mask> and the special ids come from its manifest, so a random model needs no
    tokenizer; every packing trains; a folder prepared with another tokenizer is refused."""
    shards = tmp_path / "shards"
    run([sys.executable, "-m", "longformer.prepare_data", str(setup / "essays"), str(shards), "--tokenizer",
         str(setup / "tok"), "--val-fraction", "0.2", "--workers", "1"])
    for packing in ("documents", "single", "concat"):
        out = tmp_path / f"run-{packing}"
        done = run([sys.executable, os.path.join(ROOT, "train_mlm.py"), "--data", str(shards), "--config",
                    str(setup / "cfg"), "--seq-len", "32", "--packing", packing, "--max-steps", "2", "--batch-size",
                    "2", "--out", str(out), "--device", DEVICE.type])
        assert f"({packing} packing)" in done.stdout and os.path.isfile(out / "model.safetensors")
        assert "<mask> taken to be" not in done.stdout
    # --val-data as text: all of it validates (tokenized into the cache with no split of its own)
    done = run([sys.executable, os.path.join(ROOT, "train_mlm.py"), "--data", str(shards), "--val-data",
                str(setup / "essays"), "--tokenizer", str(setup / "tok"), "--config", str(setup / "cfg"), "--seq-len",
                "32", "--max-steps", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "val")])
    assert "40 training documents" in done.stdout  # the essays' summary: none held out of --val-data
    unsplit = tmp_path / "unsplit"
    run([sys.executable, "-m", "longformer.prepare_data", str(setup / "essays"), str(unsplit), "--tokenizer",
         str(setup / "tok"), "--val-fraction", "0"])
    done = run([sys.executable, os.path.join(ROOT, "train_mlm.py"), "--data", str(unsplit), "--config",
                str(setup / "cfg"), "--seq-len", "32", "--out", str(tmp_path / "none")], ok=False)
    assert "holds no validation documents (prepared with --val-fraction 0): give --val-data" in done.stderr
    other = tmp_path / "tok2"
    other.mkdir()
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(make_text(20, seed=1), vocab_size=280, special_tokens=["<s>", "<pad>", "</s>", "<unk>",
                                                                                      "<mask>"], show_progress=False)
    tok.save_model(str(other))
    done = run([sys.executable, os.path.join(ROOT, "train_mlm.py"), "--data", str(shards), "--config",
                str(setup / "cfg"), "--tokenizer", str(other), "--seq-len", "32", "--out", str(tmp_path / "x")],
               ok=False)
    assert done.returncode != 0 and "another tokenizer" in done.stderr

