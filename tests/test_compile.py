"""torch.compile: the encoder is one graph with and without global tokens, and computes what eager mode does."""
import pytest
import torch

import longformer
from device import DEVICE
from test_attention import forward_backward, make_batch, tiny

# On CPU, training-mode attention draws its dropout decisions with an in-place random_ that dynamo does not
# trace (a graph break per layer); the GPU's fused kernels draw their own.
TRAINING = [False, True] if DEVICE.type == "cuda" else [False]


@pytest.mark.parametrize("training", TRAINING, ids=lambda t: "train" if t else "eval")
@pytest.mark.parametrize("n_global", [0, 2])
def test_encoder_compiles_without_graph_breaks(n_global, training):
    config = tiny([4, 8], max_global_tokens=2, attention_probs_dropout_prob=0.1, hidden_dropout_prob=0.1)
    model = longformer.LongformerModel(config).to(DEVICE).train(training)
    ids, am, gm = make_batch(3, 21, seed=0, n_global=n_global)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, attention_mask=am, global_attention_mask=gm if n_global else None)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("n_global", [0, 2])
def test_compiled_encoder_matches_eager(n_global):
    """Outputs and every gradient; aot_eager traces forward and backward as inductor gets them, in seconds."""
    torch.manual_seed(0)
    model = longformer.LongformerModel(tiny([4, 8], max_global_tokens=2)).to(DEVICE)
    ids, am, gm = make_batch(3, 21, seed=1, n_global=n_global)
    expected, expected_grads = forward_backward(model, ids, am, gm)
    expected_grads = {n: None if g is None else g.clone() for n, g in expected_grads.items()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    model.compile(backend="aot_eager", fullgraph=True)  # in place: parameter names unchanged
    out, grads = forward_backward(model, ids, am, gm)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # No gradient (the pooler, global projections without global tokens) is zeros: compiled graphs give zeros.
    zeros_if_none = lambda g, name: torch.zeros_like(dict(model.named_parameters())[name]) if g is None else g  # noqa: E731
    for name, g in expected_grads.items():
        torch.testing.assert_close(zeros_if_none(grads[name], name), zeros_if_none(g, name), atol=1e-5, rtol=1e-4,
                                   msg=name)
