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
    with pytest.raises(ValueError, match="attention_backend='flash': choose one of auto"):
        longformer.LongformerModel(config()).settings.attention_backend = "flash"
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


def heads(**kw):
    cfg = config(id2label={0: "neg", 1: "pos"}, **kw)
    torch.manual_seed(0)
    return {cls: cls(cfg).eval() for cls in (longformer.LongformerForMaskedLM, longformer.LongformerForSequenceClassification,
                                             longformer.LongformerForTokenClassification,
                                             longformer.LongformerForQuestionAnswering,
                                             longformer.LongformerForMultipleChoice)}


def test_bad_token_ids_are_named_with_the_value_and_the_range():
    mlm = heads()[longformer.LongformerForMaskedLM]
    ids = torch.randint(3, 50, (2, 9))
    for bad in (50, -1):
        wrong = ids.clone()
        wrong[1, 4] = bad
        with pytest.raises(ValueError, match=rf"input_ids holds token id {bad} at \[1, 4\], outside the vocabulary "
                                             rf"\(0 \.\. 49\)"):
            mlm(wrong)
    with pytest.raises(TypeError, match="input_ids must hold integer token ids .*got torch.float32"):
        mlm(ids.float())
    for cls, model in heads().items():  # an empty batch, at every head's door
        empty = torch.zeros((0, 2, 5) if cls is longformer.LongformerForMultipleChoice else (0, 5), dtype=torch.long)
        with pytest.raises(ValueError, match=r"input_ids holds no sequences \(shape \(0, 5\)\)"):
            model(empty)


def test_bad_labels_are_named_with_the_value_and_the_valid_range():
    models = heads()
    ids = torch.randint(3, 50, (2, 9))
    cases = [
        (longformer.LongformerForMaskedLM, dict(labels=torch.full((2, 9), 77)),
         r"labels holds token id 77 at \[0, 0\], outside the vocabulary \(0 \.\. 49, or -100 where nothing"),
        (longformer.LongformerForMaskedLM, dict(labels=torch.zeros(2, 8, dtype=torch.long)),
         r"labels has shape \(2, 8\); expected \(2, 9\)"),
        (longformer.LongformerForSequenceClassification, dict(labels=torch.tensor([1, 2])),
         r"labels holds label 2 at \[1\], outside the label set \(0 \.\. 1\): the labels are 0 neg, 1 pos"),
        (longformer.LongformerForSequenceClassification, dict(labels=torch.tensor([[0, 1]])),
         r"labels has shape \(1, 2\); expected \(2,\)"),
        (longformer.LongformerForSequenceClassification, dict(labels=torch.ones(2, 3)),  # multi-label: 2 columns
         r"labels has shape \(2, 3\); expected \(2, 2\)"),
        (longformer.LongformerForTokenClassification, dict(labels=torch.full((2, 9), -5)),
         r"labels holds label -5 at \[0, 0\], outside the label set \(0 \.\. 1, or -100"),
        (longformer.LongformerForTokenClassification, dict(labels=torch.zeros(9, dtype=torch.long)),
         r"labels has shape \(9,\); expected \(2, 9\)"),
        (longformer.LongformerForQuestionAnswering, dict(start_positions=torch.zeros(3, dtype=torch.long),
                                                         end_positions=torch.zeros(2, dtype=torch.long)),
         r"start_positions has shape \(3,\); expected \(2,\) or \(2, 1\)"),
    ]
    for cls, labels, message in cases:
        inputs = dict(global_attention_mask=torch.zeros_like(ids)) if cls is longformer.LongformerForQuestionAnswering \
            else {}
        with pytest.raises(ValueError, match=message):
            models[cls](ids, **inputs, **labels)
    with pytest.raises(TypeError, match="labels must hold integer token ids"):
        models[longformer.LongformerForMaskedLM](ids, labels=ids.float())
    mc = models[longformer.LongformerForMultipleChoice]
    with pytest.raises(ValueError, match=r"labels holds choice 2 at \[0\], outside the choices \(0 \.\. 1\)"):
        mc(ids.view(1, 2, 9), global_attention_mask=torch.zeros(1, 2, 9, dtype=torch.long), labels=torch.tensor([2]))


def test_the_checks_add_no_graph_break_under_torch_compile():
    """Compiled, the checks read no value back: one graph for a classifier with labels, as for the masked LM
    (test_compile)."""
    model = heads()[longformer.LongformerForSequenceClassification]
    model.settings.max_global_tokens = 1
    ids = torch.randint(3, 50, (2, 9))
    explained = torch._dynamo.explain(model)(ids, labels=torch.tensor([0, 1]))
    assert explained.graph_break_count == 0, explained.break_reasons
