"""The offline GPT-2 tokenizer against an independent pure-Python BPE and transformers' GPT2Tokenizer."""
import json
import os

import pytest

from pile_tools.slow_bpe import SlowGPT2BPE
from pile_tools.tokenizer import EOT_ID, default_vocab_dir, load_gpt2_tokenizer

VARIED_TEXTS = [
    "Hello world",
    "def f(x):\n\t    return  x**2   \n\n\n# done",
    "naïve café — 東京 🎉 emoji\u00a0nbsp ½ ÿ \x00 ctrl",
    "it's we'll I'M don't  'quoted'",
    "    leading and trailing spaces   ",
    "3.14159 1234567890 -42 0x1F",
    "A literal <|endoftext|> stays text.",
    "\r\n\r\nwindows\r\nnewlines\t\ttabs",
]


@pytest.fixture(scope="module")
def tok():
    return load_gpt2_tokenizer()


def test_hello_world_and_eot(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and EOT_ID == 50256
    assert tok.decode([EOT_ID]) == "<|endoftext|>"


def test_matches_pure_python_reference(tok):
    slow = SlowGPT2BPE()
    for text in VARIED_TEXTS:
        assert tok.encode(text) == slow.encode(text), text
    assert tok.encode_batch(VARIED_TEXTS) == [slow.encode(t) for t in VARIED_TEXTS]


def test_matches_transformers_gpt2_tokenizer(tok):
    from transformers import GPT2Tokenizer

    with open(os.path.join(default_vocab_dir(), "encoder.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(default_vocab_dir(), "vocab.bpe"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:-1]]
    reference = GPT2Tokenizer(vocab=vocab, merges=merges)
    # transformers registers <|endoftext|> as a special token, so leave out the text that contains it.
    for text in VARIED_TEXTS:
        if "<|endoftext|>" not in text:
            assert tok.encode(text) == reference(text)["input_ids"], text


def test_literal_eot_string_is_ordinary_text(tok):
    ids = tok.encode("a<|endoftext|>b")
    assert EOT_ID not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"
    assert tok.encode_document("a<|endoftext|>b").tolist() == ids + [EOT_ID]


def test_round_trip_decode(tok):
    for text in VARIED_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_missing_vocab_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="encoder.json"):
        load_gpt2_tokenizer(str(tmp_path))
