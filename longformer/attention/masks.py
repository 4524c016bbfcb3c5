"""AttentionMasks: what every layer needs to know about padding and global tokens, computed once a forward."""
import torch

from ..kernels import window_mask


class AttentionMasks:
    """keep [B, L] bool: real tokens (False = padding). is_global [B, L] bool: tokens with global attention.

    Global tokens are gathered into G slots per example (G = the most any example has; the one host sync
    that global attention needs, taken once per forward rather than once per layer, and not at all when
    no global_attention_mask is given).
    """

    def __init__(self, keep: torch.Tensor, is_global: torch.Tensor | None = None):
        self.keep = keep
        L = keep.shape[1]
        if is_global is None:  # no global tokens: nothing to count, no host sync (torch.compile sees one graph)
            self.is_global = torch.zeros_like(keep)
            self.num_global = 0
            counts = torch.zeros(keep.shape[0], dtype=torch.long, device=keep.device)
        else:
            self.is_global = is_global & keep  # a padding token is never global
            counts = self.is_global.sum(dim=1)  # [B]
            self.num_global = int(counts.max())
        self.local_keys = keep & ~self.is_global
        # Slots in position order: global tokens score higher than the rest, earlier ones a little higher.
        position = torch.arange(L, device=keep.device)
        score = self.is_global.long() * L - position
        self.global_idx = score.topk(self.num_global, dim=1).indices  # [B, G]
        self.global_valid = torch.arange(self.num_global, device=keep.device) < counts[:, None]  # [B, G]
        self._window_masks = {}

    def window_mask(self, w: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask for window w, built once and shared by the layers that use w."""
        if (w, dtype) not in self._window_masks:
            self._window_masks[w, dtype] = window_mask(
                self.keep, self.local_keys, w, dtype, self.global_valid if self.num_global else None)
        return self._window_masks[w, dtype]

    def gather_global(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, *rest] -> [B, G, *rest]: the global tokens' rows (invalid slots hold row 0)."""
        idx = self.global_idx.view(*self.global_idx.shape, *[1] * (x.dim() - 2))
        return x.gather(1, idx.expand(-1, -1, *x.shape[2:]))

    def scatter_global(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Replace the global tokens' rows of x [B, L, *rest] by rows [B, G, *rest]."""
        valid = self.global_valid.view(*self.global_valid.shape, *[1] * (x.dim() - 2))
        idx = self.global_idx.view(*self.global_idx.shape, *[1] * (x.dim() - 2)).expand_as(rows)
        # Invalid slots add zeros at row 0, so every real global row receives exactly one value.
        placed = torch.zeros_like(x).scatter_add(1, idx, rows * valid)
        is_global = self.is_global.view(*self.is_global.shape, *[1] * (x.dim() - 2))
        return torch.where(is_global, placed, x)
