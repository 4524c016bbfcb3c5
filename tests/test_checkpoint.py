"""Checkpoints: our save loads in HF with no missing or unexpected keys; prefixes and .bin files load."""
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import longformer
from conftest import HEADS, batch, load_ours, save_hf, transformers
from device import DEVICE


@pytest.mark.parametrize("cls", list(HEADS), ids=lambda c: c.__name__)
def test_save_then_hf_loads_with_same_outputs(tmp_path, cls):
    save_hf(HEADS[cls], tmp_path / "hf", seed=3)
    ours = load_ours(cls, tmp_path / "hf")
    ours.save_pretrained(str(tmp_path / "ours"))
    hf, info = getattr(transformers, HEADS[cls]).from_pretrained(str(tmp_path / "ours"), output_loading_info=True)
    hf.eval().to(DEVICE)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, am, gm = batch()
    a = ours(ids, attention_mask=am, global_attention_mask=gm)
    b = hf(ids, attention_mask=am, global_attention_mask=gm)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    # and back: our save loads in ours unchanged
    again = load_ours(cls, tmp_path / "ours")
    torch.testing.assert_close(again(ids, attention_mask=am, global_attention_mask=gm)[0], a[0])


def test_roberta_prefix_and_bin_file(tmp_path):
    """allenai's original release: keys under roberta., weights in pytorch_model.bin."""
    hf = save_hf("LongformerForMaskedLM", tmp_path / "hf")
    state = {k.replace("longformer.", "roberta.", 1): v for k, v in load_file(str(tmp_path / "hf/model.safetensors")).items()}
    state["roberta.embeddings.position_ids"] = torch.arange(80)[None]  # a harmless extra
    os.makedirs(tmp_path / "old")
    torch.save(state, tmp_path / "old/pytorch_model.bin")
    os.rename(tmp_path / "hf/config.json", tmp_path / "old/config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        ours = longformer.LongformerForMaskedLM.from_pretrained(str(tmp_path / "old")).eval().to(DEVICE)
    ids, am, gm = batch()
    torch.testing.assert_close(ours(ids, attention_mask=am, global_attention_mask=gm).logits,
                               hf(ids, attention_mask=am, global_attention_mask=gm).logits, atol=1e-5, rtol=0)


def test_base_checkpoint_into_head_warns_about_new_weights(tmp_path):
    save_hf("LongformerModel", tmp_path)  # no prefix, has a pooler, no head
    with pytest.warns(UserWarning, match="classifier.out_proj.weight"):
        model = longformer.LongformerForSequenceClassification.from_pretrained(str(tmp_path), num_labels=5)
    assert model.classifier.out_proj.out_features == 5 and model.config.num_labels == 5


def test_head_checkpoint_into_base_model(tmp_path):
    hf = save_hf("LongformerForTokenClassification", tmp_path)
    with pytest.warns(UserWarning, match="pooler"):  # the token classifier has no pooler
        ours = longformer.LongformerModel.from_pretrained(str(tmp_path)).eval().to(DEVICE)
    ids, am, gm = batch()
    torch.testing.assert_close(ours(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state,
                               hf.longformer(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state,
                               atol=1e-5, rtol=0)


def test_missing_directory_config_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        longformer.LongformerModel.from_pretrained(str(tmp_path / "nowhere"))
    save_hf("LongformerModel", tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        longformer.LongformerModel.from_pretrained(str(tmp_path))


def test_wrong_shape_and_missing_weight_are_named(tmp_path):
    save_hf("LongformerModel", tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["encoder.layer.1.intermediate.dense.weight"] = torch.zeros(65, 32)
    del state["encoder.layer.2.attention.self.key_global.bias"]
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        longformer.LongformerModel.from_pretrained(str(tmp_path))
    msg = str(err.value)
    assert "encoder.layer.1.intermediate.dense.weight: model expects (64, 32), checkpoint has (65, 32)" in msg
    assert "encoder.layer.2.attention.self.key_global.bias" in msg


def test_roberta_checkpoint_is_pointed_to_the_converter(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=20)
    transformers.RobertaModel(cfg).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="python -m longformer.convert"):
        longformer.LongformerModel.from_pretrained(str(tmp_path))


def test_damaged_config_and_weights_are_named(tmp_path):
    save_hf("LongformerModel", tmp_path)
    weights = tmp_path / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ValueError, match="model.safetensors is damaged or incomplete"):
        longformer.LongformerModel.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        longformer.LongformerModel.from_pretrained(str(tmp_path))
