"""Tokenize Pile-format (or any JSONL) inputs into per-domain token files (see `pile_tools.layout`).

Streaming: lines are read in chunks, encoded (inline or by a pool of `workers` processes, at most
2*workers chunks in flight) and appended in input order, so memory is bounded by the chunk size
whatever the shard size.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

from tqdm import tqdm

from ghost_common.durable import FileLock

from pile_tools.encode_worker import PILE_SCHEMA, EncodedChunk, RecordSchema, encode_chunk, init_worker
from pile_tools.jsonl_io import CorruptInputError, ShardSource, shard_problem
from pile_tools.layout import check_split
from pile_tools.split_writer import MAX_SKIPPED_LISTED, SplitWriter
from pile_tools.tokenizer import load_tokenizer

CHUNK_LINES = 256
DEFAULT_CHECKPOINT_DOCS = 50_000
# Test-only hook: SIGKILL this process after that many documents were appended (simulates a crash).
KILL_AFTER_DOCS_ENV = "PILE_TOOLS_TEST_KILL_AFTER_DOCS"


@dataclass
class TokenizeSummary:
    split: str
    documents: int = 0
    tokens: int = 0
    filtered: int = 0
    skipped_count: int = 0
    skipped: list = field(default_factory=list)  # (input name, line, reason), the first MAX_SKIPPED_LISTED of this run
    inputs_done: list = field(default_factory=list)
    inputs_already_done: list = field(default_factory=list)
    stopped_by_max_tokens: bool = False
    seconds: float = 0.0
    corrupt_input: CorruptInputError | None = None
    inputs_not_read: list = field(default_factory=list)  # names of the inputs after a corrupt one

    def report(self, max_listed: int = 20) -> str:
        rate = f"{self.documents / self.seconds:,.0f} docs/s, {self.tokens / self.seconds:,.0f} tokens/s" if self.seconds > 0 else ""
        lines = [f"[{self.split}] wrote {self.documents:,} documents, {self.tokens:,} tokens in {self.seconds:.1f}s ({rate})"]
        if self.inputs_already_done:
            lines.append(f"[{self.split}] already ingested, skipped: {', '.join(self.inputs_already_done)}")
        if self.filtered:
            lines.append(f"[{self.split}] {self.filtered:,} records of other domains left out (--domains)")
        if self.stopped_by_max_tokens:
            lines.append(f"[{self.split}] stopped at --max_tokens; a later run with a larger limit continues from here")
        if self.skipped_count:
            lines.append(f"[{self.split}] skipped {self.skipped_count:,} bad records:")
            lines += [f"  {name}:{line}: {reason}" for name, line, reason in self.skipped[:max_listed]]
            if self.skipped_count > max_listed:
                lines.append(f"  ... and {self.skipped_count - max_listed:,} more (the first {MAX_SKIPPED_LISTED} are listed in ingest.json)")
        if self.corrupt_input is not None:
            lines.append(f"[{self.split}] ERROR: {self.corrupt_input}. It is not recorded as finished. Documents "
                         "before that point are kept and the output is consistent; a re-run resumes after them. "
                         "Replace the file with a good copy (then rebuild the split with --overwrite) or leave it "
                         "out of --input.")
            if self.inputs_not_read:
                lines.append(f"[{self.split}] not read, after it: {', '.join(self.inputs_not_read)}")
        return "\n".join(lines)


def _chunks(items, size: int):
    while batch := list(islice(items, size)):
        yield batch


@contextlib.contextmanager
def _chunk_encoder(workers: int, keep_domains, tokenizer_spec: tuple, schema: RecordSchema):
    """A function mapping chunks to encoded chunks in input order: inline for one worker, else a process
    pool with at most 2*workers chunks in flight. Created once per run, before any other thread starts."""
    tokenizer = load_tokenizer(*tokenizer_spec)
    if workers == 1:
        yield lambda chunks: (encode_chunk(chunk, keep_domains, tokenizer, schema) for chunk in chunks)
        return
    # fork lets workers inherit the loaded vocabulary instead of reading it again.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(tokenizer_spec,)) as pool:
        pool.submit(int).result()  # starts every worker now, before the progress bar's thread exists

        def encode_in_pool(chunks):
            pending = []
            try:
                for chunk in chunks:
                    pending.append(pool.submit(encode_chunk, chunk, keep_domains, None, schema))
                    if len(pending) >= 2 * workers:
                        yield pending.pop(0).result()
                while pending:
                    yield pending.pop(0).result()
            finally:
                for future in pending:
                    future.cancel()

        yield encode_in_pool


def tokenize_sources(
    sources,
    output_dir: str,
    split: str = "train",
    workers: int = 1,
    max_tokens: int | None = None,
    domains: list[str] | None = None,
    overwrite: bool = False,
    vocab_dir: str | None = None,
    checkpoint_docs: int = DEFAULT_CHECKPOINT_DOCS,
    progress: bool = True,
    tokenizer_file: str | None = None,
    eot_token: str | None = None,
    schema: RecordSchema = PILE_SCHEMA,
) -> TokenizeSummary:
    """Append the documents of `sources` (ShardSource / HFDatasetSource) to OUTPUT_DIR/<split>/.

    Safe to re-run (inputs already ingested are skipped by content fingerprint) and to interrupt
    (the next run truncates to the last checkpoint and resumes). On a corrupt compressed input it
    commits the documents read before the damage and returns with `corrupt_input` set.
    """
    check_split(split)
    if workers < 1:
        raise ValueError(f"workers={workers}: need at least 1")
    check_inputs(sources)
    split_dir = os.path.join(output_dir, split)
    # one job writes a split at a time; others wait their turn (one job per shard into a shared output
    # is safe: each input's documents stay together and every ingest is recorded)
    lock = FileLock(os.path.join(output_dir, f".{split}.lock"))
    if not lock.acquire(blocking=False):
        print(f"[{split}] waiting for another tokenize job writing {split_dir} ({lock.holder()})",
              file=sys.stderr, flush=True)
        lock.acquire(blocking=True)
    try:
        if overwrite and os.path.isdir(split_dir):
            shutil.rmtree(split_dir)
        tokenizer_spec = (tokenizer_file, vocab_dir, eot_token)
        tokenizer = load_tokenizer(*tokenizer_spec)
        writer = SplitWriter(split_dir, split, tokenizer.identity, domains, token_dtype=tokenizer.dtype)
        keep_domains = frozenset(domains) if domains else None
        summary = TokenizeSummary(split)
        start = time.perf_counter()
        with _chunk_encoder(workers, keep_domains, tokenizer_spec, schema) as encode_chunks:
            _ingest(sources, writer, encode_chunks, max_tokens, checkpoint_docs, summary, progress)
        summary.seconds = time.perf_counter() - start
    finally:
        lock.release()
    return summary


class BadInputError(ValueError):
    """Inputs that are no shards at all (unreadable, empty, not zstd), found before anything is written."""


def check_inputs(sources) -> None:
    """Raise BadInputError naming every shard that cannot be read, is empty, or is a .zst that is not zstd."""
    problems = [problem for problem in (shard_problem(s.path) for s in sources if isinstance(s, ShardSource))
                if problem]
    if problems:
        raise BadInputError(f"{len(problems)} of the {len(sources)} inputs cannot be tokenized: "
                            f"{'; '.join(problems)}. Nothing was written: replace them with good copies, or leave "
                            "them out of --input (move them out of an --input directory)")


def _ingest(sources, writer: SplitWriter, encode_chunks, max_tokens: int | None, checkpoint_docs: int,
            summary: TokenizeSummary, progress: bool) -> None:
    kill_after = int(os.environ.get(KILL_AFTER_DOCS_ENV, "0"))
    start = time.perf_counter()
    bar = tqdm(total=sum(s.total_bytes for s in sources), unit="B", unit_scale=True, disable=not progress,
               desc=f"tokenize {summary.split}")
    bytes_before = 0
    touched = False
    try:
        for position, source in enumerate(sources):
            try:
                fingerprint = source.fingerprint()
            except OSError as err:  # became unreadable since check_inputs
                summary.corrupt_input = CorruptInputError(source.path, 0, 0, err.strerror or str(err),
                                                          what="cannot be read")
                summary.inputs_not_read = [s.name for s in sources[position + 1:]]
                break
            index, record = writer.input_record(fingerprint, source.name, os.path.abspath(source.path))
            if record["finished"]:
                summary.inputs_already_done.append(source.name)
                bytes_before += source.total_bytes
                bar.update(source.total_bytes)
                continue
            if max_tokens is not None and writer.num_tokens >= max_tokens:
                summary.stopped_by_max_tokens = True
                break
            writer.checkpoint("in_progress")
            touched = True
            docs_since_checkpoint = 0
            chunks = _chunks(source.items(skip_lines=record["lines_done"]), CHUNK_LINES)
            try:
                for chunk in encode_chunks(chunks):
                    _append_chunk(chunk, writer, index, record, source.name, max_tokens, summary)
                    docs_since_checkpoint += len(chunk.docs)
                    if kill_after and summary.documents >= kill_after:
                        os.kill(os.getpid(), signal.SIGKILL)
                    if docs_since_checkpoint >= checkpoint_docs:
                        writer.checkpoint("in_progress")
                        docs_since_checkpoint = 0
                    bar.update(max(0, bytes_before + source.bytes_done - bar.n))
                    bar.set_postfix_str(_rates(summary, start), refresh=False)
                    if summary.stopped_by_max_tokens:
                        break
                if getattr(source, "error", None) is not None:  # every complete line before it is in
                    raise source.error
            except CorruptInputError as err:
                summary.corrupt_input = err
                summary.inputs_not_read = [s.name for s in sources[position + 1:]]
                record["error"] = str(err)
                break
            if summary.stopped_by_max_tokens:
                break
            record["finished"] = True
            summary.inputs_done.append(source.name)
            writer.checkpoint("in_progress")
            bytes_before += source.total_bytes
            bar.update(max(0, bytes_before - bar.n))
        if touched or writer.state["status"] != "complete":
            writer.complete()
    finally:
        bar.close()
        writer.close()


def _append_chunk(chunk: EncodedChunk, writer: SplitWriter, index: int, record: dict, name: str,
                  max_tokens: int | None, summary: TokenizeSummary) -> None:
    """Append a chunk's documents; with max_tokens, stop after the document that reaches the limit."""
    skipped = iter(sorted(chunk.skipped))
    next_skip = next(skipped, None)
    for line_no, domain, tokens in chunk.docs:
        while next_skip is not None and next_skip[0] < line_no:
            _record_skipped(writer, summary, name, *next_skip)
            next_skip = next(skipped, None)
        writer.append_document(domain, tokens, index, line_no)
        record["lines_done"] = line_no
        summary.documents += 1
        summary.tokens += int(tokens.size)
        if max_tokens is not None and writer.num_tokens >= max_tokens:
            summary.stopped_by_max_tokens = True
            return
    while next_skip is not None:
        _record_skipped(writer, summary, name, *next_skip)
        next_skip = next(skipped, None)
    summary.filtered += chunk.filtered
    record["lines_done"] = max(record["lines_done"], chunk.last_line)


def _record_skipped(writer: SplitWriter, summary: TokenizeSummary, name: str, line_no: int, reason: str) -> None:
    writer.record_skipped(name, line_no, reason)
    summary.skipped_count += 1
    if len(summary.skipped) < MAX_SKIPPED_LISTED:
        summary.skipped.append((name, line_no, reason))


def _rates(summary: TokenizeSummary, start: float) -> str:
    elapsed = max(time.perf_counter() - start, 1e-9)
    return f"{summary.documents / elapsed:,.0f} docs/s, {summary.tokens / elapsed:,.0f} tok/s"
