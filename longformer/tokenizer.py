"""RoBERTa's byte-level BPE tokenizer, through the `tokenizers` library."""
import os
import shutil

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from .hub import resolve

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer_files(src: str, dst: str):
    """Put the tokenizer of src (a folder or a Hub name) beside a model, so that its folder is complete."""
    src = resolve(src, "tokenizer")
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def roberta_post_processing(tokenizer: Tokenizer):
    """<s> text </s> (and <s> a </s></s> b </s> for pairs), as RoBERTa was trained."""
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", tokenizer.token_to_id("</s>")), ("<s>", tokenizer.token_to_id("<s>")), trim_offsets=True,
        add_prefix_space=False)


def load_tokenizer(name: str, *, revision: str | None = None, cache_dir: str | None = None,
                   local_files_only: bool = False, token: str | bool | None = None) -> Tokenizer:
    """From tokenizer.json, or from vocab.json + merges.txt (RoBERTa's original files), in a folder or a Hub
    name's repository (as LongformerModel.from_pretrained finds it).

    Returns a `tokenizers.Tokenizer`: tok.encode(text).ids starts with <s> and ends with </s>; its
    offsets map tokens back to characters.
    """
    directory = resolve(name, "tokenizer", revision=revision, cache_dir=cache_dir,
                        local_files_only=local_files_only, token=token)
    tokenizer_json = os.path.join(directory, "tokenizer.json")
    vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    if os.path.isfile(tokenizer_json):
        tokenizer = Tokenizer.from_file(tokenizer_json)
    elif os.path.isfile(vocab) and os.path.isfile(merges):
        tokenizer = Tokenizer(BPE.from_file(vocab, merges))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        # <mask> swallows the space before it, so "a <mask>" predicts the word " b" as RoBERTa does.
        tokenizer.add_special_tokens([AddedToken(t, lstrip=t == "<mask>") for t in SPECIAL_TOKENS])
    else:
        raise FileNotFoundError(f"no tokenizer in {directory!r}: expected tokenizer.json, or vocab.json + merges.txt")
    missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"the tokenizer in {directory!r} lacks RoBERTa's special tokens {missing}")
    if tokenizer.post_processor is None:
        roberta_post_processing(tokenizer)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer
