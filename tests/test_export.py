"""Export: ONNX checked in onnxruntime and torch.export, with dynamic batch, length and number of global tokens,
odd lengths, every head; and static global slots that give NaN, not a plausible number, for an example over them.
The ONNX tests run the file in plain onnxruntime, as a server would, and are skipped, with a message, where
onnxruntime is absent (CI installs the [export] extra)."""
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
HEADS = list(export.HEADS.values())


def tiny(cls, seed=0):
    """Windows 4 and 8 (w = 4: the check lengths are 1, 4 and 17), padding token 1, 3 labels (QA: 2)."""
    torch.manual_seed(seed)
    labels = 2 if cls is longformer.LongformerForQuestionAnswering else 3
    config = longformer.LongformerConfig(vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                                         intermediate_size=48, attention_window=[4, 8], max_position_embeddings=40,
                                         id2label={i: "abc"[i] for i in range(labels)})
    return cls(config).eval()


def pytorch_outputs(model, ids, am, gm):
    out = model(ids, attention_mask=am, global_attention_mask=gm)
    return [getattr(out, name) for name in export.output_names(model)]


def test_check_batches_cover_the_grid():
    """Lengths 1, w and 3w + 5; 0, 1, 2, 7 and all real tokens global, alone and mixed in one padded batch."""
    model = tiny(HEADS[0])
    seen = {}
    for ids, am, gm in export.check_batches(model):
        seen.setdefault(ids.shape[1], []).append((am.sum(1).tolist(), gm.sum(1).tolist()))
    assert sorted(seen) == [1, 4, 17]
    singles = [g[0] for lengths, g in seen[17] if len(g) == 1]
    assert singles == [0, 1, 2, 7, 17]
    lengths, counts = [b for b in seen[17] if len(b[1]) == 6][0]
    assert lengths == [17, 8, 16] * 2 and counts == [0, 1, 2, 7, 8, 0]  # "all": the 8 real tokens of a padded row
    static = {tuple(gm.sum(1).tolist()) for ids, am, gm in export.check_batches(model, 3) if ids.shape[1] == 17}
    assert static == {(0,), (1,), (3,), (0, 1, 3, 0, 1, 3)}


@pytest.mark.parametrize("slots", [None, 3], ids=["dynamic", "3-slots"])
def test_torch_export_equals_eager(slots):
    model = tiny(longformer.LongformerForMaskedLM)
    program = export.export_program(model, max_global_tokens=slots)
    for ids, am, gm in export.check_batches(model, slots, seed=1):
        torch.testing.assert_close(program.module()(ids, am, gm)[0],
                                   model(ids, attention_mask=am, global_attention_mask=gm).logits, atol=1e-5, rtol=0)


def test_static_global_slots_match_and_refuse_too_many():
    """settings.max_global_tokens (what a fixed-shape export uses) gives the outputs of the counted slots, and says
    when an example has more global tokens than slots."""
    model = tiny(longformer.LongformerModel)
    ids, am, gm = list(export.check_batches(model, 3))[-1]
    expected = model(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
    model.settings.max_global_tokens = 5
    torch.testing.assert_close(model(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state, expected,
                               atol=1e-6, rtol=0)
    model.settings.max_global_tokens = 2
    with pytest.raises(ValueError, match="example 2 of the batch has 3 global tokens, more than the max_global_tokens=2"):
        model(ids, attention_mask=am, global_attention_mask=gm)


@pytest.fixture(scope="module")
def ort():
    return pytest.importorskip("onnxruntime", reason='ONNX tests need onnxruntime: pip install "longformer[export]"')


def plain_session(ort, path):
    """The file as a server runs it: onnxruntime alone, inputs by name."""
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(export.INPUTS)
    return lambda ids, am, gm: session.run(None, {"input_ids": ids.numpy(), "attention_mask": am.numpy(),
                                                  "global_attention_mask": gm.numpy()})


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_onnx_with_default_options_equals_pytorch_for_any_global_count(ort, tmp_path, cls):
    model = tiny(cls)
    path = str(tmp_path / "model.onnx")
    assert export.export_onnx(model, path) <= 1e-4  # the defaults: no slot count
    run = plain_session(ort, path)
    batches = list(export.check_batches(model, seed=1))  # other inputs than the export's own check
    assert any(gm.sum(-1).flatten().tolist() == [0, 1, 2, 7, 8, 0] for *_, gm in batches)  # mixed, 8 = all real
    for ids, am, gm in batches:
        for got, expected in zip(run(ids, am, gm), pytorch_outputs(model, ids, am, gm), strict=True):
            torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cls", [longformer.LongformerForQuestionAnswering, longformer.LongformerForMultipleChoice],
                         ids=lambda c: c.__name__)
def test_onnx_static_slots_give_nan_for_an_example_over_them(ort, tmp_path, cls):
    model = tiny(cls)
    path = str(tmp_path / "model.onnx")
    export.export_onnx(model, path, max_global_tokens=2)
    run = plain_session(ort, path)
    ids, am, gm = export._batch(model, 9, [(9, 3), (9, 2), (5, 0), (9, 9)], torch.Generator().manual_seed(2))
    if cls is longformer.LongformerForMultipleChoice:
        ids, am, gm = (t.view(2, 2, 9) for t in (ids, am, gm))
    over = torch.tensor([True, False, False, True])  # 3 and 9 global tokens in a graph of 2 slots
    for got, expected in zip(run(ids, am, gm), pytorch_outputs(model, ids, am, gm), strict=True):
        got, expected = torch.from_numpy(got).reshape(4, -1), expected.reshape(4, -1)  # [example or choice, *]
        assert got[over].isnan().all()
        torch.testing.assert_close(got[~over], expected[~over], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="example (3|1, choice 1,) has 9 global tokens.*--max-global-tokens 2"):
        export.OnnxLongformer(path)(ids, am, gm)  # the wrapper says so before running


def test_onnx_that_disagrees_is_not_written(ort, tmp_path, monkeypatch):
    run = export._run_onnx
    monkeypatch.setattr(export, "_run_onnx", lambda *a: [out + 1e-3 for out in run(*a)])
    with pytest.raises(export.ExportCheckFailed, match="differs from PyTorch by 1.0.e-03"):
        export.export_onnx(tiny(longformer.LongformerModel), str(tmp_path / "bad.onnx"), max_global_tokens=1)
    assert os.listdir(tmp_path) == []


def test_cli_defaults_and_the_served_models_defaults(ort, tmp_path):
    """The command with its defaults on a QA checkpoint; OnnxLongformer then makes the question global when no
    global_attention_mask is given, as the PyTorch class does, and names what the graph cannot take."""
    model = tiny(longformer.LongformerForQuestionAnswering)
    model.save_pretrained(str(tmp_path / "ckpt"))
    cmd = [sys.executable, "-m", "longformer.export", str(tmp_path / "ckpt"), str(tmp_path / "qa.onnx")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["head"] == "LongformerForQuestionAnswering" and report["max_global_tokens"] == "dynamic"
    assert report["checked_max_abs_diff"] <= 1e-4
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "exists" in again.stderr
    served = export.OnnxLongformer(str(tmp_path / "qa.onnx"))
    ids = torch.randint(3, 50, (2, 15))
    ids[:, 0], ids[0, 4:6], ids[1, 7:9], ids[:, -1] = 0, 2, 2, 2  # <s> question </s></s> text </s>: 3 and 6 global
    expected = model(ids)
    start, end = served(ids.numpy())
    torch.testing.assert_close(torch.from_numpy(start), expected.start_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(end), expected.end_logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="41 tokens is longer than this model's position table allows \\(38\\)"):
        served(np.full((1, 41), 5))
