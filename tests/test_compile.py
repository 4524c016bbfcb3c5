"""torch.compile: the encoder is one graph with and without global tokens, and computes what eager mode does."""
import pytest
import torch

import longformer
from device import DEVICE, on_device
from test_attention import build, forward_backward, make_batch, tiny


def test_torch_compile_same_outputs_without_graph_breaks_for_mlm():
    torch.manual_seed(0)
    model = longformer.LongformerForMaskedLM(tiny([4, 8])).eval().to(DEVICE)
    ids = on_device(torch.randint(3, 50, (2, 19)))
    labels = torch.where(on_device(torch.rand(ids.shape)) < 0.3, ids, -100)
    explained = torch._dynamo.explain(model)(ids, labels=labels)
    assert explained.graph_break_count == 0, explained.break_reasons  # masked-LM training: one graph
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    gm = torch.zeros_like(ids)
    gm[0, [0, 7]] = 1  # with global tokens: one break, where their count is read
    torch.testing.assert_close(compiled(ids, global_attention_mask=gm).logits,
                               model(ids, global_attention_mask=gm).logits, atol=1e-5, rtol=0)
    model.settings.max_global_tokens = 2  # a static count of global slots: one graph with global tokens too
    explained = torch._dynamo.explain(model)(ids, global_attention_mask=gm, labels=labels)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CPU's attention dropout draws with random_, which dynamo "
                    "does not trace (a break per layer); GPU kernels draw their own")
@pytest.mark.parametrize("n_global", [0, 2])
def test_encoder_in_training_compiles_without_graph_breaks(n_global):
    config = tiny([4, 8], attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1)
    model = build(longformer.LongformerModel, config, max_global_tokens=2).to(DEVICE).train()
    ids, am, gm = make_batch(3, 21, seed=0, n_global=n_global)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, attention_mask=am, global_attention_mask=gm if n_global else None)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("n_global", [0, 2])
def test_compiled_encoder_matches_eager(n_global):
    """Outputs and every gradient; aot_eager traces forward and backward as inductor gets them, in seconds."""
    torch.manual_seed(0)
    model = build(longformer.LongformerModel, tiny([4, 8]), max_global_tokens=2).to(DEVICE)
    ids, am, gm = make_batch(3, 21, seed=1, n_global=n_global)
    expected, expected_grads = forward_backward(model, ids, am, gm)
    expected_grads = {n: None if g is None else g.clone() for n, g in expected_grads.items()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    model.compile(backend="aot_eager", fullgraph=True)  # in place: parameter names unchanged
    out, grads = forward_backward(model, ids, am, gm)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # No gradient (the pooler, global projections without global tokens) is zeros: compiled graphs give zeros.
    params = dict(model.named_parameters())
    for name, g in expected_grads.items():
        mine, ref = (torch.zeros_like(params[name]) if x is None else x for x in (grads[name], g))
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-4, msg=name)
