"""HF-format checkpoints: read and write config.json + model.safetensors with HF's parameter names.

Our modules have shorter names than HF's (layers.0.attn_out vs encoder.layer.0.attention.output.dense);
HF_NAMES translates ours to theirs, and loading builds the reverse map from the model's own keys.
"""
import json
import os
import re
import warnings

import torch
from safetensors.torch import load_file

from .config import LongformerConfig
from .files import atomic_save_safetensors
from .plan import SETTINGS

# (our name, HF's name) as regular expression and replacement; the first match wins.
HF_NAMES = [
    (r"embeddings\.word\.", "embeddings.word_embeddings."),
    (r"embeddings\.position\.", "embeddings.position_embeddings."),
    (r"embeddings\.token_type\.", "embeddings.token_type_embeddings."),
    (r"embeddings\.norm\.", "embeddings.LayerNorm."),
    (r"layers\.(\d+)\.attn\.", r"encoder.layer.\1.attention.self."),
    (r"layers\.(\d+)\.attn_out\.", r"encoder.layer.\1.attention.output.dense."),
    (r"layers\.(\d+)\.attn_norm\.", r"encoder.layer.\1.attention.output.LayerNorm."),
    (r"layers\.(\d+)\.ffn_in\.", r"encoder.layer.\1.intermediate.dense."),
    (r"layers\.(\d+)\.ffn_out\.", r"encoder.layer.\1.output.dense."),
    (r"layers\.(\d+)\.ffn_norm\.", r"encoder.layer.\1.output.LayerNorm."),
    (r"pooler\.", "pooler.dense."),
]
BODY_PREFIXES = ("embeddings.", "encoder.", "pooler.")
HEAD_PREFIXES = ("lm_head.", "classifier.", "qa_outputs.")
# Keys a checkpoint may hold that carry nothing this library needs.
HARMLESS = re.compile(r"(embeddings\.position_ids|lm_head\.decoder\.(weight|bias))$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def to_hf(key: str) -> str:
    for pattern, replacement in HF_NAMES:
        new, n = re.subn(r"(?<![^.])" + pattern, replacement, key, count=1)  # at the start or after a dot
        if n:
            return new
    return key


def canonical(hf_key: str) -> str:
    """Drop the body's prefix, whichever a checkpoint uses: longformer. (HF), roberta. (allenai), or none."""
    for prefix in ("longformer.", "roberta."):
        if hf_key.startswith(prefix):
            return hf_key[len(prefix):]
    return hf_key


def _read_file(path: str) -> dict:
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        # weights_only: tensors and plain containers only, never arbitrary unpickling.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or damaged file: safetensors' and torch's own errors name no file
        raise ValueError(f"{path} is damaged or incomplete ({type(e).__name__}: {e}): download or copy it "
                         f"again") from e


def read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory (single or sharded, safetensors or .bin)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return _read_file(path)
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(_read_file(os.path.join(directory, shard)))
        return state
    raise FileNotFoundError(f"no weights in {directory!r}: expected one of {', '.join(WEIGHT_FILES)}")


def load_state_dict_hf(model, state: dict[str, torch.Tensor]):
    """Copy an HF-named state dict into model; error on missing body weights or wrong shapes."""
    own = model.state_dict()
    wanted = {canonical(to_hf(k)): k for k in own}  # canonical HF name -> our name
    found = {canonical(k): v for k, v in state.items()}
    if "lm_head.bias" in wanted and "lm_head.bias" not in found and "lm_head.decoder.bias" in found:
        found["lm_head.bias"] = found["lm_head.decoder.bias"]  # older checkpoints keep only the decoder's copy

    missing = [k for k in wanted if k not in found]
    mismatched = [(k, tuple(own[wanted[k]].shape), tuple(found[k].shape))
                  for k in wanted if k in found and own[wanted[k]].shape != found[k].shape]
    missing_body = [k for k in missing if k.startswith(("embeddings.", "encoder."))]
    if missing_body or mismatched:
        lines = []
        if missing_body:
            lines.append(f"missing weights ({len(missing_body)}): {', '.join(missing_body[:20])}"
                         + (" ..." if len(missing_body) > 20 else ""))
        lines += [f"shape mismatch for {k}: model expects {e}, checkpoint has {f}" for k, e, f in mismatched]
        raise ValueError("checkpoint does not fit this model config:\n  " + "\n  ".join(lines)
                         + "\nCheck that config.json belongs to these weights (hidden_size, num_hidden_layers, "
                           "vocab_size, max_position_embeddings, num_labels).")
    if missing:
        warnings.warn(f"{type(model).__name__}: newly initialised (not in the checkpoint, train them before use): "
                      f"{', '.join(missing)}", stacklevel=3)
    unexpected = [k for k in found if k not in wanted and not HARMLESS.search(k)
                  and not k.startswith(HEAD_PREFIXES + ("pooler.",))]  # another head's weights: expected
    if unexpected:
        warnings.warn(f"{type(model).__name__}: ignored checkpoint weights that this model has no place for: "
                      f"{', '.join(unexpected[:20])}", stacklevel=3)
    with torch.no_grad():
        for key, ours in wanted.items():
            if key in found:
                own[ours].copy_(found[key])


def load_pretrained(cls, name: str, hub: dict, **config_overrides):
    """name: a checkpoint folder or a Hub name (hub: its revision, cache_dir, local_files_only, token)."""
    from .hub import resolve
    directory = resolve(name, "model", **hub)
    config = LongformerConfig.from_pretrained(directory)
    overrides = dict(config_overrides)
    settings = {k: overrides.pop(k) for k in SETTINGS if k in overrides}  # run-time choices: model.settings
    if overrides:
        if "num_labels" in overrides:
            n = overrides.pop("num_labels")
            if config.id2label is None or len(config.id2label) != n:
                overrides.setdefault("id2label", {i: f"LABEL_{i}" for i in range(n)})
        config = LongformerConfig.from_dict({**config.to_dict(), **overrides})
    model = cls(config)
    for name, value in settings.items():
        setattr(model.settings, name, value)
    load_state_dict_hf(model, read_state_dict(directory))
    return model


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    return {to_hf(k): v.detach().contiguous() for k, v in model.state_dict().items()}


def save_pretrained(model, directory: str):
    os.makedirs(directory, exist_ok=True)
    model.config.extra["architectures"] = [type(model).__name__]
    model.config.save_pretrained(directory)
    tensors = {k: v.cpu() for k, v in hf_state_dict(model).items()}
    atomic_save_safetensors(os.path.join(directory, "model.safetensors"), tensors, metadata={"format": "pt"})
