"""Draw a run's curves: python -m longformer.plot RUN_DIR [-o curves.png]

Training loss and validation loss against the step, and every other validation metric (accuracy, F1)
in a second panel. Needs matplotlib (pip install -e ".[plot]").
"""
import argparse
import json
import os


def load_metrics(run_dir: str):
    path = os.path.join(run_dir, "metrics.jsonl") if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise SystemExit(f"no metrics.jsonl in {run_dir!r}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(run_dir: str, out: str | None = None) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit('plotting needs matplotlib: pip install -e ".[plot]"') from e
    records = load_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    others = sorted({k for r in evals for k in r if k.startswith("eval_") and k not in ("eval_loss", "eval_perplexity")})
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(11 if others else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss", alpha=0.6)
    ax.plot([r["step"] for r in evals if "eval_loss" in r], [r["eval_loss"] for r in evals if "eval_loss" in r],
            "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if others:
        ax = axes[0][1]
        for k in others:
            ax.plot([r["step"] for r in evals if k in r], [r[k] for r in evals if k in r], "o-", label=k[5:])
        ax.set_xlabel("step")
        ax.set_ylabel("validation metric")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir), "curves.png")
    fig.savefig(out, dpi=110)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m longformer.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (or its metrics.jsonl)")
    p.add_argument("-o", "--out", help="PNG to write (default: RUN/curves.png)")
    args = p.parse_args(argv)
    print(f"wrote {plot(args.run, args.out)}")


if __name__ == "__main__":
    main()
