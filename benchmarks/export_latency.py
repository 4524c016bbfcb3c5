"""Latency of an exported model in onnxruntime against PyTorch eager, same process, this machine.

    python benchmarks/export_latency.py [--lengths 512 4096] [--out benchmarks/results-export-cpu.json]

longformer-base (random weights), sequence classification, batch 1, global attention on <s> (the export's
one slot), fp32. Medians of --repeats calls after one warm-up; the ONNX file is written to a temporary folder.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import median_time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import longformer  # noqa: E402
from longformer import export  # noqa: E402

BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            attention_window=512, id2label={0: "negative", 1: "positive"})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results-export-cpu.json")
    args = p.parse_args()
    import onnxruntime
    torch.manual_seed(0)
    model = longformer.LongformerForSequenceClassification(
        longformer.LongformerConfig(**BASE, max_position_embeddings=max(args.lengths) + 2)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        t = time.perf_counter()
        worst = export.export_onnx(model, path, max_global_tokens=1)
        export_s = time.perf_counter() - t
        served = export.OnnxLongformer(path)
        rows = []
        for L in args.lengths:
            ids = torch.randint(3, 50000, (1, L))
            with torch.no_grad():
                eager = median_time(lambda: model(ids), args.repeats)
            ort = median_time(lambda: served(ids.numpy()), args.repeats)
            diff = float(np.abs(served(ids.numpy()) - model(ids).logits.detach().numpy()).max())
            rows.append({"length": L, "eager_s": eager, "onnxruntime_s": ort, "max_abs_diff": diff})
            print(f"{L:6} tokens: PyTorch eager {eager * 1e3:8.1f} ms, onnxruntime {ort * 1e3:8.1f} ms "
                  f"({eager / ort:.2f}x), max |diff| {diff:.1e}", flush=True)
    meta = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "export_s": export_s,
            "export_check_max_abs_diff": worst}
    print(json.dumps(meta))
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
