"""Turning raw Pile records into token arrays: the part of tokenization that runs in worker processes."""
from __future__ import annotations

import ctypes
import json
import signal
from dataclasses import dataclass, field

from pile_tools.tokenizer import load_tokenizer

_worker_tokenizer = None  # GPT2BPE or HFTokenizerFile


@dataclass(frozen=True)
class RecordSchema:
    """Where a JSON record keeps its text and its domain. Fields are dotted paths ("meta.pile_set_name");
    an object met on the way may also be a JSON string (some corpora store "meta" that way). A record
    without the domain field gets `default_domain` if one is set, else it is skipped and named."""

    text_field: str = "text"
    domain_field: str = "meta.pile_set_name"
    default_domain: str | None = None


PILE_SCHEMA = RecordSchema()


def _lookup(payload, path: str):
    value = payload
    for key in path.split("."):
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except ValueError:
                return None
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


@dataclass
class EncodedChunk:
    docs: list = field(default_factory=list)  # (line_no, domain, tokens ending with EOT)
    skipped: list = field(default_factory=list)  # (line_no, reason)
    filtered: int = 0  # records of domains not asked for
    last_line: int = 0


def init_worker(tokenizer_spec: tuple) -> None:
    """Process-pool initializer: one single-threaded tokenizer per worker (``load_tokenizer(*tokenizer_spec)``),
    so --workers bounds the cores used.

    A worker ignores SIGINT (Ctrl-C reaches the whole process group; the parent alone handles it and shuts
    the pool down) and, on Linux, is killed when its parent dies however the parent dies (kill -9
    included), so no worker outlives an interrupted job."""
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    _worker_tokenizer = load_tokenizer(*tokenizer_spec)


def _die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL) where the C library offers it (Linux); elsewhere nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def parse_record(payload, schema: RecordSchema = PILE_SCHEMA) -> tuple[str | None, str | None, str | None]:
    """(text, domain, None) for a usable record, else (None, None, reason)."""
    if isinstance(payload, (bytes, str)):
        try:
            payload = json.loads(payload)
        except ValueError as err:
            return None, None, f"malformed JSON ({err})"
    if not isinstance(payload, dict):
        return None, None, "not a JSON object"
    text = _lookup(payload, schema.text_field)
    if text is None:
        return None, None, f"no '{schema.text_field}' field"
    if not isinstance(text, str):
        return None, None, f"'{schema.text_field}' is a {type(text).__name__}, not a string"
    if not text:
        return None, None, f"empty '{schema.text_field}'"
    domain = _lookup(payload, schema.domain_field)
    if domain is None and schema.default_domain is not None:
        domain = schema.default_domain
    if not isinstance(domain, str) or not domain:
        return None, None, f"no '{schema.domain_field}'"
    if not domain.isprintable() or _has_surrogates(domain):
        return None, None, f"'{schema.domain_field}' {domain!r} is not a printable name"
    return text, domain, None


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def encode_chunk(items: list, keep_domains: frozenset | None, tokenizer=None,
                 schema: RecordSchema = PILE_SCHEMA) -> EncodedChunk:
    """items: [(line_no, raw JSON line or record dict)] -> token arrays for the usable records, in order."""
    tokenizer = tokenizer or _worker_tokenizer
    chunk = EncodedChunk(last_line=items[-1][0] if items else 0)
    for line_no, payload in items:
        if isinstance(payload, bytes) and not payload.strip():
            continue  # blank lines (e.g. a trailing newline) are not records
        text, domain, reason = parse_record(payload, schema)
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
