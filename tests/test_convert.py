"""RoBERTa -> Longformer: on inputs within the one-sided window, local attention is full attention, so the
converted model must reproduce RoBERTa exactly; extending a Longformer keeps its short-input outputs."""
import json
import os
import subprocess
import sys

import pytest
import torch

import longformer
from conftest import VOCAB, batch, load_ours, transformers
from device import DEVICE, on_device
from longformer.convert import tile_positions


@pytest.fixture
def roberta(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=22, pad_token_id=1)
    model = transformers.RobertaForMaskedLM(cfg).eval()
    model.save_pretrained(str(tmp_path / "roberta"))
    with open(tmp_path / "roberta/tokenizer_config.json", "w") as f:
        json.dump({"model_max_length": 20}, f)
    return model.to(DEVICE), tmp_path / "roberta"


def test_converted_roberta_equals_roberta_within_the_window(tmp_path, roberta):
    model, src = roberta
    longformer.convert_roberta(str(src), str(tmp_path / "lf"), max_positions=64, attention_window=40)
    ours = load_ours(longformer.LongformerForMaskedLM, tmp_path / "lf")
    assert ours.config.max_position_embeddings == 66 and ours.config.max_length == 64
    ids, am, _ = batch(L=20)  # 20 tokens: the one-sided window (20) covers the whole input
    real = am.bool()  # RoBERTa computes padding rows too; Longformer zeroes their attention, as HF's does
    torch.testing.assert_close(ours(ids, attention_mask=am).logits[real], model(ids, attention_mask=am).logits[real],
                               atol=1e-5, rtol=0)
    assert json.load(open(tmp_path / "lf/tokenizer_config.json"))["model_max_length"] == 64


def test_positions_are_tiled_and_global_projections_copied(tmp_path, roberta):
    model, src = roberta
    longformer.convert_roberta(str(src), str(tmp_path / "lf"), max_positions=64, attention_window=8)
    ours = load_ours(longformer.LongformerForMaskedLM, tmp_path / "lf")
    old = model.roberta.embeddings.position_embeddings.weight
    new = ours.longformer.embeddings.position.weight
    for row in range(66):
        expected = old[row] if row < 2 else old[2 + (row - 2) % 20]
        assert torch.equal(new[row], expected), row
    attn, hf_attn = ours.longformer.layers[1].attn, model.roberta.encoder.layer[1].attention.self
    for name in ("query", "key", "value"):
        assert torch.equal(getattr(attn, name + "_global").weight, getattr(hf_attn, name).weight)


def test_tile_positions_small():
    table = torch.arange(5.0)[:, None]  # pad row 0, learned rows 1..4
    assert tile_positions(table, 0, 11)[:, 0].tolist() == [0, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2]


def test_extend_longformer_keeps_short_outputs_cli(tmp_path, roberta):
    _, src = roberta
    longformer.convert_roberta(str(src), str(tmp_path / "lf64"), max_positions=64, attention_window=8)
    run = [sys.executable, "-m", "longformer.convert", str(tmp_path / "lf64"), str(tmp_path / "lf256"),
           "--max-positions", "256"]
    done = subprocess.run(run, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning" not in done.stderr
    short = load_ours(longformer.LongformerForMaskedLM, tmp_path / "lf64")
    long = load_ours(longformer.LongformerForMaskedLM, tmp_path / "lf256")
    assert long.config.attention_window == [8, 8] and long.config.max_length == 256
    ids, am, gm = batch(L=60)
    torch.testing.assert_close(long(ids, attention_mask=am, global_attention_mask=gm).logits,
                               short(ids, attention_mask=am, global_attention_mask=gm).logits)
    long(on_device(torch.randint(3, VOCAB, (1, 256))))  # and the new length runs
    again = subprocess.run(run, capture_output=True, text=True)  # out exists: refuse, do not overwrite
    assert again.returncode == 2 and "not empty" in again.stderr


def test_convert_refuses_a_shorter_target(tmp_path, roberta):
    _, src = roberta
    with pytest.raises(ValueError, match="already covers 20 tokens"):
        longformer.convert_roberta(str(src), str(tmp_path / "lf"), max_positions=16)
    assert not os.path.exists(tmp_path / "lf") or not os.listdir(tmp_path / "lf")
