"""Training blocks cut on the fly from memory-mapped token shards (made by longformer.prepare_data).

Resident memory does not follow the corpus: the tokens stay on disk (numpy memmap) and each block is read
when the loop asks for it. What is held is an index of 16 bytes per block (where each starts and ends):
1/512 of the tokens' size at 4,096-token blocks.

Packing, for blocks of L tokens:
- "documents": whole documents, in order, fill each block; a document that does not fit in what is left
  starts the next block, and one longer than L is split at block ends. Every token carries the index of its
  document (document_ids), so attention never crosses a document boundary and positions restart at each.
- "single": one document per block, padded (as HF's line-by-line MLM); long ones split as above.
- "concat": the documents concatenated and cut every L tokens; attention runs across boundaries (the
  original BERT/Longformer recipe). The last partial block is dropped.
"""
import json
import os

import numpy as np

from .prepare_data import FORMAT

PACKINGS = ("documents", "single", "concat")


def read_manifest(directory: str, tokenizer_sha256: str | None = None) -> dict:
    """The manifest of finished, whole shards; a clear error, with what to do, for anything else."""
    path = os.path.join(directory, "manifest.json")
    redo = f"run python -m longformer.prepare_data again (with --overwrite) to rebuild {directory}"
    if not os.path.isfile(path):
        raise SystemExit(f"{directory} has no manifest.json: the shards are not finished (or this is not a shard "
                         f"folder); run python -m longformer.prepare_data with the same arguments to finish them")
    try:
        manifest = json.load(open(path))
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path} is not JSON ({e}): {redo}")
    if manifest.get("format") != FORMAT:
        raise SystemExit(f"{path} is of format {manifest.get('format')!r}, not {FORMAT!r}: {redo}")
    if tokenizer_sha256 and manifest["tokenizer"]["sha256"] != tokenizer_sha256:
        raise SystemExit(f"{directory} was tokenized with another tokenizer (sha256 "
                         f"{manifest['tokenizer']['sha256'][:12]}…) than the model's ({tokenizer_sha256[:12]}…): "
                         f"prepare the data again with the model's tokenizer (--tokenizer, or the --init folder)")
    for shard in manifest["shards"]:
        for file, size in shard["files"].items():
            file_path = os.path.join(directory, file)
            found = os.path.getsize(file_path) if os.path.isfile(file_path) else None
            if found != size:
                raise SystemExit(f"{file_path} is {'missing' if found is None else f'{found:,} bytes'}, but the "
                                 f"manifest says {size:,} bytes: the shards are damaged or incomplete; {redo}")
    return manifest


def pack_starts(lengths: np.ndarray, seq_len: int, single: bool) -> np.ndarray:
    """Where each block starts (token offsets) when documents of these lengths are packed in order."""
    starts, fill, position = [], seq_len, 0
    for n in lengths.tolist():
        if single or fill + n > seq_len:  # a new block; a long document takes several
            starts.extend(range(position, position + n, seq_len))
            fill = (n - 1) % seq_len + 1
        else:
            fill += n
        position += n
    return np.asarray(starts, dtype=np.int64)


class TokenBlocks:
    """A split ("train" or "val") of a shard folder as blocks of seq_len tokens: a dataset for the loop.

    Item i: input_ids, attention_mask, special_tokens_mask [L] (and document_ids [L] with documents packing).
    """

    def __init__(self, directory: str, split: str, seq_len: int, packing: str = "documents",
                 manifest: dict | None = None, max_blocks: int = 0):
        """max_blocks > 0: keep that many blocks, evenly spaced over the split (a validation set of a size
        that is quick to evaluate, however large the corpus)."""
        if packing not in PACKINGS:
            raise ValueError(f"packing {packing!r}: expected one of {', '.join(PACKINGS)}")
        manifest = manifest or read_manifest(directory)
        self.seq_len, self.packing = seq_len, packing
        info = manifest["tokenizer"]
        self.pad_id = info["pad_id"]
        self.special_ids = np.array([info["bos_id"], info["eos_id"], info["pad_id"]])
        self.largest_id = max(shard[split]["largest_id"] for shard in manifest["shards"])
        self.tokens, self.offsets = [], []
        for shard in manifest["shards"]:
            if shard[split]["tokens"]:
                name = os.path.join(directory, f"{shard['name']}-{split}")
                self.tokens.append(np.load(f"{name}-tokens.npy", mmap_mode="r"))
                self.offsets.append(np.load(f"{name}-offsets.npy", mmap_mode="r"))
        # shard k holds the tokens base[k] .. base[k + 1] of the split's stream
        self.base = np.cumsum([0] + [len(t) for t in self.tokens])
        total = int(self.base[-1])
        if packing == "concat":
            self.starts = np.arange(total // seq_len, dtype=np.int64) * seq_len
            self.ends = self.starts + seq_len
        else:  # each shard packed on its own: a block never spans two shards
            self.starts = np.concatenate([np.zeros(0, np.int64)] + [
                pack_starts(np.diff(o), seq_len, packing == "single") + b for o, b in zip(self.offsets, self.base)])
            self.ends = np.minimum(self.starts + seq_len, np.append(self.starts[1:], total))
        if 0 < max_blocks < len(self.starts):
            chosen = np.linspace(0, len(self.starts) - 1, max_blocks).round().astype(np.int64)
            self.starts, self.ends = self.starts[chosen], self.ends[chosen]

    def __len__(self):
        return len(self.starts)

    def _read(self, start: int, end: int) -> np.ndarray:
        """Tokens start..end of the split's stream (which may run across shards) as int64."""
        k = int(np.searchsorted(self.base, start, side="right")) - 1
        parts = []
        while start < end:
            stop = min(end, int(self.base[k + 1]))
            parts.append(self.tokens[k][start - self.base[k]:stop - self.base[k]])
            start, k = stop, k + 1
        return np.concatenate(parts).astype(np.int64)

    def _document_ids(self, start: int, end: int) -> np.ndarray:
        """For tokens start..end of one shard: 0 for the first document there, 1 for the next, ..."""
        k = int(np.searchsorted(self.base, start, side="right")) - 1
        positions = np.arange(start, end) - self.base[k]
        doc = np.searchsorted(self.offsets[k], positions, side="right")
        return doc - doc[0]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"block {i} of {len(self)}")
        L, start, end = self.seq_len, int(self.starts[i]), int(self.ends[i])
        ids = np.full(L, self.pad_id, dtype=np.int64)
        ids[:end - start] = self._read(start, end)
        example = {"index": i, "input_ids": ids, "attention_mask": (np.arange(L) < end - start).astype(np.int64),
                   "special_tokens_mask": np.isin(ids, self.special_ids).astype(np.int64)}
        if self.packing == "documents":
            document_ids = np.empty(L, dtype=np.int64)
            document_ids[:end - start] = self._document_ids(start, end)
            document_ids[end - start:] = document_ids[end - start - 1] + 1  # padding: a document of its own
            example["document_ids"] = document_ids
        return example
