"""Compaction (ghost_results.compact) and the lazy scan (ghost_results.scan): a compacted run reads back bit for
bit as it did before, damage is named and refused as in step files, another run's file is never merged, a kill
between the phases leaves the same rows, a resume splits a compacted file, and scan_run selects what filtering
read_run's frame selects."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from ghost_results import compact as compaction
from ghost_results import convert, results_io
from ghost_results.results_io import ResultsFormatError, read_run, set_aside_after
from ghost_results.run_directory import DamagedRunFile, RunDirectory, RunLock
from ghost_results.scan import per_layer_columns, scan_run
from test_results_io import flip_low_bit_of, payload, step_record

RUN_ID = "5ca1ab1e"
LAYERS = ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.ln_1.bias")
DOMAINS = ["Github", "ArXiv", "Pile-CC"]


def record(rng, step, rows=3, layers=LAYERS, first_order=False):
    dots, domains = rng.standard_normal(rows), rng.choice(DOMAINS, rows).tolist()
    per_layer = {name: rng.standard_normal(rows).astype(np.float32) for name in layers} if layers else None
    r = step_record(step, dots, domains, lr=1e-3 / step, per_layer=per_layer)
    if first_order:
        r["first_order_dot_products"] = rng.standard_normal(rows).astype(np.float32)
    return r


def make_run(run_dir, last_step=40, interval=2, seed=0, run_id=RUN_ID):
    """A run of last_step / interval step files: Parquet by default, both formats for every 3rd file, a pickle
    alone for every 5th; step 7's file without per-layer values, step 9's and 10's with first-order dot products;
    the run renamed ("t" -> "t2") from step 21 on (one run_id)."""
    rng = np.random.default_rng(seed)
    for last in range(interval, last_step + 1, interval):
        steps = range(last - interval + 1, last + 1)
        records = [record(rng, step, layers=() if step == 7 else LAYERS, first_order=step in (9, 10)) for step in steps]
        formats = ("pickle",) if last % (5 * interval) == 0 else \
            ("parquet", "pickle") if last % (3 * interval) == 0 else ("parquet",)
        results_io.flush_dotprods(run_dir, "t" if last <= 20 else "t2", 1, records, formats, run_id=run_id)
    (run_dir / "config.json").write_text(json.dumps({"run_name": "t2", "run_id": run_id, "max_steps": last_step}))


def assert_bit_equal(got, expected):
    assert list(got) == list(expected)
    for name, values in expected.items():
        assert got[name].dtype == values.dtype, name
        if values.dtype.kind == "f":  # NaN gaps included: the bytes
            assert got[name].tobytes() == values.tobytes(), name
        else:
            np.testing.assert_array_equal(got[name], values, err_msg=name)


def listing(run_dir):
    return sorted(os.listdir(run_dir / "grad_dotprods"))


def test_compaction_reads_back_bit_for_bit_and_twice_is_a_no_op(tmp_path, capsys):
    """40 steps in 20 step files (Parquet, pickles, both), per-layer values with a gap, first-order dot products in
    two steps, a rename: `python -m ghost_results compact --steps_per_file 16 --row_group_rows 10` leaves three
    compacted files (≤ 16 steps each, segments whole in row groups), no step file, and read_run returns the same
    columns bit for bit, with and without per-layer columns. A second compaction writes and removes nothing."""
    run_dir = tmp_path / "run"
    make_run(run_dir)
    assert len(listing(run_dir)) == 20 + 5  # 4 of the 20 are pickles alone, 5 Parquet files have a pickle twin
    before = {per_layer: read_run(run_dir, per_layer=per_layer, strict=True) for per_layer in (False, True)}
    assert np.isnan(before[True].columns["per_layer/transformer.wte.weight"][before[True].columns["step"] == 7]).all()

    assert convert.main(["compact", str(run_dir), "--steps_per_file", "16", "--row_group_rows", "10"]) == 0
    assert "25 file(s) -> 3: wrote 3 compacted file(s), removed 25 file(s)" in capsys.readouterr().out
    assert listing(run_dir) == ["compact_000001_000016.parquet", "compact_000017_000032.parquet",
                                "compact_000033_000040.parquet"]
    for per_layer, reference in before.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            after = read_run(run_dir, per_layer=per_layer, strict=True)
        assert_bit_equal(after.columns, reference.columns)
        assert after.missing_steps == [] and after.skipped == [] and after.unverified == [] and after.run_id == RUN_ID
        assert [os.path.basename(p) for p in after.files] == listing(run_dir)
    first = run_dir / "grad_dotprods" / "compact_000001_000016.parquet"
    segments = results_io.compacted_segments(first)
    assert [s["source"] for s in segments] == [f"iter_{step:06d}" for step in range(2, 17, 2)]
    assert {s["run_name"] for s in results_io.compacted_segments(run_dir / "grad_dotprods" /
                                                                 "compact_000017_000032.parquet")} == {"t", "t2"}
    metadata = pq.ParquetFile(first).metadata
    assert metadata.num_row_groups == 4 and [metadata.row_group(i).num_rows for i in range(4)] == [12] * 4
    columns = pq.read_schema(first).names  # names no SQL engine needs quoted, mapped back in the metadata
    assert "per_layer__transformer_h_0_attn_c_attn_weight" in columns and all(c.isidentifier() for c in columns)

    mtimes = {name: (run_dir / "grad_dotprods" / name).stat().st_mtime_ns for name in listing(run_dir)}
    done = compaction.compact(run_dir, steps_per_file=16, row_group_rows=10)
    assert (done.written, done.removed, done.left) == ([], [], [])
    assert {name: (run_dir / "grad_dotprods" / name).stat().st_mtime_ns for name in listing(run_dir)} == mtimes


def test_compaction_merges_a_window_again_and_keeps_files_of_old_names(tmp_path):
    """A window compacted while the run was at step 10 gets steps 11..16 merged into one file later; a Parquet
    file written before safe per-parameter names (columns per_layer/<name>) reads as before, and compaction
    renames its columns."""
    run_dir = tmp_path / "run"
    make_run(run_dir, last_step=10)
    old_style = run_dir / "grad_dotprods" / "iter_000004.parquet"  # rewritten as the writer before safe names did
    content = results_io._read_parquet(str(old_style), per_layer=True)
    table = pa.table({name: pa.array(values.tolist() if name == "domain" else values)
                      for name, values in content.columns.items()})
    header = results_io.file_header(old_style)
    del header["per_layer_columns"]
    with pq.ParquetWriter(old_style, table.schema, store_schema=False) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata({"graddotprod": json.dumps(header)})
    assert "per_layer/transformer.wte.weight" in pq.read_schema(old_style).names
    reference = read_run(run_dir, per_layer=True, strict=True).columns
    compaction.compact(run_dir, steps_per_file=16)
    assert listing(run_dir) == ["compact_000001_000010.parquet"]
    rng = np.random.default_rng(7)
    for last in (12, 14, 16, 18):
        results_io.flush_dotprods(run_dir, "t", 1, [record(rng, last - 1), record(rng, last)], run_id=RUN_ID)
    grown = read_run(run_dir, per_layer=True, strict=True).columns
    assert_bit_equal({name: values[grown["step"] <= 10] for name, values in grown.items()}, reference)
    compaction.compact(run_dir, steps_per_file=16)
    assert listing(run_dir) == ["compact_000001_000016.parquet", "compact_000017_000018.parquet"]
    assert_bit_equal(read_run(run_dir, per_layer=True, strict=True).columns, grown)
    assert not [c for c in pq.read_schema(run_dir / "grad_dotprods" / "compact_000001_000016.parquet").names
                if "/" in c]


def test_safe_per_parameter_names_keep_names_that_would_collide_apart():
    names = results_io.per_layer_column_names(["h.0.W", "h.0.w", "a.b", "a_b", "transformer.ln_f.bias"])
    assert names["transformer.ln_f.bias"] == "per_layer__transformer_ln_f_bias"
    assert len(set(names.values())) == 5 and all(c.isidentifier() and c == c.lower() for c in names.values())
    assert names["a.b"].startswith("per_layer__a_b__") and names["a_b"].startswith("per_layer__a_b__")
    assert results_io.per_layer_column_names(["a.b"]) == {"a.b": "per_layer__a_b"}


def test_a_damaged_compacted_file_is_named_and_refused(tmp_path, monkeypatch):
    """One flipped bit in a stored dot product of a compacted file: the file, its row group and the steps are
    named (by the page CRC, or by the segment's content digest when pages carry no CRC) and refused as a step
    file is; only that row group's steps are missing. A truncated compacted file is refused whole, and a segment
    whose recorded digest was edited is named. Compaction leaves a window whose compacted file is damaged."""
    for page_checksums, message in ((True, r"compact_000001_000008.parquet row group 2: cannot read Parquet: page "
                                           r"checksum mismatch, the file is damaged .* "
                                           r"\(steps 5..5, from iter_000005\)"),
                                    (False, r"compact_000001_000008.parquet \(steps 6..6, from iter_000006\): content "
                                            r"hash mismatch \(content_sha256\)")):
        monkeypatch.setattr(results_io, "_PAGE_CHECKSUMS", page_checksums)
        run_dir = tmp_path / f"crc-{page_checksums}"
        for step in range(1, 9):  # one step a file; step 6 holds a value stored once
            dots = [31415.926, 1.0] if step == 6 else [float(step), 2.0]
            results_io.flush_dotprods(run_dir, "t", 1, [step_record(step, dots, ["Github", "ArXiv"])],
                                      run_id=RUN_ID)
        (run_dir / "config.json").write_text(json.dumps({"run_name": "t", "run_id": RUN_ID, "max_steps": 8}))
        reference = read_run(run_dir, strict=True).columns
        compaction.compact(run_dir, row_group_rows=4)  # row groups: steps 1-2, 3-4, 5-6, 7-8
        compacted = run_dir / "grad_dotprods" / "compact_000001_000008.parquet"
        flip_low_bit_of(compacted, 31415.926)
        with pytest.raises(ResultsFormatError, match=message):
            read_run(run_dir, strict=True)
        with pytest.warns(UserWarning) as caught:
            run = read_run(run_dir)
        assert any(re.search(message, str(w.message)) for w in caught)
        assert {p for p, _ in run.skipped} == {str(compacted)}
        assert run.missing_steps == ([5, 6] if page_checksums else [6])
        keep = ~np.isin(reference["step"], run.missing_steps)
        assert_bit_equal(run.columns, {name: values[keep] for name, values in reference.items()})
        assert compaction.compact(run_dir).written == []  # a window of one compacted file is not even read
        results_io.flush_dotprods(run_dir, "t", 1, [step_record(9, [9.0], ["A"])], run_id=RUN_ID)
        done = compaction.compact(run_dir)  # with a step file to merge into it: read, found damaged, left
        assert done.written == [] and [p for p, _ in done.left] == [str(compacted)]
        assert "window not compacted" in done.left[0][1]
        assert listing(run_dir) == ["compact_000001_000008.parquet", "iter_000009.parquet"]

    metadata = json.loads(pq.read_schema(compacted).metadata[b"graddotprod"])
    metadata["segments"][0]["content_sha256"] = "0" * 64  # the recorded digest edited, the rows intact
    table = pq.read_table(compacted)
    with pq.ParquetWriter(compacted, table.schema, store_schema=False) as writer:
        writer.write_table(table, row_group_size=4)
        writer.add_key_value_metadata({"graddotprod": json.dumps(metadata)})
    with pytest.raises(ResultsFormatError, match=r"\(steps 1..1, from iter_000001\): content hash mismatch"):
        read_run(run_dir, strict=True)
    compacted.write_bytes(compacted.read_bytes()[:-100])  # truncated: the footer is gone
    with pytest.raises(ResultsFormatError, match="compact_000001_000008.parquet: cannot read Parquet"):
        read_run(run_dir, strict=True)
    with pytest.warns(UserWarning, match="compact_000001_000008.parquet"):
        assert read_run(run_dir).missing_steps == list(range(1, 9))


def test_another_runs_file_is_never_merged(tmp_path, capsys):
    """Another run's step file (same name, another run_id), a file from before content digests and another run's
    compacted file in a run: compaction merges only the run's own files and names the others, which stay; the
    loader and the scan leave them out as before."""
    run_dir, other = tmp_path / "run", tmp_path / "other"
    make_run(run_dir, last_step=12)
    make_run(other, last_step=24, seed=1, run_id="0the4")
    foreign = run_dir / "grad_dotprods" / "iter_000014.parquet"
    shutil.copy(other / "grad_dotprods" / "iter_000014.parquet", foreign)
    legacy = run_dir / "grad_dotprods" / "iter_000016.pkl"
    legacy.write_bytes(__import__("pickle").dumps(payload([step_record(15, [1.0], ["A"])]), protocol=4))
    with pytest.warns(UserWarning):
        reference = read_run(run_dir, per_layer=True)
    assert convert.main(["compact", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert f"left {foreign}: written by run 't' with run_id 0the4" in out
    assert f"left {legacy}: written by run 't' without a run_id" in out
    assert listing(run_dir) == ["compact_000001_000012.parquet", "iter_000014.parquet", "iter_000016.pkl"]
    assert {s["run_id"] for s in results_io.compacted_segments(run_dir / "grad_dotprods" /
                                                               "compact_000001_000012.parquet")} == {RUN_ID}
    with pytest.warns(UserWarning) as caught:
        after = read_run(run_dir, per_layer=True)
    assert any("iter_000014.parquet: written by run 't' with run_id 0the4" in str(w.message) for w in caught)
    assert_bit_equal(after.columns, reference.columns)

    compaction.compact(other, steps_per_file=100)  # another run's compacted file copied in
    shutil.copy(other / "grad_dotprods" / "compact_000001_000024.parquet", run_dir / "grad_dotprods")
    with pytest.warns(UserWarning) as caught:
        assert_bit_equal(read_run(run_dir, per_layer=True).columns, reference.columns)
    assert sum("compact_000001_000024.parquet: written by run 't' with run_id 0the4, not by this run" in str(w.message)
               for w in caught) == 10  # each of its segments of run 't'; those of 't2' as well, by their name
    os.remove(foreign), os.remove(legacy)
    with pytest.raises(ResultsFormatError, match=r"compact_000001_000024.parquet: written by run 't' with run_id "
                                                 "0the4, not by this run"):
        read_run(run_dir, strict=True)
    with pytest.warns(UserWarning) as caught:
        paths = [os.path.basename(f) for f in scan_run(run_dir).files]
    assert paths == ["compact_000001_000012.parquet"]
    said = " ".join(str(w.message) for w in caught)
    assert "compact_000001_000024.parquet" in said and "pickles alone" not in said
    done = compaction.compact(run_dir)
    assert done.written == [] and "compact_000001_000024.parquet" in done.left[0][0]
    assert "compact_000001_000024.parquet" in listing(run_dir)


class Stop(Exception):
    pass


@pytest.mark.parametrize("phase", ["inside the write", "written", "removed"])
def test_a_stop_between_the_phases_leaves_the_same_rows(tmp_path, monkeypatch, phase):
    """An exception inside the durable write, after the compacted file is durable (nothing removed yet) or after
    the first step file is removed: read_run returns the same columns bit for bit, without a warning; a second
    compaction ends where an uninterrupted one ends."""
    run_dir = tmp_path / "run"
    make_run(run_dir, last_step=20)
    reference = read_run(run_dir, per_layer=True, strict=True).columns
    clean = tmp_path / "clean"
    shutil.copytree(run_dir, clean)
    compaction.compact(clean, steps_per_file=10)

    if phase == "inside the write":
        real = results_io._parquet_table
        calls = []

        def failing(*args):
            calls.append(1)
            if len(calls) == 3:
                raise Stop
            return real(*args)

        monkeypatch.setattr(results_io, "_parquet_table", failing)
    else:
        def stop(at, path):
            if at == phase:
                raise Stop

        monkeypatch.setattr(compaction, "_after", stop)
    with pytest.raises(Stop):
        compaction.compact(run_dir, steps_per_file=10, row_group_rows=6)
    monkeypatch.undo()
    names = listing(run_dir)
    assert not [name for name in names if ".tmp-" in name]
    if phase == "inside the write":
        assert not [name for name in names if name.startswith("compact")]
    else:
        assert "compact_000001_000010.parquet" in names and len(names) >= 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = read_run(run_dir, per_layer=True, strict=True)
    assert_bit_equal(run.columns, reference)
    assert run.duplicate_steps == [] and run.skipped == []
    if phase != "inside the write":  # the step files the compacted file holds are left out of a scan, silently
        with pytest.warns(UserWarning, match="pickles alone") as caught:
            dataset = scan_run(run_dir)
        assert len(caught) == 1 and dataset.count_rows() == int((reference["step"] <= 18).sum())  # 19, 20: a pickle
    compaction.compact(run_dir, steps_per_file=10)
    assert listing(run_dir) == listing(clean)
    assert_bit_equal(read_run(run_dir, per_layer=True, strict=True).columns, reference)


KILLED_IN_RENAME = """
import os, signal, sys
from ghost_results import compact
real = os.replace
def replace(src, dst):
    if os.path.basename(dst).startswith("compact_"):
        os.kill(os.getpid(), signal.SIGKILL)  # the file is written and fsynced, not yet renamed
    return real(src, dst)
os.replace = replace
compact.compact(sys.argv[1], steps_per_file=10)
"""


def test_kill_9_before_the_rename_leaves_a_temporary_file_no_reader_takes(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir, last_step=10)
    before = {name: (run_dir / "grad_dotprods" / name).read_bytes() for name in listing(run_dir)}
    reference = read_run(run_dir, per_layer=True, strict=True).columns
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", KILLED_IN_RENAME, str(run_dir)], env=env, capture_output=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    temporary = [name for name in listing(run_dir) if name not in before]
    assert len(temporary) == 1 and temporary[0].startswith("compact.tmp-")
    assert {name: (run_dir / "grad_dotprods" / name).read_bytes() for name in before} == before
    assert_bit_equal(read_run(run_dir, per_layer=True, strict=True).columns, reference)
    compaction.compact(run_dir, steps_per_file=10)
    assert listing(run_dir) == ["compact_000001_000010.parquet"]
    assert_bit_equal(read_run(run_dir, per_layer=True, strict=True).columns, reference)


def test_a_resume_splits_a_compacted_file_at_its_step(tmp_path):
    """A resume from step 12 of a run compacted up to step 20: the segments of steps 1..12 become
    compact_000001_000012.parquet, the compacted file is moved whole to superseded/; a stop between the two
    leaves both, read as before (the common segments once), and the resume done again completes. The run's
    lock keeps compaction off a run in training, and a compacted file that cannot be split stops the resume
    before anything is moved."""
    run_dir = tmp_path / "run"
    make_run(run_dir, last_step=20)
    reference = read_run(run_dir, per_layer=True, strict=True).columns
    compaction.compact(run_dir, steps_per_file=100)
    compacted = run_dir / "grad_dotprods" / "compact_000001_000020.parquet"
    results_io._rewrite_compacted(str(compacted), 12)  # a stop after the first phase of the split
    assert listing(run_dir) == ["compact_000001_000012.parquet", "compact_000001_000020.parquet"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_bit_equal(read_run(run_dir, per_layer=True, strict=True).columns, reference)
    moved, destination = set_aside_after(str(run_dir), 12)
    assert moved == ["compact_000001_000020.parquet"]
    assert listing(run_dir) == ["compact_000001_000012.parquet"]
    assert os.listdir(os.path.join(destination, "grad_dotprods")) == ["compact_000001_000020.parquet"]
    kept = read_run(run_dir, per_layer=True, strict=True)
    assert_bit_equal(kept.columns, {name: values[reference["step"] <= 12] for name, values in reference.items()})
    assert results_io.dotprod_steps_on_disk(str(run_dir)) == [12]

    lock = RunLock(run_dir).acquire()  # a training process holds the run
    try:
        assert convert.main(["compact", str(run_dir)]) == 1
    finally:
        lock.release()
    damaged = run_dir / "grad_dotprods" / "compact_000001_000012.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    files = RunDirectory(run_dir)
    with pytest.raises(DamagedRunFile, match="compact_000001_000012.parquet"):
        files.open(10, run_id=RUN_ID, run_name="t2")
    assert listing(run_dir) == ["compact_000001_000012.parquet"]


def frame_of(table):
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def test_scan_run_selects_what_filtering_read_run_selects(tmp_path):
    """A run compacted up to step 16 with step files after it: one domain of a step range that spans both, a
    few columns, a per-parameter column by its safe name: the rows of read_run's frame filtered the same way,
    and only the row groups that can hold them are read."""
    run_dir = tmp_path / "run"
    make_run(run_dir, last_step=20)
    compaction.compact(run_dir, steps_per_file=16, row_group_rows=6)
    frame = read_run(run_dir, per_layer=True, strict=True).to_frame()
    for steps, domain in (((5, 18), "ArXiv"), ((1, 20), "Github"), ((9, 9), "Pile-CC")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dataset = scan_run(run_dir)
        column = {name: c for c, name in per_layer_columns(dataset).items()}["transformer.h.0.attn.c_attn.weight"]
        wanted = ["step", "sample_index", "domain", "dot_products", "lr", column]
        selection = (ds.field("step") >= steps[0]) & (ds.field("step") <= steps[1]) & (ds.field("domain") == domain)
        got = frame_of(dataset.to_table(columns=wanted, filter=selection).sort_by([("step", "ascending"),
                                                                                  ("sample_index", "ascending")]))
        rows = frame[frame["step"].between(*steps) & (frame["domain"] == domain)]
        assert len(rows) > 0 and len(got["step"]) == len(rows)
        for name in wanted:
            expected = rows["per_layer/transformer.h.0.attn.c_attn.weight" if name == column else name].to_numpy()
            np.testing.assert_array_equal(got[name], expected, err_msg=name)
    compacted = [f for f in dataset.get_fragments() if "compact_" in f.path][0]
    step_range = (ds.field("step") >= 5) & (ds.field("step") <= 6)
    assert len(list(compacted.split_by_row_group(filter=step_range))) == 1 < compacted.metadata.num_row_groups
    pl = pytest.importorskip("polars")
    lazy = scan_run(run_dir, engine="polars")
    got = lazy.filter(pl.col("domain") == "ArXiv").select("step", "dot_products").collect()
    assert got.height == int((frame["domain"] == "ArXiv").sum())


def test_a_step_file_with_other_contents_than_its_compacted_copy_is_refused(tmp_path):
    """iter_000004.parquet written again with other numbers beside the compacted file that holds iter_000004:
    strict reading names both files; otherwise the step file is skipped and the compacted copy read; the scan
    leaves it out with a warning, and compaction leaves it in place."""
    run_dir = tmp_path / "run"
    make_run(run_dir, last_step=8)
    reference = read_run(run_dir, per_layer=True, strict=True).columns
    compaction.compact(run_dir)
    rng = np.random.default_rng(99)
    results_io.flush_dotprods(run_dir, "t", 1, [record(rng, 3), record(rng, 4)], run_id=RUN_ID)
    message = (r"iter_000004.parquet: holds the steps of iter_000004 with other contents than .*"
               r"compact_000001_000008.parquet \(their content digests differ\)")
    with pytest.raises(ResultsFormatError, match=message):
        read_run(run_dir, strict=True)
    with pytest.warns(UserWarning, match=message):
        run = read_run(run_dir, per_layer=True)
    assert_bit_equal(run.columns, reference)
    with pytest.warns(UserWarning, match="iter_000004.parquet: holds the steps of iter_000004 with other contents"):
        assert [os.path.basename(f) for f in scan_run(run_dir).files] == ["compact_000001_000008.parquet"]
    done = compaction.compact(run_dir)
    assert done.written == [] and [os.path.basename(p) for p, _ in done.left] == ["iter_000004.parquet"]
    assert listing(run_dir) == ["compact_000001_000008.parquet", "iter_000004.parquet"]
