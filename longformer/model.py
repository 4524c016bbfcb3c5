"""The Longformer encoder and its task heads, with HF's class, argument and output names."""
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from . import plan as plans
from .attention import AttentionMasks, LongformerSelfAttention, document_segments
from .config import LongformerConfig
from .kernels.cross_entropy import cross_entropy
from .kernels.dropout import Dropout
from .kernels.layer_norm import LayerNorm
from .kernels.linear import cached_casts, linear
from .kernels.rows import in_row_chunks
from .kernels.tied import TiedGradient, TiedLookup

ACT_FNS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


class ModelOutput:
    """Fields by name (out.logits) or, as HF's tuples, by position over the fields that are set (out[0])."""

    def to_tuple(self):
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, i):
        return self.to_tuple()[i]


@dataclass
class LongformerBaseModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class LongformerHeadOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class LongformerQuestionAnsweringModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class LongformerEmbeddings(nn.Module):
    def __init__(self, config: LongformerConfig):
        super().__init__()
        C, pad = config.hidden_size, config.pad_token_id
        self.padding_idx = pad
        self.word = nn.Embedding(config.vocab_size, C, padding_idx=pad)
        self.position = nn.Embedding(config.max_position_embeddings, C, padding_idx=pad)
        self.token_type = nn.Embedding(config.type_vocab_size, C)
        self.norm = LayerNorm(C, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def position_ids(self, input_ids, shape, device, segments=None):
        """RoBERTa's positions: padding_idx + 1, + 2, ... over real tokens; padding tokens get padding_idx.
        With segments (packed documents), the count starts again at each document."""
        if input_ids is None:  # embeddings given: nothing tells padding apart
            real = torch.ones(shape, dtype=torch.long, device=device)
        else:
            real = input_ids.ne(self.padding_idx).long()
        count = torch.cumsum(real, dim=1)
        if segments is not None:
            # Subtract the count reached before each segment: taken at its first token, carried forward by cummax
            # (the count never decreases, so the latest segment's value is the largest).
            starts = torch.cat([torch.zeros_like(segments[:, :1]), segments.diff(dim=1)], dim=1) > 0
            count = count - torch.where(starts, count - real, 0).cummax(dim=1).values
        return count * real + self.padding_idx

    def forward(self, input_ids, token_type_ids, position_ids, inputs_embeds, plan, tied=None):
        """tied: a TiedGradient (kernels/tied.py) through which the masked-LM decoder hands over its gradient of
        the word embedding, or None."""
        if inputs_embeds is not None:
            x = inputs_embeds
        elif tied is not None:
            x = TiedLookup.apply(input_ids, self.word.weight, self.padding_idx, tied)
        else:
            x = self.word(input_ids)
        x = x + self.position(position_ids) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x, plan), plan)


class LongformerLayer(nn.Module):
    def __init__(self, config: LongformerConfig, layer_id: int):
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_eps
        self.attn = LongformerSelfAttention(config, layer_id)
        self.attn_out = nn.Linear(C, C)
        self.attn_norm = LayerNorm(C, eps=eps)
        self.ffn_in = nn.Linear(C, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, C)
        self.ffn_norm = LayerNorm(C, eps=eps)
        self.act = ACT_FNS[config.hidden_act]
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, masks: AttentionMasks, plan) -> torch.Tensor:
        attended = self.attn(x, masks, plan)
        with cached_casts():  # without autograd, per_token runs a chunk at a time: each weight cast once
            return in_row_chunks(lambda *xs: self.per_token(*xs, plan), None if plan.grad else plan.row_chunk,
                                 x, attended)

    def per_token(self, x: torch.Tensor, attended: torch.Tensor, plan) -> torch.Tensor:
        """The rest of the layer, token by token: x and attended [..., C] -> [..., C]. In training the feed-forward's
        second linear keeps only the first's output (linear() recomputes the activation)."""
        x = self.attn_norm(x + self.dropout(linear(attended, self.attn_out.weight, self.attn_out.bias, plan), plan),
                           plan)
        h = linear(x, self.ffn_in.weight, self.ffn_in.bias, plan)
        out = linear(h, self.ffn_out.weight, self.ffn_out.bias, plan, self.act)
        return self.ffn_norm(x + self.dropout(out, plan), plan)


class LongformerPreTrainedModel(nn.Module):
    """What every class shares: the config, weight initialisation, and HF-format checkpoints."""

    def __init__(self, config: LongformerConfig):
        super().__init__()
        if not isinstance(config, LongformerConfig):
            raise TypeError(f"expected a LongformerConfig, got {type(config).__name__}")
        self.config = config

    def init_weights(self, module: nn.Module):
        """HF's initialisation: normal(0, initializer_range) weights, zero biases, unit LayerNorms."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def base_model(self) -> "LongformerModel":
        """The encoder (HF's name): the model itself, or a head's .longformer."""
        return getattr(self, "longformer", self)

    @property
    def settings(self) -> plans.Settings:
        """The run-time choices (longformer/plan.py's Settings), kept by the encoder and shared by its head:
        attention_backend, sdpa_backends, plan, gradient_checkpointing, max_global_tokens. The architecture
        (model.config) stays as loaded."""
        return self.base_model._settings

    def gradient_checkpointing_enable(self, mode: bool | str = True):
        """Recompute each layer's activations in the backward pass: less memory, about 1/3 more compute.
        mode "selective": keep the linear layers' outputs, recompute the rest."""
        self.settings.gradient_checkpointing = mode

    def gradient_checkpointing_disable(self):
        self.settings.gradient_checkpointing = False

    def _token_shape_and_plan(self, input_ids, inputs_embeds):
        """((batch, length) of whichever input is given, the forward's plan), or (None, None): LongformerModel then
        says what to give."""
        ref = input_ids if input_ids is not None else inputs_embeds
        return (None, None) if ref is None else (tuple(ref.shape[:2]), self.make_plan(ref))

    def make_plan(self, x: torch.Tensor) -> plans.Plan:
        """The kernel plan of a forward on x (input ids or embeddings) as things stand: device, autocast, grad mode,
        tracing, train/eval and the settings."""
        cfg = self.config
        trainable = any(p.requires_grad for p in self.parameters())
        return plans.for_forward(self.settings, x, self.base_model.embeddings.word.weight, trainable,
                                 self.training and cfg.attention_probs_dropout_prob > 0)

    @classmethod
    def from_pretrained(cls, name: str, *, revision: str | None = None, cache_dir: str | None = None,
                        local_files_only: bool = False, token: str | bool | None = None, **config_overrides):
        """Load an HF-format checkpoint (config.json + model.safetensors or pytorch_model.bin): a folder, or a Hub
        name such as "allenai/longformer-base-4096", found in the Hugging Face cache or fetched (pip install
        "longformer[hub]"; revision, cache_dir, local_files_only and token as in transformers).

        config_overrides replace config fields, e.g. num_labels=3, or set the run-time settings
        (model.settings), e.g. attention_backend="chunked" or gradient_checkpointing=True.
        """
        from .checkpoint import load_pretrained
        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        return load_pretrained(cls, name, hub, **config_overrides)

    def save_pretrained(self, directory: str):
        """Write config.json + model.safetensors that HF transformers' from_pretrained loads."""
        from .checkpoint import save_pretrained
        save_pretrained(self, directory)


def _check_inputs(config, plan, input_ids, inputs_embeds, **per_token):
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids [batch, length] and inputs_embeds [batch, length, hidden]")
    ref = input_ids if input_ids is not None else inputs_embeds
    name = "input_ids" if input_ids is not None else "inputs_embeds"
    if ref.dim() != (2 if input_ids is not None else 3) or ref.shape[1] == 0:
        raise ValueError(f"{name} must be [batch, length{', hidden' if input_ids is None else ''}] with length >= 1, "
                         f"got shape {tuple(ref.shape)}")
    if ref.shape[0] == 0:
        raise ValueError(f"{name} holds no sequences (shape {tuple(ref.shape)}): give at least one")
    shape = tuple(ref.shape[:2])
    for key, value in per_token.items():
        if value is not None and tuple(value.shape) != shape:
            raise ValueError(f"{key} has shape {tuple(value.shape)} but {name} has {shape[0]} sequences of "
                             f"{shape[1]} tokens: give one value per token, shape {shape}")
    if shape[1] > config.max_length:
        raise ValueError(f"input of {shape[1]} tokens is longer than this model's position table allows "
                         f"({config.max_length} tokens, max_position_embeddings={config.max_position_embeddings}): "
                         f"truncate it, or extend the model with `python -m longformer.convert`")
    if input_ids is not None:
        check_ids("input_ids", input_ids, plan, config.vocab_size, "the vocabulary", "token id",
                  "were the texts tokenized with this model's tokenizer?")
    return shape


def check_ids(name: str, t: torch.Tensor, plan, size: int, of: str, what: str, hint: str = "",
              ignored: int | None = None):
    """t holds integers in 0 .. size - 1 (or `ignored`): else a TypeError or a ValueError naming the argument, the
    first bad value and where it is. The values are read back only where the plan may (plan.read_back: the CPU
    plans, where that waits for nothing): traced and on GPUs only the dtype is checked (on a GPU an id out of
    range stops at the embedding lookup's device-side assert)."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer {what}s (torch.long), got {t.dtype}: convert with .long()")
    if not plan.read_back or not t.numel():
        return
    bad = (t < 0) | (t >= size)
    if ignored is not None:
        bad &= t != ignored
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        allowed = f"0 .. {size - 1}" + ("" if ignored is None else f", or {ignored} where nothing is predicted")
        raise ValueError(f"{name} holds {what} {int(t[tuple(where)])} at {where}, outside {of} ({allowed})"
                         + (f": {hint}" if hint else ""))




def _check_label_shape(name: str, labels: torch.Tensor, *shapes: tuple):
    if tuple(labels.shape) not in shapes:
        raise ValueError(f"{name} has shape {tuple(labels.shape)}; expected "
                         f"{' or '.join(str(s) for s in shapes)}")


class LongformerModel(LongformerPreTrainedModel):
    def __init__(self, config: LongformerConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = LongformerEmbeddings(config)
        self.layers = nn.ModuleList(LongformerLayer(config, i) for i in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        self._settings = plans.Settings()
        self.apply(self.init_weights)

    def forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, output_hidden_states=False, document_ids=None, *,
                plan: plans.Plan | None = None, tied: TiedGradient | None = None) -> LongformerBaseModelOutput:
        """attention_mask: 1 = real token, 0 = padding. global_attention_mask: 1 = global token.
        document_ids [B, L]: several documents packed in a row, each a run of tokens with the same id; no token
        attends across a document boundary, and positions restart at each document, so that every document
        gets the hidden states it gets alone. plan: the kernel plan (longformer/plan.py; by default make_plan's);
        tied: the masked-LM head's TiedGradient."""
        if plan is None and (input_ids is not None or inputs_embeds is not None):
            plan = self.make_plan(input_ids if input_ids is not None else inputs_embeds)
        shape = _check_inputs(self.config, plan, input_ids, inputs_embeds, attention_mask=attention_mask,
                              global_attention_mask=global_attention_mask, token_type_ids=token_type_ids,
                              position_ids=position_ids, document_ids=document_ids)
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        segments = None if document_ids is None else document_segments(document_ids)
        if position_ids is None:
            position_ids = self.embeddings.position_ids(input_ids, shape, device, segments)
        elif plan.read_back and int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"position_ids reach {int(position_ids.max())} but the position table has "
                             f"{self.config.max_position_embeddings} rows")
        if token_type_ids is None:
            token_type_ids = torch.zeros(shape, dtype=torch.long, device=device)
        keep = torch.ones(shape, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        masks = AttentionMasks(keep, None if global_attention_mask is None else global_attention_mask.bool(),
                               self.settings.max_global_tokens, segments, plan.tracing)

        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds, plan, tied)
        hidden_states = [x] if output_hidden_states else None
        mode = self.settings.gradient_checkpointing if self.training and plan.grad else False
        recompute = {"context_fn": _keep_matmul_outputs} if mode == "selective" else {}
        for layer in self.layers:
            if mode:
                x = checkpoint(layer, x, masks, plan, use_reentrant=False, **recompute)
            else:
                x = layer(x, masks, plan)
            if output_hidden_states:
                hidden_states.append(x)
        if masks.overflow is not None:  # a traced graph cannot raise: an example over its global slots gets NaN
            x = x.masked_fill(masks.overflow[:, None, None], float("nan"))
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return LongformerBaseModelOutput(x, pooled, tuple(hidden_states) if output_hidden_states else None)


def _keep_matmul_outputs():
    """Selective checkpointing: the linear layers' outputs are kept, everything else in a layer (attention,
    LayerNorm, GELU, dropout, the key windows) is recomputed in the backward pass."""
    keep = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # the linear layers' op on CPU (kernels/linear.matmul_t)
        keep.add(torch.ops.mkldnn._linear_pointwise.default)
    policy = lambda ctx, op, *args, **kwargs: (  # noqa: E731
        CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE)
    return create_selective_checkpoint_contexts(policy)


class LongformerForMaskedLM(LongformerPreTrainedModel):
    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.longformer = LongformerModel(config, add_pooling_layer=False)
        self.lm_head = LongformerLMHead(config)
        self.lm_head.apply(self.init_weights)

    def forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, output_hidden_states=False,
                logits_at_labels_only=False, document_ids=None) -> LongformerHeadOutput:
        """labels: the token to predict, -100 where nothing is predicted. document_ids: as LongformerModel's.

        logits_at_labels_only: compute the vocabulary projection only where labels != -100 (the decoder is
        the model's largest matmul) and return logits [num_predicted, vocab] instead of [B, L, vocab].
        """
        shape, plan = self._token_shape_and_plan(input_ids, inputs_embeds)
        if labels is not None and shape is not None:
            _check_label_shape("labels", labels, shape)
            check_ids("labels", labels, plan, self.config.vocab_size, "the vocabulary", "token id", ignored=-100)
        word = self.longformer.embeddings.word.weight
        # The decoder's gradient of the shared word embedding goes to the lookup's backward (kernels/tied.py).
        tied = TiedGradient() if plan and plan.tied_lookup and word.requires_grad and inputs_embeds is None else None
        out = self.longformer(input_ids, attention_mask, global_attention_mask, token_type_ids, position_ids,
                              inputs_embeds, output_hidden_states, document_ids, plan=plan, tied=tied)
        h = out.last_hidden_state
        if logits_at_labels_only:
            if labels is None:
                raise ValueError("logits_at_labels_only=True needs labels")
            selected = labels.ne(-100)
            h, labels = h[selected], labels[selected]
        logits = self.lm_head(h, word, plan, tied)
        loss = None
        if labels is not None:
            loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return LongformerHeadOutput(loss, logits, out.hidden_states)


class LongformerLMHead(nn.Module):
    """dense -> gelu -> LayerNorm -> decoder tied to the word embeddings, with its own bias."""

    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h, decoder_weight, plan, tied=None):
        """decoder_weight: the word embedding [vocab, C]; tied: the TiedGradient of the forward pass whose word
        embeddings made h, or None."""
        h = self.layer_norm(F.gelu(linear(h, self.dense.weight, self.dense.bias, plan)))
        return linear(h, decoder_weight, self.bias, plan, tied=tied)


def _problem_type(config, labels) -> str:
    """HF's rule: one label is regression, integer labels are single-label, float labels are multi-label."""
    if config.problem_type is not None:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    return "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification"


def _check_classification_labels(config, plan, labels, batch: int):
    problem = _problem_type(config, labels)
    if problem == "regression":
        _check_label_shape("labels", labels, (batch,), (batch, 1))
    elif problem == "single_label_classification":
        _check_label_shape("labels", labels, (batch,))
        names = ", ".join(f"{i} {config.id2label[i]}" for i in sorted(config.id2label or {})[:10])
        check_ids("labels", labels, plan, config.num_labels, "the label set", "label", f"the labels are {names}")
    else:
        _check_label_shape("labels", labels, (batch, config.num_labels))


def _classification_loss(config, logits, labels):
    problem = _problem_type(config, labels)
    if problem == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.float().view(logits.shape[0], -1).squeeze(-1))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, config.num_labels).float(), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class LongformerClassificationHead(nn.Module):
    """On the first token (<s>): dropout -> dense -> tanh -> dropout -> out_proj."""

    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, h, plan):
        h = self.dropout(torch.tanh(self.dense(self.dropout(h[:, 0], plan))), plan)
        return self.out_proj(h)


class LongformerForSequenceClassification(LongformerPreTrainedModel):
    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.longformer = LongformerModel(config, add_pooling_layer=False)
        self.classifier = LongformerClassificationHead(config)
        self.classifier.apply(self.init_weights)

    def forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, output_hidden_states=False) -> LongformerHeadOutput:
        """Without a global_attention_mask the first token is global, as in HF."""
        shape, plan = self._token_shape_and_plan(input_ids, inputs_embeds)
        if labels is not None and shape is not None:
            _check_classification_labels(self.config, plan, labels, shape[0])
        if global_attention_mask is None and shape is not None:
            device = (input_ids if input_ids is not None else inputs_embeds).device
            global_attention_mask = (torch.arange(shape[1], device=device) == 0).long().expand(shape)
        out = self.longformer(input_ids, attention_mask, global_attention_mask, token_type_ids, position_ids,
                              inputs_embeds, output_hidden_states, plan=plan)
        logits = self.classifier(out.last_hidden_state, plan)
        loss = _classification_loss(self.config, logits, labels) if labels is not None else None
        return LongformerHeadOutput(loss, logits, out.hidden_states)


class LongformerForTokenClassification(LongformerPreTrainedModel):
    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.longformer = LongformerModel(config, add_pooling_layer=False)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.classifier.apply(self.init_weights)

    def forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, labels=None, output_hidden_states=False,
                document_ids=None) -> LongformerHeadOutput:
        """labels [B, L]: class per token, -100 where no label applies (padding, continuation sub-words).
        document_ids: as LongformerModel's."""
        shape, plan = self._token_shape_and_plan(input_ids, inputs_embeds)
        if labels is not None and shape is not None:
            _check_label_shape("labels", labels, shape)
            check_ids("labels", labels, plan, self.config.num_labels, "the label set", "label", ignored=-100)
        out = self.longformer(input_ids, attention_mask, global_attention_mask, token_type_ids, position_ids,
                              inputs_embeds, output_hidden_states, document_ids, plan=plan)
        logits = self.classifier(self.dropout(out.last_hidden_state, plan))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return LongformerHeadOutput(loss, logits, out.hidden_states)


def _segment_global_mask(input_ids, sep_token_id: int, question_first: bool, choices: int | None = None):
    """HF's default global attention for a pair <s> A </s></s> B </s>: the tokens of A (before the first
    </s>) when question_first, else the tokens after the first </s></s>. input_ids [N, L] -> [N, L] long
    (N = batch x choices for multiple choice).

    HF asserts that the batch holds three </s> per row; here a row without one is named."""
    is_sep = input_ids.eq(sep_token_id)
    missing = (~is_sep.any(dim=1)).nonzero()
    if len(missing):
        r = int(missing[0])
        what = f"row {r}" if choices is None else f"example {r // choices}, choice {r % choices},"
        raise ValueError(f"{what} has no separator token (sep_token_id {sep_token_id}): the default "
                         f"global attention needs inputs laid out as <s> question </s></s> text </s>; give "
                         f"global_attention_mask to choose the global tokens yourself")
    first = is_sep.int().argmax(dim=1, keepdim=True)  # the first </s> of each row
    position = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    return (position < first if question_first else position > first + 1).long()


class LongformerForQuestionAnswering(LongformerPreTrainedModel):
    """Extractive QA: a start and an end score per token."""

    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.longformer = LongformerModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.qa_outputs.apply(self.init_weights)

    def forward(self, input_ids=None, attention_mask=None, global_attention_mask=None, token_type_ids=None,
                position_ids=None, inputs_embeds=None, start_positions=None, end_positions=None,
                output_hidden_states=False) -> LongformerQuestionAnsweringModelOutput:
        """Without a global_attention_mask the question (the tokens before the first </s>) is global, as in HF.
        start_positions, end_positions [B]: token indices; those outside the input are ignored by the loss."""
        shape, plan = self._token_shape_and_plan(input_ids, inputs_embeds)
        for name, positions in (("start_positions", start_positions), ("end_positions", end_positions)):
            if positions is not None and shape is not None:
                _check_label_shape(name, positions, shape[:1], (shape[0], 1))
        if global_attention_mask is None:
            if input_ids is None:
                warnings.warn("no global_attention_mask and no input_ids to find the question in: "
                              "no token gets global attention")
            elif input_ids.dim() == 2 and input_ids.numel():  # else LongformerModel names what is wrong
                global_attention_mask = _segment_global_mask(input_ids, self.config.sep_token_id, True)
        out = self.longformer(input_ids, attention_mask, global_attention_mask, token_type_ids, position_ids,
                              inputs_embeds, output_hidden_states, plan=plan)
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).split(1, dim=-1)
        start_logits, end_logits = start_logits.squeeze(-1), end_logits.squeeze(-1)  # [B, L] each
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.shape[1]  # HF's rule: positions past the input are clamped to L, then ignored
            loss = sum(F.cross_entropy(logits.float(), positions.reshape(-1).clamp(0, ignored), ignore_index=ignored)
                       for logits, positions in ((start_logits, start_positions), (end_logits, end_positions))) / 2
        return LongformerQuestionAnsweringModelOutput(loss, start_logits, end_logits, out.hidden_states)


class LongformerForMultipleChoice(LongformerPreTrainedModel):
    """One score per choice, from the pooled <s> of each (question, choice) sequence."""

    def __init__(self, config: LongformerConfig):
        super().__init__(config)
        self.longformer = LongformerModel(config)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.classifier.apply(self.init_weights)

    def forward(self, input_ids=None, token_type_ids=None, attention_mask=None, global_attention_mask=None,
                labels=None, position_ids=None, inputs_embeds=None, output_hidden_states=False) -> LongformerHeadOutput:
        """Inputs [B, num_choices, L] (HF's argument order); logits [B, num_choices]; labels [B]: the right
        choice. Without a global_attention_mask, the tokens after the first </s></s> are global, as in HF."""
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None or ref.dim() != (3 if input_ids is not None else 4):
            raise ValueError("give input_ids [batch, num_choices, length] (or inputs_embeds [batch, num_choices, "
                             f"length, hidden]), got {None if ref is None else tuple(ref.shape)}")
        B, num_choices = ref.shape[:2]
        plan = self.make_plan(ref)
        if labels is not None:
            _check_label_shape("labels", labels, (B,))
            check_ids("labels", labels, plan, num_choices, "the choices", "choice")
        flat = lambda t: None if t is None else t.reshape(B * num_choices, *t.shape[2:])  # noqa: E731
        global_mask = flat(global_attention_mask)  # [B * num_choices, L]
        if global_mask is None and input_ids is not None and input_ids.numel():
            global_mask = _segment_global_mask(flat(input_ids), self.config.sep_token_id, False, num_choices)
        out = self.longformer(flat(input_ids), flat(attention_mask), global_mask, flat(token_type_ids),
                              flat(position_ids), flat(inputs_embeds), output_hidden_states, plan=plan)
        logits = self.classifier(self.dropout(out.pooler_output, plan)).view(B, num_choices)
        loss = F.cross_entropy(logits.float(), labels.view(-1)) if labels is not None else None
        return LongformerHeadOutput(loss, logits, out.hidden_states)
