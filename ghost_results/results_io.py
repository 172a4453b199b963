"""The on-disk format of a run's gradient dot products, and its only reader.

A training run writes `Results/<run>/grad_dotprods/iter_XXXXXX.pkl`, each a
pickle of a plain dict (schema in docs/report.md):

    {"schema": "graddotprod.dotprods", "schema_version": 1, "run_name": str,
     "run_id": optional str, "world_size": int, "value": optional str,
     "content_sha256": optional str, "per_layer_sha256": optional str,
     "steps": [step_record, ...]}

"value" names what the records' "dot_products" hold (GradDotProdEngine's estimator, one of VALUES,
docs/METHOD.md section 2.1); absent means "first_order" (files written before it).

"run_id" is the run's identity (`new_run_id()`, a random 32-digit hex string made when the run starts and
kept in config.json under "run_id"); absent in files written before run ids, or by a writer given none.
The loader merges a file into a run by it, not by "run_name" (a renamed run keeps its files; another run of
the same name is refused).

"content_sha256" and "per_layer_sha256" are `content_digests` of the file: sha256 hex digests of its
identity fields and its rows decoded into columns (those of `load_run`, and the per_layer/<name> ones).
Every file this module writes has both; the loader recomputes them from what it decoded and refuses a
file whose numbers differ (a flipped bit, a torn copy). Files written before them are read unverified.

    step_record = {"step": int, "lr": float, "train_loss": float, "val_loss": float,
                   "dot_products": float32[B], "batch_weights": float32[B],
                   "token_counts": int64[B], "domain": list[str] (len B),
                   "token_offset": int64[B], "doc_id": int64[B], "sample_index": int64[B],
                   "per_layer": optional {param_name: float32[B]},
                   "first_order_dot_products": optional float32[B]}

"first_order_dot_products" is <grad l_i, grad L_val> of the same rows in a file whose "value" is another
estimator (the deferred ones, second_order, adamw_vt and midpoint, record it at no extra cost).

Instead of it (`--results_format parquet`, the default) or beside it (`both`) the same steps as a Parquet
table, `iter_XXXXXX.parquet`: one row per (step, training row), the columns of
`load_run` (step, lr, train_loss, val_loss, dot_products, batch_weight,
token_count, domain, token_offset, doc_id, sample_index, first_order_dot_products if
recorded) in the dtypes `load_run` returns, one float32 column per parameter named per_layer__<name>
(`per_layer_column_names`; files written before these names: per_layer/<param name>), and the file's schema,
schema_version, run_name, run_id (if any), world_size, value, content_sha256, per_layer_sha256 and
per_layer_columns ({column: parameter name}) as JSON under the key "graddotprod" of the Parquet key-value
metadata. Numbers are stored plainly (PLAIN encoding, snappy), `domain` dictionary-encoded, statistics for
`step` and `domain`, every page with a CRC (pyarrow >= 15). Any Parquet reader reads it (polars, DuckDB,
pandas, Spark).

`python -m ghost_results compact` (ghost_results.compact) merges step files into
`compact_<first step>_<last step>.parquet` ("Compacted files" below): the same columns, one segment per step
file with its identity and digests in the metadata, verified per segment when read.

Pickles are read with a restricted unpickler (`safe_load_pickle`): only builtin
containers/scalars and numpy arrays, dtypes and scalars may be rebuilt, so a
results directory from someone else cannot run code on load; arrays and scalars are built with clean dtypes
of plain kinds (numpy trusts a pickled dtype's state; see _CheckedArray). Neither reader allocates much more than the
file holds: a pickle's arrays may not have more elements than it has bytes, a Parquet file's footer is
checked against its size before any data is read (`_check_parquet_footer`), and a `domain` column whose
fixed-width strings would be far larger than the file is refused.
"""
from __future__ import annotations

import collections
import hashlib
import inspect
import io
import json
import os
import pickle
import re
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ghost_common.durable import fsync_directory, write_atomically, write_atomically_named

# GradDotProdEngine's estimators (ghost_engine.engine.VALUES, LR_INSIDE): the ones whose dot products carry the
# learning rate give phi_i = w_i·dot_i, first_order phi_i = lr·w_i·dot_i, cosine none
VALUES = ("first_order", "second_order", "adamw", "adamw_vt", "midpoint", "cosine")
LR_INSIDE = ("second_order", "adamw", "adamw_vt", "midpoint")

SCHEMA_NAME = "graddotprod.dotprods"
SCHEMA_VERSION = 1
DOTPROD_DIR = "grad_dotprods"
RESULTS_FORMATS = {"pickle": ".pkl", "parquet": ".parquet"}  # format -> file suffix, read in reverse order
ITER_FILE = re.compile(r"^iter_(\d+)\.(pkl|parquet)$")  # grad_dotprods/iter_<last step>.<suffix>
PER_LAYER_PREFIX = "per_layer/"  # load_run's name of a parameter's column (and a Parquet file's, before safe names)
# A Parquet column name of a parameter's values in files written since: "per_layer__" + the name lower-cased with
# every character but [a-z0-9_] made "_" (no SQL engine needs it quoted); the metadata maps each back to its
# parameter under PER_LAYER_COLUMNS_KEY ({column: parameter name}). Names that collide so get a hash suffix.
SAFE_PER_LAYER_PREFIX = "per_layer__"
PER_LAYER_COLUMNS_KEY = "per_layer_columns"
PARQUET_METADATA_KEY = "graddotprod"
RUN_ID_KEY = "run_id"  # the run's identity: in config.json, every pickle payload and every Parquet metadata
DIGEST_KEYS = ("content_sha256", "per_layer_sha256")  # content_digests(): the columns, the per-layer columns
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
TRAINING_LOG_JSONL = "training_log.jsonl"  # the app's per-step log; a resume cuts it like the files
CHECKPOINT_DIR = "checkpoints"
STEP_CHECKPOINT_FILE = re.compile(r"^step_(\d+)\.pt$")  # checkpoints/step_<step>.pt: the series --keep_checkpoints
SHARDED_CHECKPOINT = re.compile(r"^step_(\d+)\.dcp$")  # checkpoints/step_<step>.dcp/: a sharded checkpoint (--fsdp)
VALSET_FROM_STEP = re.compile(r"^valset_from_step_(\d+)\.pkl$")  # validation rows used from <step> on
STEP_FILES = {DOTPROD_DIR: (ITER_FILE,), CHECKPOINT_DIR: (STEP_CHECKPOINT_FILE, SHARDED_CHECKPOINT),
              "": (VALSET_FROM_STEP,)}  # by step

# Fields of a v1 step record, by kind. Arrays are 1-D with one entry per training row.
_V1_SCALAR_INT = ("step",)
_V1_SCALAR_FLOAT = ("lr", "train_loss", "val_loss")
_V1_FLOAT_ARRAYS = ("dot_products", "batch_weights")
_V1_INT_ARRAYS = ("token_counts", "token_offset", "doc_id", "sample_index")

# Step-record field -> name of the merged column returned by `load_dotprods`.
_V1_COLUMN_NAMES = {
    "dot_products": "dot_products",
    "batch_weights": "batch_weight",
    "token_counts": "token_count",
    "token_offset": "token_offset",
    "doc_id": "doc_id",
    "sample_index": "sample_index",
}
# The columns of `load_run` and of a Parquet file, in order, with their dtypes (per_layer/<name>: float32).
COLUMN_DTYPES = {
    "step": np.int64, "lr": np.float64, "train_loss": np.float64, "val_loss": np.float64,
    "dot_products": np.float32, "batch_weight": np.float32, "token_count": np.int64, "domain": np.str_,
    "token_offset": np.int64, "doc_id": np.int64, "sample_index": np.int64,
}
# Columns of a step-record field some files have: NaN in the rows of files without it.
FIRST_ORDER_COLUMN = "first_order_dot_products"
OPTIONAL_COLUMNS = {FIRST_ORDER_COLUMN: np.float32}

# What this module's Parquet writer can produce, against which a footer is checked before any data is read
# (`_check_parquet_footer`): numbers are stored PLAIN, so a row group of n rows holds at least n x the widths of
# its number columns before compression, and snappy turns at most 64 bytes into 3 (one copy), so column data is
# at most ~21.3 times its compressed bytes (plus _PARQUET_SLACK).
_PARQUET_MAX_RATIO = 22
_PARQUET_SLACK = 4096
# `domain` becomes fixed-width numpy strings (4 bytes a character of the longest label, on every row): a file
# whose domain column would take more than max(_DOMAIN_FLOOR, _DOMAIN_PER_BYTE x its size) bytes is refused,
# and so is a file that would widen a run's column past max(_RUN_DOMAIN_FLOOR, _DOMAIN_PER_BYTE x the run's
# bytes on disk). Honest files stay far below (a Pile label is <= 20 characters, a row >= 10 bytes on disk).
_DOMAIN_PER_BYTE = 64
_DOMAIN_FLOOR = 16 * 2**20
_RUN_DOMAIN_FLOOR = 256 * 2**20
# Page CRCs: pyarrow >= 15 writes and checks them; with pyarrow 14 files are written and read without (the
# content digests still check every number read)
_PAGE_CHECKSUMS = ("write_page_checksum" in inspect.signature(pq.ParquetWriter).parameters
                   and "page_checksum_verification" in inspect.signature(pq.ParquetFile).parameters)


class UnsafePickleError(ValueError):
    """A pickle asked to rebuild an object outside the allowed plain-data set."""


class ResultsFormatError(ValueError):
    """A results file is unreadable, truncated, or does not follow the schema."""


# ---------------------------------------------------------------------------
# Run identity and content digests


def new_run_id() -> str:
    """A fresh run identity: 32 random lowercase hex digits (uuid4). The app makes one when a run starts,
    keeps it in config.json under "run_id" (kept on --resume and when the run is renamed) and passes it to
    every `flush_dotprods`; `read_run` merges a file into the run iff it carries that id."""
    return uuid.uuid4().hex


def _identity(header) -> dict:
    """The identity fields a content digest covers, from a pickle payload or a Parquet metadata dict:
    schema, schema_version, run_name, run_id (None if absent), world_size, value ("first_order" if absent)."""
    world_size = header.get("world_size")
    if isinstance(world_size, np.integer):
        world_size = int(world_size)
    return {"schema": header.get("schema"), "schema_version": header.get("schema_version"),
            "run_name": header.get("run_name"), "run_id": header.get(RUN_ID_KEY), "world_size": world_size,
            "value": header.get("value", "first_order")}


def _framed(digest, data: bytes) -> None:
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)


def content_digest(identity: dict, columns: dict) -> str:
    """sha256 hex digest of identity fields and decoded columns, independent of the file format.

    Hashed in order: the tag b"graddotprod.content.v1", then length-prefixed (8-byte little-endian lengths)
    the identity as compact JSON with sorted keys, and for every column in sorted name order: its name
    (utf-8), its dtype ("str" for numpy strings, else numpy's little-endian dtype string such as "<f4"), its
    shape (8-byte little-endian ints) and its values: the raw little-endian bytes, or for strings the utf-8
    length of every row (8 bytes little-endian each) followed by the utf-8 bytes of every row.
    """
    digest = hashlib.sha256(b"graddotprod.content.v1")
    _framed(digest, json.dumps(identity, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(columns):
        values = columns[name]
        values = values if isinstance(values, np.ndarray) else np.asarray(values)
        name_bytes = name.encode("utf-8", "surrogatepass")
        shape = b"".join(int(n).to_bytes(8, "little") for n in values.shape)
        if values.dtype.kind == "U":
            texts = values.ravel().tolist()
            joined = "".join(texts).encode("utf-8", "surrogatepass")
            if len(joined) == sum(map(len, texts)):  # ASCII: a row's utf-8 length is its length
                lengths = np.char.str_len(values.ravel()).astype("<u8")
            else:
                lengths = np.array([len(text.encode("utf-8", "surrogatepass")) for text in texts], dtype="<u8")
            for part in (name_bytes, b"str", shape, lengths.tobytes(), joined):
                _framed(digest, part)
        else:
            dtype = values.dtype.newbyteorder("<") if values.dtype.byteorder == ">" else values.dtype
            data = values if values.dtype is dtype and values.flags.c_contiguous else \
                np.ascontiguousarray(values, dtype=dtype)
            dtype_bytes = dtype.str.encode()
            digest.update(b"".join((len(name_bytes).to_bytes(8, "little"), name_bytes,
                                    len(dtype_bytes).to_bytes(8, "little"), dtype_bytes,
                                    len(shape).to_bytes(8, "little"), shape, data.nbytes.to_bytes(8, "little"))))
            digest.update(data.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def content_digests(identity: dict, columns: dict) -> tuple:
    """(content_sha256, per_layer_sha256): `content_digest` of the columns `load_run` returns without
    per_layer (every column not named per_layer/...) and of the per_layer/<name> columns, each with the
    identity. Two digests so that a load without per_layer checks what it reads without reading the rest."""
    layers = {name: values for name, values in columns.items() if name.startswith(PER_LAYER_PREFIX)}
    rest = {name: values for name, values in columns.items() if not name.startswith(PER_LAYER_PREFIX)}
    return content_digest(identity, rest), content_digest(identity, layers)


def per_layer_column_names(names) -> dict:
    """{parameter name: its Parquet column}: SAFE_PER_LAYER_PREFIX + the name lower-cased, every character outside
    [a-z0-9_] replaced by "_" (`transformer.h.0.attn.c_attn.weight` -> `per_layer__transformer_h_0_attn_c_attn_weight`).
    Names of `names` that would share a column (`a.b` and `a_b`; `W` and `w`: DuckDB folds case) each get
    "__" + the first 8 hex digits of the sha256 of the name instead, so the result depends on the set of names
    only where such names meet."""
    names = sorted(set(names))
    base = {name: SAFE_PER_LAYER_PREFIX + re.sub(r"[^0-9a-z_]", "_", name.lower()) for name in names}
    shared = {column for column, n in collections.Counter(base.values()).items() if n > 1}
    columns = {}
    for name in names:
        column = base[name]
        if column in shared:
            column += "__" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        columns[name] = column
    if len(set(columns.values())) != len(columns):  # a hash suffix met another name's column: vanishingly rare
        columns = {name: f"{SAFE_PER_LAYER_PREFIX}{i:04d}_" + column[len(SAFE_PER_LAYER_PREFIX):]
                   for i, (name, column) in enumerate(columns.items())}
    return columns


def _layer_names_of(path: str, metadata: dict, in_file: list) -> dict:
    """{Parquet column: load_run's per_layer/<parameter> name} of a file's per-parameter columns: those named
    per_layer/<name> (files written before safe names) and those named per_layer__... with their parameter from the
    metadata's PER_LAYER_COLUMNS_KEY. ResultsFormatError naming the file if a safe column has no parameter or two
    columns name one parameter."""
    mapping = metadata.get(PER_LAYER_COLUMNS_KEY) or {}
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ResultsFormatError(f"{path}: its metadata's {PER_LAYER_COLUMNS_KEY!r} must map column names to "
                                 "parameter names; the file is damaged")
    names = {}
    for column in in_file:
        if column.startswith(PER_LAYER_PREFIX):
            names[column] = column
        elif column.startswith(SAFE_PER_LAYER_PREFIX):
            if column not in mapping:
                raise ResultsFormatError(f"{path}: column {column!r} has no parameter name in its metadata "
                                         f"({PER_LAYER_COLUMNS_KEY}); the file is damaged")
            names[column] = PER_LAYER_PREFIX + mapping[column]
    if len(set(names.values())) != len(names):
        repeated = sorted(n for n, k in collections.Counter(names.values()).items() if k > 1)
        raise ResultsFormatError(f"{path}: several columns hold {repeated}; the file is damaged")
    return names


def _check_identity_fields(header, where: str) -> None:
    """run_id: absent or a non-empty str; content_sha256 and per_layer_sha256: both absent or both 64 hex digits."""
    run_id = header.get(RUN_ID_KEY)
    if run_id is not None and (not isinstance(run_id, str) or not run_id):
        raise ResultsFormatError(f"{where}: '{RUN_ID_KEY}' must be a non-empty str, got {run_id!r}")
    digests = [header.get(key) for key in DIGEST_KEYS]
    if digests != [None, None] and not all(isinstance(d, str) and _HEX64.match(d) for d in digests):
        raise ResultsFormatError(f"{where}: {DIGEST_KEYS} must both be 64 lowercase hex digits, got {digests!r}; "
                                 "the file is damaged")


_TWIN_REMEDY = "the same steps in the other format (iter_XXXXXX.pkl / .parquet) are read if there; else restore it " \
    "from a copy"
_COMPACTED_REMEDY = "its step file is read instead if it is still there; else restore the compacted file from a copy"


def _verify(path: str, header, columns: dict, per_layer: bool, remedy: str = _TWIN_REMEDY) -> bool:
    """Check what was decoded from a file against its digests: True if checked, False for a file written before
    digests. Raises ResultsFormatError naming the file on a mismatch."""
    if header.get(DIGEST_KEYS[0]) is None:
        if header.get(RUN_ID_KEY) is not None:  # every writer that records run ids records digests too
            raise ResultsFormatError(f"{path}: carries a run_id but no content digest, which this package never "
                                     "writes: the file is damaged or was altered; restore it from a copy")
        return False
    identity = _identity(header)
    layers = {name: values for name, values in columns.items() if name.startswith(PER_LAYER_PREFIX)}
    rest = {name: values for name, values in columns.items() if not name.startswith(PER_LAYER_PREFIX)}
    for key, part in [(DIGEST_KEYS[0], rest)] + ([(DIGEST_KEYS[1], layers)] if per_layer else []):
        if content_digest(identity, part) != header[key]:
            raise ResultsFormatError(f"{path}: content hash mismatch ({key}): the file is damaged (its bytes "
                                     f"changed after it was written); {remedy}")
    return True


# ---------------------------------------------------------------------------
# Restricted unpickling


def _numpy_core_module(submodule: str):
    """`numpy._core.<sub>` on numpy 2, `numpy.core.<sub>` on numpy 1."""
    import importlib

    for base in ("numpy._core", "numpy.core"):
        try:
            return importlib.import_module(f"{base}.{submodule}")
        except ImportError:
            continue
    raise ImportError(f"numpy has neither numpy._core.{submodule} nor numpy.core.{submodule}")


# Builtins a results pickle may call: protocol 2 writes sets through these. Everything else a results
# file holds has its own opcodes; callables such as bytes/bytearray would let 90 bytes allocate gigabytes.
_ALLOWED_BUILTINS = {"set": set, "frozenset": frozenset}
# numpy globals that array/dtype/scalar pickles name, keyed by (submodule, name);
# numpy 1 writes them under numpy.core, numpy 2 under numpy._core.
_ALLOWED_NUMPY_CORE = {
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),
}


_ALLOWED_GLOBALS = ([("builtins", name) for name in _ALLOWED_BUILTINS] + [("collections", "OrderedDict"),
                    ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype")]
                    + [(base + sub, name) for base in ("numpy._core.", "numpy.core.") for sub, name in _ALLOWED_NUMPY_CORE])


def _one_bit_from_allowed(module: str, name: str):
    """The allowed global "module.name" that (module, name) differs from in exactly one bit, or None: a pickle
    naming it was damaged (one flipped bit), not written to attack."""
    got = f"{module}\0{name}".encode("utf-8", "surrogatepass")
    for allowed in _ALLOWED_GLOBALS:
        want = "\0".join(allowed).encode()
        if len(want) == len(got) and sum(bin(a ^ b).count("1") for a, b in zip(want, got)) == 1:
            return ".".join(allowed)
    return None


# Array and scalar dtypes a results pickle may hold: bool, integers, floats, complex, str, bytes. Anything else
# (datetimes, objects, records) is refused before numpy builds it: numpy's dtype.__setstate__ trusts its input
# (a datetime dtype without metadata crashes the process, a state's flags can make numpy treat raw bytes as
# object pointers), so no array or scalar is built from a dtype as the pickle left it either (`_clean_dtype`).
_PICKLE_DTYPE_KINDS = "biufcUS"


def _clean_dtype(descr, source: str) -> np.dtype:
    """A fresh dtype equal to what `descr` claims to be (kind, byte order, size), from its string alone; refused
    unless a plain scalar dtype of _PICKLE_DTYPE_KINDS."""
    if (not isinstance(descr, np.dtype) or descr.kind not in _PICKLE_DTYPE_KINDS or descr.names is not None
            or descr.subdtype is not None):
        raise ResultsFormatError(f"{source}: holds an array or scalar of dtype {descr!r}, which results files never "
                                 "hold: the file is damaged or crafted; nothing was built from it")
    return np.dtype(descr.str)


class _CheckedArray(np.ndarray):
    """What the restricted unpickler rebuilds arrays as: ndarray.__setstate__ with a clean dtype
    (`_clean_dtype`) in place of the one the pickle built; turned into plain ndarrays once loaded. A pickle
    shares one dtype object among its arrays (memo): its clean copy is made once (`_clean`: id -> (dtype as the
    pickle built it, clean copy), per unpickler)."""

    _source = "a results pickle"
    _clean = {}

    def __setstate__(self, state):
        if type(state) is not tuple or len(state) not in (4, 5):
            raise ResultsFormatError(f"{self._source}: an array state of {type(state).__name__} "
                                     f"{len(state) if isinstance(state, tuple) else ''}: the file is damaged")
        built = state[-3]
        known = self._clean.get(id(built))
        if known is None or known[0] is not built:
            known = self._clean[id(built)] = (built, _clean_dtype(built, self._source))
        np.ndarray.__setstate__(self, state[:-3] + (known[1],) + state[-2:])


def _plain_arrays(obj):
    """The unpickled data with every _CheckedArray made a plain ndarray (containers rebuilt or updated in place)."""
    if isinstance(obj, _CheckedArray):
        return obj.view(np.ndarray)
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, (np.ndarray, dict, list, tuple)):
                obj[key] = _plain_arrays(value)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            if isinstance(value, (np.ndarray, dict, list, tuple)):
                obj[i] = _plain_arrays(value)
    elif isinstance(obj, tuple):
        return tuple(_plain_arrays(value) for value in obj)
    return obj


class _NdarrayName:
    """What `numpy.ndarray` in a results pickle stands for: the array type that _reconstruct rebuilds."""

    def __repr__(self):
        return "numpy.ndarray (as named in a pickle)"


_NDARRAY = _NdarrayName()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str, size: int):
        super().__init__(file)
        self._source = source
        self._size = size  # bytes in the file: no array built while loading may be larger
        self._array_type = type("_CheckedArray", (_CheckedArray,), {"_source": source, "_clean": {}})

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _ALLOWED_BUILTINS:
            return _ALLOWED_BUILTINS[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "_codecs" and name == "encode":  # protocol-2 pickles store bytes this way
            import codecs

            return codecs.encode
        if module == "numpy" and name == "ndarray":
            return _NDARRAY  # not callable: only _reconstruct may take it (np.ndarray(shape) allocates any size)
        if module == "numpy" and name == "dtype":
            return self._checked_dtype
        for base in ("numpy._core.", "numpy.core."):
            if module.startswith(base) and (module[len(base):], name) in _ALLOWED_NUMPY_CORE:
                found = getattr(_numpy_core_module(module[len(base):]), name)
                if name == "_reconstruct":
                    return self._bounded_reconstruct(found)
                return self._with_clean_dtype(found, 0 if name == "scalar" else 1)
        near = _one_bit_from_allowed(module, name)
        if near is not None:  # damage, not an attack: skippable like any damaged file (nothing is called)
            raise ResultsFormatError(f"{self._source}: names global '{module}.{name}', one flipped bit away from "
                                     f"'{near}': the file is damaged; nothing was loaded from it")
        raise UnsafePickleError(
            f"{self._source}: refusing to load global '{module}.{name}'; results pickles may only "
            "hold builtin containers/scalars and numpy arrays, dtypes and scalars. Do not load "
            "this file unless you trust where it came from."
        )

    def _checked_dtype(self, spec, align=False, copy=False):
        """np.dtype as a pickle calls it (a type string such as "f4"), for _PICKLE_DTYPE_KINDS only and always a
        copy: the pickle's BUILD then sets its state, which must never reach numpy's shared dtype singletons."""
        if not isinstance(spec, str) or np.dtype(spec).kind not in _PICKLE_DTYPE_KINDS:
            raise ResultsFormatError(f"{self._source}: asks for dtype {spec!r}, which results files never hold: the "
                                     "file is damaged or crafted; nothing was built from it")
        return np.dtype(spec, align=bool(align), copy=True)

    def _with_clean_dtype(self, build, position: int):
        """numpy's scalar(dtype, data) / _frombuffer(buffer, dtype, ...), given a clean copy of the dtype."""
        def built(*args):
            args = list(args)
            if len(args) > position:
                args[position] = _clean_dtype(args[position], self._source)
            return build(*args)

        return built

    def _bounded_reconstruct(self, reconstruct):
        """numpy's _reconstruct allocates the shape it is given; a real array pickle passes (0,). Builds a
        _CheckedArray, whose __setstate__ uses a clean dtype."""

        def bounded(subtype, shape, dtype):
            if subtype is not _NDARRAY:  # nothing is called with it: a damaged file, not a hostile one
                raise ResultsFormatError(f"{self._source}: an array of type {subtype!r}, which results files never "
                                         "hold: the file is damaged; nothing was built from it")
            if type(shape) is tuple and shape == (0,):  # what every array pickle passes: the real shape comes with its state
                return reconstruct(self._array_type, shape, dtype)
            elements = int(np.prod(shape, dtype=np.float64)) if np.ndim(shape) else int(shape)
            if elements > self._size:
                raise UnsafePickleError(f"{self._source}: an array of {elements:,} elements in a file of "
                                        f"{self._size:,} bytes; refusing to allocate it")
            return reconstruct(self._array_type, shape, dtype)

        return bounded


def safe_load_pickle(path):
    """Load a pickle that may only contain plain python data and numpy arrays.

    Raises UnsafePickleError (a ValueError) naming the file and the refused
    global, before that global is ever called; ResultsFormatError instead when the refused global is one
    flipped bit away from an allowed one (a damaged file, which the loader may skip like any other).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return _plain_arrays(_RestrictedUnpickler(io.BytesIO(data), source=path, size=len(data)).load())


# ---------------------------------------------------------------------------
# Writing


def _check_plain(obj, where: str) -> None:
    """Raise ResultsFormatError unless obj is plain python/numpy data."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, np.generic)):
        if isinstance(obj, np.generic) and obj.dtype.kind == "O":
            raise ResultsFormatError(f"{where}: numpy object scalar is not plain data")
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in ("O", "V"):
            raise ResultsFormatError(
                f"{where}: numpy array of dtype {obj.dtype} is not plain data; use numeric "
                "arrays or a list of str"
            )
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ResultsFormatError(f"{where}: dict key {key!r} is not a str")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    hint = " (convert tensors with .detach().cpu().numpy())" if type(obj).__module__.startswith("torch") else ""
    raise ResultsFormatError(
        f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not plain python/numpy data{hint}"
    )


def _check_v1_step(record, where: str) -> int:
    """Validate one v1 step record; returns its row count B."""
    if not isinstance(record, dict):
        raise ResultsFormatError(f"{where}: step record must be a dict, got {type(record).__name__}")
    missing = [k for k in (*_V1_SCALAR_INT, *_V1_SCALAR_FLOAT, *_V1_FLOAT_ARRAYS, *_V1_INT_ARRAYS, "domain")
               if k not in record]
    if missing:
        raise ResultsFormatError(f"{where}: step record lacks {missing}")
    for key in _V1_SCALAR_INT:
        if isinstance(record[key], (bool, np.bool_)) or not isinstance(record[key], (int, np.integer)):
            raise ResultsFormatError(f"{where}: '{key}' must be an int, got {record[key]!r}")
    for key in _V1_SCALAR_FLOAT:
        if not isinstance(record[key], (int, float, np.integer, np.floating)):
            raise ResultsFormatError(f"{where}: '{key}' must be a float, got {record[key]!r}")
    n_rows = None
    for key in (*_V1_FLOAT_ARRAYS, *_V1_INT_ARRAYS):
        value = record[key]
        kinds = "f" if key in _V1_FLOAT_ARRAYS else "iu"
        if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in kinds:
            got = f"{type(value).__name__} {getattr(value, 'dtype', '')} {getattr(value, 'shape', '')}"
            want = "float" if kinds == "f" else "integer"
            raise ResultsFormatError(f"{where}: '{key}' must be a 1-D numpy {want} array, got {got}")
        if n_rows is None:
            n_rows = len(value)
        elif len(value) != n_rows:
            raise ResultsFormatError(f"{where}: '{key}' has {len(value)} rows, expected {n_rows}")
    domain = record["domain"]
    if isinstance(domain, np.ndarray):
        domain = domain.tolist()
    if not isinstance(domain, (list, tuple)) or not all(isinstance(d, str) for d in domain):
        raise ResultsFormatError(f"{where}: 'domain' must be a list of str")
    if len(domain) != n_rows:
        raise ResultsFormatError(f"{where}: 'domain' has {len(domain)} rows, expected {n_rows}")
    for key in OPTIONAL_COLUMNS:
        value = record.get(key)
        if value is not None and (not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind != "f"
                                  or len(value) != n_rows):
            raise ResultsFormatError(f"{where}: '{key}' must be a 1-D float array of {n_rows} rows")
    per_layer = record.get("per_layer")
    if per_layer is not None:
        if not isinstance(per_layer, dict):
            raise ResultsFormatError(f"{where}: 'per_layer' must be a dict of param name -> array")
        for name, value in per_layer.items():
            if (not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind != "f"
                    or len(value) != n_rows):
                raise ResultsFormatError(
                    f"{where}: per_layer[{name!r}] must be a 1-D float array of {n_rows} rows"
                )
    return n_rows


def validate_payload(payload, where: str = "payload") -> None:
    """Raise ResultsFormatError unless payload is a valid dot-product file body."""
    if not isinstance(payload, dict):
        raise ResultsFormatError(f"{where}: expected a dict, got {type(payload).__name__}")
    if payload.get("schema") != SCHEMA_NAME:
        raise ResultsFormatError(f"{where}: 'schema' is {payload.get('schema')!r}, expected {SCHEMA_NAME!r}")
    version = payload.get("schema_version")
    if version != 1:
        raise ResultsFormatError(
            f"{where}: schema_version {version!r} is not supported (this code reads 1..{SCHEMA_VERSION}); "
            "upgrade the package that reads it"
        )
    if not isinstance(payload.get("run_name"), str):
        raise ResultsFormatError(f"{where}: 'run_name' must be a str")
    _check_identity_fields(payload, where)
    world_size = payload.get("world_size")
    if isinstance(world_size, bool) or not isinstance(world_size, (int, np.integer)) or world_size < 1:
        raise ResultsFormatError(f"{where}: 'world_size' must be a positive int, got {world_size!r}")
    value = payload.get("value", "first_order")
    if value not in VALUES:
        raise ResultsFormatError(f"{where}: 'value' is {value!r}, expected one of {VALUES}")
    steps = payload.get("steps")
    if not isinstance(steps, (list, tuple)):
        raise ResultsFormatError(f"{where}: 'steps' must be a list of step records")
    for i, record in enumerate(steps):
        _check_v1_step(record, f"{where} steps[{i}]")


def _stamp(payload, where: str):
    """Check a payload and give it its digests: (the payload with content_sha256 and per_layer_sha256, its
    columns per_layer ones included). A payload that already carries digests (a file read back, e.g. by
    `python -m ghost_results convert`) must match them."""
    _check_plain(payload, where)
    validate_payload(payload, where)
    columns = _records_to_columns(payload["steps"], per_layer=True)
    digests = content_digests(_identity(payload), columns)
    carried = tuple(payload.get(key) for key in DIGEST_KEYS)
    if carried != (None, None) and carried != digests:
        raise ResultsFormatError(f"{where}: the payload's content hash does not match its content: it was damaged, "
                                 f"or edited after it was read; remove {' and '.join(DIGEST_KEYS)} from it to "
                                 "write it with new digests")
    return dict(payload, **dict(zip(DIGEST_KEYS, digests))), columns


def save_dotprod_pickle(path, payload) -> None:
    """Validate and atomically write one dot-product file, with its content digests (module docstring).

    ghost_common.durable.write_atomically: a reader sees the old file or the complete new one, never a
    partial one, and the new one survives a crash once this returns.
    """
    path = os.fspath(path)
    _write_pickle(path, *_stamp(payload, path))


def save_dotprod_parquet(path, payload) -> None:
    """Validate and atomically write one dot-product file's steps as a Parquet table (module docstring).

    The rows equal what `load_run` makes of the same payload written as a pickle, column for column and
    dtype for dtype, and the metadata carries the same content digests; the table is built in memory and
    written through write_atomically like the pickle.
    """
    path = os.fspath(path)
    _write_parquet(path, *_stamp(payload, path))


def _write_pickle(path: str, payload, columns=None) -> None:
    write_atomically(path, lambda f: pickle.dump(payload, f, protocol=4))


def _parquet_table(columns: dict, layer_columns: dict):
    """load_run's columns -> an Arrow table in the file layout: `domain` dictionary-encoded, per_layer/<name>
    columns named by `layer_columns` ({parameter name: column})."""
    arrays = {}
    for name, values in columns.items():
        if name == "domain":
            arrays[name] = pa.array(values.tolist(), type=pa.string()).dictionary_encode()
        elif name.startswith(PER_LAYER_PREFIX):
            arrays[layer_columns[name[len(PER_LAYER_PREFIX):]]] = pa.array(values)
        else:
            arrays[name] = pa.array(values)
    return pa.table(arrays)


def _parquet_writer(sink, schema):
    """The one way this package writes Parquet (step files and compacted files alike). Loading speed over size:
    floats stored plainly (a dictionary of distinct float32 values only makes them larger) with snappy (zstd saves
    ~5% on these values and reads ~3x slower); statistics of `step` and `domain` only (row groups skipped by a
    lazy scan's filter) and no Arrow schema copy, so that the footer of a file with ~150 per-layer columns stays
    small. A CRC on every page (pyarrow >= 15) names a damaged page before it is decoded."""
    checksums = {"write_page_checksum": True} if _PAGE_CHECKSUMS else {}
    return pq.ParquetWriter(sink, schema, compression="snappy", use_dictionary=["domain"],
                            write_statistics=["step", "domain"], store_schema=False, **checksums)


def _write_parquet(path: str, payload, columns) -> None:
    metadata = {"schema": payload["schema"], "schema_version": payload["schema_version"],
                "run_name": payload["run_name"], "world_size": int(payload["world_size"]),
                "value": payload.get("value", "first_order")}
    if payload.get(RUN_ID_KEY) is not None:
        metadata[RUN_ID_KEY] = payload[RUN_ID_KEY]
    metadata.update({key: payload[key] for key in DIGEST_KEYS})
    layer_columns = per_layer_column_names(name[len(PER_LAYER_PREFIX):] for name in columns
                                           if name.startswith(PER_LAYER_PREFIX))
    if layer_columns:
        metadata[PER_LAYER_COLUMNS_KEY] = {column: name for name, column in layer_columns.items()}
    table = _parquet_table(columns, layer_columns)
    sink = pa.BufferOutputStream()
    with _parquet_writer(sink, table.schema) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata({PARQUET_METADATA_KEY: json.dumps(metadata)})
    data = sink.getvalue()
    write_atomically(path, lambda f: f.write(memoryview(data)))


_WRITERS = {"pickle": _write_pickle, "parquet": _write_parquet}  # format -> writer of a stamped payload


def file_formats(results_format: str) -> tuple:
    """The file formats of a --results_format choice: "pickle", "parquet" or "both" (pickle and Parquet)."""
    if results_format == "both":
        return tuple(RESULTS_FORMATS)
    if results_format not in RESULTS_FORMATS:
        raise ValueError(f"results_format={results_format!r}: one of 'pickle', 'parquet', 'both'")
    return (results_format,)


def dotprod_file(run_dir, last_step, results_format="parquet"):
    return os.path.join(run_dir, DOTPROD_DIR, f"iter_{last_step:06d}{RESULTS_FORMATS[results_format]}")


def flush_dotprods(run_dir, run_name, world_size, pending, formats=("parquet",), value="first_order", run_id=None):
    """Write the pending step records (ascending steps) as iter_<last step>.pkl and/or .parquet (the same
    rows and the same content digests; `formats` from --results_format); empties `pending`. Returns the paths
    written. run_id: the run's identity (config.json's "run_id", `new_run_id()`), stored in every file;
    None writes files without one (a run started before run ids), which a run with an id does not merge."""
    if not pending:
        return []
    os.makedirs(os.path.join(run_dir, DOTPROD_DIR), exist_ok=True)
    payload = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "run_name": run_name,
               "world_size": world_size, "value": value, "steps": list(pending)}
    if run_id is not None:
        payload[RUN_ID_KEY] = run_id
    paths = [dotprod_file(run_dir, pending[-1]["step"], results_format) for results_format in formats]
    stamped, columns = _stamp(payload, paths[0] if paths else run_dir)
    for results_format, path in zip(formats, paths):
        _WRITERS[results_format](path, stamped, columns)
    pending.clear()
    return paths


def dotprod_steps_on_disk(run_dir):
    """Last steps of the run's iter_XXXXXX.pkl / .parquet files and compact_XXXXXX_YYYYYY.parquet files (YYYYYY),
    ascending, each once."""
    directory = os.path.join(run_dir, DOTPROD_DIR)
    if not os.path.isdir(directory):
        return []
    names = os.listdir(directory)
    return sorted({int(m.group(1)) for m in map(ITER_FILE.match, names) if m} |
                  {int(m.group(2)) for m in map(COMPACT_FILE.match, names) if m})


def split_log_lines(data, step):
    """training_log.jsonl's bytes -> (kept, later): the leading complete lines of steps <= `step`, and the
    rest from the first line that is later, torn (no newline: a kill in the middle of a write) or not JSON."""
    kept = 0
    for line in data.splitlines(keepends=True):
        try:
            record = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] > step:
            break
        kept += len(line)
    return data[:kept], data[kept:]


def set_aside_after(run_dir, step):
    """Move what a resumed run is about to redo, everything of steps after `step` (the checkpoint it resumes
    from), to superseded/<UTC time>/: the dot-product files (both formats), the kept checkpoints
    checkpoints/step_XXXXXX.pt, the sharded checkpoints checkpoints/step_XXXXXX.dcp/, the validation rows
    valset_from_step_XXXXXX.pkl first used after `step`, and the lines of
    training_log.jsonl (the file is cut after the last line of
    step <= `step`). A compacted file holding step files of later steps is moved whole, after the segments of
    the step files up to `step` are written durably as a compacted file of their own (a crash in between leaves
    both, whose common segments the loader reads once). Removes stray temporary files of interrupted writes.
    Nothing complete is deleted. Returns (moved names, destination or None); ResultsFormatError (with `.path`)
    before anything is moved if such a compacted file cannot be read up to `step`."""
    later = {}  # sub directory -> names of its files of steps after `step`
    for sub, patterns in STEP_FILES.items():
        directory = os.path.join(run_dir, sub)
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if ".tmp-" in name:  # a write that never completed (kill -9, full disk): no data in it
                os.remove(os.path.join(directory, name))
            elif any(p.match(name) and int(p.match(name).group(1)) > step for p in patterns):
                later.setdefault(sub, []).append(name)
    split = [path for path in _compacted_files(run_dir)
             if int(COMPACT_FILE.match(os.path.basename(path)).group(2)) > step]
    for path in split:
        later.setdefault(DOTPROD_DIR, []).append(os.path.basename(path))
    log_path = os.path.join(run_dir, TRAINING_LOG_JSONL)
    kept_lines, later_lines = b"", b""
    if os.path.exists(log_path):
        with open(log_path, "rb") as f:
            kept_lines, later_lines = split_log_lines(f.read(), step)
    if not later and not later_lines:
        return [], None
    destination = base = os.path.join(run_dir, "superseded", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    attempt = 1
    while os.path.exists(destination):  # two resumes within a second: the earlier one's files stay
        destination, attempt = f"{base}-{attempt}", attempt + 1
    moved = []
    for path in split:  # the segments up to `step` as a file of their own, durably, before anything is moved
        try:
            _rewrite_compacted(path, step)
        except ResultsFormatError as err:
            err.path = path
            raise
    for sub, names in later.items():
        os.makedirs(os.path.join(destination, sub), exist_ok=True)
        for name in sorted(names):
            os.replace(os.path.join(run_dir, sub, name), os.path.join(destination, sub, name))
            moved.append(name)
        fsync_directory(os.path.join(destination, sub))
        fsync_directory(os.path.join(run_dir, sub))
    if later_lines:
        # the copy first: a crash before the cut leaves the lines in both places, never in neither
        os.makedirs(destination, exist_ok=True)
        write_atomically(os.path.join(destination, TRAINING_LOG_JSONL), lambda f: f.write(later_lines))
        with open(log_path, "r+b") as f:
            f.truncate(len(kept_lines))
            os.fsync(f.fileno())
        moved.append(TRAINING_LOG_JSONL)
    return moved, destination


# ---------------------------------------------------------------------------
# Reading


@dataclass
class Run:
    """A run directory loaded into columns (one entry per training row)."""

    run_dir: str
    columns: dict  # name -> 1-D np.ndarray, all the same length, sorted by (step, sample_index)
    config: dict  # config.json, {} if absent
    files: list  # dot-product files that were read
    skipped: list  # [(path, reason)] for files that could not be read, failed their digest or are another run's
    missing_steps: list  # steps expected (config max_steps, gaps) but not found
    duplicate_steps: list  # steps seen in more than one file (one copy kept)
    schema_versions: dict = field(default_factory=dict)  # path -> schema_version
    run_id: str = None  # the identity files were merged by (config.json's "run_id"), None for a run without one
    unverified: list = field(default_factory=list)  # files read without a content digest (written before them)

    @property
    def num_rows(self) -> int:
        return len(self.columns["step"])

    @property
    def value(self) -> str:
        """The estimator the run's dot products hold (config.json's "value"; runs without it: first_order)."""
        return self.config.get("value", "first_order")

    def to_frame(self):
        """The columns as a pandas DataFrame (per-layer columns included); `.attrs` holds run_dir, config,
        files, skipped, missing_steps, duplicate_steps, run_id and unverified."""
        import pandas as pd

        frame = pd.DataFrame(self.columns)
        frame.attrs.update(run_dir=self.run_dir, config=self.config, files=self.files, skipped=self.skipped,
                           missing_steps=self.missing_steps, duplicate_steps=self.duplicate_steps,
                           run_id=self.run_id, unverified=self.unverified)
        return frame

    to_pandas = to_frame


class Columns(dict):
    """`load_dotprods`' result: a plain dict of columns plus `.skipped` / `.missing_steps`."""

    skipped: list
    missing_steps: list


@dataclass
class _Content:
    """What one file holds, decoded and checked against its digests (if it has them)."""

    version: int
    run_name: object
    run_id: object
    columns: dict
    repeated: set  # steps the file holds more than once (the later record kept)
    verified: bool  # False: written before content digests, read unchecked
    size: int  # bytes on disk
    source: str = None  # the step file's name without suffix (iter_000010), also for a segment of a compacted file
    digests: tuple = None  # (content_sha256, per_layer_sha256) the file carries; None: written before digests
    compacted: bool = False  # a segment of a compacted file
    header: dict = None  # the file's identity and digests (_header_of): what a compacted file records of it


@dataclass
class _RunIdentity:
    """Which files are the run's. run_id set: exactly the files carrying it (a run with an id writes it into
    every file, so a file without one is of unknown identity); run_id None (a run started before run ids):
    the files whose run_name is run_name. `source` says where it came from, for messages."""

    run_id: object
    run_name: object
    source: str

    def refusal(self, path: str, content: _Content):
        """None if the file is the run's, else the ResultsFormatError that names it and both identities."""
        if self.run_id is None:
            if self.run_name is None or content.run_name == self.run_name:
                return None
            return ResultsFormatError(f"{path}: written by run {content.run_name!r}, not {self.run_name!r}; files of "
                                      "another run are not merged")
        if content.run_id == self.run_id:
            return None
        if content.run_id is None:
            return ResultsFormatError(
                f"{path}: written by run {content.run_name!r} without a run_id, but this run ({self.run_name!r}, "
                f"run_id {self.run_id} from {self.source}) writes its id into every file: a file of unknown "
                "identity (another run's, or from before run ids) is not merged; remove it")
        return ResultsFormatError(
            f"{path}: written by run {content.run_name!r} with run_id {content.run_id}, not by this run "
            f"({self.run_name!r}, run_id {self.run_id} from {self.source}); files of another run are not merged; "
            "remove it")


def _config_identity(config: dict, config_path: str):
    """The run's identity from config.json: its "run_id" if it has one, else its "run_name"; None without
    either (the files decide, `_majority_identity`)."""
    run_id = config.get(RUN_ID_KEY)
    if run_id is not None:
        if not isinstance(run_id, str) or not run_id:
            raise ResultsFormatError(f"{config_path}: '{RUN_ID_KEY}' must be a non-empty str, got {run_id!r}; "
                                     "restore config.json")
        return _RunIdentity(run_id, config.get("run_name"), "config.json")
    if config.get("run_name"):
        return _RunIdentity(None, config["run_name"], "config.json")
    return None


def _majority_identity(contents: list) -> _RunIdentity:
    """Without config.json: the run_id most files carry (ties: the earliest file's), else the run_name most
    files carry."""
    ids = collections.Counter(content.run_id for content in contents if content.run_id is not None)
    if ids:
        run_id = ids.most_common(1)[0][0]
        name = collections.Counter(c.run_name for c in contents if c.run_id == run_id).most_common(1)[0][0]
        return _RunIdentity(run_id, name, "the files (no config.json): the id most of them carry")
    names = collections.Counter(content.run_name for content in contents)
    return _RunIdentity(None, names.most_common(1)[0][0] if names else None, "the files")


def _dotprod_files(run_dir: str) -> list:
    """[(last step, [paths])] in step order; per step the Parquet file first, then the pickle."""
    directory = os.path.join(run_dir, DOTPROD_DIR)
    by_step = collections.defaultdict(list)
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        match = ITER_FILE.match(name)
        if match:
            by_step[int(match.group(1))].append(os.path.join(directory, name))
    return [(step, sorted(paths, key=lambda p: not p.endswith(".parquet"))) for step, paths in sorted(by_step.items())]


def _compacted_files(run_dir: str) -> list:
    """grad_dotprods/compact_<first>_<last>.parquet paths, by (first, last) step."""
    directory = os.path.join(run_dir, DOTPROD_DIR)
    found = [(tuple(map(int, m.groups())), name) for name in (os.listdir(directory) if os.path.isdir(directory)
                                                                else []) for m in [COMPACT_FILE.match(name)] if m]
    return [os.path.join(directory, name) for _, name in sorted(found)]


def _read_iteration(paths: list, per_layer: bool, identity, read=None) -> list:
    """Read one iteration's files in order (Parquet first) until one is readable, intact and, if `identity` is
    given, the run's: a damaged or foreign file gives way to its twin in the other format.
    [(path, _Content, or the ResultsFormatError that refused it)]; `read`: {path: result} of an earlier pass."""
    attempt = []
    for path in paths:
        result = (read or {}).get(path)
        if result is None:
            try:
                result = _read_file(path, per_layer)
            except ResultsFormatError as err:
                result = err
        if isinstance(result, _Content) and identity is not None:
            result = identity.refusal(path, result) or result
        attempt.append((path, result))
        if isinstance(result, _Content):
            break
    return attempt


def _read_file(path: str, per_layer: bool) -> _Content:
    """Load, validate and verify one file (its digests, if it has them)."""
    if path.endswith(".parquet"):
        return _read_parquet(path, per_layer)
    try:
        size = os.path.getsize(path)
        payload = safe_load_pickle(path)
    except UnsafePickleError:
        raise
    except Exception as err:  # truncated/corrupt pickles raise many types (EOFError, UnpicklingError, ...)
        raise ResultsFormatError(f"{path}: cannot unpickle ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("schema") != SCHEMA_NAME:
        raise ResultsFormatError(f"{path}: not a dot-product file (no schema {SCHEMA_NAME!r})")
    version = payload.get("schema_version")
    reader = _READERS.get(version)
    if reader is None:
        raise ResultsFormatError(
            f"{path}: schema_version {version!r} is unknown to this reader (knows {sorted(_READERS)}); "
            "upgrade the package or load the run with the version that wrote it"
        )
    records = reader(payload, path)
    rows = sum(len(record["dot_products"]) for record in records)
    _check_domain_size(path, rows, max((len(d) for r in records for d in r["domain"]), default=0), size)
    columns = _records_to_columns(records, per_layer)
    verified = _verify(path, payload, columns, per_layer)
    by_step, repeated = {}, set()
    for record in records:
        step = int(record["step"])
        if step in by_step:
            repeated.add(step)
        by_step[step] = record  # the later record of a step wins
    if repeated:
        columns = _records_to_columns(list(by_step.values()), per_layer)
    return _Content(version, payload.get("run_name"), payload.get(RUN_ID_KEY), columns, repeated, verified, size,
                    source=_source_of(path), digests=_digests_of(payload), header=_header_of(payload))


def file_header(path) -> dict:
    """A dot-product file's identity and digests without its rows: schema, schema_version, run_name, run_id (if
    any), world_size, value, content_sha256 and per_layer_sha256 (if any) from a pickle's payload (the pickle is
    unpickled, restricted, but its rows are not checked) or a Parquet file's metadata (its footer alone is read).
    ResultsFormatError naming the file if it has none."""
    path = os.fspath(path)
    try:
        if path.endswith(".parquet"):
            header = json.loads((pq.read_schema(path).metadata or {}).get(PARQUET_METADATA_KEY.encode(), b"null"))
        else:
            header = safe_load_pickle(path)
    except UnsafePickleError:
        raise
    except Exception as err:  # truncated or corrupt: pyarrow and the unpickler raise many types
        raise ResultsFormatError(f"{path}: cannot read its header ({type(err).__name__}: {err})") from err
    if not isinstance(header, dict) or header.get("schema") != SCHEMA_NAME:
        raise ResultsFormatError(f"{path}: not a dot-product file (no schema {SCHEMA_NAME!r})")
    return {key: value for key, value in header.items() if key != "steps"}


def load_dotprod_pickle(path):
    """One dot-product pickle, read with `safe_load_pickle` and checked: its schema, and its content digests if
    it has them (all columns, per-layer ones included). Returns the payload, run_id and digests included;
    raises ResultsFormatError naming the file if it is damaged or off-schema."""
    path = os.fspath(path)
    try:
        payload = safe_load_pickle(path)
    except UnsafePickleError:
        raise
    except Exception as err:  # truncated/corrupt pickles raise many types (EOFError, UnpicklingError, ...)
        raise ResultsFormatError(f"{path}: cannot unpickle ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("schema_version") not in _READERS:
        raise ResultsFormatError(f"{path}: not a dot-product file of a schema_version this reader knows "
                                 f"({sorted(_READERS)})")
    records = _READERS[payload["schema_version"]](payload, path)
    _verify(path, payload, _records_to_columns(records, per_layer=True), per_layer=True)
    return payload


def _read_v1(payload, path: str) -> list:
    validate_payload(payload, path)
    return list(payload["steps"])


# schema_version -> reader returning step records in the current (v1) field layout.
# A future v2 adds its reader here and converts to the newest layout.
_READERS = {1: _read_v1}


_ARROW_KINDS = {np.int64: pa.types.is_integer, np.float64: pa.types.is_floating, np.float32: pa.types.is_floating,
                np.str_: pa.types.is_string}  # column dtype -> test of the Arrow type that may hold it


def _check_domain_size(path: str, rows: int, longest: int, size: int) -> None:
    """Refuse, before building it, a `domain` column whose fixed-width strings (rows x longest label x 4 bytes)
    would be far larger than the file that holds it (one long label repeated on every row)."""
    needed = rows * longest * 4
    if needed > max(_DOMAIN_FLOOR, _DOMAIN_PER_BYTE * size):
        raise ResultsFormatError(
            f"{path}: its domain column would take {needed:,} bytes as fixed-width strings ({rows:,} rows x a label "
            f"of {longest:,} characters), far more than its {size:,} bytes can honestly hold; not a file this "
            "package wrote: remove it")


def _check_parquet_footer(path: str, metadata, schema, size: int) -> None:
    """Refuse a Parquet file whose footer declares more rows than its bytes can hold, before any data is read.

    This package's writer stores numbers PLAIN, so a row group of n rows holds at least n x (the byte widths of
    the required number columns, 72 bytes) uncompressed, and snappy inflates at most _PARQUET_MAX_RATIO-fold, so
    the row groups' uncompressed bytes together are at most _PARQUET_MAX_RATIO x the bytes outside the footer.
    Arrow decodes a row group's declared row count and no more, so no column can yield more than ~0.3 rows per
    byte of the file, however its pages are encoded. Only the footer's file- and row-group-level fields are
    read: pyarrow aborts the process on some damaged column-chunk metadata when Python asks for it, where its
    readers raise an error instead.
    """
    def refuse(why):
        raise ResultsFormatError(f"{path}: its Parquet footer {why}: more than the file can hold as this package "
                                 "writes it (numbers stored plainly, snappy); damaged or not written by this "
                                 "package: remove it (the same steps in iter_XXXXXX.pkl are read if there)")

    if metadata.num_columns != len(schema):  # leaf columns = top-level fields: flat, as this package writes
        refuse(f"declares {metadata.num_columns} leaf columns for {len(schema)} fields (nested columns)")
    row_bytes = 0  # uncompressed bytes a row takes at least: the widths of the required number columns (72)
    for name in COLUMN_DTYPES:
        kind = schema.field(name).type
        kind = kind.value_type if pa.types.is_dictionary(kind) else kind
        row_bytes += kind.bit_width // 8 if pa.types.is_integer(kind) or pa.types.is_floating(kind) else 0
    groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
    declared = sum(group.num_rows for group in groups)
    if declared != metadata.num_rows:
        refuse(f"declares {metadata.num_rows:,} rows but its row groups {declared:,}")
    for i, group in enumerate(groups):
        if group.num_rows < 0 or group.num_rows * row_bytes > group.total_byte_size:
            refuse(f"declares {group.num_rows:,} rows in row group {i}, which take at least "
                   f"{group.num_rows * row_bytes:,} bytes ({row_bytes} a row), in {group.total_byte_size:,} bytes")
    data_bytes = size - metadata.serialized_size - 12  # "PAR1", footer, its length, "PAR1"
    uncompressed = sum(group.total_byte_size for group in groups)
    if uncompressed > _PARQUET_MAX_RATIO * max(data_bytes, 0) + _PARQUET_SLACK:
        refuse(f"declares {uncompressed:,} bytes of column data, more than {_PARQUET_MAX_RATIO} times the "
               f"{max(data_bytes, 0):,} bytes outside its footer")


def _domain_column(path: str, column, size: int) -> np.ndarray:
    """The Arrow `domain` column (dictionary-encoded or plain strings) -> numpy str array, its size bounded
    (`_check_domain_size`) before it is built."""
    parts = []  # (labels, indices into them or None)
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type):
            parts.append((chunk.dictionary.cast(pa.string()).to_pylist(),
                          chunk.indices.to_numpy(zero_copy_only=False).astype(np.intp)))
        else:  # plain strings: every row stored, so no more than the file holds (x snappy's ratio)
            parts.append((chunk.cast(pa.string()).to_pylist(), None))
    longest = max((len(label) for labels, _ in parts for label in labels), default=0)
    _check_domain_size(path, len(column), longest, size)
    arrays = [np.asarray(labels, dtype=str)[indices] if indices is not None and labels
              else np.zeros(len(indices), dtype="<U1") if indices is not None
              else np.asarray(labels, dtype=str) for labels, indices in parts]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype="<U1")


def _open_parquet(path: str):
    """(ParquetFile with page CRC checks, its Arrow schema, its "graddotprod" metadata dict, its size), the
    metadata's schema, version and identity fields checked; ResultsFormatError naming the file otherwise."""
    checksums = {"page_checksum_verification": True} if _PAGE_CHECKSUMS else {}
    try:
        size = os.path.getsize(path)
        file = pq.ParquetFile(path, **checksums)
        schema = file.schema_arrow
        metadata = json.loads((schema.metadata or {}).get(PARQUET_METADATA_KEY.encode(), b"null"))
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ResultsFormatError(f"{path}: cannot read Parquet ({type(err).__name__}: {err})") from err
    if not isinstance(metadata, dict) or metadata.get("schema") != SCHEMA_NAME:
        raise ResultsFormatError(f"{path}: not a dot-product file (no schema {SCHEMA_NAME!r} in its metadata)")
    version = metadata.get("schema_version")
    if version not in _READERS:
        raise ResultsFormatError(
            f"{path}: schema_version {version!r} is unknown to this reader (knows {sorted(_READERS)}); "
            "upgrade the package or load the run with the version that wrote it"
        )
    _check_identity_fields(metadata, path)
    return file, schema, metadata, size


def _columns_to_read(path: str, schema, metadata: dict, per_layer: bool):
    """(the file's columns to read, {its per-parameter column: per_layer/<parameter>}): load_run's columns, the
    optional ones it has and, with per_layer, its per-parameter ones; every column's Arrow type checked before
    anything is read (a column of another type would not be bounded as a number column is)."""
    in_file = schema.names
    unique = set(in_file)
    missing = [name for name in COLUMN_DTYPES if name not in unique]
    if missing:
        raise ResultsFormatError(f"{path}: lacks the columns {missing}")
    if len(unique) != len(in_file):
        repeated = sorted(name for name, n in collections.Counter(in_file).items() if n > 1)
        raise ResultsFormatError(f"{path}: has the columns {repeated} more than once; the file is damaged")
    layer_names = _layer_names_of(path, metadata, in_file)
    names = list(COLUMN_DTYPES) + [n for n in OPTIONAL_COLUMNS if n in unique] + \
        ([n for n in in_file if n in layer_names] if per_layer else [])
    for name in names:
        dtype = COLUMN_DTYPES.get(name, OPTIONAL_COLUMNS.get(name, np.float32))
        arrow_type = schema.field(name).type
        if not _ARROW_KINDS[dtype](arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type):
            raise ResultsFormatError(f"{path}: column {name!r} must be {np.dtype(dtype).name}, got {arrow_type}")
    return names, layer_names


def _decode(path: str, table, names: list, layer_names: dict, size: int) -> dict:
    """An Arrow table read from a file -> load_run's numpy columns (per_layer/<parameter> names), no nulls."""
    columns = {}
    for name in names:
        column = table.column(name)
        dtype = COLUMN_DTYPES.get(name, OPTIONAL_COLUMNS.get(name, np.float32))
        kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        if column.null_count or not _ARROW_KINDS[dtype](kind):
            raise ResultsFormatError(f"{path}: column {name!r} must be {np.dtype(dtype).name} without nulls, got "
                                     f"{column.type} with {column.null_count} null(s)")
        if dtype is np.str_:
            columns[name] = _domain_column(path, column, size)
        else:
            columns[layer_names.get(name, name)] = column.to_numpy().astype(dtype, copy=False)
    return columns


def _read_error(path: str, err) -> ResultsFormatError:
    damaged = ": page checksum mismatch, the file is damaged" if "CRC" in str(err) else ""
    return ResultsFormatError(f"{path}: cannot read Parquet{damaged} ({type(err).__name__}: {err})")


def _read_parquet(path: str, per_layer: bool) -> _Content:
    """A Parquet dot-product file -> its _Content (its footer checked against its size first, every page's
    CRC and then its content digests checked); only the per-layer columns are left unread when not asked for."""
    file, schema, metadata, size = _open_parquet(path)
    if metadata.get("kind") is not None:
        raise ResultsFormatError(f"{path}: a {metadata.get('kind')!r} file named as a step file; the file was "
                                 f"renamed or damaged")
    names, layer_names = _columns_to_read(path, schema, metadata, per_layer)
    try:
        _check_parquet_footer(path, file.metadata, schema, size)
        table = file.read(columns=names, use_threads=False)  # small files: threads cost more than they save
    except (pa.ArrowException, OSError) as err:
        raise _read_error(path, err) from err
    columns = _decode(path, table, names, layer_names, size)
    verified = _verify(path, metadata, columns, per_layer)
    return _Content(version=metadata["schema_version"], run_name=metadata.get("run_name"),
                    run_id=metadata.get(RUN_ID_KEY), columns=columns, repeated=set(), verified=verified, size=size,
                    source=_source_of(path), digests=_digests_of(metadata), header=_header_of(metadata))


def _source_of(path: str) -> str:
    """A step file's name without its suffix (iter_000010): what a compacted file records as a segment's source."""
    return os.path.basename(path).rsplit(".", 1)[0]


def _header_of(header) -> dict:
    """A file's identity fields and digests (schema_version, run_name, run_id, world_size, value, content_sha256,
    per_layer_sha256), as a compacted file records them for each step file it holds."""
    kept = {key: header.get(key) for key in _SEGMENT_IDENTITY + DIGEST_KEYS}
    if isinstance(kept["world_size"], np.integer):
        kept["world_size"] = int(kept["world_size"])
    kept["value"] = kept["value"] or "first_order"
    return kept


def _digests_of(header) -> tuple:
    digests = tuple(header.get(key) for key in DIGEST_KEYS)
    return None if digests == (None, None) else digests


# ---------------------------------------------------------------------------
# Compacted files: many step files in one


COMPACT_FILE = re.compile(r"^compact_(\d+)_(\d+)\.parquet$")  # grad_dotprods/compact_<first step>_<last step>.parquet
COMPACT_KIND = "compacted"
_SEGMENT_IDENTITY = ("schema_version", "run_name", RUN_ID_KEY, "world_size", "value")


def compacted_name(first_step: int, last_step: int) -> str:
    return f"compact_{first_step:06d}_{last_step:06d}.parquet"


def write_compacted(directory, segments, layer_names, first_order, row_group_rows=65536) -> tuple:
    """Write step files' contents as one compacted file in `directory`, durably (temporary file, fsync, rename,
    fsync of the directory; named compact_<first step>_<last step>.parquet once written). `segments` yields
    (source, header, columns): a step file's name without suffix (iter_000010), its identity and digests
    (`file_header`), and its columns as read and verified (`read_run`'s names). Each segment's rows are stored
    as they were, in their order, whole in one row group; a row group closes once it holds row_group_rows rows
    or more. `layer_names`: every parameter a segment may have; `first_order`: whether one may have
    first_order_dot_products (columns a segment lacks are NaN in its rows, and it records which it has).
    Returns (path, [segment records]); (None, []) when `segments` yields nothing."""
    layer_columns = per_layer_column_names(layer_names)
    order = list(COLUMN_DTYPES) + ([FIRST_ORDER_COLUMN] if first_order else []) + \
        [PER_LAYER_PREFIX + name for name in sorted(layer_columns)]
    records, layer_sets, buffered, opened = [], [], [], []  # opened: the ParquetWriter, once the first segment came

    def flush(writer):
        if not buffered:
            return
        n = sum(len(columns["step"]) for _, columns in buffered)
        full = {}
        for name in order:
            dtype = np.float32 if name not in COLUMN_DTYPES else COLUMN_DTYPES[name]
            full[name] = np.concatenate([columns[name] if name in columns else np.full(len(columns["step"]), np.nan,
                                                                                      dtype=np.float32)
                                         for _, columns in buffered]) if dtype is not np.str_ else \
                np.concatenate([columns[name] for _, columns in buffered])
        table = _parquet_table(full, layer_columns)
        writer.write_table(table, row_group_size=n)
        buffered.clear()

    def write(f):
        try:
            return write_segments(f)
        except BaseException:
            if opened and opened[0].is_open:
                opened[0].close()  # into the temporary file, removed next
            raise

    def write_segments(f):
        group = rows = 0
        for source, header, columns in segments:
            if set(columns) - set(order):
                raise ValueError(f"{source}: columns {sorted(set(columns) - set(order))} outside the layout given")
            if not opened:
                opened.append(_parquet_writer(f, _parquet_table(
                    {name: np.zeros(0, dtype=COLUMN_DTYPES.get(name, np.float32)) for name in order},
                    layer_columns).schema))
            writer = opened[0]
            n = len(columns["step"])
            steps = (int(columns["step"].min()), int(columns["step"].max())) if n else (_source_step(source),) * 2
            layers = sorted(name[len(PER_LAYER_PREFIX):] for name in columns if name.startswith(PER_LAYER_PREFIX))
            if layers and layers not in layer_sets:
                layer_sets.append(layers)
            records.append({"source": source, "rows": n, "first_step": steps[0], "last_step": steps[1],
                            "row_group": group,
                            **{key: header.get(key) for key in _SEGMENT_IDENTITY},
                            **{key: header[key] for key in DIGEST_KEYS},
                            "layers": layer_sets.index(layers) if layers else None,
                            "first_order": FIRST_ORDER_COLUMN in columns})
            records[-1]["value"] = records[-1]["value"] or "first_order"
            buffered.append((source, columns))
            rows += n
            if rows >= row_group_rows:
                flush(writer)
                group, rows = group + 1, 0
        if not opened:
            raise _NothingToWrite
        writer = opened[0]
        flush(writer)
        last = records[-1]
        first_step = min(r["first_step"] for r in records)
        last_step = max(r["last_step"] for r in records)
        metadata = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "kind": COMPACT_KIND,
                    "run_name": last["run_name"], "world_size": last["world_size"], "value": last["value"],
                    "first_step": first_step, "last_step": last_step,
                    PER_LAYER_COLUMNS_KEY: {column: name for name, column in layer_columns.items()},
                    "layer_sets": layer_sets, "segments": records}
        run_ids = {r[RUN_ID_KEY] for r in records}
        if len(run_ids) == 1 and last[RUN_ID_KEY] is not None:
            metadata[RUN_ID_KEY] = last[RUN_ID_KEY]
        writer.add_key_value_metadata({PARQUET_METADATA_KEY: json.dumps(metadata)})
        writer.close()
        return compacted_name(first_step, last_step)

    try:
        return write_atomically_named(os.fspath(directory), "compact", write), records
    except _NothingToWrite:  # the temporary file is removed
        return None, []


class _NothingToWrite(Exception):
    """write_compacted's segments were none."""


def _compacted_metadata(path: str, file, metadata: dict) -> list:
    """A compacted file's segment records, checked against each other, its row groups and its name; the file's
    ResultsFormatError otherwise."""
    def refuse(why):
        raise ResultsFormatError(f"{path}: {why}; the compacted file is damaged or was altered: restore it from a "
                                 "copy, or remove it (its steps are lost with it)")

    if metadata.get("kind") != COMPACT_KIND:
        refuse(f"its metadata's kind is {metadata.get('kind')!r}, not {COMPACT_KIND!r}")
    segments, layer_sets = metadata.get("segments"), metadata.get("layer_sets")
    if not isinstance(segments, list) or not segments or not isinstance(layer_sets, list) or not all(
            isinstance(names, list) and all(isinstance(n, str) for n in names) for names in layer_sets):
        refuse("its metadata lacks a list of segments or of layer sets")
    groups = [file.metadata.row_group(i).num_rows for i in range(file.metadata.num_row_groups)]
    held = [0] * len(groups)
    for i, segment in enumerate(segments):
        ok = isinstance(segment, dict) and isinstance(segment.get("source"), str) and \
            ITER_FILE.match(segment["source"] + ".parquet") is not None and all(
                isinstance(segment.get(key), int) and not isinstance(segment.get(key), bool)
                for key in ("rows", "first_step", "last_step", "row_group")) and \
            isinstance(segment.get("first_order"), bool) and \
            (segment.get("layers") is None or (isinstance(segment["layers"], int) and
                                               0 <= segment["layers"] < len(layer_sets)))
        if not ok or not 0 <= segment["row_group"] < len(groups) or segment["rows"] < 0:
            refuse(f"segment {i} of its metadata is malformed")
        if segment.get("schema_version") not in _READERS:
            refuse(f"segment {i} has schema_version {segment.get('schema_version')!r}, unknown to this reader")
        _check_identity_fields(segment, f"{path} segment {i}")
        if _digests_of(segment) is None:
            refuse(f"segment {i} ({segment['source']}) carries no content digest, which compaction never writes")
        if i and (segment["row_group"] < segments[i - 1]["row_group"] or
                  _source_step(segment["source"]) <= _source_step(segments[i - 1]["source"])):
            refuse("its segments are out of order")
        held[segment["row_group"]] += segment["rows"]
    if held != groups:
        refuse(f"its segments hold {held} rows per row group, its row groups {groups}")
    match = COMPACT_FILE.match(os.path.basename(path))
    steps = (min(s["first_step"] for s in segments), max(s["last_step"] for s in segments))
    if match is None or (int(match.group(1)), int(match.group(2))) != steps:
        refuse(f"its segments hold steps {steps[0]}..{steps[1]}, its name says otherwise")
    return segments


def read_compacted(path, per_layer: bool = False) -> list:
    """A compacted file -> [(path, _Content or the ResultsFormatError that refuses it)], one per segment (the
    step file it was made of), in order. Every page's CRC is checked as it is read (row group by row group: a
    damaged row group costs its own segments), then every segment's digests, as the step file's were. A damaged
    footer or metadata refuses the file whole (one entry)."""
    return list(iter_compacted(path, per_layer))


def iter_compacted(path, per_layer: bool = False, up_to_step=None):
    """`read_compacted` one row group at a time (a generator); up_to_step: only the segments of step files
    up to that step (iter_XXXXXX with XXXXXX <= it), the row groups after them left unread."""
    path = os.fspath(path)
    try:
        file, schema, metadata, size = _open_parquet(path)
        segments = _compacted_metadata(path, file, metadata)
        names, layer_names = _columns_to_read(path, schema, metadata, per_layer)
        _check_parquet_footer(path, file.metadata, schema, size)
    except ResultsFormatError as err:
        yield path, err
        return
    layer_sets = metadata["layer_sets"]
    total = sum(segment["rows"] for segment in segments)  # a segment's share of the file's bytes: by its rows
    if up_to_step is not None:
        segments = [segment for segment in segments if _source_step(segment["source"]) <= up_to_step]
    for group in sorted({segment["row_group"] for segment in segments}):
        results = []
        members = [segment for segment in segments if segment["row_group"] == group]
        try:
            table = file.read_row_group(group, columns=names, use_threads=False)
            columns = _decode(path, table, names, layer_names, size)
        except (pa.ArrowException, OSError) as err:
            error = _read_error(f"{path} row group {group}", err)
            yield from [(path, ResultsFormatError(f"{error} (steps {s['first_step']}..{s['last_step']}, from "
                                                  f"{s['source']})")) for s in members]
            continue
        except ResultsFormatError as err:
            yield from [(path, err)] * len(members)
            continue
        start = 0
        for segment in members:
            rows = slice(start, start + segment["rows"])
            start = rows.stop
            label = f"{path} (steps {segment['first_step']}..{segment['last_step']}, from {segment['source']})"
            wanted = list(COLUMN_DTYPES) + ([FIRST_ORDER_COLUMN] if segment["first_order"] else [])
            if per_layer and segment["layers"] is not None:
                wanted += [PER_LAYER_PREFIX + name for name in layer_sets[segment["layers"]]]
            absent = [name for name in wanted if name not in columns]
            if absent:
                results.append((path, ResultsFormatError(f"{label}: lacks the columns {absent}; the file is damaged")))
                continue
            part = {name: columns[name][rows] for name in wanted}
            header = dict({key: segment.get(key) for key in _SEGMENT_IDENTITY + DIGEST_KEYS}, schema=SCHEMA_NAME)
            steps = part["step"]
            try:
                if len(steps) and (steps.min(), steps.max()) != (segment["first_step"], segment["last_step"]):
                    raise ResultsFormatError(f"{label}: holds steps {steps.min()}..{steps.max()}; the file is damaged")
                _verify(label, header, part, per_layer, _COMPACTED_REMEDY)
            except ResultsFormatError as err:
                results.append((path, err))
                continue
            results.append((path, _Content(
                version=segment["schema_version"], run_name=segment.get("run_name"), run_id=segment.get(RUN_ID_KEY),
                columns=part, repeated=set(), verified=True, size=size * segment["rows"] // max(total, 1),
                source=segment["source"], digests=_digests_of(segment), compacted=True,
                header=_header_of(header))))
        yield from results


def _rewrite_compacted(path: str, step: int):
    """Write the segments of a compacted file's step files up to `step`, read and verified, as a compacted file
    of their own (row groups of about the original's rows); nothing if it has none. Returns the path or None;
    ResultsFormatError if a segment up to `step` is unreadable or damaged (nothing written)."""
    segments = compacted_segments(path)
    kept = [segment for segment in segments if _source_step(segment["source"]) <= step]
    if not kept:
        return None
    _, schema, metadata, _ = _open_parquet(path)
    layer_names = _layer_names_of(path, metadata, schema.names)
    first_order = FIRST_ORDER_COLUMN in schema.names
    groups = collections.Counter(segment["row_group"] for segment in kept)

    def contents():
        for _, content in iter_compacted(path, per_layer=True, up_to_step=step):
            if isinstance(content, ResultsFormatError):
                raise content
            yield content.source, content.header, content.columns

    rows = max(sum(s["rows"] for s in kept if s["row_group"] == group) for group in groups)
    written, _ = write_compacted(os.path.dirname(path), contents(), [name[len(PER_LAYER_PREFIX):] for name in
                                                                    layer_names.values()], first_order,
                                 row_group_rows=rows)
    return written


def _source_step(source: str) -> int:
    """iter_000010 -> 10: the last step of a step file, by its name."""
    return int(source[len("iter_"):])


def compacted_segments(path) -> list:
    """A compacted file's segment records from its footer alone (source, rows, first_step, last_step, identity,
    digests, ...); ResultsFormatError naming the file if its footer or metadata is damaged."""
    path = os.fspath(path)
    file, _, metadata, _ = _open_parquet(path)
    return _compacted_metadata(path, file, metadata)


def _expected_steps(config: dict, seen_steps: list) -> list:
    """Steps a complete run would have: training counts steps from 1, so with
    config.json's max_steps that is 1..max_steps; without it, 1..the last step seen."""
    max_steps = config.get("max_steps")
    if isinstance(max_steps, int) and not isinstance(max_steps, bool):
        return list(range(1, max(max_steps, max(seen_steps, default=0)) + 1))
    if not seen_steps:
        return []
    return list(range(1, max(seen_steps) + 1))  # steps count from 1; the end is unknown without config.json


def load_run(run_dir, per_layer: bool = False, strict: bool = False, as_frame: bool = True):
    """A run's dot products as a pandas DataFrame, one row per training row (see `read_run`); `.attrs` holds
    run_dir, config, files, skipped, missing_steps, duplicate_steps, run_id and unverified. as_frame=False:
    the `Run` itself."""
    run = read_run(run_dir, per_layer=per_layer, strict=strict)
    return run.to_frame() if as_frame else run


def read_run(run_dir, per_layer: bool = False, strict: bool = False) -> Run:
    """Merge every `grad_dotprods/iter_*` file of a run into columns (numpy arrays): a `Run`.

    For every iteration the Parquet file is read if there is one (per-layer columns only when
    per_layer=True), else the pickle; the other format of the same steps whenever the first file read is
    unreadable, damaged (its content digests or page CRCs do not match what was decoded, its footer declares
    more than the file can hold) or another run's. Compacted files (compact_XXXXXX_YYYYYY.parquet) are read
    with them, segment by segment, each verified and matched to the run as its step file was; a step file and a
    segment made from it are one copy when their digests are equal, else the step file is refused. Which files
    are the run's:
      - config.json has "run_id": exactly the files carrying that run_id, whatever their run_name (a renamed
        run keeps its files); a file with another run_id, or with none, is refused;
      - config.json without "run_id" (a run started before run ids): the files whose run_name is config.json's;
      - no config.json: the run_id most files carry (then as above), else the run_name most files carry.
    Files written before content digests are read unverified (listed in `Run.unverified`).
    strict=False skips unreadable/damaged/unknown-version/foreign files with a warning naming them and
    lists them in `Run.skipped`; strict=True raises ResultsFormatError naming the file. Unsafe
    pickles always raise. A step present in several files (crash + resume) is
    kept once, from the last file in iteration order, with a warning.
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    config_path = os.path.join(run_dir, "config.json")
    config = _read_json(config_path)
    identity = _config_identity(config, config_path)
    skipped = []

    def skip(path, err):
        if strict:
            raise err
        warnings.warn(f"skipping {err}", stacklevel=3)
        skipped.append((path, str(err)))

    iterations = [paths for _, paths in _dotprod_files(run_dir)]
    compacted = _compacted_files(run_dir)
    # Parquet reads release the GIL; unpickling does not, and threads would only add malloc arenas
    threads = min(8, os.cpu_count() or 1) if compacted or any(paths[0].endswith(".parquet")
                                                               for paths in iterations) else 1
    with ThreadPoolExecutor(max_workers=threads) as pool:
        segments = pool.map(lambda path: read_compacted(path, per_layer), compacted)
        attempts = list(pool.map(lambda paths: _read_iteration(paths, per_layer, identity), iterations))
        segments = list(segments)  # [(path, _Content or error)] per compacted file, identity not yet applied
    if identity is None:  # no config.json: the files decide, then a file refused gives way to its twin
        identity = _majority_identity([result for attempt in attempts for _, result in attempt[-1:]
                                       if isinstance(result, _Content)] +
                                      [result for parts in segments for _, result in parts
                                       if isinstance(result, _Content)])
        attempts = [_read_iteration(paths, per_layer, identity, read=dict(attempt))
                    for paths, attempt in zip(iterations, attempts)]
    attempts += [[(path, identity.refusal(path, result) or result if isinstance(result, _Content) else result)
                  for path, result in parts] for parts in segments]
    units = []
    for attempt in attempts:
        for path, result in attempt:
            if isinstance(result, ResultsFormatError):
                skip(path, result)
            else:
                units.append((path, result))
    kept = _one_copy_per_source(units, skip)
    kept = _bound_domain_width(kept, skip)
    # a step in several files is kept from the last one: walk the files backwards, claiming steps
    claimed, duplicates, chunks = set(), set(), []
    for _, content in reversed(kept):
        columns = content.columns
        steps_here = set(np.unique(columns["step"]).tolist())
        again = steps_here & claimed
        if again:
            keep = ~np.isin(columns["step"], sorted(again))
            columns = {name: values[keep] for name, values in columns.items()}
        duplicates |= again | content.repeated
        claimed |= steps_here
        chunks.append(columns)
    if duplicates:
        warnings.warn(
            f"{run_dir}: steps {sorted(duplicates)} appear in more than one file (resumed run?); "
            "keeping the copy from the last file",
            stacklevel=2,
        )
    columns = _concatenate(chunks[::-1])
    missing = sorted(set(_expected_steps(config, sorted(claimed))) - claimed)
    run = Run(run_dir=run_dir, columns=columns, config=config, files=list(dict.fromkeys(path for path, _ in kept)),
              skipped=skipped,
              missing_steps=missing, duplicate_steps=sorted(duplicates),
              schema_versions={path: content.version for path, content in kept}, run_id=identity.run_id,
              unverified=[path for path, content in kept if not content.verified])
    return run


def _one_copy_per_source(units: list, skip) -> list:
    """[(path, _Content)] -> one per step file (`source`), in step-file order. A step file and a compacted file's
    segment made from it (a compaction stopped before it removed its step files), or two compacted files holding
    it, are one copy when their content digests are equal; with other digests the copy not in a compacted file
    (else the one in the file named later) is refused via skip, naming both."""
    chosen = {}
    for path, content in sorted(units, key=lambda unit: (not unit[1].compacted, unit[0])):
        first = chosen.get(content.source)
        if first is None:
            chosen[content.source] = (path, content)
        elif content.digests is None or content.digests != first[1].digests:
            skip(path, ResultsFormatError(
                f"{path}: holds the steps of {content.source} with other contents than {first[0]} (their content "
                f"digests differ); not merged: the copy in {first[0]} is read. Move aside the one that is wrong"))
    return sorted(chosen.values(), key=lambda unit: _source_step(unit[1].source))


def _bound_domain_width(kept: list, skip) -> list:
    """Refuse (via skip) the files whose long domain labels would widen the run's fixed-width domain column past
    max(_RUN_DOMAIN_FLOOR, _DOMAIN_PER_BYTE x the bytes of all its files): one 1-row file with a label of a
    million characters would otherwise make every row of the run 4 MB. Returns the files kept."""
    while kept:
        rows = sum(len(content.columns["step"]) for _, content in kept)
        widest = max(range(len(kept)), key=lambda i: kept[i][1].columns["domain"].dtype.itemsize)
        needed = rows * kept[widest][1].columns["domain"].dtype.itemsize
        on_disk = sum(content.size for _, content in kept)
        if needed <= max(_RUN_DOMAIN_FLOOR, _DOMAIN_PER_BYTE * on_disk):
            return kept
        path, content = kept.pop(widest)
        longest = content.columns["domain"].dtype.itemsize // 4
        skip(path, ResultsFormatError(
            f"{path}: a domain label of {longest:,} characters would make the run's domain column {needed:,} bytes "
            f"({rows:,} rows as fixed-width strings), far more than its files hold ({on_disk:,} bytes); "
            "not merged: remove it, or shorten the labels"))
    return kept


def load_dotprods(run_dir, per_layer: bool = False, strict: bool = False, as_frame: bool = False) -> Columns:
    """Columns of a run (see `load_run`): step, lr, train_loss, val_loss,
    dot_products, batch_weight, token_count, domain, token_offset, doc_id,
    sample_index (+ "per_layer/<name>" if per_layer). `.skipped` lists the
    files that were skipped, `.missing_steps` the steps not found.
    as_frame=True: the same as `load_run`, a pandas DataFrame."""
    run = read_run(run_dir, per_layer=per_layer, strict=strict)
    if as_frame:
        return run.to_frame()
    columns = Columns(run.columns)
    columns.skipped = run.skipped
    columns.missing_steps = run.missing_steps
    return columns


def _records_to_columns(records: list, per_layer: bool) -> dict:
    """Step records -> columns in record order (COLUMN_DTYPES, + per_layer/<name> float32, NaN where a
    record lacks that parameter)."""
    n_rows = [len(r["dot_products"]) for r in records]
    total = sum(n_rows)

    def per_step(key, dtype):  # a step scalar repeated over that step's rows
        return np.repeat(np.array([r[key] for r in records], dtype=dtype), n_rows)

    def concat(key, dtype):
        if not records:
            return np.zeros(0, dtype=dtype)
        return np.concatenate([np.asarray(r[key], dtype=dtype) for r in records])

    columns = {
        "step": per_step("step", np.int64),
        "lr": per_step("lr", np.float64),
        "train_loss": per_step("train_loss", np.float64),
        "val_loss": per_step("val_loss", np.float64),
    }
    for field_name, column in _V1_COLUMN_NAMES.items():
        dtype = np.float32 if field_name in _V1_FLOAT_ARRAYS else np.int64
        columns[column] = concat(field_name, dtype)
    columns["domain"] = np.array([d for r in records for d in r["domain"]], dtype=str) if total else np.zeros(0, dtype="<U1")
    columns = {name: columns[name] for name in COLUMN_DTYPES}
    for name, dtype in OPTIONAL_COLUMNS.items():
        if any(r.get(name) is not None for r in records):
            columns[name] = np.concatenate([np.asarray(r[name], dtype=dtype) if r.get(name) is not None
                                            else np.full(n, np.nan, dtype=dtype) for r, n in zip(records, n_rows)])
    if per_layer:
        names = sorted({name for r in records for name in (r.get("per_layer") or {})})
        for name in names:
            parts = [np.asarray(r["per_layer"][name], dtype=np.float32) if name in (r.get("per_layer") or {})
                     else np.full(n, np.nan, dtype=np.float32) for r, n in zip(records, n_rows)]
            columns[f"{PER_LAYER_PREFIX}{name}"] = np.concatenate(parts)
    return columns


def _concatenate(chunks: list) -> dict:
    """Column chunks of files -> one set of columns sorted by (step, sample_index); a per-layer column that
    a chunk lacks is NaN there."""
    if not chunks:
        return _records_to_columns([], per_layer=False)
    layer_names = sorted({name for chunk in chunks for name in chunk if name.startswith(PER_LAYER_PREFIX)})
    columns = {name: np.concatenate([chunk[name] for chunk in chunks]) for name in COLUMN_DTYPES}
    for name in [n for n in OPTIONAL_COLUMNS if any(n in chunk for chunk in chunks)] + layer_names:
        columns[name] = np.concatenate([chunk[name] if name in chunk else
                                        np.full(len(chunk["step"]), np.nan, dtype=np.float32) for chunk in chunks])
    order = np.lexsort((columns["sample_index"], columns["step"]))
    if (order[1:] > order[:-1]).all():  # already in order (files written by the app): no copy
        return columns
    return {name: values[order] for name, values in columns.items()}


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ResultsFormatError(f"{path}: cannot read JSON ({err})") from err
