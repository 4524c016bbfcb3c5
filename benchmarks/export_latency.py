"""Latency of an exported model in onnxruntime against PyTorch eager, same process, this machine.

    python benchmarks/export_latency.py [--lengths 512 4096] [--global-tokens 1 16] [--out benchmarks/results-export-cpu.json]

longformer-base (random weights), question answering, exported with the defaults (global slots sized from the mask),
batch 1, fp32, the first --global-tokens tokens global (a question). The graph runs in plain onnxruntime, as a
server would. Medians of --repeats calls after one warm-up; the ONNX file is written to a temporary folder.
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
            attention_window=512)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--global-tokens", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results-export-cpu.json")
    args = p.parse_args()
    import onnxruntime
    torch.manual_seed(0)
    model = longformer.LongformerForQuestionAnswering(
        longformer.LongformerConfig(**BASE, max_position_embeddings=max(args.lengths) + 2)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        t = time.perf_counter()
        worst = export.export_onnx(model, path)
        export_s = time.perf_counter() - t
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        rows = []
        for L in args.lengths:
            for n_global in args.global_tokens:
                ids = torch.randint(3, 50000, (1, L))
                am, gm = torch.ones_like(ids), torch.zeros_like(ids)
                gm[:, :n_global] = 1
                feed = {"input_ids": ids.numpy(), "attention_mask": am.numpy(), "global_attention_mask": gm.numpy()}
                with torch.no_grad():
                    eager = median_time(lambda: model(ids, attention_mask=am, global_attention_mask=gm), args.repeats)
                    expected = model(ids, attention_mask=am, global_attention_mask=gm).start_logits.numpy()
                ort = median_time(lambda: session.run(None, feed), args.repeats)
                diff = float(np.abs(session.run(None, feed)[0] - expected).max())
                rows.append({"length": L, "global_tokens": n_global, "eager_s": eager, "onnxruntime_s": ort,
                             "max_abs_diff": diff})
                print(f"{L:6} tokens, {n_global:3} global: PyTorch eager {eager * 1e3:8.1f} ms, onnxruntime "
                      f"{ort * 1e3:8.1f} ms ({eager / ort:.2f}x), max |diff| {diff:.1e}", flush=True)
    cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                     platform.processor() or platform.machine())
    meta = {"cpu_model": cpu_model, "amx_bf16": "amx_bf16" in cpuinfo, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "export_s": export_s,
            "export_check_max_abs_diff": worst}
    print(json.dumps(meta))
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
