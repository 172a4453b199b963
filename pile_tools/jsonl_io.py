"""Streaming IO for Pile-format shards: `*.jsonl.zst`, plain `*.jsonl`, and local `datasets` datasets.

Every source yields (line_number, payload) with 1-based line numbers (row numbers for datasets);
payload is the raw JSON line (bytes) or an already-decoded record (dict).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Iterable, Iterator

import zstandard

from ghost_engine.durable import write_atomically

READ_CHUNK_BYTES = 1 << 20
FINGERPRINT_BLOCK_BYTES = 1 << 20


class CorruptInputError(Exception):
    """A compressed shard ended early or failed to decompress; says how far reading got."""

    def __init__(self, path: str, compressed_bytes: int, lines: int, reason: str):
        self.path, self.compressed_bytes, self.lines, self.reason = path, compressed_bytes, lines, reason
        super().__init__(
            f"{path} is truncated or corrupt ({reason}): stopped after {compressed_bytes} compressed bytes "
            f"and {lines} complete lines"
        )


def _zst_chunks(path: str, fh) -> Iterator[bytes]:
    """Decompressed bytes of every frame in `fh`; raises CorruptInputError if the last frame is incomplete."""
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    frame_has_data = False
    while True:
        compressed = fh.read(READ_CHUNK_BYTES)
        if not compressed:
            break
        while compressed:
            try:
                out = dobj.decompress(compressed)
            except zstandard.ZstdError as err:
                raise CorruptInputError(path, fh.tell(), -1, f"zstd error: {err}") from err
            frame_has_data = True
            if out:
                yield out
            # A finished frame leaves the bytes of the next frame in unused_data.
            compressed = dobj.unused_data if dobj.eof else b""
            if dobj.eof:
                dobj = dctx.decompressobj()
                frame_has_data = False
    if frame_has_data and not dobj.eof:
        raise CorruptInputError(path, fh.tell(), -1, "the last zstd frame is incomplete")


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from complete
    if pending:
        yield pending


class ShardSource:
    """A `.jsonl.zst` or `.jsonl` file read as a stream of lines."""

    def __init__(self, path: str):
        self.path = path
        self.name = os.path.basename(path)
        self.total_bytes = os.path.getsize(path)
        self._fh = None
        self._finished = False
        self.error = None  # CorruptInputError once items() met a truncated or corrupt compressed stream

    @property
    def bytes_done(self) -> int:
        if self._finished:
            return self.total_bytes
        return self._fh.tell() if self._fh is not None and not self._fh.closed else 0

    def fingerprint(self) -> str:
        """Content identity independent of the file's name or mtime: size plus hashes of its first and last MiB."""
        digest = hashlib.sha256(str(self.total_bytes).encode())
        with open(self.path, "rb") as f:
            digest.update(f.read(FINGERPRINT_BLOCK_BYTES))
            f.seek(max(0, self.total_bytes - FINGERPRINT_BLOCK_BYTES))
            digest.update(f.read(FINGERPRINT_BLOCK_BYTES))
        return digest.hexdigest()

    def items(self, skip_lines: int = 0) -> Iterator[tuple[int, bytes]]:
        """(line number, line) of every complete line. A truncated or corrupt compressed stream ends the
        iteration normally after the last complete line, with `self.error` set: a consumer that batches
        lines sees every one of them before it learns of the damage."""
        self.error = None
        with open(self.path, "rb") as fh:
            self._fh = fh
            chunks = _zst_chunks(self.path, fh) if self.path.endswith(".zst") else iter(lambda: fh.read(READ_CHUNK_BYTES), b"")
            line_no = 0
            try:
                for line in _split_lines(chunks):
                    line_no += 1
                    if line_no > skip_lines:
                        yield line_no, line
                self._finished = True
            except CorruptInputError as err:
                self.error = CorruptInputError(self.path, err.compressed_bytes, line_no, err.reason)


class HFDatasetSource:
    """Rows of a dataset on local disk, read through the `datasets` library with downloads disabled."""

    def __init__(self, path: str, split: str):
        self.path, self.split = path, split
        self.name = f"{os.path.basename(os.path.normpath(path))}[{split}]"
        self.total_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
        self._rows_done = 0
        self._num_rows = None

    @property
    def bytes_done(self) -> int:
        # Progress is reported in bytes for shards; rows are mapped onto the dataset's size on disk.
        if not self._num_rows:
            return 0
        return self.total_bytes * self._rows_done // self._num_rows

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.split.encode())
        for d, _, files in sorted(os.walk(self.path)):
            for f in sorted(files):
                st = os.stat(os.path.join(d, f))
                digest.update(f"{os.path.relpath(os.path.join(d, f), self.path)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return digest.hexdigest()

    def _load(self):
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
        import datasets

        if os.path.exists(os.path.join(self.path, "dataset_dict.json")) or os.path.exists(os.path.join(self.path, "state.json")):
            ds = datasets.load_from_disk(self.path)
        else:
            ds = datasets.load_dataset(self.path)
        if isinstance(ds, datasets.DatasetDict):
            names = {"validation": ("validation", "val"), "train": ("train",), "test": ("test",)}[self.split]
            found = [n for n in names if n in ds]
            if not found:
                raise ValueError(f"dataset {self.path} has splits {list(ds)}, none of them is {self.split!r}")
            ds = ds[found[0]]
        return ds

    def items(self, skip_lines: int = 0) -> Iterator[tuple[int, dict]]:
        ds = self._load()
        self._num_rows = len(ds)
        for row, record in enumerate(ds.select(range(skip_lines, len(ds))), start=skip_lines + 1):
            self._rows_done = row
            yield row, record


def write_jsonl_zst(path: str, records: Iterable[dict], level: int = 10) -> None:
    """Write records as one zstd-compressed JSON object per line (same bytes for the same records)."""
    def write(fh):
        with zstandard.ZstdCompressor(level=level).stream_writer(fh, closefd=False) as writer:
            text = io.TextIOWrapper(writer, encoding="utf-8", newline="\n")
            for record in records:
                text.write(json.dumps(record, ensure_ascii=False) + "\n")
            text.flush()
            text.detach()

    write_atomically(path, write)
