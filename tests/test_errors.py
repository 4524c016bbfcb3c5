"""Bad configs and bad inputs fail loudly, with a message that says what to do."""
import pytest
import torch

import longformer


def config(**kw):
    base = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                attention_window=4, max_position_embeddings=34)
    base.update(kw)
    return longformer.LongformerConfig(**base)


@pytest.mark.parametrize("window,match", [(5, "positive even"), (0, "positive even"), (-4, "positive even"),
                                          ([4, 3], "layer 1 is 3"), ([4, 4, 4], "3 entries but the model has 2")])
def test_bad_windows(window, match):
    with pytest.raises(ValueError, match=match):
        config(attention_window=window)


def test_unknown_activation_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown hidden_act 'gelu_fancy'"):
        config(hidden_act="gelu_fancy")
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        config(hidden_size=15)
    with pytest.raises(ValueError, match="attention_backend"):
        config(attention_backend="flash")
    with pytest.raises(ValueError, match="hidden_dropout_prob"):
        config(hidden_dropout_prob=1.5)


def test_input_longer_than_position_table():
    model = longformer.LongformerModel(config())
    model(torch.randint(3, 50, (1, 32)))  # 34 rows - pad 1 - 1 = 32 tokens fit
    with pytest.raises(ValueError, match=r"33 tokens is longer .* \(32 tokens"):
        model(torch.randint(3, 50, (1, 33)))


def test_mask_shapes_must_match_input():
    model = longformer.LongformerModel(config())
    ids = torch.randint(3, 50, (2, 10))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 9\) .* shape \(2, 10\)"):
        model(ids, attention_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="global_attention_mask"):
        model(ids, global_attention_mask=torch.ones(1, 10))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model()


def test_config_json_round_trip_keeps_unknown_fields(tmp_path):
    c = config(id2label={0: "neg", 1: "pos"})
    c.extra["custom_field"] = 7
    c.save_pretrained(str(tmp_path))
    back = longformer.LongformerConfig.from_pretrained(str(tmp_path))
    assert back == c and back.label2id == {"neg": 0, "pos": 1} and back.extra["custom_field"] == 7
