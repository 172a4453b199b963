"""One domain's tokens as PileReader reads them: a token stream and where its documents start, in four formats.

    NativeDomain     pile_tools' own files (layout.py): <slug>.bin, <slug>.docs.bin, <slug>.origin.bin, <slug>.json
    FlatTokens       nanoGPT's train.bin / val.bin: tokens (uint16) with an end-of-text id after every document
    MegatronIndexed  Megatron's PREFIX.bin + PREFIX.idx (MMIDIDX, version 1), the format of Pythia's Pile
    HFTokenized      a Hugging Face dataset saved with `save_to_disk`, one document per row of a list-of-ids column

Every source has the attributes PileReader uses, so a batch is the same function of the tokens in every format:

    num_tokens, num_documents
    tokens          1-D, sliced as tokens[a:b] into a numpy array; memory-mapped, never read whole
    doc_starts      int64 [num_documents], non-decreasing: the token offset where each document starts
    max_token_id    the largest id, or None where finding it would read more than SCAN_LIMIT_BYTES
    origin(doc_id)  (file, line or index) the document was read from

Provenance is (document, offset) in that stream: token_offset counts tokens from the start of the stream, doc_id is
the index of the document holding the token, the last document whose start is <= the offset.

- nanoGPT: the stream is the .bin file. Document 0 starts at token 0 and document k + 1 right after the (k + 1)-th
  separator: a separator ends the document it follows, a separator that is the file's last token starts no
  document, two separators in a row make a document of only the second. This is the same numbering as
  pile_tools' own files, where every document ends with the end-of-text id.
- Megatron: the stream is the .bin file (the index's sequences lie back to back in it). Document d is the
  sequences [document_indices[d], document_indices[d + 1]) of the .idx and starts at sequence_pointers of its first
  sequence / the token size; it may span several sequences.
- Hugging Face: the stream is the flattened values of the column, shard after shard in state.json's order. Document
  d is row d; it starts at its list offset (plus the tokens of the shards before).

The non-native sources are opened once per process per file version (`open_source` is cached on the files' sizes
and modification times): nanoGPT's separators are found by one pass over the file (about 0.4 s per GB from the page
cache), Megatron's and Hugging Face's document starts come from their indices (8 bytes per document in RAM).
"""
from __future__ import annotations

import os
import struct
from functools import lru_cache

import numpy as np

from pile_tools.layout import read_json

SCAN_LIMIT_BYTES = 1 << 30  # the largest token data read once at start for its maximum id (and index checks)
SCAN_CHUNK = 1 << 24  # tokens per numpy pass of a scan
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count
MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                   8: np.uint16}  # Megatron's DType codes
FLAT_DTYPES = ("uint16", "uint32")


class NativeDomain:
    """One domain of a pile_tools split, its files mapped lazily (nothing is read into RAM)."""

    def __init__(self, split_dir: str, manifest: dict, inputs: list):
        self.manifest = manifest
        self.num_tokens = int(manifest["num_tokens"])
        self.num_documents = int(manifest["num_documents"])
        largest = manifest.get("max_token_id")  # recorded at ingest; None for splits written before it was
        self.max_token_id = largest if isinstance(largest, int) else None
        self._inputs = inputs
        self._paths = {key: os.path.join(split_dir, manifest[f"{key}_file"]) for key in ("token", "doc_starts", "doc_origin")}
        dtype = manifest.get("dtype", "uint16")
        if dtype not in ("uint16", "uint32"):
            raise ValueError(f"{self._paths['token']}: its manifest gives token dtype {dtype!r}; expected uint16 "
                             "or uint32: re-tokenize")
        self.dtype = np.dtype(dtype)
        if os.path.getsize(self._paths["token"]) != self.dtype.itemsize * self.num_tokens:
            raise ValueError(f"{self._paths['token']} does not hold the {self.num_tokens} tokens its manifest says; re-tokenize")
        self._tokens = self._doc_starts = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self._paths["token"], dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        return self._tokens

    @property
    def doc_starts(self) -> np.ndarray:
        if self._doc_starts is None:
            self._doc_starts = np.memmap(self._paths["doc_starts"], dtype=np.int64, mode="r", shape=(self.num_documents,))
        return self._doc_starts

    def origin(self, doc_id: int) -> tuple[str, int]:
        """(input file path, line number) the document was read from."""
        origin = np.memmap(self._paths["doc_origin"], dtype=np.int64, mode="r", shape=(self.num_documents, 2))
        return self._inputs[int(origin[doc_id, 0])]["path"], int(origin[doc_id, 1])


class FlatTokens:
    """nanoGPT's flat token file: documents separated by `separator` (module docstring)."""

    def __init__(self, path: str, dtype: str = "uint16", separator: int = 50256):
        if dtype not in FLAT_DTYPES:
            raise ValueError(f"{path}: token dtype {dtype!r} is not one of {FLAT_DTYPES}")
        self.path, self.dtype = path, np.dtype(dtype)
        size = _size(path, "nanoGPT token file")
        if size % self.dtype.itemsize:
            raise ValueError(f"{path} holds {size} bytes, not a whole number of {dtype} tokens: the file is truncated "
                             f"or not {dtype} (nanoGPT writes uint16)")
        self.num_tokens = size // self.dtype.itemsize
        self.tokens = _map(path, self.dtype, self.num_tokens)
        ends, _, self.max_token_id = _scan(self.tokens, separator)  # the separators' positions
        starts = np.concatenate([np.zeros(min(1, self.num_tokens), np.int64), ends + 1])
        self.doc_starts = starts[starts < self.num_tokens]
        self.num_documents = len(self.doc_starts)

    def origin(self, doc_id: int) -> tuple[str, int]:
        return self.path, int(doc_id)


class MegatronIndexed:
    """Megatron's indexed dataset PREFIX.bin + PREFIX.idx, format MMIDIDX version 1 (module docstring).

    .idx: b"MMIDIDX\\x00\\x00", <Q version (1), <B dtype code, <Q sequence count S, <Q document-index count D,
    int32 [S] sequence lengths (tokens), int64 [S] sequence pointers (byte offsets into the .bin), int64 [D] document
    indices (0, then the sequence index where each document ends: D - 1 documents), and for a multimodal dataset int8
    [S] sequence modes (ignored)."""

    def __init__(self, prefix: str):
        self.path = prefix
        idx, bin_path = prefix + ".idx", prefix + ".bin"
        self.dtype, n_seq, n_doc_index = _megatron_header(idx)
        offset = MEGATRON_HEADER.size
        lengths = _map(idx, np.int32, n_seq, offset)
        pointers = _map(idx, np.int64, n_seq, offset + 4 * n_seq)
        doc_index = _map(idx, np.int64, n_doc_index, offset + 12 * n_seq)
        if n_doc_index < 1 or doc_index[0] != 0 or doc_index[-1] != n_seq:
            raise ValueError(f"{idx}: its document indices do not run from 0 to its {n_seq} sequences: the index is "
                             "damaged")
        size = _size(bin_path, "Megatron token file")
        described = int(pointers[-1]) + int(lengths[-1]) * self.dtype.itemsize if n_seq else 0
        if size != described:
            raise ValueError(f"{bin_path} holds {size} bytes but {os.path.basename(idx)} describes {described} "
                             f"({described // self.dtype.itemsize} {self.dtype.name} tokens in {n_seq} sequences): the "
                             ".bin is truncated or belongs to another index")
        if os.path.getsize(idx) <= SCAN_LIMIT_BYTES:  # a larger index is trusted beyond its ends (each batch is still checked)
            _check_back_to_back(idx, lengths, pointers, doc_index, self.dtype.itemsize)
        self.num_tokens = size // self.dtype.itemsize
        self.tokens = _map(bin_path, self.dtype, self.num_tokens)
        first = doc_index[:-1]  # each document's first sequence (S for an empty document at the end)
        starts = np.where(first < n_seq, pointers[np.minimum(first, max(n_seq - 1, 0))] if n_seq else 0, size)
        self.doc_starts = np.asarray(starts, dtype=np.int64) // self.dtype.itemsize
        self.num_documents = n_doc_index - 1
        self.max_token_id = _checked_max(self.tokens, bin_path) if size <= SCAN_LIMIT_BYTES else None

    def origin(self, doc_id: int) -> tuple[str, int]:
        return self.path, int(doc_id)


class HFTokenized:
    """A `save_to_disk` dataset's list-of-ids column, read memory-mapped through pyarrow (module docstring)."""

    def __init__(self, path: str, column: str = "input_ids"):
        import pyarrow as pa

        self.path = path
        state_path = os.path.join(path, "state.json")
        if not os.path.isfile(state_path):
            what = ("a DatasetDict: give its directory as --data_dir, or name one of its splits (`split`) in a data "
                    "spec" if os.path.isfile(os.path.join(path, "dataset_dict.json")) else
                    "not a dataset saved with Dataset.save_to_disk")
            raise ValueError(f"{path} has no state.json: {what}")
        chunks, starts, base, largest = [], [], 0, -1
        for shard in hf_shards(path):
            try:
                table = pa.ipc.open_stream(pa.memory_map(shard)).read_all()  # zero-copy views of the mapped file
            except (pa.ArrowException, OSError) as err:
                raise ValueError(f"{shard} is not a readable Arrow shard ({err}); save the dataset again") from None
            if column not in table.column_names:
                raise ValueError(f"{path} has no {column!r} column (its columns: {table.column_names}): tokenize it "
                                 "into one list of token ids per document, or name the column with `column` in a "
                                 "data spec")
            kind = table.schema.field(column).type
            if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(kind.value_type):
                raise ValueError(f"{path}: column {column!r} is {kind}, not a list of integer token ids per row")
            for chunk in table.column(column).chunks:
                offsets = chunk.offsets.to_numpy().astype(np.int64)  # [rows + 1], aware of the chunk's slice
                values = chunk.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
                if chunk.null_count or values.null_count:
                    raise ValueError(f"{shard}: column {column!r} has missing rows or ids; every row must be a list "
                                     "of token ids")
                chunks.append(values.to_numpy(zero_copy_only=True))
                starts.append(offsets[:-1] - offsets[0] + base)
                base += len(chunks[-1])
        self.num_tokens = base
        self.doc_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.num_documents = len(self.doc_starts)
        chunks = [c for c in chunks if len(c)]
        self.tokens = chunks[0] if len(chunks) == 1 else ChunkedTokens(chunks)
        scan = sum(c.nbytes for c in chunks) <= SCAN_LIMIT_BYTES
        self.max_token_id = max((_checked_max(c, path) for c in chunks), default=-1) if scan else None

    def origin(self, doc_id: int) -> tuple[str, int]:
        return self.path, int(doc_id)


class ChunkedTokens:
    """Several 1-D arrays read as one: tokens[a:b] joins the pieces of the chunks it covers (Arrow record batches)."""

    def __init__(self, chunks: list):
        self.chunks = chunks
        self.bounds = np.cumsum([0] + [len(c) for c in chunks])  # chunk i holds [bounds[i], bounds[i + 1])
        self.dtype = chunks[0].dtype if chunks else np.dtype(np.int64)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ChunkedTokens takes contiguous slices only")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return np.zeros(0, self.dtype)
        first, last = np.searchsorted(self.bounds, [start, stop - 1], side="right") - 1
        pieces = [self.chunks[i][max(start - self.bounds[i], 0):stop - self.bounds[i]] for i in range(first, last + 1)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def hf_shards(path: str) -> list[str]:
    """The Arrow files of a `save_to_disk` dataset, in its state.json's order (the order of its rows)."""
    state = read_json(os.path.join(path, "state.json"))
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files):
        raise ValueError(f"{path}/state.json lists no data files (_data_files): not a dataset written by save_to_disk")
    return [os.path.join(path, f["filename"]) for f in files]


@lru_cache(maxsize=64)
def _open_cached(kind: str, path: str, options: tuple, stamp: tuple):
    return {"nanogpt": FlatTokens, "megatron": MegatronIndexed, "hf": HFTokenized}[kind](path, **dict(options))


def open_source(kind: str, path: str, **options):
    """The source of format `kind` (nanogpt, megatron, hf) at `path`, opened once per process per version of its
    files (their sizes and modification times)."""
    if kind == "megatron":
        watched = [path + ".idx", path + ".bin"]
    elif kind == "hf":
        watched = [os.path.join(path, name) for name in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    else:
        watched = [path]
    stamp = tuple((p, s.st_size, s.st_mtime_ns) for p in watched for s in [_stat(p)] if s is not None)
    return _open_cached(kind, path, tuple(sorted(options.items())), stamp)


# --- helpers -----------------------------------------------------------------------------------------------------

def _stat(path: str):
    try:
        return os.stat(path)
    except OSError:
        return None


def _size(path: str, what: str) -> int:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (the {what})")
    return os.path.getsize(path)


def _map(path: str, dtype, count: int, offset: int = 0) -> np.ndarray:
    """count values of dtype at byte offset of the file, memory-mapped (an empty array for none)."""
    if not count:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _scan(tokens, separator: int | None):
    """(int64 positions of `separator` (none for None), smallest id, largest id) in one chunked pass over a 1-D
    token array."""
    found, smallest, largest = [], 0, -1
    for a in range(0, len(tokens), SCAN_CHUNK):
        block = np.asarray(tokens[a:a + SCAN_CHUNK])
        if separator is not None:
            found.append(np.flatnonzero(block == separator) + a)
        smallest, largest = min(smallest, int(block.min())), max(largest, int(block.max()))
    return (np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)), smallest, largest


def _checked_max(tokens, where: str) -> int:
    """The largest id of a token array (-1 if empty); a ValueError for a negative one."""
    _, smallest, largest = _scan(tokens, separator=None)
    if smallest < 0:
        raise ValueError(f"{where} holds the negative token id {smallest}: the file is not token ids or is damaged")
    return largest


def _megatron_header(idx: str) -> tuple[np.dtype, int, int]:
    """(token dtype, sequence count, document-index count) of a Megatron .idx, its header and size checked."""
    idx_size = _size(idx, "Megatron index")
    with open(idx, "rb") as f:
        head = f.read(MEGATRON_HEADER.size)
    if head[:len(MEGATRON_MAGIC)] != MEGATRON_MAGIC:
        older = " (the older TNTIDX indexed dataset: re-preprocess with the mmap implementation)" \
            if head.startswith(b"TNTIDX") else ""
        raise ValueError(f"{idx} does not start with Megatron's {MEGATRON_MAGIC!r} but {head[:9]!r}{older}: it is "
                         "not an MMIDIDX index")
    if len(head) < MEGATRON_HEADER.size:
        raise ValueError(f"{idx} ends inside its header ({idx_size} bytes): the index is truncated")
    _, version, code, n_seq, n_doc_index = MEGATRON_HEADER.unpack(head)
    if version != 1:
        raise ValueError(f"{idx} is MMIDIDX version {version}; this reader knows version 1")
    if code not in MEGATRON_DTYPES:
        raise ValueError(f"{idx} gives dtype code {code}, which this reader does not know (Megatron's codes: "
                         f"{ {c: np.dtype(t).name for c, t in MEGATRON_DTYPES.items()} })")
    dtype = np.dtype(MEGATRON_DTYPES[code])
    if dtype.kind == "f":
        raise ValueError(f"{idx} gives dtype code {code} ({dtype.name}): floating-point values, not token ids")
    expected = MEGATRON_HEADER.size + n_seq * (4 + 8) + n_doc_index * 8
    if idx_size not in (expected, expected + n_seq):  # + S: a multimodal index's sequence modes
        fairseq = MEGATRON_HEADER.size - 8 + n_seq * (4 + 8) == idx_size  # no document count, no document index
        raise ValueError(f"{idx} holds {idx_size} bytes but its header describes {expected} ({n_seq} sequences, "
                         f"{n_doc_index} document indices): " + ("it is fairseq's MMIDIDX, which has no documents"
                                                                 if fairseq else "the index is truncated or damaged"))
    return dtype, n_seq, n_doc_index


def _check_back_to_back(idx: str, lengths, pointers, doc_index, itemsize: int) -> None:
    """The sequences of a Megatron index must lie back to back from byte 0 and documents must not run backwards:
    the .bin is then one token stream."""
    if len(lengths) and lengths.min() < 0:
        raise ValueError(f"{idx} gives a negative sequence length: the index is damaged")
    expected = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=expected[1:])
    if not np.array_equal(expected, pointers):
        raise ValueError(f"{idx}: its sequences do not lie back to back in the .bin (pointer of sequence "
                         f"{int(np.flatnonzero(expected != pointers)[0])}); this reader reads the .bin as one stream")
    if np.any(np.diff(doc_index) < 0):
        raise ValueError(f"{idx}: its document indices run backwards: the index is damaged")
