"""The on-disk store of projected per-sample gradients (docs/DESIGN.md section 8): its format, its one writer
(`GradStoreWriter`) and its reader (`GradStore`). Scoring lives in `ghost_results.grad_query`.

A store is a directory that numpy and json alone can read:

    manifest.json               what the store holds; the only file a reader trusts
    shard-000000.rows.npy       float rows [n, K]: "bfloat16" as uint16 bit patterns ("<u2"), "float16" ("<f2")
                                or "float32" ("<f4"); a plain .npy (format 1.0, C order, no pickle)
    shard-000000.prov.npy       one provenance record a row, the structured dtype PROV_DTYPE (packed):
                                step <i8, row <i8 (the row's index within its step), doc_id <i8, token_offset <i8,
                                domain <i4 (index into the manifest's "domains"), lr <f8, weight <f8 (the row's
                                weight in the step's loss, e.g. 1/B), n_tokens <i8
    superseded/                 shard files that drop_steps_after took out of the store (never deleted)
    preconditioner.npz          written by grad_query.Preconditioner.save (optional)
    .lock                       the writer's FileLock, naming its holder

manifest.json:

    {"format": "ghost.grad_store", "version": 1, "dim": K, "dtype": "bfloat16" | "float16" | "float32",
     "blocks": [[name, start, stop], ...],      # contiguous column ranges covering 0..K, in order
     "domains": [name, ...], "meta": {...},      # meta["identity"], if given, names the run (e.g. its run_id)
     "next_shard": int,                         # the number the next shard file gets (never reused)
     "shards": [{"name": "shard-000000", "rows": n, "first_step": min step, "last_step": max step,
                 "rows_file": "shard-000000.rows.npy", "rows_bytes": int, "rows_sha256": hex,
                 "prov_file": "shard-000000.prov.npy", "prov_bytes": int, "prov_sha256": hex}, ...]}

The store's row i is row i of the concatenation of the shards in manifest order. By hand:

    m = json.load(open("manifest.json"))
    u16 = np.load("shard-000000.rows.npy", mmap_mode="r")                         # bfloat16 bits
    rows = (u16.astype(np.uint32) << 16).view(np.float32)
    prov = np.load("shard-000000.prov.npy"); domains = np.array(m["domains"])[prov["domain"]]

Durability: a shard's two files are written completely and fsynced (write_atomically) before the manifest that
names them is replaced (write_atomically), so a crash at any moment leaves the old manifest (the new files are
orphans: readers never see them, the next writer removes them) or the new one. Bytes per stored sample:
`bytes_per_row(K, dtype)` = K x itemsize (2 for bfloat16 and float16, 4 for float32) + PROV_DTYPE.itemsize (60).

bfloat16 is float32 rounded to nearest, ties to even (not truncated); a value that is not finite, or that
overflows the stored dtype, is refused (ValueError), never stored as something else.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from ghost_common.durable import FileLock, fsync_directory, write_atomically

FORMAT_NAME = "ghost.grad_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
SUPERSEDED_DIR = "superseded"
STORAGE_DTYPES = {"bfloat16": np.dtype("<u2"), "float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
PROV_DTYPE = np.dtype([("step", "<i8"), ("row", "<i8"), ("doc_id", "<i8"), ("token_offset", "<i8"),
                       ("domain", "<i4"), ("lr", "<f8"), ("weight", "<f8"), ("n_tokens", "<i8")])
PROV_COLUMNS = PROV_DTYPE.names
SHARD_FILE = re.compile(r"^shard-(\d{6,})\.(rows|prov)\.npy$")
_HASH_BLOCK = 8 * 2**20


class DamagedStore(ValueError):
    """A store's manifest or one of its shard files is missing, truncated, altered or malformed."""


class StoreLocked(RuntimeError):
    """Another writer holds the store."""


def usable_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def bytes_per_row(dim: int, dtype: str) -> int:
    """Bytes on disk per stored sample: dim x the dtype's itemsize + one provenance record (60 bytes)."""
    return int(dim) * _storage_dtype(dtype).itemsize + PROV_DTYPE.itemsize


def _storage_dtype(dtype: str) -> np.dtype:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype={dtype!r}: a gradient store holds one of {', '.join(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[dtype]


# ---------------------------------------------------------------------------
# Number conversion


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 bits rounded to the nearest bfloat16, ties to even, as uint16 (NaN must be refused before)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & np.uint32(1)) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def to_storage(rows: np.ndarray, dtype: str) -> np.ndarray:
    """rows (float, [n, K], all finite) in the store's dtype; ValueError naming the first row that overflows."""
    if dtype == "bfloat16":
        stored = to_bfloat16_bits(rows)
        overflow = (stored & np.uint16(0x7FFF)) == np.uint16(0x7F80)  # rounded up to +-inf
    else:
        with np.errstate(over="ignore"):
            stored = np.ascontiguousarray(rows, dtype=STORAGE_DTYPES[dtype])
        overflow = ~np.isfinite(stored)
    if overflow.any():
        bad = int(np.flatnonzero(overflow.any(axis=1))[0])
        raise ValueError(f"row {bad} of the appended rows holds a value too large for {dtype} "
                         f"(largest |value| {float(np.max(np.abs(rows[bad]))):.6g}): store it as float32")
    return stored


_F16_CLEAR = np.int32(-0x70000001)  # 0x8FFFFFFF: keeps the sign (bit 31) and the shifted exponent and mantissa
_F16_SCALE = np.float32(2.0**112)  # 2^(127 - 15): rebiases the exponent, and scales subnormal halves exactly


def to_float32(stored: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values [n, k] as float32 (into `out` if given, same shape), exactly.

    bfloat16: the bits widened to 32 and shifted up by 16. float16: by bit operations rather than numpy's cast
    (8x faster on normal values, 100x on subnormal ones, measured): the sign-extended half shifted up by 13 with
    bits 28-30 cleared is the float32 whose exponent is the half's, unbiased by 112; times 2^112, exact for
    normal and subnormal halves alike (the store holds no inf or NaN, which this would not keep).
    Each is two to four passes over `out`, cheapest when `out` fits in the cache."""
    if out is None:
        out = np.empty(stored.shape, dtype=np.float32)
    if dtype == "bfloat16":
        bits = out.view(np.uint32)
        np.copyto(bits, stored, casting="safe")
        np.left_shift(bits, np.uint32(16), out=bits)
    elif dtype == "float16":
        bits = out.view(np.int32)
        np.copyto(bits, stored.view(np.int16), casting="safe")
        np.left_shift(bits, np.int32(13), out=bits)
        np.bitwise_and(bits, _F16_CLEAR, out=bits)
        np.multiply(out, _F16_SCALE, out=out)
    else:
        np.copyto(out, stored, casting="same_kind")
    return out


# ---------------------------------------------------------------------------
# Files


def _sha256_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _HashingFile:
    """A writable file that also hashes and counts what goes through it."""

    def __init__(self, raw):
        self._raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data):
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += len(view)
        return self._raw.write(view)


def _write_npy(path, array: np.ndarray):
    """Write `array` as a .npy file durably; returns (bytes, sha256 hex)."""
    result = {}

    def write(f):
        hashing = _HashingFile(f)
        np.lib.format.write_array(hashing, array, version=(1, 0), allow_pickle=False)
        result.update(size=hashing.size, sha256=hashing.digest.hexdigest())

    write_atomically(path, write)
    return result["size"], result["sha256"]


def _check_npy(path, dtype: np.dtype, shape: tuple) -> None:
    """The .npy header of `path` says `dtype`, `shape`, C order, and the file holds exactly that."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            got_shape, fortran, got_dtype = read_header(f, max_header_size=100_000)
        except (ValueError, SyntaxError, EOFError, TypeError) as err:
            raise DamagedStore(f"{path}: not a readable .npy header ({err})") from err
        data_offset = f.tell()
    if got_dtype != dtype or tuple(got_shape) != tuple(shape) or fortran:
        raise DamagedStore(f"{path}: the .npy header says dtype {got_dtype}, shape {got_shape}"
                           f"{', Fortran order' if fortran else ''}; the manifest expects {dtype}, {shape}")
    expected = data_offset + int(np.prod(shape)) * dtype.itemsize
    if os.path.getsize(path) != expected:
        raise DamagedStore(f"{path}: {os.path.getsize(path)} bytes, its header implies {expected}")


def verify_shard(directory, shard: dict, dim: int, dtype: str) -> None:
    """Raise DamagedStore naming the file if either file of `shard` is missing, of the wrong size, differs
    from its sha256 in the manifest, or has a header that does not match the manifest."""
    shapes = {"rows": ((shard["rows"], dim), STORAGE_DTYPES[dtype]), "prov": ((shard["rows"],), PROV_DTYPE)}
    for kind, (shape, file_dtype) in shapes.items():
        path = os.path.join(directory, shard[f"{kind}_file"])
        if not os.path.isfile(path):
            raise DamagedStore(f"{path}: missing ({kind} file of shard {shard['name']} listed in "
                               f"{os.path.join(directory, MANIFEST)}); restore it from a copy of the store")
        size = os.path.getsize(path)
        if size != shard[f"{kind}_bytes"]:
            raise DamagedStore(f"{path}: {size} bytes, the manifest says {shard[f'{kind}_bytes']} (truncated or "
                               "replaced); restore it from a copy of the store")
        if _sha256_file(path) != shard[f"{kind}_sha256"]:
            raise DamagedStore(f"{path}: its content differs from the sha256 in the manifest (a flipped bit or a "
                               "replaced file); restore it from a copy of the store")
        _check_npy(path, file_dtype, shape)


# ---------------------------------------------------------------------------
# The manifest


def check_blocks(blocks) -> list:
    """blocks as [[name, start, stop], ...]: contiguous ranges from column 0, distinct names."""
    checked, position = [], 0
    for block in blocks:
        name, start, stop = block
        if not isinstance(name, str) or int(start) != position or int(stop) <= int(start):
            raise ValueError(f"block {list(block)}: blocks must be [name, start, stop] with contiguous, non-empty "
                             f"column ranges starting at 0 (this one should start at {position})")
        checked.append([name, int(start), int(stop)])
        position = int(stop)
    names = [b[0] for b in checked]
    if not checked or len(set(names)) != len(names):
        raise ValueError(f"blocks {names}: give at least one block, each name once")
    return checked


def read_manifest(directory) -> dict:
    """The manifest of the store in `directory`, checked for its format; DamagedStore if unreadable."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no gradient store here (no manifest)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedStore(f"{path}: not readable JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DamagedStore(f"{path}: not a gradient store manifest (format {FORMAT_NAME!r} expected)")
    if manifest.get("version") != FORMAT_VERSION:
        raise DamagedStore(f"{path}: format version {manifest.get('version')}; this reader knows "
                           f"{FORMAT_VERSION}")
    _storage_dtype(manifest["dtype"])
    if check_blocks(manifest["blocks"])[-1][2] != manifest["dim"]:
        raise DamagedStore(f"{path}: blocks end at column {manifest['blocks'][-1][2]}, dim is {manifest['dim']}")
    return manifest


def _write_manifest(directory, manifest: dict) -> None:
    data = json.dumps(manifest, indent=1).encode("utf-8")
    write_atomically(os.path.join(directory, MANIFEST), lambda f: f.write(data))


# ---------------------------------------------------------------------------
# Writer


class GradStoreWriter:
    """The one writer of a store: creates it or opens it for append, buffers rows until `shard_rows`, writes
    each shard's files and then the manifest. One writer at a time (a FileLock on directory/.lock)."""

    def __init__(self, directory, blocks, dtype: str = "bfloat16", shard_rows: int = 8192, meta: dict | None = None):
        self.directory = os.fspath(directory)
        self.blocks = check_blocks(blocks)
        self.dim = self.blocks[-1][2]
        self.dtype = dtype
        _storage_dtype(dtype)
        if int(shard_rows) < 1:
            raise ValueError(f"shard_rows={shard_rows}: a shard holds at least one row")
        self.shard_rows = int(shard_rows)
        self._lock = FileLock(os.path.join(self.directory, LOCK_FILE))
        if not self._lock.acquire():
            raise StoreLocked(f"{self.directory}: another writer holds the store ({self._lock.holder()}); "
                              "one writer at a time: wait for it to close, or write another store")
        try:
            self._manifest = self._open(dict(meta or {}))
            self._remove_orphans()
        except BaseException:
            self._lock.release()
            raise
        self._domain_index = {name: i for i, name in enumerate(self._manifest["domains"])}
        self._rows, self._prov, self._buffered = [], [], 0
        self._closed = False

    def _open(self, meta: dict) -> dict:
        """The existing manifest, checked against this writer's blocks, dtype and identity; or a new store's."""
        if not os.path.exists(os.path.join(self.directory, MANIFEST)):
            manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dim": self.dim, "dtype": self.dtype,
                        "blocks": self.blocks, "domains": [], "meta": meta, "next_shard": 0, "shards": []}
            _write_manifest(self.directory, manifest)
            return manifest
        manifest = read_manifest(self.directory)
        for what, mine in (("dtype", self.dtype), ("dim", self.dim), ("blocks", self.blocks)):
            if manifest[what] != mine:
                raise ValueError(f"{self.directory}: the store has {what} {manifest[what]}, this writer was "
                                 f"given {mine}; append with the store's {what}, or write another store")
        theirs, mine = manifest["meta"].get("identity"), meta.get("identity")
        if mine is not None and theirs != mine:
            raise ValueError(f"{self.directory}: the store holds the rows of identity {theirs!r}, this writer's "
                             f"is {mine!r}; never mix two runs' rows: write another store")
        return manifest

    def _remove_orphans(self) -> None:
        """Shard files the manifest does not name: those of an append that crashed before its manifest
        (numbered from next_shard on) are removed; those of a drop_steps_after that crashed after its manifest
        (numbered below) go to superseded/, like the files it moves; temporary files are removed."""
        listed = {s[f"{kind}_file"] for s in self._manifest["shards"] for kind in ("rows", "prov")}
        for name in sorted(os.listdir(self.directory)):
            match = SHARD_FILE.match(name)
            path = os.path.join(self.directory, name)
            if ".tmp-" in name and (name.startswith("shard-") or name.startswith(MANIFEST)):
                os.remove(path)
            elif match and name not in listed:
                if int(match.group(1)) >= self._manifest["next_shard"]:
                    os.remove(path)
                else:
                    self._supersede(name)
        fsync_directory(self.directory)

    def _supersede(self, name: str) -> None:
        target_dir = os.path.join(self.directory, SUPERSEDED_DIR)
        os.makedirs(target_dir, exist_ok=True)
        target, n = os.path.join(target_dir, name), 0
        while os.path.exists(target):
            n += 1
            target = os.path.join(target_dir, f"{name}.{n}")
        os.replace(os.path.join(self.directory, name), target)

    # -- appending

    def append(self, rows, prov: dict) -> None:
        """Buffer `rows` (float [n, K]) with their provenance: a dict of the PROV_COLUMNS, each an array of n
        or a scalar for all n, `domain` as strings. A shard is written for every `shard_rows` rows buffered."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim or rows.dtype.kind != "f":
            raise ValueError(f"rows of shape {rows.shape} and dtype {rows.dtype}: expected float rows [n, {self.dim}]")
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise ValueError(f"row {bad} of the appended rows is not finite (NaN or inf); nothing of this call "
                             "was stored: find where the gradient went non-finite")
        stored = to_storage(rows, self.dtype)
        self._prov.append(self._records(prov, len(rows)))
        self._rows.append(stored)
        self._buffered += len(rows)
        if self._buffered >= self.shard_rows:
            self._write_buffer(full_only=True)

    def _records(self, prov: dict, n: int) -> np.ndarray:
        missing = sorted(set(PROV_COLUMNS) - set(prov))
        unknown = sorted(set(prov) - set(PROV_COLUMNS))
        if missing or unknown:
            raise ValueError(f"provenance columns: missing {missing}, unknown {unknown}; give {list(PROV_COLUMNS)}")
        records = np.empty(n, dtype=PROV_DTYPE)
        for name in PROV_COLUMNS:
            values = np.asarray(prov[name])
            if values.ndim > 1 or (values.ndim == 1 and len(values) != n):
                raise ValueError(f"provenance column {name!r} has shape {values.shape}; expected ({n},) or a scalar")
            if name == "domain":
                values = self._domain_codes(np.broadcast_to(values, (n,)))
            elif values.dtype.kind not in ("i", "u", "f", "b"):
                raise ValueError(f"provenance column {name!r} holds {values.dtype}; expected numbers")
            records[name] = values
        return records

    def _domain_codes(self, names: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(names.astype(str), return_inverse=True)
        codes = np.empty(len(unique), dtype=np.int32)
        for i, name in enumerate(unique.tolist()):  # once per distinct domain, not per row
            if name not in self._domain_index:
                self._domain_index[name] = len(self._manifest["domains"])
                self._manifest["domains"].append(name)
            codes[i] = self._domain_index[name]
        return codes[inverse.reshape(-1)]

    def flush(self) -> None:
        """Write every buffered row (the last shard may be smaller than shard_rows)."""
        self._write_buffer(full_only=False)

    def flush_full(self) -> None:
        """Write the buffered rows that fill whole shards (of shard_rows); keep the rest buffered."""
        self._write_buffer(full_only=True)

    def _write_buffer(self, full_only: bool) -> None:
        if not self._buffered:
            return
        rows, prov = np.concatenate(self._rows), np.concatenate(self._prov)
        n_written = 0
        while len(rows) - n_written >= (self.shard_rows if full_only else 1):
            stop = min(n_written + self.shard_rows, len(rows))
            self._write_shard(rows[n_written:stop], prov[n_written:stop])
            n_written = stop
        self._rows, self._prov = ([rows[n_written:]], [prov[n_written:]]) if n_written < len(rows) else ([], [])
        self._buffered = len(rows) - n_written

    def _write_shard(self, rows: np.ndarray, prov: np.ndarray, replacing: str | None = None) -> None:
        """Write one shard's files, then the manifest naming them (in place of shard `replacing` if given)."""
        number = self._manifest["next_shard"]
        shard = {"name": f"shard-{number:06d}", "rows": len(rows), "first_step": int(prov["step"].min()),
                 "last_step": int(prov["step"].max())}
        for kind, array in (("rows", rows), ("prov", prov)):
            shard[f"{kind}_file"] = f"shard-{number:06d}.{kind}.npy"
            size, sha256 = _write_npy(os.path.join(self.directory, shard[f"{kind}_file"]), array)
            shard[f"{kind}_bytes"], shard[f"{kind}_sha256"] = size, sha256
        manifest = dict(self._manifest, next_shard=number + 1, domains=list(self._manifest["domains"]))
        shards = list(manifest["shards"])
        if replacing is None:
            shards.append(shard)
        else:
            shards[[s["name"] for s in shards].index(replacing)] = shard
        manifest["shards"] = shards
        _write_manifest(self.directory, manifest)
        self._manifest = manifest

    # -- resuming a run

    def drop_steps_after(self, step: int) -> int:
        """Take every row of a step after `step` out of the store (a run resumed from its checkpoint at `step`);
        returns how many rows went. Buffered rows go; a shard with later steps only leaves the manifest; one
        that straddles `step` is written again as a new shard of its rows of steps <= `step`. The files of
        both go to superseded/, after the manifest no longer names them; no file is changed in place."""
        dropped = 0
        if self._buffered:
            prov = np.concatenate(self._prov)
            keep = prov["step"] <= step
            dropped += int((~keep).sum())
            self._rows, self._prov = [np.concatenate(self._rows)[keep]], [prov[keep]]
            self._buffered = int(keep.sum())
        later = [s for s in self._manifest["shards"] if s["first_step"] > step]
        straddling = [s for s in self._manifest["shards"] if s["first_step"] <= step < s["last_step"]]
        if later:
            names = {s["name"] for s in later}
            manifest = dict(self._manifest, shards=[s for s in self._manifest["shards"] if s["name"] not in names])
            _write_manifest(self.directory, manifest)
            self._manifest = manifest
            dropped += sum(s["rows"] for s in later)
        for shard in straddling:
            dropped += self._rewrite_straddling(shard, step)
        for shard in later + straddling:
            self._supersede(shard["rows_file"])
            self._supersede(shard["prov_file"])
        fsync_directory(self.directory)
        return dropped

    def _rewrite_straddling(self, shard: dict, step: int) -> int:
        verify_shard(self.directory, shard, self.dim, self.dtype)
        rows = np.load(os.path.join(self.directory, shard["rows_file"]), allow_pickle=False)
        prov = np.load(os.path.join(self.directory, shard["prov_file"]), allow_pickle=False)
        keep = prov["step"] <= step
        self._write_shard(rows[keep], prov[keep], replacing=shard["name"])
        return int((~keep).sum())

    # -- life cycle

    @property
    def n_rows(self) -> int:
        """Rows in the store's manifest plus the rows buffered here."""
        return sum(s["rows"] for s in self._manifest["shards"]) + self._buffered

    def close(self) -> None:
        """Flush, then release the lock (also when the flush fails). Closing twice is harmless."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        """Close; after an exception the buffered (already checked) rows are still flushed if they can be, and
        the exception that ended the block is the one raised."""
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except Exception:
                pass
        return False


# ---------------------------------------------------------------------------
# Reader


class GradStore:
    """A store opened for reading: its manifest as read at open time; every shard verified (size, sha256,
    header) once per reader before its rows are used, then memory-mapped."""

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        self.manifest = read_manifest(self.directory)
        self.dim, self.dtype = int(self.manifest["dim"]), self.manifest["dtype"]
        self.blocks = [tuple(b) for b in self.manifest["blocks"]]
        self.domains = list(self.manifest["domains"])
        self.meta = dict(self.manifest["meta"])
        self.shards = list(self.manifest["shards"])
        self.offsets = np.concatenate([[0], np.cumsum([s["rows"] for s in self.shards], dtype=np.int64)])
        self.n_rows = int(self.offsets[-1])
        self._opened = {}  # shard index -> (rows memmap, prov memmap), verified

    def __len__(self) -> int:
        return self.n_rows

    def shard_arrays(self, index: int):
        """(stored rows, provenance records) of shard `index`, memory-mapped; verified on first use."""
        if index not in self._opened:
            shard = self.shards[index]
            verify_shard(self.directory, shard, self.dim, self.dtype)
            self._opened[index] = tuple(np.load(os.path.join(self.directory, shard[f"{kind}_file"]),
                                                mmap_mode="r", allow_pickle=False) for kind in ("rows", "prov"))
        return self._opened[index]

    def columns_of(self, columns=None):
        """A column selection as a slice or an index array: None (all), block names, or column indices."""
        if columns is None:
            return slice(0, self.dim)
        names = [columns] if isinstance(columns, str) else list(columns)
        if names and all(isinstance(c, str) for c in names):
            spans = {b[0]: (b[1], b[2]) for b in self.blocks}
            unknown = [c for c in names if c not in spans]
            if unknown:
                raise KeyError(f"blocks {unknown} are not in the store (it has {list(spans)})")
            index = np.concatenate([np.arange(*spans[c]) for c in names])
        else:
            index = np.asarray(names, dtype=np.int64)
        if len(index) and np.array_equal(index, np.arange(index[0], index[0] + len(index))):
            return slice(int(index[0]), int(index[0]) + len(index))
        return index

    def iter_stored(self, chunk_rows: int = 65536, columns=None):
        """Yield (start_row, stored rows [n, K or the selected columns] in the store's dtype (bfloat16 as uint16
        bits; to_float32 converts), provenance records [n]) in store order, n <= chunk_rows; a chunk never spans
        two shards, and its rows are a view of the memory-mapped shard unless scattered columns are selected.
        Every shard is verified before its first chunk is yielded; the next one is verified in a background
        thread while this one's chunks are used (file reads and hashlib release the GIL), so that a reader's
        first pass costs about the larger of hashing and the caller's work rather than their sum."""
        select = self.columns_of(columns)
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows}: a chunk holds at least one row")
        for index, (stored, prov) in self._shards_in_order():
            stored = np.asarray(stored)  # an ndarray view of the memmap: its slices skip memmap's Python hooks
            for start in range(0, self.shards[index]["rows"], chunk_rows):
                stop = min(start + chunk_rows, self.shards[index]["rows"])
                yield int(self.offsets[index]) + start, stored[start:stop, select], np.asarray(prov[start:stop])

    def _shards_in_order(self):
        """Yield (index, shard_arrays(index)) for every shard in order, verifying the next ones meanwhile: as
        many at once as this process has CPUs (up to 4), since sha256 (about 1.6 GB/s a core with SHA-NI)
        is slower than reading a file in the page cache."""
        if not self.shards:
            return
        ahead = min(4, usable_cpus())
        with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="grad_store_verify") as verifier:
            pending = {index: verifier.submit(self.shard_arrays, index)
                       for index in range(min(ahead, len(self.shards)))}
            for index in range(len(self.shards)):
                arrays = pending.pop(index).result()
                if index + ahead < len(self.shards):
                    pending[index + ahead] = verifier.submit(self.shard_arrays, index + ahead)
                yield index, arrays

    def iter_chunks(self, chunk_rows: int = 65536, columns=None):
        """Yield (start_row, rows float32 [n, K or the selected columns], provenance records [n]) in store
        order, n <= chunk_rows; a chunk never spans two shards. The float32 array is reused between chunks
        of the same size: copy it to keep it. Shards are verified as iter_stored says."""
        select = self.columns_of(columns)
        width = select.stop - select.start if isinstance(select, slice) else len(select)
        buffer = np.empty((min(max(chunk_rows, 1), max([s["rows"] for s in self.shards], default=0)), width),
                          np.float32)
        for start, stored, prov in self.iter_stored(chunk_rows, columns):
            yield start, to_float32(stored, self.dtype, out=buffer[:len(stored)]), prov

    def _locate(self, indices) -> tuple:
        indices = np.asarray(indices)
        if indices.dtype == bool:  # a mask over the store's rows, not the row numbers 0 and 1
            if indices.shape != (self.n_rows,):
                raise IndexError(f"a boolean mask of shape {indices.shape} for a store of {self.n_rows} rows")
            indices = np.flatnonzero(indices)
        indices = indices.astype(np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n_rows):
            raise IndexError(f"row indices outside the store's {self.n_rows} rows")
        return indices, np.searchsorted(self.offsets[1:], indices, side="right")

    def rows(self, indices) -> np.ndarray:
        """Rows at store indices (or a boolean mask over the store's rows), float32 [len(indices), K]; only the
        shards they fall in are read."""
        indices, shard_of = self._locate(indices)
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        for index in np.unique(shard_of).tolist():
            where = np.flatnonzero(shard_of == index)
            stored = self.shard_arrays(index)[0]
            out[where] = to_float32(stored[indices[where] - self.offsets[index]], self.dtype)
        return out

    def records(self, indices=None) -> np.ndarray:
        """Provenance records (PROV_DTYPE) at store indices, or of every row."""
        if indices is None:
            parts = [self.shard_arrays(i)[1] for i in range(len(self.shards))]
            return np.concatenate(parts) if parts else np.empty(0, PROV_DTYPE)
        indices, shard_of = self._locate(indices)
        out = np.empty(len(indices), dtype=PROV_DTYPE)
        for index in np.unique(shard_of).tolist():
            where = np.flatnonzero(shard_of == index)
            out[where] = self.shard_arrays(index)[1][indices[where] - self.offsets[index]]
        return out

    def provenance(self, indices=None) -> pd.DataFrame:
        """Provenance as a DataFrame (store_row, then PROV_COLUMNS with domain names as strings)."""
        records = self.records(indices)
        rows = np.arange(self.n_rows) if indices is None else self._locate(indices)[0]
        frame = pd.DataFrame({"store_row": rows})
        for name in PROV_COLUMNS:
            frame[name] = records[name]
        frame["domain"] = np.asarray(self.domains, dtype=object)[records["domain"]]
        return frame

    def fingerprint(self) -> str:
        """sha256 over the manifest's shard digests in order: changes whenever the store's rows do."""
        digest = hashlib.sha256(f"{self.dim}:{self.dtype}".encode())
        for shard in self.shards:
            digest.update(f"{shard['rows_sha256']}:{shard['prov_sha256']}".encode())
        return digest.hexdigest()
