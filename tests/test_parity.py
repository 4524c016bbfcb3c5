"""Our models load HF checkpoints and give HF's outputs and gradients."""
import pytest
import torch

import longformer

from conftest import HEADS, assert_grads_match, batch, load_ours, save_hf
from device import DEVICE, on_device
from kernel_spy import KernelSpy, expected

PLANS = [None, "cuda", "compiled", "exported"]  # None: the device's own (on CPU cpu-training, then cpu-inference)


def run(model, cls_name, ids, am, gm, labels_seed=2, spy=None):
    """Forward + backward through a loss that reaches every parameter; returns the output tensor. spy: a KernelSpy,
    given the outputs' autograd graph."""
    g = torch.Generator().manual_seed(labels_seed)
    B, L = ids.shape
    if cls_name == "LongformerModel":
        out = model(ids, attention_mask=am, global_attention_mask=gm)
        y = out.last_hidden_state
        proj = on_device(torch.randn(y.shape, generator=g))
        loss = (y * proj).sum() if out.pooler_output is None else (y * proj).sum() + out.pooler_output.sum()
        if spy:
            spy.graph(loss)
        loss.backward()
        return y
    if cls_name == "LongformerForSequenceClassification":
        labels = on_device(torch.randint(0, 3, (B,), generator=g))
    else:
        labels = on_device(torch.randint(0, 60 if cls_name == "LongformerForMaskedLM" else 3, (B, L), generator=g))
        labels[am == 0] = -100
    out = model(ids, attention_mask=am, global_attention_mask=gm, labels=labels)
    if spy:
        spy.graph(out.loss)
    out.loss.backward()
    return out.logits


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("cls", list(HEADS), ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", ["mixed", "no_global", "one_window", "one_token"])
def test_outputs_and_gradients_match_hf_under_every_plan(tmp_path, cls, case, plan):
    """Under each plan (None: the one of the device, in training and in inference), HF's outputs and every
    gradient, and the plan's own kernels are the ones that ran."""
    if plan and plan.startswith("cpu") and DEVICE.type != "cpu":
        pytest.skip("a CPU plan")
    cls_name = HEADS[cls]
    hf = save_hf(cls_name, tmp_path)
    ours = load_ours(cls, tmp_path, plan=plan)
    if case == "mixed":  # lengths 13/9/6 (no multiple of windows 4 and 8), 3/1/0 global tokens
        ids, am, gm = batch()
    elif case == "no_global":
        ids, am, gm = batch(n_global=(0,))
    elif case == "one_window":  # exactly the largest window
        ids, am, gm = batch(L=8, lengths=[8, 8, 3], n_global=(1, 0, 2))
    else:
        ids, am, gm = batch(B=2, L=1, lengths=[1, 1], n_global=(0, 1))
    if cls_name == "LongformerForSequenceClassification" and case == "no_global":
        gm = None  # the default: global attention on the first token
    masked_lm = cls_name == "LongformerForMaskedLM"
    y_hf = run(hf, cls_name, ids, am, gm)
    with KernelSpy() as spy:
        y = run(ours, cls_name, ids, am, gm, spy=spy)
    assert spy.observed() == expected(ours.make_plan(ids), masked_lm)
    assert y.shape == y_hf.shape
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=0)
    assert_grads_match(ours, hf)
    with torch.no_grad(), KernelSpy() as spy:
        y = ours(ids, attention_mask=am, global_attention_mask=gm)[0]  # last_hidden_state or logits
        inference_plan = ours.make_plan(ids)
    assert not inference_plan.grad and spy.observed() == expected(inference_plan, masked_lm)
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=0)


def test_without_attention_mask_and_with_inputs_embeds(tmp_path):
    hf = save_hf("LongformerModel", tmp_path)
    ours = load_ours(longformer.LongformerModel, tmp_path)
    ids, _, gm = batch(lengths=[13, 13, 13])
    torch.testing.assert_close(ours(ids, global_attention_mask=gm).last_hidden_state,
                               hf(ids, global_attention_mask=gm).last_hidden_state, atol=1e-5, rtol=0)
    emb = on_device(torch.randn(2, 11, 32))
    torch.testing.assert_close(ours(inputs_embeds=emb).last_hidden_state,
                               hf(inputs_embeds=emb).last_hidden_state, atol=1e-5, rtol=0)
