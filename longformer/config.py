"""LongformerConfig: the model's hyper-parameters, read from and written to HF's config.json."""
import json
import os
from dataclasses import asdict, dataclass, field, fields

from .files import atomic_write_text
from .plan import SETTINGS

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish", "tanh")


@dataclass
class LongformerConfig:
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 4098
    type_vocab_size: int = 1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    # Full window per layer (an int for all layers): each token sees attention_window // 2 tokens on each side.
    attention_window: int | list[int] = 512
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    sep_token_id: int = 2
    id2label: dict[int, str] | None = None
    problem_type: str | None = None  # "single_label_classification", "multi_label_classification", "regression"
    # Fields of config.json that this library does not use, kept so that a save writes them back.
    extra: dict = field(default_factory=dict, repr=False)

    def __setattr__(self, name, value):
        if name in SETTINGS:  # once fields here; set silently, they would change nothing
            raise AttributeError(f"{name} is a run-time setting, not part of the architecture: set "
                                 f"model.settings.{name} (or pass {name}=... to from_pretrained)")
        super().__setattr__(name, value)

    def __post_init__(self):
        if isinstance(self.attention_window, int):
            self.attention_window = [self.attention_window] * self.num_hidden_layers
        self.attention_window = list(self.attention_window)
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        self.validate()

    def validate(self):
        def fail(msg):
            raise ValueError(f"LongformerConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            fail(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                 f"({self.num_attention_heads})")
        if len(self.attention_window) != self.num_hidden_layers:
            fail(f"attention_window has {len(self.attention_window)} entries but the model has "
                 f"{self.num_hidden_layers} layers: give one window per layer, or a single int for all")
        for i, w in enumerate(self.attention_window):
            if not isinstance(w, int) or isinstance(w, bool) or w <= 0 or w % 2:
                fail(f"attention_window of layer {i} is {w!r}; it must be a positive even integer "
                     f"(the full window: each token sees window // 2 tokens on each side)")
        if self.hidden_act not in ACTIVATIONS:
            fail(f"unknown hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0 <= p < 1:
                fail(f"{name} must be in [0, 1), got {p!r}")
        if not self.layer_norm_eps > 0:
            fail(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            fail(f"pad_token_id {self.pad_token_id} is outside the vocabulary (size {self.vocab_size})")
        if self.max_position_embeddings <= self.pad_token_id + 1:
            fail(f"max_position_embeddings ({self.max_position_embeddings}) leaves no room for positions: "
                 f"RoBERTa-style positions start at pad_token_id + 1 = {self.pad_token_id + 1}")

    # -- derived values -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_length(self) -> int:
        """Longest input the position table covers (positions start after the padding index)."""
        return self.max_position_embeddings - self.pad_token_id - 1

    @property
    def num_labels(self) -> int:
        return len(self.id2label) if self.id2label else 2

    @property
    def label2id(self) -> dict[str, int]:
        return {v: k for k, v in (self.id2label or {}).items()}

    # -- config.json ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "LongformerConfig":
        d = dict(d)
        known = {f.name for f in fields(cls)} - {"extra"}
        if "num_labels" in d and "id2label" not in d:
            d["id2label"] = {i: f"LABEL_{i}" for i in range(int(d["num_labels"]))}
        d.pop("num_labels", None)
        d.pop("label2id", None)  # derived from id2label
        d.pop("model_type", None)  # always longformer here
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        return cls(**kwargs, extra=d)

    def to_dict(self) -> dict:
        d = {**self.extra, **{k: v for k, v in asdict(self).items() if k != "extra"}}
        d["model_type"] = "longformer"
        if self.id2label is None:
            d.pop("id2label")
        else:
            d["id2label"] = {str(k): v for k, v in self.id2label.items()}
            d["label2id"] = self.label2id
        return d

    @classmethod
    def from_pretrained(cls, path: str, **hub) -> "LongformerConfig":
        """Read a config.json, the config.json inside a checkpoint directory, or a Hub name's (hub: revision,
        cache_dir, local_files_only, token; see longformer.hub)."""
        if not os.path.isfile(path):
            from .hub import resolve
            file = os.path.join(resolve(path, "config", **hub), "config.json")
            if not os.path.isfile(file):
                raise FileNotFoundError(f"no config.json in {path!r}: expected a checkpoint directory holding "
                                        f"config.json (as written by save_pretrained) or the path of a config file")
        else:
            file = path
        with open(file, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} is not valid JSON ({e}): restore it from the checkpoint's source, or "
                                 f"write it again with save_pretrained") from e
        model_type = d.get("model_type", "longformer")
        if model_type != "longformer":
            raise ValueError(f"{file} describes a {model_type!r} model, not a Longformer. "
                             f"A RoBERTa checkpoint is converted with: python -m longformer.convert SRC OUT")
        return cls.from_dict(d)

    def save_pretrained(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        atomic_write_text(os.path.join(directory, "config.json"), json.dumps(self.to_dict(), indent=2) + "\n")
