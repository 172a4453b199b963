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

from ghost_common.durable import write_atomically

READ_CHUNK_BYTES = 1 << 20
FINGERPRINT_BLOCK_BYTES = 1 << 20


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # every zstd frame starts with it (RFC 8878), a skippable frame with
SKIPPABLE_MAGIC_LOW = 0x184D2A50  # 0x184D2A5? (little endian)


class CorruptInputError(Exception):
    """A shard ended early, failed to decompress, holds nothing or could not be read; says how far reading got."""

    def __init__(self, path: str, compressed_bytes: int, lines: int, reason: str,
                 what: str = "is truncated or corrupt"):
        self.path, self.compressed_bytes, self.lines, self.reason = path, compressed_bytes, lines, reason
        self.what = what
        super().__init__(
            f"{path} {what} ({reason}): stopped after {compressed_bytes} compressed bytes "
            f"and {lines} complete lines"
        )


def shard_problem(path: str) -> str | None:
    """What makes `path` no shard at all, found without reading it through (None if nothing): it cannot be
    opened or read, it is empty, or a `.zst` that does not start as zstd data does."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        return f"{path} cannot be read ({err.strerror or err})"
    if not head:
        return f"{path} is empty (0 bytes)"
    if path.endswith(".zst") and head != ZSTD_MAGIC and not (
            len(head) == 4 and int.from_bytes(head, "little") & ~0xF == SKIPPABLE_MAGIC_LOW):
        return (f"{path} is not zstd-compressed (it starts with {head!r}, not zstd's magic number "
                f"{ZSTD_MAGIC!r}); a plain JSON-lines file is read when named .jsonl")
    return None


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


def _split_lines(chunks: Iterable[bytes]) -> Iterator[tuple[bytes, bool]]:
    """(line, whether a newline ended it): only the last line may lack one."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line, True
    if pending:
        yield pending, False


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False
    return True


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
        """(line number, line) of every complete line. A truncated or corrupt compressed stream, a file that
        holds no line at all, one that ends inside a record, or a read error ends the iteration normally after
        the last complete line, with `self.error` set: a consumer that batches lines sees every one of them
        before it learns of the damage."""
        self.error = None
        try:
            fh = open(self.path, "rb")
        except OSError as err:
            self.error = CorruptInputError(self.path, 0, 0, err.strerror or str(err), what="cannot be read")
            return
        with fh:
            self._fh = fh
            chunks = _zst_chunks(self.path, fh) if self.path.endswith(".zst") else iter(lambda: fh.read(READ_CHUNK_BYTES), b"")
            line_no = 0
            has_text = skip_lines > 0  # lines before skip_lines were read by an earlier run
            try:
                for line, complete in _split_lines(chunks):
                    if not complete and not _is_json(line):
                        # a cut at a zstd frame boundary (or of a plain file) inside a record: what decompresses
                        # is valid, only the last line is not whole
                        raise CorruptInputError(self.path, fh.tell(), -1, f"it ends inside a line: the last "
                                                f"{len(line)} bytes have no newline and are not a JSON record")
                    line_no += 1
                    has_text = has_text or bool(line.strip())
                    if line_no > skip_lines:
                        yield line_no, line
                if not has_text:
                    raise CorruptInputError(self.path, fh.tell(), -1, "no line of text in it"
                                            + (": it decompresses to nothing" if self.path.endswith(".zst") else ""),
                                            what="holds no records")
                self._finished = True
            except CorruptInputError as err:
                self.error = CorruptInputError(self.path, err.compressed_bytes, line_no, err.reason, err.what)
            except OSError as err:  # the disk or the network file system under it
                self.error = CorruptInputError(self.path, fh.tell(), line_no, err.strerror or str(err),
                                               what="could not be read to its end")


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
