"""The kernel plan: one table of the programs the model runs (pinned here and in docs/attention.md), made in one
place, switchable by name on any device, and apart from the architecture config."""
import os
import re

import pytest
import torch

import longformer
from longformer import plan as plans
from test_attention import make_batch, tiny

FP32, BF16 = torch.float32, torch.bfloat16
# The contexts whose plans docs/attention.md lists: (device, dtype, autocast, grad, attention dropout, tracing,
# Settings.plan) -> what the table says of it.
CONTEXTS = {
    "CPU, eager, no autograd, fp32": ("cpu", FP32, None, False, False, None, None),
    "CPU, eager, no autograd, bf16 autocast": ("cpu", BF16, BF16, False, False, None, None),
    "CPU, eager, autograd": ("cpu", FP32, None, True, True, None, None),
    "CUDA, eager": ("cuda", FP32, None, True, True, None, None),
    "torch.compile on CPU": ("cpu", FP32, None, True, False, "compile", None),
    "torch.compile on CUDA": ("cuda", BF16, BF16, True, True, "compile", None),
    "torch.export, ONNX": ("cpu", FP32, None, False, False, "export", None),
    "CPU, plan='cuda'": ("cpu", FP32, None, True, True, None, "cuda"),
}


def row(when: str, p: plans.Plan) -> str:
    names = {v: k for k, v in plans.BACKEND_NAMES.items()}
    sdpa = ",".join(names[b] for b in p.sdpa) if p.sdpa else "-"
    return (f"| {p.name} | {when} | {p.band} | {sdpa} | {p.linear} | {p.layer_norm} | {p.dropout} | "
            f"{p.row_chunk or 'all'} | {'yes' if p.tied_lookup else 'no'} | {'; '.join(p.stand_ins) or '-'} |")


def plan_of(context, **settings):
    device, dtype, autocast, grad, dropout, tracing, name = context
    return plans.make_plan(device, dtype, autocast, grad, dropout, tracing, plans.Settings(plan=name, **settings))


@pytest.fixture(autouse=True)
def default_backends(monkeypatch):
    monkeypatch.delenv(plans.ENV_VAR, raising=False)


def test_the_plan_table_is_pinned_and_is_the_one_in_the_docs():
    bf16_linear = "onednn" if BF16 in plans.ONEDNN_DTYPES else "torch"
    expected = [
        "| cpu-inference | CPU, eager, no autograd, fp32 | flash | - | onednn | torch | bits | 1024 | no | - |",
        f"| cpu-inference | CPU, eager, no autograd, bf16 autocast | explicit | - | {bf16_linear} | torch | bits | "
        "1024 | no | - |",
        "| cpu-training | CPU, eager, autograd | explicit | - | onednn | keep-output | bits | 1024 | yes | - |",
        "| cuda | CUDA, eager | blocks | efficient,math | torch | torch | torch | all | yes | - |",
        "| compiled | torch.compile on CPU | blocks | flash,math | traced | torch | torch | all | no | - |",
        "| compiled | torch.compile on CUDA | blocks | efficient,math | traced | torch | torch | all | no | - |",
        "| exported | torch.export, ONNX | blocks | - | traced | torch | torch | all | no | - |",
        "| cuda | CPU, plan='cuda' | blocks | math | torch | torch | torch | all | yes | "
        "SDPA EFFICIENT_ATTENTION -> MATH (no CPU kernel) |",
    ]
    assert [row(when, plan_of(c)) for when, c in CONTEXTS.items()] == expected
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "attention.md"), encoding="utf-8") as f:
        docs = f.read()
    for line in expected:  # the docs show the bf16 row of a CPU with bf16 instructions
        assert line.replace("| torch | torch | bits", "| onednn | torch | bits") in docs, line
    assert {plan_of(c).name for c in CONTEXTS.values()} == set(plans.PLANS)


def test_the_user_choices_change_the_band_and_nothing_else():
    base = plan_of(CONTEXTS["CPU, eager, autograd"])
    for backend, band, sdpa in (("sdpa", "blocks", ("flash", "math")), ("chunked", "blocks", None),
                                ("dense", "dense", None)):
        p = plan_of(CONTEXTS["CPU, eager, autograd"], attention_backend=backend)
        assert (p.band, p.sdpa and tuple(plans.BACKEND_NAMES[n] for n in sdpa)) == (band, sdpa and p.sdpa)
        assert (p.linear, p.layer_norm, p.dropout, p.row_chunk) == (base.linear, base.layer_norm, base.dropout,
                                                                   base.row_chunk)
    p = plan_of(CONTEXTS["CUDA, eager"], sdpa_backends="cudnn,efficient")
    assert p.sdpa == (plans.SDPBackend.CUDNN_ATTENTION, plans.SDPBackend.EFFICIENT_ATTENTION)
    # sdpa_backends steers SDPA alone, not also which CPU kernel runs the band
    assert plan_of(CONTEXTS["CPU, eager, no autograd, fp32"], sdpa_backends="math").band == "flash"


def test_a_cpu_plan_on_another_device_is_refused_and_settings_are_checked():
    with pytest.raises(ValueError, match="plan 'cpu-training' runs on CPU only"):
        plan_of(("cuda", FP32, None, True, False, None, "cpu-training"))
    settings = plans.Settings()
    for name, value, message in (("attention_backend", "flash", "choose one of auto, sdpa"),
                                 ("plan", "tpu", "choose one of cpu-inference"),
                                 ("gradient_checkpointing", "some", "False, True or 'selective'"),
                                 ("max_global_tokens", -1, "non-negative"),
                                 ("sdpa_backends", "flash,turbo", "SDPA backends 'flash,turbo'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            setattr(settings, name, value)


def test_run_time_choices_leave_the_architecture_config_alone(tmp_path):
    model = longformer.LongformerForMaskedLM(tiny([4, 8]))
    before = model.config.to_dict()
    model.gradient_checkpointing_enable("selective")
    model.settings.attention_backend, model.settings.plan = "chunked", "cuda"
    assert model.config.to_dict() == before
    with pytest.raises(AttributeError, match=r"set model\.settings\.attention_backend"):
        model.config.attention_backend = "dense"  # would change nothing: refused
    assert model.settings is model.longformer.settings  # a head and its encoder share one
    assert model.longformer.settings.gradient_checkpointing == "selective"
    model.save_pretrained(str(tmp_path))
    loaded = longformer.LongformerForMaskedLM.from_pretrained(str(tmp_path), attention_backend="dense",
                                                              gradient_checkpointing=True, max_global_tokens=3)
    assert loaded.config.to_dict() == longformer.LongformerConfig.from_pretrained(str(tmp_path)).to_dict()
    assert (loaded.settings.attention_backend, loaded.settings.gradient_checkpointing,
            loaded.settings.max_global_tokens) == ("dense", True, 3)
    assert not any(k in loaded.config.extra for k in plans.SETTINGS)


def test_the_model_makes_its_plan_from_where_and_how_it_runs():
    model = longformer.LongformerModel(tiny([4, 8], attention_probs_dropout_prob=0.1))
    ids = torch.randint(3, 50, (1, 9))
    assert model.train().make_plan(ids).name == "cpu-training"
    with torch.no_grad():
        assert model.make_plan(ids).band == "explicit"  # attention dropout in train mode: not the flash kernel
        assert model.eval().make_plan(ids).band == "flash"
    for p in model.parameters():
        p.requires_grad_(False)
    assert model.make_plan(ids).name == "cpu-inference"  # nothing to train: autograd records nothing


def test_torch_compile_and_export_get_their_plans():
    model = longformer.LongformerModel(tiny([4]))

    class Probe(torch.nn.Module):
        def forward(self, x):
            plan = model.make_plan(x)
            return x + (1 if plan.name == "compiled" else 2 if plan.name == "exported" else 0) + 10 * (
                plan.band == "dense")

    x = torch.zeros(2, 3, dtype=torch.long)
    assert int(Probe()(x).max()) == 0
    compiled = torch.compile(Probe(), backend="eager", fullgraph=True)
    assert int(compiled(x).max()) == 1
    model.settings.attention_backend = "dense"  # a changed setting: compiled again, with the new plan
    assert int(compiled(x).max()) == 11
    model.settings.attention_backend = "auto"
    assert int(torch.export.export(Probe(), (x,)).module()(x).max()) == 2


@pytest.mark.parametrize("plan", ["cpu-training", "cuda", "compiled", "exported"])
def test_dropout_runs_the_plans_kernel(plan):
    """With dropout on, the hidden dropout's kernel is the plan's (bits on CPU, torch's on the others)."""
    from kernel_spy import KernelSpy, expected
    model = longformer.LongformerForMaskedLM(tiny([4, 8], attention_probs_dropout_prob=0.1,
                                                  hidden_dropout_prob=0.1)).train()
    model.settings.plan = plan
    ids, am, gm = make_batch(2, 19, seed=0, n_global=2)
    with KernelSpy() as spy:
        spy.graph(model(ids, attention_mask=am, global_attention_mask=gm, labels=ids).loss)
    assert spy.observed() == expected(model.make_plan(ids), masked_lm=True, dropout=True)
