"""Small random models built with HF transformers and saved with save_pretrained: our fixtures."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

import longformer  # noqa: E402
from device import DEVICE, on_device  # noqa: E402
from longformer.checkpoint import to_hf  # noqa: E402

VOCAB = 60
HEADS = {  # our class -> HF's class name
    longformer.LongformerModel: "LongformerModel",
    longformer.LongformerForMaskedLM: "LongformerForMaskedLM",
    longformer.LongformerForSequenceClassification: "LongformerForSequenceClassification",
    longformer.LongformerForTokenClassification: "LongformerForTokenClassification",
}


def hf_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                attention_window=[4, 8, 4], max_position_embeddings=80, type_vocab_size=1, layer_norm_eps=1e-5,
                num_labels=3)
    base.update(kw)
    return transformers.LongformerConfig(**base)


def save_hf(cls_name, directory, seed=0, **config_kw):
    """A random HF model of the named class, saved to directory; returns it on DEVICE in eval mode."""
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(hf_config(**config_kw)).eval()
    model.save_pretrained(directory)
    return model.to(DEVICE)


def load_ours(cls, directory, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(str(directory), **overrides).eval().to(DEVICE)


def batch(B=3, L=13, n_global=(3, 1, 0), lengths=None, seed=1):
    """input_ids, attention_mask, global_attention_mask with per-example padding and global tokens, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [L, max(1, L - 4), max(1, L // 2)][:B]
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    am = torch.zeros(B, L, dtype=torch.long)
    gm = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        am[b, :lengths[b]] = 1
        ids[b, lengths[b]:] = 1  # the pad token
        chosen = torch.randperm(lengths[b], generator=g)[:n_global[b % len(n_global)]]
        gm[b, chosen] = 1
    return on_device(ids, am, gm)


def hf_grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


def assert_grads_match(ours, hf, rel=1e-4, floor=1e-7):
    """Every parameter of ours has the gradient of its HF twin: |diff| <= rel * |grad| + floor (norms).

    The floor is for gradients that are zero in exact arithmetic (the key biases: softmax ignores a
    constant added to all of a query's scores), where both sides hold only rounding noise (~1e-9).
    """
    theirs = hf_grads(hf)
    checked = 0
    for name, p in ours.named_parameters():
        key = to_hf(name)
        if key not in theirs and key == "lm_head.bias":
            key = "lm_head.decoder.bias"  # HF ties these two; named_parameters lists one of them
        g_hf = theirs[key]
        # No gradient means zero: unused by a batch without global tokens, or zero in exact arithmetic
        # (key_global's bias, which our re-associated global attention never multiplies).
        mine = p.grad if p.grad is not None else torch.zeros_like(p)
        g_hf = g_hf if g_hf is not None else torch.zeros_like(p)
        diff, norm = (mine - g_hf).norm(), g_hf.norm()
        assert diff <= rel * norm + floor, f"gradient of {name}: |diff| {diff:.2e} vs |grad| {norm:.2e}"
        checked += 1
    assert checked == len(theirs), "HF has parameters that ours lacks"
