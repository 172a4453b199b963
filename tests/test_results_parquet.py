"""Parquet dot-product files: the app writes the same rows as its pickles (read back with plain pyarrow and
the restricted unpickler, column by column), load_run prefers them and returns a DataFrame,
`python -m ghost_results convert` round-trips a pickle-only run, and ghost_results.analysis gives the
same answers on a DataFrame as on column dicts."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ghost_results import analysis, convert, results_io
from ghost_results.results_io import (ResultsFormatError, load_dotprods, load_run, read_run, safe_load_pickle,
                                     save_dotprod_parquet, save_dotprod_pickle)
from GradDotProd_LM import train
from test_results_io import flip_low_bit_of, payload, run_with_id, step_record, write_run
from test_train_runs import tiny_flags

# pickle step-record field -> Parquet column
FIELD_COLUMNS = {"step": "step", "lr": "lr", "train_loss": "train_loss", "val_loss": "val_loss",
                 "dot_products": "dot_products", "batch_weights": "batch_weight", "token_counts": "token_count",
                 "domain": "domain", "token_offset": "token_offset", "doc_id": "doc_id", "sample_index": "sample_index"}


def assert_parquet_equals_pickle(pickle_path, parquet_path):
    """Every field of every step record of the pickle equals the Parquet rows of that step, dtype included; a
    parameter's column is named per_layer__<name with [a-z0-9_] alone> and the metadata names its parameter."""
    payload_ = safe_load_pickle(pickle_path)
    table = pq.read_table(parquet_path)
    metadata = json.loads(pq.read_schema(parquet_path).metadata[b"graddotprod"])
    assert metadata["run_name"] == payload_["run_name"]
    layer_names = {name for record in payload_["steps"] for name in record.get("per_layer") or {}}
    column_of = {name: column for column, name in metadata.get("per_layer_columns", {}).items()}
    assert sorted(column_of) == sorted(layer_names)
    for name, column in column_of.items():
        assert column == "per_layer__" + name.lower().replace(".", "_") and column.isidentifier(), column
    frame = {name: table.column(name).to_pylist() for name in table.column_names}
    start = 0
    for record in payload_["steps"]:
        rows = slice(start, start + len(record["dot_products"]))
        start = rows.stop
        for field, column in FIELD_COLUMNS.items():
            values = np.asarray(frame[column][rows])
            expected = record[field]
            if np.ndim(expected) == 0:
                assert (values == expected).all(), field
            else:
                np.testing.assert_array_equal(values, np.asarray(expected), err_msg=field)
                if field != "domain":
                    assert table.schema.field(column).type.to_pandas_dtype() == np.asarray(expected).dtype, field
        for name in layer_names:  # a step without a parameter's values has NaN there
            expected = (record.get("per_layer") or {}).get(name, np.full(rows.stop - rows.start, np.nan, np.float32))
            np.testing.assert_array_equal(np.asarray(frame[column_of[name]][rows], dtype=np.float32), expected)
            assert str(table.schema.field(column_of[name]).type) == "float"
    assert start == table.num_rows
    assert sorted(table.column_names) == sorted(list(FIELD_COLUMNS.values()) + list(column_of.values()))


def test_the_app_writes_the_same_rows_as_parquet_and_as_pickle(data_dir, tmp_path):
    """--results_format both: iter_XXXXXX.parquet beside every .pkl with exactly its rows, per-parameter columns
    included; --results_format parquet (the default) writes Parquet only and loads the same."""
    assert train.main(tiny_flags(data_dir, str(tmp_path), "both", "--max_steps", "3", "--eval_interval", "3",
                                 "--results_format", "both")) == 0
    directory = tmp_path / "both" / "grad_dotprods"
    assert sorted(os.listdir(directory)) == ["iter_000002.parquet", "iter_000002.pkl", "iter_000003.parquet",
                                             "iter_000003.pkl"]
    for step in (2, 3):
        assert_parquet_equals_pickle(directory / f"iter_{step:06d}.pkl", directory / f"iter_{step:06d}.parquet")
    assert len(safe_load_pickle(directory / "iter_000002.pkl")["steps"][0]["per_layer"]) > 10

    flags = tiny_flags(data_dir, str(tmp_path), "parquet", "--max_steps", "1", "--eval_interval", "1")
    assert train.main(flags) == 0
    assert os.listdir(tmp_path / "parquet" / "grad_dotprods") == ["iter_000001.parquet"]
    only_parquet = read_run(tmp_path / "parquet", per_layer=True, strict=True).columns
    both = read_run(tmp_path / "both", per_layer=True, strict=True).columns
    first = both["step"] == 1
    assert list(only_parquet) == list(both)
    for name in ("step", "sample_index", "domain", "token_offset", "batch_weight", "lr"):
        np.testing.assert_array_equal(only_parquet[name], both[name][first], err_msg=name)
    np.testing.assert_allclose(only_parquet["dot_products"], both["dot_products"][first], rtol=1e-5)


def per_layer_run(run_dir, parquet=True):
    """A synthetic run: 3 files, two domains, per-layer values (one step without them: NaN columns)."""
    rng = np.random.default_rng(0)

    def record(step, n):
        layers = None if step == 3 else {name: rng.standard_normal(n).astype(np.float32)
                                         for name in ("wte.weight", "h.0.attn.c_attn.weight")}
        return step_record(step, rng.standard_normal(n), rng.choice(["Github", "ArXiv"], n).tolist(),
                           lr=1e-3 / step, per_layer=layers)

    write_run(run_dir, {2: [record(1, 4), record(2, 4)], 4: [record(3, 4), record(4, 4)], 5: [record(5, 3)]})
    if parquet:
        assert convert.main(["convert", str(run_dir)]) == 0


def assert_same_columns(got, expected):
    assert list(got) == list(expected)
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
        assert got[name].dtype.kind == values.dtype.kind, name


def test_convert_round_trips_and_load_run_prefers_parquet(tmp_path, capsys):
    """convert writes Parquet beside every pickle; a run of only those Parquet files loads to the same
    columns as the pickles (every column, per-layer ones with their NaN gaps); a second convert writes
    nothing; load_run reads the Parquet files when both exist."""
    pickles = tmp_path / "pickles"
    per_layer_run(pickles, parquet=False)
    converted = tmp_path / "converted"
    shutil.copytree(pickles, converted)
    assert convert.main(["convert", str(converted)]) == 0
    assert "wrote 3 Parquet file(s)" in capsys.readouterr().out
    for step in (2, 4, 5):
        assert_parquet_equals_pickle(converted / "grad_dotprods" / f"iter_{step:06d}.pkl",
                                     converted / "grad_dotprods" / f"iter_{step:06d}.parquet")
    assert convert.main(["convert", str(converted)]) == 0
    assert "wrote 0 Parquet file(s)" in capsys.readouterr().out

    run = read_run(converted, per_layer=True, strict=True)
    assert [os.path.basename(p) for p in run.files] == ["iter_000002.parquet", "iter_000004.parquet",
                                                        "iter_000005.parquet"]
    reference = read_run(pickles, per_layer=True, strict=True).columns
    assert np.isnan(reference["per_layer/wte.weight"][reference["step"] == 3]).all()
    assert_same_columns(run.columns, reference)
    assert_same_columns(read_run(converted).columns, read_run(pickles).columns)  # per-layer columns not read
    parquet_only = tmp_path / "parquet-only"
    shutil.copytree(converted, parquet_only)
    for name in os.listdir(parquet_only / "grad_dotprods"):
        if name.endswith(".pkl"):
            os.remove(parquet_only / "grad_dotprods" / name)
    assert_same_columns(read_run(parquet_only, per_layer=True, strict=True).columns, reference)


def test_a_damaged_parquet_file_falls_back_to_its_pickle(tmp_path):
    """A truncated Parquet file is named and skipped, and the pickle of the same steps is read instead
    (strict=True: an error naming it). A Parquet file of another run is not merged."""
    run_dir = tmp_path / "run"
    per_layer_run(run_dir)
    reference = read_run(run_dir, per_layer=True).columns
    bad = run_dir / "grad_dotprods" / "iter_000004.parquet"
    intact = bad.read_bytes()
    bad.write_bytes(intact[:100])
    with pytest.warns(UserWarning, match="iter_000004.parquet"):
        run = read_run(run_dir, per_layer=True)
    assert [p for p, _ in run.skipped] == [str(bad)]
    assert os.path.basename(run.files[1]) == "iter_000004.pkl"
    assert_same_columns(run.columns, reference)
    with pytest.raises(ResultsFormatError, match="iter_000004.parquet"):
        read_run(run_dir, strict=True)

    bad.write_bytes(intact)
    foreign = payload([step_record(6, [1.0], ["Github"])])
    foreign["run_name"] = "other"
    save_dotprod_parquet(run_dir / "grad_dotprods" / "iter_000006.parquet", foreign)
    with pytest.warns(UserWarning, match="written by run 'other', not 't'"):
        assert 6 not in read_run(run_dir).columns["step"]


def test_load_run_returns_a_dataframe(tmp_path):
    run_dir = tmp_path / "run"
    per_layer_run(run_dir)
    (run_dir / "config.json").write_text('{"run_name": "t", "max_steps": 6}')
    run = read_run(run_dir, per_layer=True)
    frame = load_run(run_dir, per_layer=True)
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(run.columns)
    for name, values in run.columns.items():
        np.testing.assert_array_equal(frame[name].to_numpy(), values, err_msg=name)
    assert frame.attrs["missing_steps"] == [6] and frame.attrs["config"]["run_name"] == "t"
    assert frame.attrs["files"] == run.files
    pd.testing.assert_frame_equal(load_dotprods(run_dir, per_layer=True, as_frame=True), frame)
    assert load_run(run_dir, as_frame=False).columns.keys() == read_run(run_dir).columns.keys()


def test_convert_names_unreadable_pickles_and_bad_arguments(tmp_path, capsys):
    run_dir = tmp_path / "run"
    per_layer_run(run_dir, parquet=False)
    bad = run_dir / "grad_dotprods" / "iter_000004.pkl"
    bad.write_bytes(bad.read_bytes()[:50])
    assert convert.main(["convert", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "wrote 2 Parquet file(s), 1 failed" in out and str(bad) in out
    assert sorted(n for n in os.listdir(run_dir / "grad_dotprods") if n.endswith(".parquet")) == [
        "iter_000002.parquet", "iter_000005.parquet"]
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["convert", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "has no grad_dotprods/ directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["conv", str(run_dir)])  # no abbreviations
    assert exit_info.value.code == 2


def test_analysis_on_a_dataframe_equals_analysis_on_column_dicts(tmp_path):
    run_dir = tmp_path / "run"
    per_layer_run(run_dir)
    columns = read_run(run_dir).columns
    frame = load_run(run_dir)
    frame.index = frame.index * 10 + 7  # a frame selected from a larger one keeps its index

    def assert_table_equal(got, expected):
        assert isinstance(got, pd.DataFrame) and list(got.columns) == list(expected)
        for name, values in expected.items():
            np.testing.assert_array_equal(got[name].to_numpy(dtype=np.asarray(values).dtype), values, err_msg=name)

    for convention in analysis.CONVENTIONS:
        values = analysis.compute_values(columns, convention)
        frame_values = analysis.compute_values(frame, convention)
        assert isinstance(frame_values, pd.Series) and (frame_values.index == frame.index).all()
        np.testing.assert_array_equal(frame_values.to_numpy(), values)
        for by in ("sample", "document"):
            table = analysis.aggregate(columns, values, by=by)
            frame_table = analysis.aggregate(frame, frame_values, by=by)
            assert_table_equal(frame_table, table)
            ranked = analysis.rank(table, 3)
            np.testing.assert_array_equal(analysis.rank(frame_table, 3), ranked)
            assert_table_equal(analysis.take(frame_table, ranked), analysis.take(table, ranked))
        samples, frame_samples = (analysis.aggregate(columns, values), analysis.aggregate(frame, frame_values))
        assert_table_equal(analysis.domain_summary(frame_samples), analysis.domain_summary(samples))
        for domain in ("Github", "ArXiv"):
            assert analysis.normalised_recall_at_k(frame_samples, domain, 2) == \
                analysis.normalised_recall_at_k(samples, domain, 2)
        steps, curves = analysis.cumulative_by_domain(columns, values)
        frame_curves = analysis.cumulative_by_domain(frame, frame_values)
        np.testing.assert_array_equal(frame_curves.index.to_numpy(), steps)
        assert_table_equal(frame_curves, curves)
    mask = analysis.rows_in_steps(frame, [2, 5])
    np.testing.assert_array_equal(mask.to_numpy(), analysis.rows_in_steps(columns, [2, 5]))
    assert sorted(set(frame[mask]["step"])) == [2, 5]


def test_first_order_dot_products_beside_another_estimator(tmp_path):
    """A deferred estimator's files carry the first-order dot products of the same rows: both formats keep them
    as the column first_order_dot_products (NaN in the rows of files without it); a wrong length is refused;
    a run without them has no such column and valuing it says why."""
    def midpoint(steps):
        return dict(payload(steps), value="midpoint")

    with_first = step_record(1, [0.5, -1.0], ["Github", "ArXiv"])
    with_first["first_order_dot_products"] = np.array([0.25, 2.0], dtype=np.float32)
    without = step_record(2, [1.5], ["Github"])  # e.g. written before the column existed
    run_dir = tmp_path / "run"
    (run_dir / "grad_dotprods").mkdir(parents=True)
    save_dotprod_pickle(run_dir / "grad_dotprods" / "iter_000001.pkl", midpoint([with_first]))
    save_dotprod_parquet(run_dir / "grad_dotprods" / "iter_000002.parquet", midpoint([without]))
    (run_dir / "config.json").write_text('{"run_name": "t", "value": "midpoint", "max_steps": 2}')
    expected = np.array([0.25, 2.0, np.nan], dtype=np.float32)
    np.testing.assert_array_equal(read_run(run_dir, strict=True).columns["first_order_dot_products"], expected)
    frame = load_run(run_dir, strict=True)
    np.testing.assert_array_equal(frame["first_order_dot_products"].to_numpy(), expected)
    values = analysis.compute_values(frame, dots="first_order_dot_products")  # lr * w * first-order dot
    np.testing.assert_allclose(values.to_numpy(), [1e-3 * 0.5 * 0.25, 1e-3 * 0.5 * 2.0, np.nan])
    with pytest.raises(ValueError, match="holds first-order dot products, not 'midpoint'"):
        analysis.compute_values(frame, value="midpoint", dots="first_order_dot_products")

    save_dotprod_parquet(tmp_path / "iter_000001.parquet", midpoint([with_first]))  # read by plain pyarrow
    np.testing.assert_array_equal(pq.read_table(tmp_path / "iter_000001.parquet").column(
        "first_order_dot_products").to_numpy(), with_first["first_order_dot_products"])

    bad = dict(with_first, first_order_dot_products=np.zeros(3, dtype=np.float32))
    with pytest.raises(ResultsFormatError, match="'first_order_dot_products' must be a 1-D float array of 2 rows"):
        save_dotprod_pickle(tmp_path / "bad.pkl", midpoint([bad]))
    plain = tmp_path / "plain"
    write_run(plain, {1: [step_record(1, [0.5], ["Github"])]})
    assert "first_order_dot_products" not in load_run(plain)
    with pytest.raises(ValueError, match="no 'first_order_dot_products' column"):
        analysis.compute_values(load_run(plain), dots="first_order_dot_products")


# ---------------------------------------------------------------------------
# Damage, identity and bounded reads


def test_a_flipped_bit_in_a_parquet_file_is_named_and_its_pickle_read(tmp_path, monkeypatch):
    """One bit of one stored dot product in iter_000002.parquet: the file is named (by its page CRC, and with
    pyarrow < 15 or a file without CRCs by its content digest) and the pickle of the same steps gives exactly
    the values that were written; strict=True raises naming it. Damage in both loses those steps, both named."""
    for page_checksums, message in ((True, "iter_000002.parquet: cannot read Parquet: page checksum mismatch, "
                                           "the file is damaged"),
                                    (False, r"iter_000002.parquet: content hash mismatch \(content_sha256\)")):
        monkeypatch.setattr(results_io, "_PAGE_CHECKSUMS", page_checksums)
        run_dir = tmp_path / f"crc-{page_checksums}"
        written = [step_record(1, [0.5, -1.5], ["Github", "ArXiv"]),
                   step_record(2, [2718.2818, 3.25], ["Github", "ArXiv"])]
        run_with_id(run_dir, {2: written, 3: [step_record(3, [4.0], ["Github"])]}, "d1ce",
                    formats=("pickle", "parquet"))
        reference = read_run(run_dir, strict=True).columns
        np.testing.assert_array_equal(reference["dot_products"],
                                      np.array([0.5, -1.5, 2718.2818, 3.25, 4.0], dtype=np.float32))
        bad = run_dir / "grad_dotprods" / "iter_000002.parquet"
        flip_low_bit_of(bad, 2718.2818)
        with pytest.raises(ResultsFormatError, match=message):
            read_run(run_dir, strict=True)
        with pytest.warns(UserWarning, match=message):
            run = read_run(run_dir)
        assert [p for p, _ in run.skipped] == [str(bad)]
        assert [os.path.basename(p) for p in run.files] == ["iter_000002.pkl", "iter_000003.parquet"]
        assert_same_columns(run.columns, reference)

        pickle_path = run_dir / "grad_dotprods" / "iter_000002.pkl"
        flip_low_bit_of(pickle_path, 2718.2818)
        with pytest.warns(UserWarning) as caught:
            run = read_run(run_dir)
        assert sorted(p for p, _ in run.skipped) == sorted([str(bad), str(pickle_path)])
        assert "content hash mismatch" in dict(run.skipped)[str(pickle_path)] and len(caught) >= 2
        assert run.columns["step"].tolist() == [3] and run.missing_steps == [1, 2]
        os.remove(bad)  # only the damaged pickle: strict names it
        with pytest.raises(ResultsFormatError, match=r"iter_000002.pkl: content hash mismatch"):
            read_run(run_dir, strict=True)


def test_a_damaged_pickle_beside_an_intact_parquet_file_is_not_needed(tmp_path):
    """The Parquet file is read first and intact: the damaged pickle of the same steps is not read at all."""
    run_dir = tmp_path / "run"
    run_with_id(run_dir, {1: [step_record(1, [1618.0339, 1.0], ["Github", "ArXiv"])]}, "e1",
                formats=("pickle", "parquet"))
    flip_low_bit_of(run_dir / "grad_dotprods" / "iter_000001.pkl", 1618.0339)
    run = read_run(run_dir, strict=True)
    np.testing.assert_array_equal(run.columns["dot_products"], np.array([1618.0339, 1.0], dtype=np.float32))


def test_a_foreign_parquet_file_gives_way_to_the_runs_own_pickle(tmp_path):
    """Another run's iter_000001.parquet (same run_name, another run_id) beside the run's own iter_000001.pkl:
    the pickle's rows are returned and the Parquet file is named; the same without config.json, where the id most
    files carry decides."""
    run_dir = tmp_path / "run"
    run_with_id(run_dir, {i: [step_record(i, [float(i)], ["A"])] for i in (1, 2, 3)}, "0001")
    other = tmp_path / "other"
    run_with_id(other, {1: [step_record(1, [-7.0], ["A"])]}, "0002", formats=("parquet",))
    foreign = run_dir / "grad_dotprods" / "iter_000001.parquet"
    os.replace(other / "grad_dotprods" / "iter_000001.parquet", foreign)
    for config in (True, False):
        if not config:
            os.remove(run_dir / "config.json")
        with pytest.warns(UserWarning, match=r"iter_000001.parquet: written by run 't' with run_id 0002"):
            run = read_run(run_dir)
        assert run.columns["dot_products"].tolist() == [1.0, 2.0, 3.0] and run.run_id == "0001"
        assert [os.path.basename(p) for p in run.files] == ["iter_000001.pkl", "iter_000002.pkl", "iter_000003.pkl"]


def test_convert_carries_run_id_and_digests_and_refuses_a_damaged_pickle(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_with_id(run_dir, {1: [step_record(1, [1.0, 2.0], ["A", "B"])], 2: [step_record(2, [577.2156], ["A"])]}, "cafe")
    flip_low_bit_of(run_dir / "grad_dotprods" / "iter_000002.pkl", 577.2156)
    assert convert.main(["convert", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "wrote 1 Parquet file(s), 1 failed" in out and "iter_000002.pkl: ResultsFormatError" in out
    assert "content hash mismatch" in out
    assert sorted(os.listdir(run_dir / "grad_dotprods")) == ["iter_000001.parquet", "iter_000001.pkl",
                                                             "iter_000002.pkl"]
    metadata = json.loads(pq.read_schema(run_dir / "grad_dotprods" / "iter_000001.parquet").metadata[b"graddotprod"])
    stored = safe_load_pickle(run_dir / "grad_dotprods" / "iter_000001.pkl")
    assert metadata["run_id"] == "cafe"
    assert (metadata["content_sha256"], metadata["per_layer_sha256"]) == (stored["content_sha256"],
                                                                          stored["per_layer_sha256"])


def hostile_parquet(path, rows_per_group, groups, **writer_options):
    """A Parquet file with this package's metadata and schema declaring rows_per_group x groups rows of constant
    values, written with pyarrow's own choices (`writer_options`) instead of this package's."""
    import pyarrow as pa

    n = rows_per_group
    table = pa.table({
        "step": np.ones(n, np.int64), "lr": np.full(n, 1e-3), "train_loss": np.full(n, 3.0),
        "val_loss": np.full(n, 3.5), "dot_products": np.ones(n, np.float32), "batch_weight": np.ones(n, np.float32),
        "token_count": np.ones(n, np.int64),
        "domain": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array(["Github"])),
        "token_offset": np.zeros(n, np.int64), "doc_id": np.zeros(n, np.int64), "sample_index": np.zeros(n, np.int64)})
    metadata = {"schema": "graddotprod.dotprods", "schema_version": 1, "run_name": "t", "world_size": 1}
    with pq.ParquetWriter(path, table.schema, store_schema=False, **writer_options) as writer:
        for _ in range(groups):
            writer.write_table(table)
        writer.add_key_value_metadata({"graddotprod": json.dumps(metadata)})


LOAD_AND_MEASURE = """
import json, resource, sys
import pyarrow as pa
from ghost_results.results_io import ResultsFormatError, read_run
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    outcome = "rows %d" % read_run(sys.argv[1], strict=True).num_rows
except ResultsFormatError as err:
    outcome = str(err)
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"outcome": outcome, "rss_growth_mib": growth,
                  "arrow_peak_mib": pa.default_memory_pool().max_memory() / 2**20}))
"""


def test_a_parquet_file_declaring_more_rows_than_it_can_hold_is_refused_before_reading(tmp_path):
    """A ~220 KB file declaring 5,000,000 rows (constants, dictionary-encoded: what fault 6 reproduced; the
    loader used to allocate over 600 MB and return them) is refused naming it, in a fresh process that grows by
    less than 64 MiB; so are variants: zstd-compressed plain constants, a row-group row count the footer contradicts."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    os.makedirs(run_dir / "grad_dotprods")
    huge = run_dir / "grad_dotprods" / "iter_000001.parquet"
    hostile_parquet(huge, 500_000, 10, compression="snappy")
    assert huge.stat().st_size < 400_000
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(run_dir)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["outcome"].startswith(f"{huge}: its Parquet footer declares 500,000 rows in row group 0, which "
                                          "take at least 36,000,000 bytes (72 a row), in "), measured
    assert measured["rss_growth_mib"] < 64 and measured["arrow_peak_mib"] < 16, measured

    hostile_parquet(huge, 200_000, 1, compression="zstd", use_dictionary=False)  # plain, but ~100x compressed
    with pytest.raises(ResultsFormatError, match=r"iter_000001.parquet: its Parquet footer declares 16,[\d,]+ bytes "
                                                 r"of column data, more than 22 times the [\d,]+ bytes outside its footer"):
        read_run(run_dir, strict=True)
    with pytest.warns(UserWarning, match="iter_000001.parquet: its Parquet footer"):
        assert read_run(run_dir).num_rows == 0

    # a genuine file of 300 rows whose Thrift footer is patched to declare 5,000,000: in the file's num_rows only
    # (the first i64 field 3 after the schema: header 0x16, zigzag(300) = 600 as a varint), then in every count
    # of 300 (the row group's num_rows and every column chunk's num_values too)
    results_io.flush_dotprods(run_dir, "t", 1, [step_record(1, np.arange(300), ["A"] * 300)], ("parquet",))
    genuine = huge.read_bytes()
    footer_length = int.from_bytes(genuine[-8:-4], "little")
    footer = genuine[-8 - footer_length:-8]

    def varint(value):
        encoded = b""
        while value >= 0x80:
            encoded, value = encoded + bytes([value & 0x7F | 0x80]), value >> 7
        return encoded + bytes([value])

    count, lie = b"\x16" + varint(600), b"\x16" + varint(10_000_000)
    assert footer.count(count) >= 13  # num_rows, the row group's, 11 columns'
    for patched, message in ((footer.replace(count, lie, 1), "declares 5,000,000 rows but its row groups 300"),
                             (footer.replace(count, lie), "declares 5,000,000 rows in row group 0, which take at "
                                                          "least 360,000,000 bytes")):
        huge.write_bytes(genuine[:-8 - footer_length] + patched + len(patched).to_bytes(4, "little") + b"PAR1")
        assert pq.ParquetFile(huge).metadata.num_rows == 5_000_000
        with pytest.raises(ResultsFormatError, match=f"iter_000001.parquet: its Parquet footer {message}"):
            read_run(run_dir, strict=True)
