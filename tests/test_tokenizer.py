"""load_tokenizer gives RoBERTa's ids, from vocab.json + merges.txt or tokenizer.json."""
import pytest
from tokenizers import ByteLevelBPETokenizer

import longformer
from conftest import transformers

TEXTS = ["Hello world, this is a long document.", "  irregular   spaces\tand tabs", "naïve café — ünïcödé"]


@pytest.fixture
def vocab_dir(tmp_path):
    tok = ByteLevelBPETokenizer()
    corpus = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world, documents are long.", *TEXTS] * 20
    tok.train_from_iterator(corpus, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.save_model(str(tmp_path))
    return tmp_path


def test_vocab_merges_match_hf(vocab_dir):
    ours = longformer.load_tokenizer(str(vocab_dir))
    hf = transformers.RobertaTokenizerFast.from_pretrained(str(vocab_dir))
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == hf(text)["input_ids"], text
        assert ids[0] == ours.token_to_id("<s>") and ids[-1] == ours.token_to_id("</s>")
    assert ours.encode("a", "b").ids == hf("a", "b")["input_ids"]


def test_mask_token_takes_the_space_before_it(vocab_dir):
    """As in roberta-base's tokenizer.json (lstrip): "a <mask> b" is <s> a <mask> Ġb </s>."""
    tok = longformer.load_tokenizer(str(vocab_dir))
    assert tok.encode("a <mask> b").ids == tok.encode("a").ids[:-1] + [tok.token_to_id("<mask>")] + tok.encode(" b").ids[1:]


def test_tokenizer_json_from_hf(vocab_dir, tmp_path):
    hf = transformers.RobertaTokenizerFast.from_pretrained(str(vocab_dir))
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = longformer.load_tokenizer(str(tmp_path / "hf"))
    for text in TEXTS:
        assert ours.encode(text).ids == hf(text)["input_ids"]


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json, or vocab.json"):
        longformer.load_tokenizer(str(tmp_path))
