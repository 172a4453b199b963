"""Memory-mapped reader of a tokenized corpus: random [B, T+1] windows with provenance.

The corpus is pile_tools' own format or a nanoGPT, Megatron or Hugging Face dataset (pile_tools.data_spec says how
one is named); every domain is a token stream with its document starts (pile_tools.token_sources), so the same
tokens give the same rows, offsets and documents in every format.

Batches are pure functions of (seed, step, batch_size, seq_len, mixture): the generator is seeded by
(seed, step), so resuming at step k is just asking for step k, and every DDP rank computes the same
global batch and keeps its own disjoint slice of rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pile_tools.data_spec import open_split
from pile_tools.layout import INGEST_FILE, check_split

FIXED_BATCH_STREAM = 1  # separates fixed_batch's random stream from get_batch's (which uses the step)


@dataclass
class Batch:
    tokens: np.ndarray  # int64 [rows, seq_len + 1]
    domain: list  # str per row
    token_offset: np.ndarray  # int64 [rows]: offset of the window's first token in its domain's token file
    doc_id: np.ndarray  # int64 [rows]: document containing the window's first token
    sample_index: np.ndarray  # int64 [rows]: row index within the global batch

    def __len__(self) -> int:
        return len(self.domain)


class PileReader:
    """Batches of one split of the data `data_dir` names: a pile_tools corpus, a data spec, or a nanoGPT or Hugging
    Face directory (pile_tools.data_spec); each domain is a token source (pile_tools.token_sources)."""

    def __init__(self, data_dir: str, split: str = "train", domains=None, seed: int = 0):
        check_split(split)
        self.data_dir, self.split, self.seed = data_dir, split, int(seed)
        opened = open_split(data_dir, split)
        self.split_dir = opened.where  # the split's directory (pile_tools' format), or the spec and split
        self._tokenizer, self._domains = opened.tokenizer, opened.domains
        self.mixture = self._resolve_mixture(domains, self._domains)  # {domain: probability}, sorted by name
        self.domains = list(self.mixture)

    @staticmethod
    def _resolve_mixture(domains, available: dict) -> dict[str, float]:
        if domains is None:
            weights = {name: float(d.num_tokens) for name, d in available.items()}
        elif isinstance(domains, dict):
            weights = {name: float(w) for name, w in domains.items()}
        else:
            weights = {name: float(available[name].num_tokens) if name in available else 0.0 for name in domains}
        unknown = [name for name in weights if name not in available]
        if unknown:
            raise ValueError(f"domains {unknown} are not in this split; it has {sorted(available)}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"mixture weights {weights} must be non-negative with a positive sum")
        total = sum(weights.values())
        return {name: weights[name] / total for name in sorted(weights) if weights[name] > 0}

    # --- lookups ------------------------------------------------------------------------------

    def _domain(self, domain: str):
        if domain not in self._domains:
            raise ValueError(f"domain {domain!r} is not in {self.split_dir}; it has {sorted(self._domains)}")
        return self._domains[domain]

    def num_tokens(self, domain: str) -> int:
        return self._domain(domain).num_tokens

    @property
    def tokenizer(self) -> dict:
        """The identity of the vocabulary the split was tokenized with (name, vocab_size, eot_id, hashes)."""
        identity = self._tokenizer
        if not isinstance(identity, dict) or not isinstance(identity.get("vocab_size"), int):
            raise ValueError(f"{self.split_dir}/{INGEST_FILE} names no tokenizer vocabulary; re-tokenize this split")
        return identity

    def check_vocabulary(self, vocab_size: int) -> None:
        """A ValueError naming every selected domain whose recorded largest token id is >= vocab_size (its
        tokens came from another vocabulary). Domains whose maximum is unknown pass here (tokenized before it was
        recorded; another format's file over token_sources.SCAN_LIMIT_BYTES); training still checks every batch."""
        recorded = {name: self._domains[name].max_token_id for name in self.domains}
        bad = {name: largest for name, largest in recorded.items() if largest is not None and largest >= vocab_size}
        if bad:
            raise ValueError(f"split {self.split!r}: token ids up to {bad} (domain: largest id) do not fit a "
                             f"vocabulary of {vocab_size}; these files were tokenized with another vocabulary: "
                             "re-tokenize them (or, for a data spec, name their tokenizer in it)")

    def num_documents(self, domain: str) -> int:
        return self._domain(domain).num_documents

    def read_tokens(self, domain: str, offset: int, length: int) -> np.ndarray:
        """int64 [length] raw tokens starting at `offset` of the domain's token file."""
        d = self._domain(domain)
        if offset < 0 or length < 0 or offset + length > d.num_tokens:
            raise ValueError(f"tokens [{offset}, {offset + length}) are outside {domain!r}'s {d.num_tokens} tokens")
        return np.asarray(d.tokens[offset:offset + length], dtype=np.int64)

    def document_starts(self, domain: str) -> np.ndarray:
        """int64 [num_documents]: the token offset where each document starts (memory-mapped, read-only)."""
        d = self._domain(domain)
        return d.doc_starts if d.num_documents else np.zeros(0, dtype=np.int64)

    def doc_id_at(self, domain: str, offsets) -> np.ndarray:
        """int64: index of the document containing each token offset."""
        return np.searchsorted(self._domain(domain).doc_starts, np.asarray(offsets, dtype=np.int64), side="right") - 1

    def document_span(self, domain: str, doc_id: int) -> tuple[int, int]:
        """(start, end) token range of a document's text: `end` is its last token, the end-of-text token in
        pile_tools' and nanoGPT's files."""
        d = self._domain(domain)
        if not 0 <= doc_id < d.num_documents:
            raise ValueError(f"doc_id {doc_id} is outside {domain!r}'s {d.num_documents} documents")
        start = int(d.doc_starts[doc_id])
        next_start = int(d.doc_starts[doc_id + 1]) if doc_id + 1 < d.num_documents else d.num_tokens
        return start, next_start - 1

    def document_source(self, domain: str, doc_id: int) -> tuple[str, int]:
        """(input file path, line number) the document was read from; for the other formats (the dataset's path,
        doc_id)."""
        return self._domain(domain).origin(doc_id)

    # --- batches ------------------------------------------------------------------------------

    def _window_capacity(self, names, seq_len: int) -> np.ndarray:
        """Number of valid window starts per domain: a window of seq_len+1 tokens must fit in the file."""
        capacity = np.array([self._domains[n].num_tokens - seq_len for n in names], dtype=np.int64)
        short = [n for n, c in zip(names, capacity) if c < 1]
        if short:
            raise ValueError(f"domains {short} hold fewer than seq_len+1={seq_len + 1} tokens; lower seq_len or drop them")
        return capacity

    def _gather(self, names: list[str], starts: np.ndarray, seq_len: int, rows: np.ndarray) -> Batch:
        tokens = np.empty((len(rows), seq_len + 1), dtype=np.int64)
        doc_ids = np.empty(len(rows), dtype=np.int64)
        for i, (name, start) in enumerate(zip(names, starts)):
            tokens[i] = self._domains[name].tokens[start:start + seq_len + 1]
            doc_ids[i] = self.doc_id_at(name, start)
        return Batch(tokens, list(names), np.asarray(starts, dtype=np.int64), doc_ids, np.asarray(rows, dtype=np.int64))

    def get_batch(self, step: int, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1) -> Batch:
        """This rank's rows [rank*B/W, (rank+1)*B/W) of the global batch of `step`."""
        if batch_size < 1 or seq_len < 1 or step < 0:
            raise ValueError(f"need step >= 0, batch_size >= 1, seq_len >= 1; got {step}, {batch_size}, {seq_len}")
        if world_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is not divisible by world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
        names = list(self.mixture)
        capacity = self._window_capacity(names, seq_len)
        rng = np.random.default_rng([self.seed, step])
        domain_index = rng.choice(len(names), size=batch_size, p=list(self.mixture.values()))  # [B]
        starts = rng.integers(0, capacity[domain_index])  # [B], uniform over valid window starts
        rows = np.arange(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        return self._gather([names[i] for i in domain_index[rows]], starts[rows], seq_len, rows)

    def fixed_batch(self, n_rows: int, seq_len: int) -> Batch:
        """A deterministic batch of non-overlapping windows (the same on every call and every rank).

        Rows are shared among the reader's domains in proportion to the mixture; within a domain the
        windows are distinct slots of seq_len+1 tokens from a fixed tiling of the file.
        """
        if n_rows < 1 or seq_len < 1:
            raise ValueError(f"need n_rows >= 1 and seq_len >= 1; got {n_rows}, {seq_len}")
        names = list(self.mixture)
        probs = np.array(list(self.mixture.values()))
        rows_per_domain = np.floor(probs * n_rows).astype(np.int64)
        for i in np.argsort(-(probs * n_rows - rows_per_domain), kind="stable")[: n_rows - rows_per_domain.sum()]:
            rows_per_domain[i] += 1
        rng = np.random.default_rng([self.seed, FIXED_BATCH_STREAM])
        row_names, starts = [], []
        for name, count in zip(names, rows_per_domain):
            slots = self._domains[name].num_tokens // (seq_len + 1)
            if count > slots:
                raise ValueError(
                    f"fixed_batch wants {count} non-overlapping windows of {seq_len + 1} tokens from {name!r}, "
                    f"which has room for {slots}; lower n_rows or seq_len"
                )
            chosen = np.sort(rng.choice(slots, size=count, replace=False)) if count else np.zeros(0, np.int64)
            row_names += [name] * int(count)
            starts += list(chosen * (seq_len + 1))
        return self._gather(row_names, np.array(starts, dtype=np.int64), seq_len, np.arange(n_rows))
