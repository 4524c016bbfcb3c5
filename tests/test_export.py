"""Export: ONNX checked in onnxruntime and torch.export, with dynamic batch and length, odd lengths and
per-example global tokens. The ONNX tests are skipped, with a message, where onnxruntime is absent
(CI installs the [export] extra)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import longformer
from longformer import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = [longformer.LongformerModel, longformer.LongformerForMaskedLM, longformer.LongformerForSequenceClassification,
         longformer.LongformerForTokenClassification]


def tiny(cls, seed=0):
    """Windows 4 and 8 (w = 4: the check lengths are 1, 4 and 17), padding token 1, 3 labels."""
    torch.manual_seed(seed)
    config = longformer.LongformerConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                         intermediate_size=48, attention_window=[4, 8], max_position_embeddings=40,
                                         id2label={0: "a", 1: "b", 2: "c"})
    return cls(config).eval()


def test_check_batches_cover_the_grid():
    seen = {(tuple(ids.shape), tuple(gm.sum(1).tolist())) for ids, _, gm in export.check_batches(tiny(HEADS[0]), 3)}
    assert {s[0][1] for s in seen} == {1, 4, 17} and {s[0][0] for s in seen} == {1, 3}
    for L in (4, 17):
        assert {((1, L), (c,)) for c in (0, 1, 3)} <= seen  # one example with 0, 1, 3 global tokens
        assert ((3, L), (3, 0, 1)) in seen  # three examples, padded, with different counts


def test_torch_export_dynamic_batch_and_length_equals_eager():
    model = tiny(longformer.LongformerForMaskedLM)
    program = export.export_program(model, max_global_tokens=3)
    for ids, am, gm in export.check_batches(model, 3):
        torch.testing.assert_close(program.module()(ids, am, gm),
                                   model(ids, attention_mask=am, global_attention_mask=gm).logits, atol=1e-5, rtol=0)


def test_static_global_slots_match_and_refuse_too_many():
    """config.max_global_tokens (what export uses) gives the outputs of the counted slots, and says when an
    example has more global tokens than slots."""
    model = tiny(longformer.LongformerModel)
    ids, am, gm = list(export.check_batches(model, 3))[-1]
    expected = model(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
    model.config.max_global_tokens = 5
    torch.testing.assert_close(model(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state, expected,
                               atol=1e-6, rtol=0)
    model.config.max_global_tokens = 2
    with pytest.raises(ValueError, match="example 0 of the batch has 3 global tokens, more than the max_global_tokens=2"):
        model(ids, attention_mask=am, global_attention_mask=gm)


@pytest.fixture(scope="module")
def ort():
    return pytest.importorskip("onnxruntime", reason='ONNX tests need onnxruntime: pip install "longformer[export]"')


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_onnx_equals_pytorch(ort, tmp_path, cls):
    model = tiny(cls)
    path = str(tmp_path / "model.onnx")
    worst = export.export_onnx(model, path, max_global_tokens=3)
    assert worst <= 1e-4
    served = export.OnnxLongformer(path)
    for ids, am, gm in export.check_batches(model, 3, seed=1):  # other inputs than the export's own check
        expected = model(ids, attention_mask=am, global_attention_mask=gm)[0]
        torch.testing.assert_close(torch.from_numpy(served(ids.numpy(), am.numpy(), gm.numpy())), expected,
                                   atol=1e-4, rtol=0)
    if cls is longformer.LongformerForSequenceClassification:  # no global mask: <s> global, as in PyTorch
        ids = torch.randint(3, 50, (2, 9))
        torch.testing.assert_close(torch.from_numpy(served(ids.numpy())), model(ids).logits, atol=1e-4, rtol=0)


def test_onnx_that_disagrees_is_not_written(ort, tmp_path, monkeypatch):
    run = export._run_onnx
    monkeypatch.setattr(export, "_run_onnx", lambda *a: run(*a) + 1e-3)
    with pytest.raises(export.ExportCheckFailed, match="differs from PyTorch by 1.0.e-03"):
        export.export_onnx(tiny(longformer.LongformerModel), str(tmp_path / "bad.onnx"), max_global_tokens=1)
    assert os.listdir(tmp_path) == []


def test_cli_and_served_model_errors(ort, tmp_path):
    tiny(longformer.LongformerForTokenClassification).save_pretrained(str(tmp_path / "ckpt"))
    cmd = [sys.executable, "-m", "longformer.export", str(tmp_path / "ckpt"), str(tmp_path / "m.onnx"),
           "--max-global-tokens", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["head"] == "LongformerForTokenClassification" and report["checked_max_abs_diff"] <= 1e-4
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "exists" in again.stderr
    served = export.OnnxLongformer(str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="example 1 has 3 global tokens.*--max-global-tokens 2"):
        served(np.full((2, 6), 5), global_attention_mask=np.array([[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]))
    with pytest.raises(ValueError, match="41 tokens is longer than this model's position table allows \\(38\\)"):
        served(np.full((1, 41), 5))
