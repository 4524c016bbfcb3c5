"""LongformerForQuestionAnswering and LongformerForMultipleChoice against HF: outputs, gradients, HF's default
global attention, the loss's clamped positions, checkpoints both ways, and rows without separators."""
import pytest
import torch

import longformer
from conftest import assert_grads_match, load_ours, save_hf, transformers
from device import on_device


def pairs(n, L, seed, question_lengths=(3, 1, 5, 2, 4, 6)):
    """n rows <s> question </s></s> context </s> <pad>...: question lengths from the list, some padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n, L), 1)
    am = torch.zeros(n, L, dtype=torch.long)
    for r in range(n):
        q = question_lengths[r % len(question_lengths)]
        length = L - (r % 3) * 2  # rows of L, L - 2, L - 4 tokens
        row = [0] + torch.randint(3, 60, (q,), generator=g).tolist() + [2, 2] \
            + torch.randint(3, 60, (length - q - 4,), generator=g).tolist() + [2]
        ids[r, :length] = torch.tensor(row)
        am[r, :length] = 1
    return ids, am


@pytest.mark.parametrize("given_mask", [False, True], ids=["default_global", "given_global"])
def test_question_answering_matches_hf(tmp_path, given_mask):
    hf = save_hf("LongformerForQuestionAnswering", tmp_path, num_labels=2)
    ours = load_ours(longformer.LongformerForQuestionAnswering, tmp_path)
    ids, am = pairs(3, 17, seed=0)
    gm = None
    if given_mask:
        gm = torch.zeros_like(ids)
        gm[0, [0, 5, 9]] = 1
        gm[2, 3] = 1
    ids, am, gm = on_device(ids, am, gm)
    start, end = on_device(torch.tensor([4, 30, 8]), torch.tensor([6, 30, 1]))  # 30: past the input, ignored
    outputs = []
    for model in (hf, ours):
        out = model(ids, attention_mask=am, global_attention_mask=gm, start_positions=start, end_positions=end)
        out.loss.backward()
        outputs.append(out)
    for name in ("start_logits", "end_logits", "loss"):
        torch.testing.assert_close(getattr(outputs[1], name), getattr(outputs[0], name), atol=1e-5, rtol=0)
    assert_grads_match(ours, hf)


@pytest.mark.parametrize("given_mask", [False, True], ids=["default_global", "given_global"])
def test_multiple_choice_matches_hf(tmp_path, given_mask):
    hf = save_hf("LongformerForMultipleChoice", tmp_path)
    ours = load_ours(longformer.LongformerForMultipleChoice, tmp_path)
    ids, am = pairs(6, 15, seed=1)  # 2 examples x 3 choices
    ids, am = ids.view(2, 3, 15), am.view(2, 3, 15)
    gm = None
    if given_mask:
        gm = torch.zeros_like(ids)
        gm[:, :, 0] = 1
        gm[1, 2, 4] = 1
    ids, am, gm = on_device(ids, am, gm)
    labels = on_device(torch.tensor([2, 0]))
    outputs = []
    for model in (hf, ours):
        out = model(ids, attention_mask=am, global_attention_mask=gm, labels=labels)
        out.loss.backward()
        outputs.append(out)
    assert outputs[1].logits.shape == (2, 3)
    torch.testing.assert_close(outputs[1].logits, outputs[0].logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(outputs[1].loss, outputs[0].loss, atol=1e-5, rtol=0)
    assert_grads_match(ours, hf)


@pytest.mark.parametrize("cls_name", ["LongformerForQuestionAnswering", "LongformerForMultipleChoice"])
def test_save_then_hf_loads(tmp_path, cls_name):
    save_hf(cls_name, tmp_path / "hf", seed=3, num_labels=2)
    ours = load_ours(getattr(longformer, cls_name), tmp_path / "hf")
    ours.save_pretrained(str(tmp_path / "ours"))
    hf, info = getattr(transformers, cls_name).from_pretrained(str(tmp_path / "ours"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf.eval().to(ours.longformer.embeddings.word.weight.device)
    ids, am = pairs(3, 13, seed=2)
    if cls_name == "LongformerForMultipleChoice":
        ids, am = ids[None], am[None]  # one example, three choices
    ids, am = on_device(ids, am)
    for a, b in zip(ours(ids, attention_mask=am).to_tuple(), hf(ids, attention_mask=am).to_tuple()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_rows_without_a_separator_are_named(tmp_path):
    save_hf("LongformerForQuestionAnswering", tmp_path / "qa", num_labels=2)
    qa = load_ours(longformer.LongformerForQuestionAnswering, tmp_path / "qa")
    ids, am = pairs(3, 13, seed=0)
    ids[1][ids[1] == 2] = 7
    with pytest.raises(ValueError, match="row 1 has no separator token \\(sep_token_id 2\\).*global_attention_mask"):
        qa(*on_device(ids, am))
    save_hf("LongformerForMultipleChoice", tmp_path / "mc")
    mc = load_ours(longformer.LongformerForMultipleChoice, tmp_path / "mc")
    ids, am = pairs(4, 13, seed=0)
    ids[3][ids[3] == 2] = 7
    with pytest.raises(ValueError, match="example 1, choice 1, has no separator token"):
        mc(on_device(ids.view(2, 2, 13)), attention_mask=on_device(am.view(2, 2, 13)))
