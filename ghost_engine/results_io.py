"""The on-disk format of a run's gradient dot products, and its only reader.

A training run writes `Results/<run>/grad_dotprods/iter_XXXXXX.pkl`, each a
pickle of a plain dict (schema in docs/report.md):

    {"schema": "graddotprod.dotprods", "schema_version": 1, "run_name": str,
     "world_size": int, "value": optional str, "steps": [step_record, ...]}

"value" names what the records' "dot_products" hold (GradDotProdEngine's estimator: "first_order",
"adamw" or "cosine", docs/METHOD.md section 2.1); absent means "first_order" (files written before it).

    step_record = {"step": int, "lr": float, "train_loss": float, "val_loss": float,
                   "dot_products": float32[B], "batch_weights": float32[B],
                   "token_counts": int64[B], "domain": list[str] (len B),
                   "token_offset": int64[B], "doc_id": int64[B], "sample_index": int64[B],
                   "per_layer": optional {param_name: float32[B]}}

Pickles are read with a restricted unpickler (`safe_load_pickle`): only builtin
containers/scalars and numpy arrays, dtypes and scalars may be rebuilt, so a
results directory from someone else cannot run code on load.
"""
from __future__ import annotations

import collections
import glob
import io
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from ghost_engine.durable import write_atomically

VALUES = ("first_order", "adamw", "cosine")  # GradDotProdEngine's estimators (ghost_engine.engine.VALUES)

SCHEMA_NAME = "graddotprod.dotprods"
SCHEMA_VERSION = 1
DOTPROD_DIR = "grad_dotprods"
DOTPROD_FILE_PATTERN = "iter_*.pkl"

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

    ghost_engine.durable.write_atomically: a reader sees the old file or the complete new one, never a
    partial one, and the new one survives a crash once this returns.
    """
    path = os.fspath(path)
    _check_plain(payload, path)
    validate_payload(payload, path)
    write_atomically(path, lambda f: pickle.dump(payload, f, protocol=4))


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

    def to_pandas(self):
        """The columns as a pandas DataFrame (needs pandas; per-layer columns included)."""
        import pandas as pd

        return pd.DataFrame(self.columns)


class Columns(dict):
    """`load_dotprods`' result: a plain dict of columns plus `.skipped` / `.missing_steps`."""

    skipped: list
    missing_steps: list


def _dotprod_files(run_dir: str) -> list:
    def iteration(path):
        match = re.search(r"iter_(\d+)\.pkl$", path)
        return (int(match.group(1)) if match else -1, path)

    return sorted(glob.glob(os.path.join(run_dir, DOTPROD_DIR, DOTPROD_FILE_PATTERN)), key=iteration)


def _read_file(path: str):
    """Load and validate one file; returns (schema_version, run_name, step records)."""
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
    return version, payload.get("run_name"), reader(payload, path)


def _read_v1(payload, path: str) -> list:
    validate_payload(payload, path)
    return list(payload["steps"])


# schema_version -> reader returning step records in the current (v1) field layout.
# A future v2 adds its reader here and converts to the newest layout.
_READERS = {1: _read_v1}


def _expected_steps(config: dict, seen_steps: list) -> list:
    """Steps a complete run would have: training counts steps from 1, so with
    config.json's max_steps that is 1..max_steps; without it, 1..the last step seen."""
    max_steps = config.get("max_steps")
    if isinstance(max_steps, int) and not isinstance(max_steps, bool):
        return list(range(1, max(max_steps, max(seen_steps, default=0)) + 1))
    if not seen_steps:
        return []
    return list(range(1, max(seen_steps) + 1))  # steps count from 1; the end is unknown without config.json


def load_run(run_dir, per_layer: bool = False, strict: bool = False) -> Run:
    """Merge every `grad_dotprods/iter_*.pkl` of a run into columns.

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
    skipped, files, versions = [], [], {}
    records_by_step = {}
    duplicates = set()

    def skip(path, err):
        if strict:
            raise err
        warnings.warn(f"skipping {err}", stacklevel=3)
        skipped.append((path, str(err)))

    readable = []
    for path in _dotprod_files(run_dir):
        try:
            readable.append((path, *_read_file(path)))
        except UnsafePickleError:
            raise
        except ResultsFormatError as err:
            skip(path, err)
    # the run's name: config.json's, else the one most files carry; a file of another run is never merged
    names = collections.Counter(name for _, _, name, _ in readable)
    run_name = config.get("run_name") or (names.most_common(1)[0][0] if names else None)
    for path, version, name, records in readable:
        if name != run_name:
            err = ResultsFormatError(f"{path}: written by run {name!r}, not {run_name!r}; files of another "
                                     "run are not merged")
            skip(path, err)
            continue
        files.append(path)
        versions[path] = version
        for record in records:
            step = int(record["step"])
            if step in records_by_step:
                duplicates.add(step)
            records_by_step[step] = record
    if duplicates:
        warnings.warn(
            f"{run_dir}: steps {sorted(duplicates)} appear in more than one file (resumed run?); "
            "keeping the copy from the last file",
            stacklevel=2,
        )
    steps = sorted(records_by_step)
    missing = sorted(set(_expected_steps(config, steps)) - set(steps))
    columns = _merge_records([records_by_step[s] for s in steps], per_layer)
    return Run(run_dir=run_dir, columns=columns, config=config, files=files, skipped=skipped,
               missing_steps=missing, duplicate_steps=sorted(duplicates), schema_versions=versions)


def load_dotprods(run_dir, per_layer: bool = False, strict: bool = False) -> Columns:
    """Columns of a run (see `load_run`): step, lr, train_loss, val_loss,
    dot_products, batch_weight, token_count, domain, token_offset, doc_id,
    sample_index (+ "per_layer/<name>" if per_layer). `.skipped` lists the
    files that were skipped, `.missing_steps` the steps not found."""
    run = load_run(run_dir, per_layer=per_layer, strict=strict)
    columns = Columns(run.columns)
    columns.skipped = run.skipped
    columns.missing_steps = run.missing_steps
    return columns


def _merge_records(records: list, per_layer: bool) -> dict:
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
    if per_layer:
        names = sorted({name for r in records for name in (r.get("per_layer") or {})})
        for name in names:
            parts = [np.asarray(r["per_layer"][name], dtype=np.float32) if name in (r.get("per_layer") or {})
                     else np.full(n, np.nan, dtype=np.float32) for r, n in zip(records, n_rows)]
            columns[f"per_layer/{name}"] = np.concatenate(parts)
    order = np.lexsort((columns["sample_index"], columns["step"]))
    return {name: values[order] for name, values in columns.items()}


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ResultsFormatError(f"{path}: cannot read JSON ({err})") from err
