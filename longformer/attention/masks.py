"""AttentionMasks: what every layer needs to know about padding and global tokens, computed once a forward."""
import torch

from ..kernels.banded import band_mask


class AttentionMasks:
    """keep [B, L] bool: real tokens (False = padding). is_global [B, L] bool: tokens with global attention.
    segments [B, L] long (from document_segments), or None: packed documents; a token attends only to tokens
    of its own segment, through the window and through global attention alike.

    Global tokens are gathered into G slots per example. G is max_global when given: a static count, so that
    torch.compile and export see one graph with no count read back. Eager mode then refuses an example with
    more global tokens; a traced graph cannot raise, so it marks such examples in `overflow` [B] and the model
    makes their outputs NaN. Without max_global, G is the most any example has: in eager mode the one host sync
    that global attention needs (once per forward, not per layer, and none without a global_attention_mask);
    under torch.export a size read from the mask when the graph runs. tracing: the plan's (None, "compile" or
    "export"), which decides between these.
    """

    def __init__(self, keep: torch.Tensor, is_global: torch.Tensor | None = None, max_global: int | None = None,
                 segments: torch.Tensor | None = None, tracing: str | None = None):
        self.keep, self.segments = keep, segments
        B, L = keep.shape
        self.is_global = torch.zeros_like(keep) if is_global is None else is_global & keep  # padding is never global
        counts = self.is_global.sum(dim=1)  # [B]
        self.overflow = None
        if max_global is not None:
            self.num_global = max_global
            if tracing:
                self.overflow = counts > max_global
            else:
                _check_global_counts(counts, max_global)
        elif is_global is not None and tracing == "export":
            # At least one slot (masked where unused): with none, onnxruntime broadcasts the [B, 1] batch index
            # against the [B, 0] slots to [B, 1], and the scatter of the global rows fails.
            G = counts.max().clamp(min=1).item()
            torch._check(G >= 1)
            torch._check(G <= L)
            self.num_global = G
        else:  # without global tokens nothing to count: no host sync
            self.num_global = 0 if is_global is None else int(counts.max())
        self.local_keys = keep & ~self.is_global
        # Slot s of example b holds the position of its s-th global token (in position order); slots past
        # the example's count hold position 0 and are marked invalid. Scattered through one spare column.
        G = self.num_global
        slot = torch.where(self.is_global, self.is_global.long().cumsum(1) - 1, G).clamp(max=G)  # [B, L]
        position = torch.arange(L, device=keep.device).expand(B, L)
        self.global_idx = keep.new_zeros(B, G + 1, dtype=torch.long).scatter(1, slot, position)[:, :G]  # [B, G]
        self.global_valid = torch.arange(G, device=keep.device) < counts[:, None]  # [B, G]
        self.global_segments = None if segments is None else self.gather_global(segments)  # [B, G]
        # The keys global queries see: every real token [B, L], or with segments the real tokens of each
        # global token's own document [B, G, L].
        self.global_keys = keep if segments is None else (
            keep[:, None, :] & (segments[:, None, :] == self.global_segments[:, :, None]))
        self._band_masks = {}

    def band_mask(self, w: int, n: int, dtype: torch.dtype, global_keys: bool = True, multiple: int = 1,
                  key_major: bool = False) -> torch.Tensor:
        """banded.band_mask for window w in blocks of n, with the global slots (unless global_keys is False),
        built once a forward and shared by the layers that ask for the same."""
        key = (w, n, dtype, global_keys, multiple, key_major)
        if key not in self._band_masks:
            self._band_masks[key] = band_mask(self.keep, self.local_keys, w, n, dtype, self.segments,
                                              self.global_allowed() if global_keys and self.num_global else None,
                                              multiple, key_major)
        return self._band_masks[key]

    def global_allowed(self) -> torch.Tensor:
        """[B, L, G] bool: the global keys each query sees (the valid slots; with segments, its own document's)."""
        allowed = self.global_valid[:, None, :].expand(-1, self.keep.shape[1], -1)
        if self.segments is not None:
            allowed = allowed & (self.segments[:, :, None] == self.global_segments[:, None, :])
        return allowed

    def gather_global(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, *rest] -> [B, G, *rest]: the global tokens' rows (invalid slots hold row 0)."""
        # Indexing rather than gather: gather keeps all of x for its backward pass, indexing only the indices.
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        return x[rows, self.global_idx]

    def place(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """x [B, L, *rest] with the padding rows zeroed and the global tokens' rows replaced by rows [B, G, *rest]
        (None where there are no global tokens). Through 0/1 factors: torch.where and products with a bool mask
        run unvectorized on CPU (2-3x slower in bf16), and torch.where's backward twice. The rows are added in
        place at their positions: a scatter_add_ into zeros of x's shape took 1.2 ms a layer in bf16 and 8.8 in
        fp32 (copies of all of x) at 4,096 tokens on a 2-core EPYC, this 0.26 and 0.17."""
        shape = (*self.keep.shape, *[1] * (x.dim() - 2))  # [B, L, 1, ...]
        # The [B, L] factors cast directly, not through dropout.factor's uint8 view: ONNX export has no view to
        # another dtype, and a cast of B x L values costs nothing here.
        if rows is None:
            return x * self.keep.to(x.dtype).view(shape)
        out = x * (self.keep & ~self.is_global).to(x.dtype).view(shape)
        valid = self.global_valid.view(*self.global_valid.shape, *shape[2:])
        batch = torch.arange(x.shape[0], device=x.device)[:, None]
        # Invalid slots add zeros at row 0 (accumulated, so that each real global row receives its one value
        # whatever the order of the writes).
        return out.index_put_((batch, self.global_idx), rows * valid, accumulate=True)


def document_segments(document_ids: torch.Tensor) -> torch.Tensor:
    """document_ids [B, L] -> segment index [B, L] long: 0, 0, ..., 1, 1, ...; a new segment begins wherever the
    id changes from one token to the next, so the ids themselves may be any values (each document's tokens
    lie next to each other, as packing puts them)."""
    change = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.cat([torch.zeros_like(change[:, :1]), change], dim=1).long().cumsum(1)


def _check_global_counts(counts: torch.Tensor, max_global: int):
    if bool((counts > max_global).any()):
        row = int(counts.argmax())
        raise ValueError(f"example {row} of the batch has {int(counts[row])} global tokens, more than the "
                         f"max_global_tokens={max_global} this model was set (or exported) for: give fewer global "
                         f"tokens, or raise max_global_tokens")
