"""The on-disk format of a run's gradient dot products, and its only reader.

A training run writes `Results/<run>/grad_dotprods/iter_XXXXXX.pkl`, each a
pickle of a plain dict (schema in docs/report.md):

    {"schema": "graddotprod.dotprods", "schema_version": 1, "run_name": str,
     "world_size": int, "value": optional str, "steps": [step_record, ...]}

"value" names what the records' "dot_products" hold (GradDotProdEngine's estimator, one of VALUES,
docs/METHOD.md section 2.1); absent means "first_order" (files written before it).

    step_record = {"step": int, "lr": float, "train_loss": float, "val_loss": float,
                   "dot_products": float32[B], "batch_weights": float32[B],
                   "token_counts": int64[B], "domain": list[str] (len B),
                   "token_offset": int64[B], "doc_id": int64[B], "sample_index": int64[B],
                   "per_layer": optional {param_name: float32[B]},
                   "first_order_dot_products": optional float32[B]}

"first_order_dot_products" is <grad l_i, grad L_val> of the same rows in a file whose "value" is another
estimator (the deferred ones, second_order, adamw_vt and midpoint, record it at no extra cost).

Beside it (or instead of it, `--results_format`) the same steps as a Parquet
table, `iter_XXXXXX.parquet`: one row per (step, training row), the columns of
`load_run` (step, lr, train_loss, val_loss, dot_products, batch_weight,
token_count, domain, token_offset, doc_id, sample_index, first_order_dot_products if
recorded, per_layer/<param name>)
in the dtypes `load_run` returns, and the file's schema, schema_version,
run_name and world_size as JSON under the key "graddotprod" of the Parquet
key-value metadata. Any Parquet reader reads it (polars, DuckDB, pandas, Spark).

Pickles are read with a restricted unpickler (`safe_load_pickle`): only builtin
containers/scalars and numpy arrays, dtypes and scalars may be rebuilt, so a
results directory from someone else cannot run code on load.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ghost_common.durable import fsync_directory, write_atomically

# GradDotProdEngine's estimators (ghost_engine.engine.VALUES, LR_INSIDE): the ones whose dot products carry the
# learning rate give phi_i = w_i·dot_i, first_order phi_i = lr·w_i·dot_i, cosine none
VALUES = ("first_order", "second_order", "adamw", "adamw_vt", "midpoint", "cosine")
LR_INSIDE = ("second_order", "adamw", "adamw_vt", "midpoint")

SCHEMA_NAME = "graddotprod.dotprods"
SCHEMA_VERSION = 1
DOTPROD_DIR = "grad_dotprods"
RESULTS_FORMATS = {"pickle": ".pkl", "parquet": ".parquet"}  # format -> file suffix, read in reverse order
ITER_FILE = re.compile(r"^iter_(\d+)\.(pkl|parquet)$")  # grad_dotprods/iter_<last step>.<suffix>
PER_LAYER_PREFIX = "per_layer/"
PARQUET_METADATA_KEY = "graddotprod"
TRAINING_LOG_JSONL = "training_log.jsonl"  # the app's per-step log; a resume cuts it like the files

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


class UnsafePickleError(ValueError):
    """A pickle asked to rebuild an object outside the allowed plain-data set."""


class ResultsFormatError(ValueError):
    """A results file is unreadable, truncated, or does not follow the schema."""


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


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str, size: int):
        super().__init__(file)
        self._source = source
        self._size = size  # bytes in the file: no array built while loading may be larger

    def find_class(self, module: str, name: str):
        if module in ("builtins", "__builtin__") and name in _ALLOWED_BUILTINS:
            return _ALLOWED_BUILTINS[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "_codecs" and name == "encode":  # protocol-2 pickles store bytes this way
            import codecs

            return codecs.encode
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        for base in ("numpy._core.", "numpy.core."):
            if module.startswith(base) and (module[len(base):], name) in _ALLOWED_NUMPY_CORE:
                found = getattr(_numpy_core_module(module[len(base):]), name)
                return self._bounded_reconstruct(found) if name == "_reconstruct" else found
        raise UnsafePickleError(
            f"{self._source}: refusing to load global '{module}.{name}'; results pickles may only "
            "hold builtin containers/scalars and numpy arrays, dtypes and scalars. Do not load "
            "this file unless you trust where it came from."
        )


    def _bounded_reconstruct(self, reconstruct):
        """numpy's _reconstruct allocates the shape it is given; a real array pickle passes (0,)."""

        def bounded(subtype, shape, dtype):
            elements = int(np.prod(shape, dtype=np.float64)) if np.ndim(shape) else int(shape)
            if elements > self._size:
                raise UnsafePickleError(f"{self._source}: an array of {elements:,} elements in a file of "
                                        f"{self._size:,} bytes; refusing to allocate it")
            return reconstruct(subtype, shape, dtype)

        return bounded


def safe_load_pickle(path):
    """Load a pickle that may only contain plain python data and numpy arrays.

    Raises UnsafePickleError (a ValueError) naming the file and the refused
    global, before that global is ever called.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return _RestrictedUnpickler(io.BytesIO(data), source=path, size=len(data)).load()


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


def save_dotprod_pickle(path, payload) -> None:
    """Validate and atomically write one dot-product file.

    ghost_common.durable.write_atomically: a reader sees the old file or the complete new one, never a
    partial one, and the new one survives a crash once this returns.
    """
    path = os.fspath(path)
    _check_plain(payload, path)
    validate_payload(payload, path)
    write_atomically(path, lambda f: pickle.dump(payload, f, protocol=4))


def save_dotprod_parquet(path, payload) -> None:
    """Validate and atomically write one dot-product file's steps as a Parquet table (module docstring).

    The rows equal what `load_run` makes of the same payload written as a pickle, column for column and
    dtype for dtype; the table is built in memory and written through write_atomically like the pickle.
    """
    path = os.fspath(path)
    _check_plain(payload, path)
    validate_payload(payload, path)
    columns = _records_to_columns(payload["steps"], per_layer=True)
    arrays = {name: pa.array(values) for name, values in columns.items() if name != "domain"}
    arrays["domain"] = pa.array(columns["domain"].tolist(), type=pa.string()).dictionary_encode()
    metadata = {"schema": payload["schema"], "schema_version": payload["schema_version"],
                "run_name": payload["run_name"], "world_size": int(payload["world_size"]),
                "value": payload.get("value", "first_order")}
    table = pa.table({name: arrays[name] for name in columns})
    sink = pa.BufferOutputStream()
    # Loading speed over size: floats stored plainly (a dictionary of distinct float32 values only makes them
    # larger) with snappy (zstd saves ~5% on these values and reads ~3x slower); statistics of `step` only
    # and no Arrow schema copy, so that the footer of a file with ~150 per-layer columns stays small.
    with pq.ParquetWriter(sink, table.schema, compression="snappy", use_dictionary=["domain"],
                          write_statistics=["step"], store_schema=False) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata({PARQUET_METADATA_KEY: json.dumps(metadata)})
    data = sink.getvalue()
    write_atomically(path, lambda f: f.write(memoryview(data)))


_SAVERS = {"pickle": save_dotprod_pickle, "parquet": save_dotprod_parquet}


def file_formats(results_format: str) -> tuple:
    """The file formats of a --results_format choice: "pickle", "parquet" or "both" (pickle and Parquet)."""
    if results_format == "both":
        return tuple(RESULTS_FORMATS)
    if results_format not in RESULTS_FORMATS:
        raise ValueError(f"results_format={results_format!r}: one of 'pickle', 'parquet', 'both'")
    return (results_format,)


def dotprod_file(run_dir, last_step, results_format="pickle"):
    return os.path.join(run_dir, DOTPROD_DIR, f"iter_{last_step:06d}{RESULTS_FORMATS[results_format]}")


def flush_dotprods(run_dir, run_name, world_size, pending, formats=("pickle",), value="first_order"):
    """Write the pending step records (ascending steps) as iter_<last step>.pkl and/or .parquet (the same
    rows; `formats` from --results_format); empties `pending`. Returns the paths written."""
    if not pending:
        return []
    os.makedirs(os.path.join(run_dir, DOTPROD_DIR), exist_ok=True)
    payload = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "run_name": run_name,
               "world_size": world_size, "value": value, "steps": list(pending)}
    paths = []
    for results_format in formats:
        paths.append(dotprod_file(run_dir, pending[-1]["step"], results_format))
        _SAVERS[results_format](paths[-1], payload)
    pending.clear()
    return paths


def dotprod_steps_on_disk(run_dir):
    """Last steps of the run's iter_XXXXXX.pkl / .parquet files, ascending, each once."""
    directory = os.path.join(run_dir, DOTPROD_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted({int(m.group(1)) for m in map(ITER_FILE.match, os.listdir(directory)) if m})


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
    from), to superseded/<UTC time>/: the dot-product files (both formats) and the lines of
    training_log.jsonl (the file is cut after the last line of step <= `step`). Removes stray temporary
    files of interrupted writes. Nothing complete is deleted. Returns (moved names, destination or None)."""
    for sub in (DOTPROD_DIR, "checkpoints"):
        directory = os.path.join(run_dir, sub)
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if ".tmp-" in name:  # a write that never completed (kill -9, full disk): no data in it
                os.remove(os.path.join(directory, name))
    directory = os.path.join(run_dir, DOTPROD_DIR)
    later = sorted(name for name in (os.listdir(directory) if os.path.isdir(directory) else [])
                   if ITER_FILE.match(name) and int(ITER_FILE.match(name).group(1)) > step)
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
    if later:
        os.makedirs(os.path.join(destination, DOTPROD_DIR), exist_ok=True)
        for name in later:
            os.replace(os.path.join(directory, name), os.path.join(destination, DOTPROD_DIR, name))
            moved.append(name)
        fsync_directory(os.path.join(destination, DOTPROD_DIR))
        fsync_directory(directory)
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
    skipped: list  # [(path, reason)] for files that could not be read
    missing_steps: list  # steps expected (config max_steps, gaps) but not found
    duplicate_steps: list  # steps seen in more than one file (one copy kept)
    schema_versions: dict = field(default_factory=dict)  # path -> schema_version

    @property
    def num_rows(self) -> int:
        return len(self.columns["step"])

    @property
    def value(self) -> str:
        """The estimator the run's dot products hold (config.json's "value"; runs without it: first_order)."""
        return self.config.get("value", "first_order")

    def to_frame(self):
        """The columns as a pandas DataFrame (per-layer columns included); `.attrs` holds run_dir, config,
        files, skipped, missing_steps and duplicate_steps."""
        import pandas as pd

        frame = pd.DataFrame(self.columns)
        frame.attrs.update(run_dir=self.run_dir, config=self.config, files=self.files, skipped=self.skipped,
                           missing_steps=self.missing_steps, duplicate_steps=self.duplicate_steps)
        return frame

    to_pandas = to_frame


class Columns(dict):
    """`load_dotprods`' result: a plain dict of columns plus `.skipped` / `.missing_steps`."""

    skipped: list
    missing_steps: list


def _dotprod_files(run_dir: str) -> list:
    """[(last step, [paths])] in step order; per step the Parquet file first, then the pickle."""
    directory = os.path.join(run_dir, DOTPROD_DIR)
    by_step = collections.defaultdict(list)
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        match = ITER_FILE.match(name)
        if match:
            by_step[int(match.group(1))].append(os.path.join(directory, name))
    return [(step, sorted(paths, key=lambda p: not p.endswith(".parquet"))) for step, paths in sorted(by_step.items())]


def _read_iteration(paths: list, per_layer: bool) -> list:
    """Read the first readable of one iteration's files (Parquet first; the pickle of the same steps only if
    the Parquet file is unreadable): [(path, what _read_file returned, or its ResultsFormatError)]."""
    attempt = []
    for path in paths:
        try:
            attempt.append((path, _read_file(path, per_layer)))
            break
        except ResultsFormatError as err:
            attempt.append((path, err))
    return attempt


def _read_file(path: str, per_layer: bool):
    """Load and validate one file; returns (schema_version, run_name, columns, steps repeated in the file)."""
    if path.endswith(".parquet"):
        return _read_parquet(path, per_layer)
    try:
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
    by_step, repeated = {}, set()
    for record in reader(payload, path):
        step = int(record["step"])
        if step in by_step:
            repeated.add(step)
        by_step[step] = record  # the later record of a step wins
    return version, payload.get("run_name"), _records_to_columns(list(by_step.values()), per_layer), repeated


def _read_v1(payload, path: str) -> list:
    validate_payload(payload, path)
    return list(payload["steps"])


# schema_version -> reader returning step records in the current (v1) field layout.
# A future v2 adds its reader here and converts to the newest layout.
_READERS = {1: _read_v1}


_ARROW_KINDS = {np.int64: pa.types.is_integer, np.float64: pa.types.is_floating, np.float32: pa.types.is_floating,
                np.str_: pa.types.is_string}  # column dtype -> test of the Arrow type that may hold it


def _read_parquet(path: str, per_layer: bool):
    """A Parquet dot-product file -> (schema_version, run_name, columns, set()); only the per-layer
    columns are left unread when not asked for."""
    try:
        file = pq.ParquetFile(path)
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
    missing = [name for name in COLUMN_DTYPES if name not in schema.names]
    if missing:
        raise ResultsFormatError(f"{path}: lacks the columns {missing}")
    names = list(COLUMN_DTYPES) + [n for n in OPTIONAL_COLUMNS if n in schema.names] + \
        [n for n in schema.names if per_layer and n.startswith(PER_LAYER_PREFIX)]
    try:
        table = file.read(columns=names, use_threads=False)  # small files: threads cost more than they save
    except (pa.ArrowException, OSError) as err:
        raise ResultsFormatError(f"{path}: cannot read Parquet ({type(err).__name__}: {err})") from err
    columns = {}
    for name in names:
        column = table.column(name)
        dtype = COLUMN_DTYPES.get(name, OPTIONAL_COLUMNS.get(name, np.float32))
        kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        if column.null_count or not _ARROW_KINDS[dtype](kind):
            raise ResultsFormatError(f"{path}: column {name!r} must be {np.dtype(dtype).name} without nulls, got "
                                     f"{column.type} with {column.null_count} null(s)")
        if dtype is np.str_:
            columns[name] = np.asarray(column.cast(pa.string()).to_pylist(), dtype=str)
        else:
            columns[name] = column.to_numpy().astype(dtype, copy=False)
    return version, metadata.get("run_name"), columns, set()


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
    run_dir, config, files, skipped, missing_steps and duplicate_steps. as_frame=False: the `Run` itself."""
    run = read_run(run_dir, per_layer=per_layer, strict=strict)
    return run.to_frame() if as_frame else run


def read_run(run_dir, per_layer: bool = False, strict: bool = False) -> Run:
    """Merge every `grad_dotprods/iter_*` file of a run into columns (numpy arrays): a `Run`.

    For every iteration the Parquet file is read if there is one (per-layer columns only when
    per_layer=True), else the pickle; the pickle also when the Parquet file cannot be read.
    Only files whose `run_name` is the run's (config.json's, else the directory's name) are merged.
    strict=False skips unreadable/corrupt/unknown-version/foreign files with a warning
    and lists them in `Run.skipped`; strict=True raises naming the file. Unsafe
    pickles always raise. A step present in several files (crash + resume) is
    kept once, from the last file in iteration order, with a warning.
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    config = _read_json(os.path.join(run_dir, "config.json"))
    skipped = []

    def skip(path, err):
        if strict:
            raise err
        warnings.warn(f"skipping {err}", stacklevel=3)
        skipped.append((path, str(err)))

    readable = []
    iterations = [paths for _, paths in _dotprod_files(run_dir)]
    # Parquet reads release the GIL; unpickling does not, and threads would only add malloc arenas
    threads = min(8, os.cpu_count() or 1) if any(paths[0].endswith(".parquet") for paths in iterations) else 1
    with ThreadPoolExecutor(max_workers=threads) as pool:
        attempts = list(pool.map(lambda paths: _read_iteration(paths, per_layer), iterations))
    for attempt in attempts:
        for path, result in attempt:
            if isinstance(result, ResultsFormatError):
                skip(path, result)
            else:
                readable.append((path, *result))
    # the run's name: config.json's, else the one most files carry; a file of another run is never merged
    names = collections.Counter(name for _, _, name, _, _ in readable)
    run_name = config.get("run_name") or (names.most_common(1)[0][0] if names else None)
    kept = []
    for path, version, name, columns, repeated in readable:
        if name != run_name:
            skip(path, ResultsFormatError(f"{path}: written by run {name!r}, not {run_name!r}; files of another "
                                          "run are not merged"))
        else:
            kept.append((path, version, columns, repeated))
    # a step in several files is kept from the last one: walk the files backwards, claiming steps
    claimed, duplicates, chunks = set(), set(), []
    for _, _, columns, repeated in reversed(kept):
        steps_here = set(np.unique(columns["step"]).tolist())
        again = steps_here & claimed
        if again:
            keep = ~np.isin(columns["step"], sorted(again))
            columns = {name: values[keep] for name, values in columns.items()}
        duplicates |= again | repeated
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
    run = Run(run_dir=run_dir, columns=columns, config=config, files=[path for path, *_ in kept], skipped=skipped,
              missing_steps=missing, duplicate_steps=sorted(duplicates),
              schema_versions={path: version for path, version, _, _ in kept})
    return run


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
