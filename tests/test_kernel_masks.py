"""Masks that the CUDA kernels take as they are: no query row without a key, key slots padded to a multiple
of 8, q's dtype, no gradient; and the SDPA backend chosen on purpose. Checked on CPU under the cuda plan, with an
SDPA that fails the way CUDA's memory-efficient kernel does (NaN for a row whose keys are all masked)."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

import longformer
from device import DEVICE, on_device
from longformer import plan as plans
from longformer.attention import AttentionMasks
from longformer.kernels import banded
from longformer.plan import choose_backends

real_sdpa = F.scaled_dot_product_attention


def tiny(windows):
    return longformer.LongformerConfig(vocab_size=50, hidden_size=24, num_hidden_layers=len(windows),
                                       num_attention_heads=3, intermediate_size=48, attention_window=windows,
                                       max_position_embeddings=200, attention_probs_dropout_prob=0.0,
                                       hidden_dropout_prob=0.0)


def cuda_program(cls, windows):
    """A model running the cuda plan (the band in blocks of w through SDPA, torch's LayerNorm and dropout, ...),
    on CPU too."""
    model = cls(tiny(windows))
    model.settings.plan = "cuda"
    return model


def mixed_batch(lengths, L, n_global, seed=0):
    """Padded batch: example b has lengths[b] real tokens and n_global[b] global ones among them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (len(lengths), L), generator=g)
    am = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    gm = torch.zeros_like(am)
    for b, n in enumerate(n_global):
        gm[b, torch.randperm(lengths[b], generator=g)[:n]] = 1
    ids[am == 0] = 1
    return on_device(ids, am, gm)


def test_every_window_mask_row_sees_a_key():
    """Random batches of mixed lengths (an all-padding example included), windows and global counts."""
    g = torch.Generator().manual_seed(0)
    for case in range(60):
        B, L = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 70, (1,), generator=g))
        keep = torch.arange(L)[None] < torch.randint(0, L + 1, (B, 1), generator=g)  # lengths 0..L
        is_global = keep & (torch.rand(B, L, generator=g) < float(torch.rand(1, generator=g)) * 0.3)
        masks = AttentionMasks(keep, is_global if case % 3 else None)
        for w in (1, 2, 3, 5, 8, 13):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                # (the flash kernel's mask has no global slots: a row may see only those, merged apart)
                for n, layout in ((w, dict(multiple=8)), (plans.EXPLICIT_BLOCK, dict(key_major=True))):
                    mask = masks.band_mask(w, n, dtype, **layout)
                    assert (mask == 0).any(-2 if layout.get("key_major") else -1).all(), (case, w, n, dtype)
                assert torch.isfinite(mask).all()  # finfo.min, never -inf: no dtype cast turns it into -inf


def nan_for_empty_rows(q, k, v, attn_mask=None, **kw):
    """SDPA as CUDA's memory-efficient kernel behaves: NaN for a query row whose keys are all masked."""
    out = real_sdpa(q, k, v, attn_mask=attn_mask, **kw)
    empty = (attn_mask <= torch.finfo(attn_mask.dtype).min).all(-1, keepdim=True)  # [N, 1, w, 1]
    return out.masked_fill(empty, float("nan"))


@pytest.mark.parametrize("n_global", [(0, 0, 0), (2, 1, 0)])
def test_padded_batch_stays_finite_under_a_kernel_that_fails_on_empty_rows(monkeypatch, n_global):
    """Lengths 41/6/1 with windows of 2 and 4: most padding queries are far from any real token."""
    torch.manual_seed(0)
    model = cuda_program(longformer.LongformerModel, [4, 8]).to(DEVICE)
    ids, am, gm = mixed_batch([41, 6, 1], 41, n_global)
    attention_outputs = []
    for layer in model.layers:
        layer.attn.register_forward_hook(lambda mod, args, out: attention_outputs.append(out))
    expected = model(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state.detach()
    monkeypatch.setattr(F, "scaled_dot_product_attention", nan_for_empty_rows)
    attention_outputs.clear()
    out = model(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
    real = am.bool()
    torch.testing.assert_close(out[real], expected[real], atol=0, rtol=0)
    assert torch.isfinite(out).all()
    for a in attention_outputs:  # padding positions still get zeros from the attention
        assert (a[~real] == 0).all()
    (out[real] * torch.linspace(-1, 1, int(real.sum()), device=out.device)[:, None]).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("windows,n_global", [([2, 6], 1), ([2, 6], 3), ([10], 0), ([14, 4], 2)])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_masks_reach_sdpa_as_the_kernels_want(monkeypatch, windows, n_global, autocast):
    """3w + G is 7, 9, 19, 21, 30, 45 ... here: every call's key count is padded to a multiple of 8."""
    calls = []
    real_attend = banded.attend

    def spy(q, k, v, mask, *args):
        calls.append((q.dtype, k.shape[-2], mask))
        return real_attend(q, k, v, mask, *args)

    monkeypatch.setattr(banded, "attend", spy)
    model = cuda_program(longformer.LongformerForMaskedLM, windows).to(DEVICE)
    ids, am, gm = mixed_batch([23, 17], 23, (n_global, n_global))
    with torch.autocast(DEVICE.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        model(ids, attention_mask=am, global_attention_mask=gm).logits.float().sum().backward()
    assert len(calls) == len(windows)
    for q_dtype, num_keys, mask in calls:
        assert mask.shape[-1] % 8 == 0 and mask.shape[-1] == num_keys
        assert mask.stride(-1) == 1 and all(s % 8 == 0 for s in mask.stride()[:-1]), mask.stride()
        assert mask.dtype == q_dtype == (autocast or torch.float32)
        assert not mask.requires_grad


def test_sdpa_backends_are_chosen_per_device_and_overridable(monkeypatch):
    monkeypatch.delenv("LONGFORMER_SDPA_BACKENDS", raising=False)
    assert choose_backends("cuda") == (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
    assert choose_backends("cpu") == (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
    monkeypatch.setenv("LONGFORMER_SDPA_BACKENDS", "cudnn, efficient")
    assert choose_backends("cuda") == (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
    assert choose_backends("cuda", "math") == (SDPBackend.MATH,)  # the config wins over the environment
    monkeypatch.setenv("LONGFORMER_SDPA_BACKENDS", "fastest")
    with pytest.raises(ValueError, match="'fastest'.*flash, efficient, cudnn, math"):
        choose_backends("cuda")
    with pytest.raises(ValueError, match="SDPA backends 'flash,turbo'"):
        longformer.LongformerModel(tiny([4])).settings.sdpa_backends = "flash,turbo"


def test_the_configured_backend_is_the_one_enabled_at_the_call(monkeypatch):
    """sdpa_backends='math' really restricts the call (and changes no number beyond rounding)."""
    seen = []

    def spy(*args, **kw):
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return real_sdpa(*args, **kw)

    torch.manual_seed(0)
    model = longformer.LongformerModel(tiny([4, 6])).to(DEVICE).eval()
    model.settings.attention_backend = "sdpa"  # the band in blocks through SDPA, on CPU too
    ids, am, gm = mixed_batch([19, 11], 19, (1, 0))
    default = model(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model.settings.sdpa_backends = "math"
    math_only = model(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
    assert seen == [(False, True)] * 2
    torch.testing.assert_close(math_only, default, atol=1e-5, rtol=0)
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the call
