"""Turning raw Pile records into token arrays: the part of tokenization that runs in worker processes."""
from __future__ import annotations

import ctypes
import json
import signal
from dataclasses import dataclass, field

from pile_tools.tokenizer import GPT2BPE, load_gpt2_tokenizer

_worker_tokenizer: GPT2BPE | None = None


@dataclass
class EncodedChunk:
    docs: list = field(default_factory=list)  # (line_no, domain, uint16 tokens ending with EOT)
    skipped: list = field(default_factory=list)  # (line_no, reason)
    filtered: int = 0  # records of domains not asked for
    last_line: int = 0


def init_worker(vocab_dir: str | None) -> None:
    """Process-pool initializer: one single-threaded tokenizer per worker, so --workers bounds the cores used.

    A worker ignores SIGINT (Ctrl-C reaches the whole process group; the parent alone handles it and shuts
    the pool down) and, on Linux, is killed when its parent dies however the parent dies (kill -9
    included), so no worker outlives an interrupted job."""
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    _worker_tokenizer = load_gpt2_tokenizer(vocab_dir)


def _die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) where the C library offers it (Linux); elsewhere nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def parse_record(payload) -> tuple[str | None, str | None, str | None]:
    """(text, domain, None) for a usable record, else (None, None, reason)."""
    if isinstance(payload, (bytes, str)):
        try:
            payload = json.loads(payload)
        except ValueError as err:
            return None, None, f"malformed JSON ({err})"
    if not isinstance(payload, dict):
        return None, None, "not a JSON object"
    text = payload.get("text")
    if text is None:
        return None, None, "no 'text' field"
    if not isinstance(text, str):
        return None, None, f"'text' is a {type(text).__name__}, not a string"
    if not text:
        return None, None, "empty 'text'"
    meta = payload.get("meta")
    domain = meta.get("pile_set_name") if isinstance(meta, dict) else None
    if not isinstance(domain, str) or not domain:
        return None, None, "no 'meta.pile_set_name'"
    if not domain.isprintable() or _has_surrogates(domain):
        return None, None, f"'meta.pile_set_name' {domain!r} is not a printable name"
    return text, domain, None


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def encode_chunk(items: list, keep_domains: frozenset | None, tokenizer: GPT2BPE | None = None) -> EncodedChunk:
    """items: [(line_no, raw JSON line or record dict)] -> token arrays for the usable records, in order."""
    tokenizer = tokenizer or _worker_tokenizer
    chunk = EncodedChunk(last_line=items[-1][0] if items else 0)
    for line_no, payload in items:
        if isinstance(payload, bytes) and not payload.strip():
            continue  # blank lines (e.g. a trailing newline) are not records
        text, domain, reason = parse_record(payload)
        if reason is not None:
            chunk.skipped.append((line_no, reason))
        elif keep_domains is not None and domain not in keep_domains:
            chunk.filtered += 1
        else:
            try:
                chunk.docs.append((line_no, domain, tokenizer.encode_document(text)))
            except UnicodeEncodeError as err:  # an escaped lone surrogate ("\ud800"): not Unicode text
                chunk.skipped.append((line_no, f"'text' is not valid Unicode ({err.reason} at character "
                                               f"{err.start})"))
    return chunk
