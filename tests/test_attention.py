"""The banded kernels equal the dense reference, for windows HF cannot run too."""
import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend

import longformer
from device import DEVICE, on_device
from kernel_spy import KernelSpy, expected
from longformer import plan as plans
from longformer.attention.masks import AttentionMasks, document_segments
from longformer.kernels.banded import band_mask, blocks_band, key_windows
from longformer.kernels.strided import ExplicitBand, explicit_band
from longformer.plan import ONEDNN_DTYPES


def tiny(windows, **kw):
    cfg = dict(vocab_size=50, hidden_size=24, num_hidden_layers=len(windows), num_attention_heads=3,
               intermediate_size=48, attention_window=windows, max_position_embeddings=200, hidden_act="gelu",
               attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    cfg.update(kw)
    return longformer.LongformerConfig(**cfg)


def build(cls, config, **settings):
    """cls(config) with the run-time settings given (model.settings)."""
    model = cls(config)
    for name, value in settings.items():
        setattr(model.settings, name, value)
    return model


def cpu_plan(dtype=torch.float32, autocast=None, grad=True, **fields):
    """The CPU eager plan (cpu-training where grad, else cpu-inference), with fields replaced."""
    plan = plans.make_plan("cpu", autocast or dtype, autocast, grad, False, None, plans.Settings())
    return dataclasses.replace(plan, **fields)


def forward_backward(model, ids, am, gm):
    out = model(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)).sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def make_batch(B, L, seed, n_global):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (B, L), generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L
    am = (torch.arange(L)[None] < lengths[:, None]).long()
    gm = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        gm[b, torch.randperm(int(lengths[b]), generator=g)[:n_global]] = 1
    gm[-1] = 0  # one example without global tokens
    ids[am == 0] = 1
    return on_device(ids, am, gm)


@pytest.mark.parametrize("implementation", ["auto", "sdpa", "chunked"])
@pytest.mark.parametrize("windows,L", [([2, 2], 7), ([2, 6, 10], 23), ([4, 6], 1), ([14, 4], 9), ([6, 8, 12], 40)])
@pytest.mark.parametrize("n_global", [0, 1, 3])
def test_kernels_match_dense_reference(windows, L, n_global, implementation):
    torch.manual_seed(0)
    ref = build(longformer.LongformerModel, tiny(windows), attention_backend="dense").to(DEVICE)
    fast = build(longformer.LongformerModel, tiny(windows), attention_backend=implementation).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    ids, am, gm = make_batch(3, L, seed=L + n_global, n_global=n_global)
    y_ref, g_ref = forward_backward(ref, ids, am, gm)
    y, g = forward_backward(fast, ids, am, gm)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    zero_if_none = lambda name, t: t if t is not None else torch.zeros_like(dict(fast.named_parameters())[name])  # noqa: E731
    for name, grad in g_ref.items():
        grad, mine = zero_if_none(name, grad), zero_if_none(name, g[name])
        assert (mine - grad).norm() <= 1e-4 * grad.norm() + 1e-7, name


@pytest.mark.parametrize("n", ["w", plans.FLASH_BLOCK, plans.EXPLICIT_BLOCK])
@pytest.mark.parametrize("key_major", [False, True])
def test_band_mask_is_the_band(n, key_major):
    """Each query sees exactly the keys within ±w: in blocks of w against three key blocks (slack slots padded to
    a multiple of 8, seeing nothing), and in the CPU kernels' blocks of 32 and 64, query-major and key-major, for
    windows smaller and larger than their blocks."""
    for L, w in ((11, 3), (70, 3), (95, 71)):
        block = w if n == "w" else n
        multiple = 8 if n == "w" else 1
        keep = torch.ones(1, L, dtype=torch.bool)
        mask = band_mask(keep, keep, w, block, torch.float32, multiple=multiple, key_major=key_major)[0]
        allowed = (mask.transpose(1, 2) if key_major else mask) == 0  # [nc, n, S]
        pos = key_windows(torch.arange(L)[None] + 1, w, block, multiple=multiple)[0] - 1  # -1: outside or slack
        assert allowed.shape[2] == pos.shape[1] and allowed.shape[2] % multiple == 0
        assert_each_query_sees_its_window(allowed, lambda c, s: int(pos[c, s]), L, w)
        assert not allowed[:, :, 2 * w + block:].any()


def assert_each_query_sees_its_window(allowed, key_at, L: int, w: int):
    """allowed [nc, n, S] bool (block c's query a may see slot s), key_at(c, s) the position slot s of block c
    holds: every query sees exactly the keys within ±w; the padded tail of the last block, never an empty
    row, sees at least its own slot."""
    n = allowed.shape[1]
    for c in range(allowed.shape[0]):
        for a in range(n):
            i = c * n + a
            if i >= L:
                assert allowed[c, a, w + a]
                continue
            seen = sorted(key_at(c, s) for s in range(allowed.shape[2]) if allowed[c, a, s])
            assert seen == [j for j in range(L) if abs(i - j) <= w], (L, w, i, seen)


@pytest.mark.parametrize("windows,L", [([2, 6, 10], 23), ([6, 80], 70), ([100, 64], 150)])
@pytest.mark.parametrize("n_global", [0, 1, 3])
def test_inference_kernel_matches_dense_reference(windows, L, n_global):
    """Without autograd, in fp32 on CPU, the band runs through strided views of k and v, blocks of 32 queries,
    global keys merged by log-sum-exp; the rest of each layer in chunks of tokens (here 16): the dense reference's
    outputs, with padding, odd lengths and windows below and above the block size."""
    torch.manual_seed(0)
    ref = build(longformer.LongformerModel, tiny(windows), attention_backend="dense").to(DEVICE).eval()
    fast = longformer.LongformerModel(tiny(windows)).to(DEVICE).eval()
    fast.load_state_dict(ref.state_dict())
    ids, am, gm = make_batch(3, L, seed=L + n_global, n_global=n_global)
    with torch.no_grad():
        y_ref = ref(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
        plan = fast.make_plan(ids)
        if plan.row_chunk:
            plan = dataclasses.replace(plan, row_chunk=16)
        with KernelSpy() as spy:
            y = fast(ids, attention_mask=am, global_attention_mask=gm, plan=plan).last_hidden_state
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    assert spy.observed() == expected(plan, masked_lm=False)
    assert plan.band == ("flash" if DEVICE.type == "cpu" else "blocks")


@pytest.mark.parametrize("w,L", [(3, 23), (40, 70), (150, 400)])
@pytest.mark.parametrize("n_global", [0, 1, 3])
@pytest.mark.parametrize("packed", [False, True], ids=["alone", "packed"])
def test_explicit_kernel_matches_the_blocks_kernel(w, L, n_global, packed):
    """The CPU explicit kernel (training, dropout, bf16): in float64, the blocks kernel's outputs and gradients
    (q, k, v, global keys and values); in bf16, its outputs and gradients to bf16's precision. With padding,
    global tokens, odd lengths, windows below and above its blocks of 64, and packed documents."""
    ids, am, gm = (t.cpu() for t in make_batch(3, L, seed=L + n_global, n_global=n_global))
    segments = document_segments(torch.arange(L).expand(3, L) // 17) if packed else None
    masks = AttentionMasks(am.bool(), gm.bool(), segments=segments)
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(3, L, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    inputs = [q, k, v, *(masks.gather_global(x) if n_global else None for x in (k, v))]
    real = masks.keep[:, :, None, None]
    weights = torch.randn(q.shape, generator=g, dtype=torch.float64) * real

    def run(dtype, kernel):
        xs = [None if x is None else x.to(dtype).requires_grad_() for x in inputs]
        out = kernel(xs, dtype)
        grads = torch.autograd.grad((out * weights.to(dtype)).sum(), [x for x in xs if x is not None])
        return [out * real, *grads]

    def explicit(xs, dtype):
        return explicit_band(*xs[:3], w, masks, xs[3:] if n_global else None, 0.0, cpu_plan(dtype))

    def blocks(xs, dtype):
        plan = cpu_plan(dtype, band="blocks", sdpa=(SDPBackend.MATH,))
        return blocks_band(*xs[:3], w, masks, xs[3:] if n_global else None, 0.0, plan)

    for mine, ref in zip(run(torch.float64, explicit), run(torch.float64, blocks)):
        torch.testing.assert_close(mine, ref)
    for mine, ref in zip(run(torch.bfloat16, explicit), run(torch.float32, blocks)):
        torch.testing.assert_close(mine.float(), ref, atol=3e-2, rtol=3e-2)


def test_bf16_autocast_inference_runs_the_strided_kernel():
    """Under bf16 autocast without autograd the band goes through the explicit strided kernel, and the model's
    output stays that of the blocks with an explicit softmax ("chunked") to bf16's precision."""
    torch.manual_seed(0)
    fast = longformer.LongformerModel(tiny([6, 80])).eval()
    ref = build(longformer.LongformerModel, tiny([6, 80]), attention_backend="chunked").eval()
    ref.load_state_dict(fast.state_dict())
    ids, am, gm = (t.cpu() for t in make_batch(3, 70, seed=1, n_global=2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with KernelSpy() as spy:
            y = fast(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
        y_ref = ref(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
        assert fast.make_plan(ids).band == spy.observed()["band"] == "explicit"
    torch.testing.assert_close(y.float(), y_ref.float(), atol=0.1, rtol=0)


@pytest.mark.parametrize("implementation", ["auto", "sdpa", "chunked"])
def test_memory_is_linear_in_length(implementation):
    """No L x L buffer: the largest tensor autograd keeps grows linearly with L (4x length, 4x size)."""
    model = build(longformer.LongformerModel, tiny([8], max_position_embeddings=1100),
                  attention_backend=implementation)
    model.to(DEVICE)
    largest = []
    for L in (256, 1024):
        sizes = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            ids, gm = on_device(torch.randint(3, 50, (1, L)), (torch.arange(L) < 2)[None].long())
            model(ids, global_attention_mask=gm)
        largest.append(max(sizes))
    assert largest[1] <= 4 * largest[0]


@pytest.mark.parametrize("backend", ["auto", "sdpa", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_autocast_stays_close_to_fp32(backend, dtype):
    """Autocast against fp32, padded batch with global tokens: logits within 0.02 + 2% (bf16 keeps 8 bits of
    mantissa); every gradient finite, and all of them together within 5% of fp32's (norm of the difference
    over the norm; a single tiny gradient, such as a key's at initialisation, is mostly rounding)."""
    torch.manual_seed(0)
    model = build(longformer.LongformerForMaskedLM, tiny([4, 8]), attention_backend=backend).to(DEVICE)
    ids, am, gm = make_batch(2, 19, seed=0, n_global=2)
    labels = torch.where(am.bool(), ids, -100)
    ref = model(ids, attention_mask=am, global_attention_mask=gm, labels=labels)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with torch.autocast(DEVICE.type, dtype=dtype):
        out = model(ids, attention_mask=am, global_attention_mask=gm, labels=labels)
    out.loss.backward()
    assert out.logits.dtype == dtype
    torch.testing.assert_close(out.logits.float(), ref.logits, atol=0.02, rtol=0.02)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    assert all(torch.isfinite(g).all() for g in grads.values())
    flat = lambda d: torch.cat([d[n].flatten() for n in sorted(d)])  # noqa: E731
    assert (flat(grads) - flat(ref_grads)).norm() <= 0.05 * flat(ref_grads).norm()


@pytest.mark.parametrize("mode", [True, "selective"])
def test_gradient_checkpointing_gives_the_same_gradients(mode):
    """With dropout: the recomputation draws the same decisions."""
    torch.manual_seed(0)
    dropout = dict(attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.1)
    plain = longformer.LongformerModel(tiny([4, 6], **dropout)).to(DEVICE)
    ckpt = build(longformer.LongformerModel, tiny([4, 6], **dropout), gradient_checkpointing=mode).to(DEVICE)
    ckpt.load_state_dict(plain.state_dict())
    ids, am, gm = make_batch(2, 17, seed=5, n_global=2)
    torch.manual_seed(1)
    y0, g0 = forward_backward(plain, ids, am, gm)
    torch.manual_seed(1)
    y1, g1 = forward_backward(ckpt, ids, am, gm)
    torch.testing.assert_close(y1, y0)
    for name, grad in g0.items():
        if grad is not None:
            torch.testing.assert_close(g1[name], grad)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_selective_checkpointing_recomputes_no_linear_layer(autocast):
    """"selective" keeps the linear layers' outputs, whichever op computes them (on CPU oneDNN's linear op,
    kernels/linear.matmul_t): its backward runs as many matrix products as the backward without checkpointing,
    where full checkpointing runs the forward's again."""
    from torch.utils._python_dispatch import TorchDispatchMode
    products = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}  # the linear layers (attention: bmm)
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        products.add(torch.ops.mkldnn._linear_pointwise.default)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[-1] += func in products
            return func(*args, **(kwargs or {}))

    ids, am, gm = make_batch(2, 17, seed=5, n_global=2)
    backward = {}
    for mode in (False, "selective", True):
        torch.manual_seed(0)
        config = tiny([4, 6], hidden_dropout_prob=0.1)
        model = build(longformer.LongformerModel, config, gradient_checkpointing=mode).to(DEVICE)
        counts = [0]
        with Count():
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(ids, attention_mask=am, global_attention_mask=gm).last_hidden_state
            counts.append(0)
            out.float().sum().backward()
        backward[mode] = counts[-1]
    assert backward["selective"] == backward[False] < backward[True]


def test_backend_can_be_switched_on_a_built_model():
    """The scripts set settings.attention_backend after building the model: the layers follow it."""
    model = longformer.LongformerModel(tiny([4]))
    ids = torch.randint(3, 50, (1, 5))
    for backend, band in (("auto", "explicit"), ("dense", "matmul-softmax"), ("sdpa", "blocks+sdpa")):
        model.settings.attention_backend = backend
        with KernelSpy() as spy:
            spy.graph(model(ids).last_hidden_state)
        assert spy.observed()["band"] == band


@pytest.mark.parametrize("group_blocks", [1, 2, 100])
def test_explicit_kernel_gradients_with_dropout(group_blocks):
    """The explicit kernel with dropout, in blocks of 4 queries taken in groups of 1, 2 or all blocks (windows
    overlapping across groups): exact gradients (gradcheck, float64), with global keys and padding."""
    B, L, H, D, w = 2, 11, 2, 3, 3
    group_bytes = group_blocks * (2 * w + 4 + 2) * 4 * 8  # G = 2, float64
    g = torch.Generator().manual_seed(0)
    keep = torch.arange(L)[None] < torch.tensor([L, L - 4])[:, None]  # the second example padded
    is_global = torch.zeros(B, L, dtype=torch.bool)
    is_global[:, 2] = is_global[0, 5] = True
    masks = AttentionMasks(keep, is_global)
    mask = masks.band_mask(w, 4, torch.float64, key_major=True)
    inputs = [torch.randn(B, n, H, D, generator=g, dtype=torch.float64, requires_grad=True) for n in (L, L, L, 2, 2)]

    def with_dropout(*x):  # the same seeds at every call: gradcheck's finite differences need the same draws
        torch.manual_seed(0)
        return ExplicitBand.apply(*x, mask, w, 0.25, group_bytes) * keep[:, :, None, None]

    # Backward reads the decisions forward drew (kept as bits): gradcheck fails unless they are the same.
    assert torch.autograd.gradcheck(with_dropout, inputs)


def test_attention_dropout_drops_at_the_configured_rate():
    """Training with attention dropout: outputs vary between calls, and the expectation is kept."""
    torch.manual_seed(0)
    model = longformer.LongformerModel(tiny([4], attention_probs_dropout_prob=0.3)).train().to(DEVICE)
    ids = on_device(torch.randint(3, 50, (1, 9)))
    a, b = model(ids).last_hidden_state, model(ids).last_hidden_state
    assert not torch.allclose(a, b)
    (a.sum()).backward()  # the dropout kernel's backward runs
    assert model.layers[0].attn.query.weight.grad is not None


def test_autocast_band_keeps_no_q_k_v_and_projects_them_again(monkeypatch):
    """Under bf16 autocast the CPU band keeps x (which the projections keep anyway) rather than q, k and v, and
    projects them again in backward: exactly the gradients of keeping them, and no [B, L, H, D] tensor saved."""
    from longformer.attention.self_attention import LongformerSelfAttention
    torch.manual_seed(0)
    model = longformer.LongformerModel(tiny([4, 80]))
    ids, am, gm = (t.cpu() for t in make_batch(3, 70, seed=2, n_global=2))

    def grads():
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                _, g = forward_backward(model, ids, am, gm)
        model.zero_grad(set_to_none=True)
        return {n: t.clone() for n, t in g.items() if t is not None}, shapes

    projected, shapes = grads()
    assert (3, 70, 3, 8) not in shapes
    monkeypatch.setattr(LongformerSelfAttention, "_projections", lambda self, x, plan: None)
    kept, shapes = grads()
    assert (3, 70, 3, 8) in shapes  # the check above can fail
    assert projected.keys() == kept.keys()
    for name in kept:
        torch.testing.assert_close(projected[name], kept[name], atol=0, rtol=0, msg=name)


def test_cpu_dropout_keeps_1_minus_p_of_a_million_scores_and_draws_afresh_per_group():
    """The explicit kernel's dropout: over 10^6 scores of the band's 2w + 1 window keys and the global key the
    kept fraction is within 0.5% of 1 - p; each block (and group of blocks) draws its own decisions; a seed
    repeats them."""
    H, w, p = 4, 32, 0.1
    n = plans.EXPLICIT_BLOCK
    L = 3968 + 2 * n  # 3,968 inner queries x 4 heads x (65 window keys + 1 global key): 10^6 scores
    q = torch.zeros(1, L, H, 8)  # every score equal: each output is the mean of kept / (1 - p) over its keys
    k, v, k_global, v_global = torch.randn(1, L, H, 8), torch.ones(1, L, H, 8), torch.randn(1, 1, H, 8), torch.ones(1, 1, H, 8)
    masks = AttentionMasks(torch.ones(1, L, dtype=torch.bool))
    every_global = torch.ones(1, L, 1, dtype=torch.bool)
    mask = band_mask(masks.keep, masks.local_keys, w, n, torch.float32, None, every_global, key_major=True)

    def attention():
        return ExplicitBand.apply(q, k, v, k_global, v_global, mask, w, p, plans.GROUP_BYTES)[0, n:-n, :, 0]  # [inner, H]

    torch.manual_seed(0)
    out = attention()
    kept = float(out.mean()) * (1 - p)
    assert abs(kept - (1 - p)) < 0.005 * (1 - p), kept
    blocks = out.unflatten(0, (-1, n))
    assert all(not torch.equal(blocks[0], blocks[c]) for c in range(1, len(blocks)))  # no block repeats another
    torch.manual_seed(0)
    assert torch.equal(attention(), out)


def test_cpu_attention_dropout_differs_across_layers_steps_and_ranks(monkeypatch):
    """The band kernel's decisions, recorded in a model's forward: each layer draws its own, each step draws
    afresh, another seed (the trainer seeds each rank with seed + rank) draws others, and the same seed draws
    the same again (what a resumed run relies on)."""
    from longformer.kernels import strided
    drawn, draw = [], strided.draw_keep
    monkeypatch.setattr(strided, "draw_keep", lambda *args: drawn.append(draw(*args)) or drawn[-1])
    model = longformer.LongformerModel(tiny([8, 8], attention_probs_dropout_prob=0.1)).train()
    ids = torch.randint(3, 50, (1, 40))

    def steps(seed, n):  # the decisions of each step, each layer's apart: [step][layer]
        torch.manual_seed(seed)
        out = []
        for _ in range(n):
            drawn.clear()
            model(ids)
            assert len(drawn) % 2 == 0 and drawn
            half = len(drawn) // 2
            out.append([torch.cat([d.flatten() for d in drawn[:half]]), torch.cat([d.flatten() for d in drawn[half:]])])
        return out

    rank0, rank1, again = steps(0, 2), steps(1, 1), steps(0, 2)
    assert not torch.equal(rank0[0][0], rank0[0][1])  # layers
    assert not torch.equal(rank0[0][0], rank0[1][0])  # steps
    assert not torch.equal(rank0[0][0], rank1[0][0])  # ranks
    for a, b in zip(rank0, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_hidden_dropout_keeps_1_minus_p_and_drops_the_same_in_backward():
    """The hidden dropout on CPU: over 10^6 values the kept fraction is within 0.5% of 1 - p; backward drops
    exactly what forward dropped (its decisions kept as bits); a new call draws afresh; a seed repeats them;
    eval is the identity."""
    from longformer.kernels.dropout import Dropout
    p = 0.1
    drop = Dropout(p)
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(0)
    plan = cpu_plan()
    y = drop(x, plan)
    kept = y != 0
    assert abs(float(kept.float().mean()) - (1 - p)) < 0.005 * (1 - p)
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    y.backward(torch.arange(1e6).view(1000, 1000))
    torch.testing.assert_close(x.grad, torch.arange(1e6).view(1000, 1000) * y)
    assert not torch.equal(drop(x, plan), y)
    torch.manual_seed(0)
    assert torch.equal(drop(x, plan), y)
    assert torch.equal(drop.eval()(x, plan), x)


def test_dropout_hash_matches_lowbias32_and_its_two_halves_are_independent():
    """The decisions' hash: torch's int32 ops (arithmetic shifts masked, wrapping multiplies, vectorized bodies
    and scalar tails) give lowbias32 as written in uint32 numpy; the two 16-bit decisions of one hash, and those
    of neighbouring counters, are kept together at the rate (1 - p)^2 of independent draws."""
    import numpy as np
    from longformer.kernels.dropout import _hash, draw_keep

    def lowbias32(x):
        x = x.copy()
        for shift, multiplier in ((16, 0x7feb352d), (15, 0x846ca68b), (16, 1)):
            x ^= x >> np.uint32(shift)
            x *= np.uint32(multiplier)
        return x

    for n in (1, 7, 100_003):
        x = torch.randint(-2**31, 2**31, (n,), dtype=torch.int64).to(torch.int32)
        expected = lowbias32(x.numpy().view(np.uint32))
        assert (_hash(x.clone()).numpy().view(np.uint32) == expected).all(), n
    p = 0.3
    torch.manual_seed(0)
    keep = draw_keep((10**6,), p, torch.device("cpu")).view(-1, 2).float()
    assert abs(float(keep.mean()) - (1 - p)) < 0.005 * (1 - p)
    for together in (keep[:, 0] * keep[:, 1], keep[:-1, 1] * keep[1:, 0]):  # one hash's halves; neighbours
        assert abs(float(together.mean()) - (1 - p) ** 2) < 0.01 * (1 - p) ** 2


@pytest.mark.parametrize("act_name", ["gelu", None])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("shape", [(2, 5, 12), (10, 12)])
def test_act_linear_keeps_only_its_input_and_gives_linear_act_gradients(monkeypatch, autocast, act_name, shape):
    """linear(act(h)) with act(h) computed again in backward, or linear(h) casting its weight again, in chunks
    of rows (here 4 of the 10) and its weight gradient in chunks of output features (3 of the 4): the gradients
    of the plain composition (gradcheck in float64; under bf16 autocast, the same dtypes, and the values of
    autocast's own to bf16's precision: the weight gradient sums the chunks' bf16 products in fp32)."""
    from longformer.kernels import linear as lean
    from longformer.kernels.linear import ActLinear
    monkeypatch.setattr(lean, "GRAD_CHUNK", 3)
    from longformer.model import ACT_FNS
    g = torch.Generator().manual_seed(0)
    dtype = torch.float64 if autocast is None else torch.float32
    h = torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
    linear = torch.nn.Linear(12, 4, dtype=dtype)
    act = ACT_FNS[act_name] if act_name else None
    if autocast is None:
        plan = cpu_plan(torch.float64, row_chunk=4)
        assert torch.autograd.gradcheck(lambda h, w, b: ActLinear.apply(h, w, b, act, None, plan),
                                        (h, linear.weight, linear.bias))
        return
    plan = cpu_plan(autocast=autocast, row_chunk=4)
    h_bf16 = h.detach().bfloat16().requires_grad_()  # as the first linear's output would be under autocast
    results = []
    for fn in (lambda x: linear(x if act is None else act(x)),
               lambda x: ActLinear.apply(x, linear.weight, linear.bias, act, None, plan)):
        with torch.autocast("cpu", dtype=autocast):
            out = fn(h_bf16)
        grads = torch.autograd.grad((out.float() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum(),
                                    (h_bf16, linear.weight, linear.bias))
        results.append((out, *grads))
    for mine, ref in zip(results[1], results[0]):
        assert mine.dtype == ref.dtype
        torch.testing.assert_close(mine.float(), ref.float(), atol=1e-2 * ref.abs().max().item(), rtol=0)


@pytest.mark.skipif(not ONEDNN_DTYPES, reason="this torch build has no oneDNN linear op")
@pytest.mark.parametrize("act_name", ["gelu", None])
def test_cpu_linear_products_run_through_onednn_with_fp32_accuracy(monkeypatch, act_name):
    """On CPU the linear layers' fp32 products (forward, input gradient, weight gradient; with and without the
    activation recomputed in backward, in chunks of rows and of output features) go through oneDNN's linear op
    rather than torch.matmul's MKL, and equal the float64 products to fp32's precision; without autograd, and
    under bf16 autocast in the dtype and to the precision of F.linear's."""
    from longformer.kernels import linear as lean
    from longformer.model import ACT_FNS
    calls = []
    monkeypatch.setattr(lean, "_onednn_linear", lambda *a: calls.append(a[0].dtype) or torch.ops.mkldnn._linear_pointwise(*a))
    monkeypatch.setattr(lean, "GRAD_CHUNK", 3)
    act = ACT_FNS[act_name] if act_name else None
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 12, generator=g, requires_grad=True)
    layer = torch.nn.Linear(12, 4)
    weight = torch.linspace(-1, 1, 2 * 5 * 4).view(2, 5, 4)

    def products(h, w, b, fn):
        out = fn(h, w, b)
        return (out, *torch.autograd.grad((out * weight.to(out.dtype)).sum(), (h, w, b)))

    mine = products(h, layer.weight, layer.bias, lambda h, w, b: lean.linear(h, w, b, cpu_plan(row_chunk=4), act))
    # 3 chunks of 4 rows (10 rows): in the forward one product each where the activation is computed a chunk at a
    # time (one product for all rows without it), in backward the input gradient's and the weight gradient's 2
    # chunks of output features (4 features, 3 a chunk)
    assert calls == [torch.float32] * ((3 if act else 1) + 3 * (1 + 2))
    exact = products(*(t.detach().double().requires_grad_() for t in (h, layer.weight, layer.bias)),
                     lambda h, w, b: torch.nn.functional.linear(h if act is None else act(h), w, b))
    for m, e in zip(mine, exact):
        assert m.dtype == torch.float32
        torch.testing.assert_close(m.double(), e, rtol=1e-5, atol=1e-5)
    calls.clear()
    with torch.no_grad():
        inference = cpu_plan(grad=False)
        torch.testing.assert_close(lean.linear(h, layer.weight, layer.bias, inference, act).double(), exact[0],
                                   rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = lean.linear(h, layer.weight, layer.bias, cpu_plan(autocast=torch.bfloat16, grad=False), act)
            reference = layer(h if act is None else act(h))
    assert calls == [torch.float32] + [torch.bfloat16] * (torch.bfloat16 in ONEDNN_DTYPES)
    assert mixed.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), reference.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(torch.bfloat16 not in ONEDNN_DTYPES, reason="casts are cached for oneDNN's bf16 products")
def test_cached_casts_cast_each_weight_once_and_see_changes_in_place():
    """Under autocast without autograd, matmul_t inside cached_casts casts a weight and bias once for all its
    calls, to the same result; a weight changed in place is cast again; outside, nothing is kept."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from longformer.kernels import linear as lean

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].shape in ((4, 12), (4,)):
                self.count += 1
            return func(*args, **(kwargs or {}))

    layer, x = torch.nn.Linear(12, 4), torch.randn(3, 12)
    plan = cpu_plan(autocast=torch.bfloat16, grad=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = lean.matmul_t(x, layer.weight, layer.bias, plan)
        with lean.cached_casts(), Casts() as casts:
            casts.count = 0
            once = [lean.matmul_t(x, layer.weight, layer.bias, plan) for _ in range(3)]
            assert casts.count == 2
            layer.weight.mul_(2)
            doubled = lean.matmul_t(x, layer.weight, layer.bias, plan)
            assert casts.count == 3
        assert lean._casts is None
    for out in once:
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
    bias = layer.bias.to(torch.bfloat16).float()
    torch.testing.assert_close(doubled.float() - bias, 2 * (plain.float() - bias), rtol=2e-2, atol=2e-2)


def test_act_linear_without_rows_gives_zero_gradients():
    """No rows at all (a masked-LM batch with nothing predicted, logits at the labels only): an empty output,
    and weight and bias gradients of zero, not whatever memory the gradient was written into."""
    from longformer.kernels.linear import ActLinear
    linear = torch.nn.Linear(12, 4)
    h = torch.zeros(0, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ActLinear.apply(h, linear.weight, linear.bias, None, None, cpu_plan(autocast=torch.bfloat16))
    out.float().sum().backward()
    assert out.shape == (0, 4)
    assert torch.equal(linear.weight.grad, torch.zeros_like(linear.weight))
    assert torch.equal(linear.bias.grad, torch.zeros_like(linear.bias))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss", ["mlm", "no_decoder", "two_forwards"])
def test_tied_word_embedding_gets_one_gradient(monkeypatch, autocast, loss):
    """The masked-LM decoder hands its gradient of the shared word embedding to the lookup's backward, which adds
    the lookup's rows into it (none into the padding row) and returns it: the gradient of the tie undone, one
    dense tensor, the decoder's own. Also where the loss skips the decoder (the sparse gradient this replaced
    was left sparse there, which AdamW refuses), and for two forwards, one backward."""
    from longformer.kernels import cross_entropy as ce, tied
    handed = []
    backward = tied.TiedLookup.backward
    monkeypatch.setattr(tied.TiedLookup, "backward", staticmethod(
        lambda ctx, grad: handed.append(ctx.tied.grad is not None and ctx.tied.grad.data_ptr()) or backward(ctx, grad)))
    torch.manual_seed(0)
    model = longformer.LongformerForMaskedLM(tiny([4, 4], vocab_size=60)).to(DEVICE).train()
    ids = on_device(torch.randint(3, 60, (2, 11)))
    ids[1, 8:] = model.config.pad_token_id
    labels = torch.where(on_device(torch.rand(2, 11)) < 0.5, ids, -100)
    weight = model.longformer.embeddings.word.weight

    def untied_loss():
        """The head's loss as LongformerForMaskedLM computes it, under the same plan but for the tie."""
        plan = dataclasses.replace(model.make_plan(ids), tied_lookup=False)
        h = model.longformer(ids, plan=plan).last_hidden_state
        logits = model.lm_head(h, weight, plan)
        return ce.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def gradient(tie):
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            if loss == "no_decoder":
                untied = dataclasses.replace(model.make_plan(ids), tied_lookup=False)
                out = model(ids, output_hidden_states=True) if tie else model.longformer(
                    ids, output_hidden_states=True, plan=untied)
                total = out.hidden_states[-1].float().pow(2).sum()
            else:
                one = (lambda: model(ids, labels=labels).loss) if tie else untied_loss
                total = sum(one() for _ in range(1 + (loss == "two_forwards")))
        total.backward()
        return weight.grad

    mine, ref = gradient(True), gradient(False)
    assert mine.layout == torch.strided and mine.dtype == weight.dtype
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-7)
    if loss == "mlm":  # the weight's gradient is the tensor the decoder handed over
        assert handed == [mine.data_ptr()]
    else:  # nothing handed over; each forward's decoder to its own lookup (autograd sums the two)
        assert handed == [False] if loss == "no_decoder" else len(handed) == 2 and all(handed)


@pytest.mark.parametrize("n", [1, 8, 13, 256 * 8])
def test_decisions_packed_as_bits_unpack_to_the_same(n):
    """Every pattern of eight decisions (and lengths that are not a multiple of 8) survives packing."""
    import itertools
    from longformer.kernels.dropout import pack_keep, unpack_keep
    if n == 256 * 8:
        keep = torch.tensor(list(itertools.product([False, True], repeat=8))).view(-1)
    else:
        keep = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    packed = pack_keep(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_keep(packed, keep.shape), keep)


@pytest.mark.parametrize("case", ["output", "zero_weight", "autocast"])
def test_layer_norm_keeping_its_output_or_normalised_input_gives_layer_norm_gradients(case):
    """LayerNorm's backward from its output (x_hat recovered as (y - bias) / weight), or under autocast from
    x_hat kept in bf16: torch's gradients (gradcheck in float64, both ways; under bf16 autocast, to bf16's
    precision); where a weight is zero, outside autocast, torch's own LayerNorm instead."""
    from longformer.kernels.layer_norm import LayerNorm, OutputLayerNorm
    g = torch.Generator().manual_seed(0)
    dtype = torch.float32 if case == "autocast" else torch.float64
    x = (3 * torch.randn(2, 5, 8, generator=g, dtype=dtype) + 1).requires_grad_()
    norm = LayerNorm(8, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=g))
        norm.bias.copy_(torch.randn(8, generator=g))
        if case == "zero_weight":
            norm.weight[3] = 0
    if case == "output":
        for kept in (None, torch.float64):  # y, or x_hat (in fp64 here, so that gradcheck can tell)
            assert torch.autograd.gradcheck(lambda *a: OutputLayerNorm.apply(*a, norm.eps, kept),
                                            (x, norm.weight, norm.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        y = norm(x, cpu_plan(dtype, autocast=torch.bfloat16 if case == "autocast" else None))
    assert (y.grad_fn.name() == "NativeLayerNormBackward0") == (case == "zero_weight")
    weights = torch.randn(y.shape, generator=g, dtype=y.dtype)
    mine = torch.autograd.grad((y * weights).sum(), (x, norm.weight, norm.bias))
    ref_y = torch.nn.functional.layer_norm(x, (8,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(y, ref_y)
    tolerance = dict(rtol=2e-2, atol=2e-2) if case == "autocast" else {}
    for a, b in zip(mine, torch.autograd.grad((ref_y * weights).sum(), (x, norm.weight, norm.bias))):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_in_chunks_equals_torchs(monkeypatch, dtype, reduction):
    """The masked-LM loss over chunks of rows (here 3 rows of 7 words): torch's loss and gradient on the fp32
    (here fp64) logits, ignored rows included; gradcheck in fp64; in bf16 the gradient autocast would give."""
    from longformer.kernels import cross_entropy as ce
    monkeypatch.setattr(ce, "CHUNK_ELEMENTS", 21)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(10, 7, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, 7, (10,), generator=g)
    labels[[2, 5]] = -100
    loss = ce.cross_entropy(logits, labels, reduction=reduction)
    grad, = torch.autograd.grad(3 * loss, logits)
    wide = logits.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(wide, labels, reduction=reduction)
    ref_grad, = torch.autograd.grad(3 * ref, wide)
    assert loss.dtype == torch.promote_types(dtype, torch.float32) and grad.dtype == dtype and not grad[[2, 5]].any()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad.to(dtype), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x: ce.CrossEntropy.apply(x, labels, -100, reduction == "mean"),
                                        (logits,))
    assert ce.cross_entropy(logits, torch.full_like(labels, -100)).isnan()  # a mean over nothing, as torch's
