"""A lazy scan of a run's Parquet files: `scan_run(run_dir)`, a `pyarrow.dataset.Dataset` over its compacted
files (ghost_results.compact) and its remaining Parquet step files, nothing read until asked:

    from ghost_results import scan_run
    import pyarrow.dataset as ds
    table = scan_run("Results/my-run").to_table(
        columns=["step", "domain", "dot_products", "batch_weight", "lr"],
        filter=(ds.field("step") >= 5001) & (ds.field("step") <= 6000) & (ds.field("domain") == "Github"))

Only the columns asked for are read, and only the row groups whose `step` and `domain` statistics can match the
filter (compacted files hold whole step files per row group in step order, so a step range reads its own row
groups and the footers of the others). `scan_run(run_dir, engine="polars")` gives a `polars.LazyFrame` of the
same dataset (`polars.scan_pyarrow_dataset`; polars is not a dependency of this package: install it to use this).

Which files, by the rules of `read_run`: the run's identity (config.json's run_id, else its run_name; no
config.json: the id most files carry) decides; a file of another run is left out with a warning naming it, and
so is a compacted file any of whose segments is another run's. A step file whose steps a compacted file holds (a
compaction stopped before it removed it) is left out: silently when its content digests are the segment's,
with a warning when they differ (read_run refuses that copy too). Step files kept only as pickles are not
scanned (named in a warning: `python -m ghost_results convert RUN` writes their Parquet files).

What it does not verify: the content digests (sha256 of every column) are checked by `read_run`/`load_run`, not
by a lazy scan: a scan checks each Parquet page's CRC as it reads it (pyarrow >= 15), which catches damaged
bytes, not a page rewritten with a fresh CRC. A scan does not merge steps that two step files both hold (a run
resumed by a version of this package from before resumes set files aside): read_run keeps the later file's.
Nothing is deduplicated, sorted or NaN-filled: rows come in file order, and a column a file lacks is null there.

Per-parameter columns: files written since safe names are named `per_layer__<name>` (lower case, [a-z0-9_]:
no SQL engine needs them quoted), files written before `per_layer/<name>`; compaction rewrites the old names.
The dataset schema's metadata maps every per-parameter column to its parameter (`per_layer_columns(dataset)`).
"""
import json
import os
import warnings
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from ghost_results import results_io
from ghost_results.results_io import PER_LAYER_COLUMNS_KEY, PER_LAYER_PREFIX, ResultsFormatError

SCHEMA_METADATA_KEY = b"graddotprod.per_layer_columns"  # in the dataset's schema: {column: parameter name}


def scan_run(run_dir, engine="pyarrow"):
    """The run's Parquet files as one lazily read dataset (module docstring): a pyarrow.dataset.Dataset, or with
    engine="polars" a polars.LazyFrame."""
    if engine not in ("pyarrow", "polars"):
        raise ValueError(f"engine={engine!r}: 'pyarrow' (a pyarrow.dataset.Dataset) or 'polars' (a LazyFrame)")
    paths, layer_names, schemas = run_files(run_dir)
    schema = pa.unify_schemas(schemas) if schemas else pa.schema(
        [(name, pa.string() if name == "domain" else pa.from_numpy_dtype(dtype))
         for name, dtype in results_io.COLUMN_DTYPES.items()])
    schema = schema.with_metadata({SCHEMA_METADATA_KEY: json.dumps(layer_names)})
    options = {"page_checksum_verification": True} if results_io._PAGE_CHECKSUMS else {}
    file_format = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(**options))
    dataset = ds.dataset(paths, schema=schema, format=file_format)
    if engine == "polars":
        try:
            import polars
        except ImportError:
            raise ImportError("scan_run(engine='polars') needs polars (pip install polars); engine='pyarrow' "
                              "needs nothing more") from None
        return polars.scan_pyarrow_dataset(dataset)
    return dataset


def per_layer_columns(dataset) -> dict:
    """{per-parameter column: parameter name} of a `scan_run` dataset."""
    return json.loads((dataset.schema.metadata or {}).get(SCHEMA_METADATA_KEY, b"{}"))


def run_files(run_dir):
    """(the Parquet files a scan of the run reads, in step order, {per-parameter column: parameter}, their Arrow
    schemas); warnings name the files left out (module docstring). Footers alone are read. ValueError if one
    column names two parameters in two files."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    config_path = os.path.join(run_dir, "config.json")
    identity = results_io._config_identity(results_io._read_json(config_path), config_path)
    compacted, steps, pickles_only, footers = {}, {}, [], {}
    for path in results_io._compacted_files(run_dir):
        try:
            footers[path] = results_io._open_parquet(path)[1:3]
            compacted[path] = results_io.compacted_segments(path)
        except ResultsFormatError as err:
            warnings.warn(f"scan_run leaves out {err}", stacklevel=3)
    for _, paths in results_io._dotprod_files(run_dir):
        if not paths[0].endswith(".parquet"):
            pickles_only.append(paths[0])
            continue
        try:
            footers[paths[0]] = results_io._open_parquet(paths[0])[1:3]
            steps[paths[0]] = footers[paths[0]][1]
        except ResultsFormatError as err:
            warnings.warn(f"scan_run leaves out {err}", stacklevel=3)
    if identity is None:
        identity = results_io._majority_identity(
            [_who(header) for header in steps.values()] +
            [_who(segment) for segments in compacted.values() for segment in segments])
    held = {}  # source -> (compacted path, digests)
    chosen = []
    for path, segments in compacted.items():
        refused = [identity.refusal(path, _who(segment)) for segment in segments]
        refused = [err for err in refused if err is not None]
        if refused:
            warnings.warn(f"scan_run leaves out {path}: {refused[0]}", stacklevel=3)
            continue
        chosen.append((segments[0]["first_step"], path))
        for segment in segments:
            held.setdefault(segment["source"], (path, results_io._digests_of(segment)))
    for path, header in steps.items():
        refusal = identity.refusal(path, _who(header))
        source = results_io._source_of(path)
        if refusal is not None:
            warnings.warn(f"scan_run leaves out {refusal}", stacklevel=3)
        elif source in held:
            if held[source][1] != results_io._digests_of(header):
                warnings.warn(f"scan_run leaves out {path}: holds the steps of {source} with other contents than "
                              f"{held[source][0]} (their content digests differ); the compacted copy is read",
                              stacklevel=3)
        else:
            chosen.append((results_io._source_step(source), path))
    if pickles_only:
        warnings.warn(f"scan_run reads Parquet files only: {len(pickles_only)} step file(s) of this run are pickles "
                      f"alone ({os.path.basename(pickles_only[0])}, ...); `python -m ghost_results convert {run_dir}` "
                      "writes their Parquet files", stacklevel=3)
    paths = [path for _, path in sorted(chosen)]
    layer_names = {}
    for path in paths:
        schema, metadata = footers[path]
        for column, name in results_io._layer_names_of(path, metadata, schema.names).items():
            parameter = name[len(PER_LAYER_PREFIX):]
            if layer_names.setdefault(column, parameter) != parameter:
                raise ValueError(f"{path}: column {column!r} holds parameter {parameter!r}, another file's holds "
                                 f"{layer_names[column]!r}: one scan cannot hold both (read_run can: it reads each "
                                 f"file's {PER_LAYER_COLUMNS_KEY} metadata)")
    return paths, layer_names, [footers[path][0].remove_metadata() for path in paths]


def _who(header) -> SimpleNamespace:
    """What identity.refusal reads of a file or segment: its run_id and run_name."""
    return SimpleNamespace(run_id=header.get(results_io.RUN_ID_KEY), run_name=header.get("run_name"))
