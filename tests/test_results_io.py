"""results_io: atomic writes, the restricted unpickler, and merging a run's files."""
import json
import os
import pickle

import numpy as np
import pytest

from ghost_results import results_io
from ghost_results.results_io import (
    SCHEMA_VERSION,
    ResultsFormatError,
    UnsafePickleError,
    load_dotprods,
    read_run,
    safe_load_pickle,
    save_dotprod_pickle,
)


def step_record(step, dots, domains, lr=1e-3, offsets=None, per_layer=None):
    n = len(dots)
    record = {
        "step": step, "lr": lr, "train_loss": 3.0, "val_loss": 3.5,
        "dot_products": np.asarray(dots, dtype=np.float32),
        "batch_weights": np.full(n, 1.0 / n, dtype=np.float32),
        "token_counts": np.full(n, 8, dtype=np.int64),
        "domain": list(domains),
        "token_offset": np.asarray(offsets if offsets is not None else [100 * step + i for i in range(n)],
                                   dtype=np.int64),
        "doc_id": np.arange(n, dtype=np.int64),
        "sample_index": np.arange(n, dtype=np.int64),
    }
    if per_layer is not None:
        record["per_layer"] = per_layer
    return record


def payload(steps):
    return {"schema": "graddotprod.dotprods", "schema_version": SCHEMA_VERSION, "run_name": "t",
            "world_size": 1, "steps": steps}


def write_run(run_dir, files):
    """files: {iteration: [step_record, ...]} -> grad_dotprods/iter_XXXXXX.pkl."""
    os.makedirs(run_dir / "grad_dotprods", exist_ok=True)
    for iteration, steps in files.items():
        save_dotprod_pickle(run_dir / "grad_dotprods" / f"iter_{iteration:06d}.pkl", payload(steps))


def test_round_trip_keeps_every_field(tmp_path):
    record = step_record(3, [0.5, -1.25], ["Github", "ArXiv"],
                         per_layer={"h.0.attn.c_attn.weight": np.array([0.25, -1.0], dtype=np.float32)})
    path = tmp_path / "iter_000003.pkl"
    save_dotprod_pickle(path, payload([record]))
    loaded = safe_load_pickle(path)
    assert loaded["schema_version"] == SCHEMA_VERSION
    got = loaded["steps"][0]
    for key, value in record.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[key], value)
            assert got[key].dtype == value.dtype
        elif key == "per_layer":
            np.testing.assert_array_equal(got[key]["h.0.attn.c_attn.weight"], value["h.0.attn.c_attn.weight"])
        else:
            assert got[key] == value


def test_save_rejects_non_plain_payload(tmp_path):
    class Opaque:
        pass

    bad = payload([step_record(1, [1.0], ["Github"])])
    bad["steps"][0]["extra"] = Opaque()
    with pytest.raises(ResultsFormatError, match="Opaque"):
        save_dotprod_pickle(tmp_path / "x.pkl", bad)
    wrong_shape = payload([step_record(1, [1.0, 2.0], ["Github"])])
    with pytest.raises(ResultsFormatError, match="'domain' has 1 rows, expected 2"):
        save_dotprod_pickle(tmp_path / "x.pkl", wrong_shape)
    assert not os.listdir(tmp_path)


def test_failed_write_leaves_old_file_and_no_partial(tmp_path, monkeypatch):
    path = tmp_path / "iter_000010.pkl"
    save_dotprod_pickle(path, payload([step_record(1, [1.0], ["Github"])]))
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(results_io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_dotprod_pickle(path, payload([step_record(2, [5.0, 6.0], ["ArXiv", "ArXiv"])]))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["iter_000010.pkl"]


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_rejected_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "iter_000001.pkl"
    path.write_bytes(pickle.dumps({"schema": "graddotprod.dotprods", "x": _RunsShell(marker)}))
    with pytest.raises(UnsafePickleError) as err:
        safe_load_pickle(path)
    assert str(path) in str(err.value) and "system" in str(err.value)
    assert not marker.exists()
    # the run loader never skips an unsafe file silently, even when not strict
    run_dir = tmp_path / "run"
    os.makedirs(run_dir / "grad_dotprods")
    os.replace(path, run_dir / "grad_dotprods" / "iter_000001.pkl")
    with pytest.raises(UnsafePickleError):
        load_dotprods(run_dir)
    assert not marker.exists()


class _Allocates:
    def __init__(self, builder, args):
        self.builder, self.args = builder, args

    def __reduce__(self):
        return (self.builder, self.args)


def test_pickles_that_allocate_are_refused_before_allocating(tmp_path):
    """A few dozen bytes asking for a 1.5 GB bytearray, or an ndarray of 10^12 elements, are refused;
    protocol 2, 4 and 5 pickles of real results (sets, bytes, arrays, scalars) still load."""
    from numpy._core.multiarray import _reconstruct

    for builder, args, message in [(bytearray, (1_500_000_000,), "builtins.bytearray"),
                                   (bytes, (1_500_000_000,), "builtins.bytes"),
                                   (_reconstruct, (np.ndarray, (10**12,), b"b"), "refusing to allocate")]:
        path = tmp_path / "hostile.pkl"
        path.write_bytes(pickle.dumps({"x": _Allocates(builder, args)}, protocol=4))
        assert path.stat().st_size < 200
        with pytest.raises(UnsafePickleError, match=message.replace(".", r"\.")):
            safe_load_pickle(path)
    real = {"steps": [{"a": np.arange(5, dtype=np.float32), "s": {1, 2}, "b": b"xy", "f": np.float32(2.5),
                       "u": np.zeros((2, 3), dtype=np.uint16)}]}
    for protocol in (2, 4, 5):
        path = tmp_path / f"real{protocol}.pkl"
        path.write_bytes(pickle.dumps(real, protocol=protocol))
        loaded = safe_load_pickle(path)["steps"][0]
        np.testing.assert_array_equal(loaded["a"], real["steps"][0]["a"])
        assert loaded["s"] == {1, 2} and loaded["b"] == b"xy" and loaded["u"].shape == (2, 3)


def test_numpy2_and_numpy1_module_paths_load(tmp_path):
    data = {"a": np.arange(4, dtype=np.float32), "s": np.float32(2.5), "dt": np.dtype("int64"),
            "u": np.array(["Github", "ArXiv"])}
    for protocol in (2, 4, 5):
        raw = pickle.dumps(data, protocol=protocol)
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(raw)
        loaded = safe_load_pickle(path)
        np.testing.assert_array_equal(loaded["a"], data["a"])
        assert loaded["s"] == np.float32(2.5) and loaded["dt"] == np.dtype("int64")
        np.testing.assert_array_equal(loaded["u"], data["u"])
    # protocol 2 spells globals as text: rewrite numpy 2's module path into numpy 1's
    raw = pickle.dumps(data, protocol=2)
    assert b"numpy._core.multiarray" in raw
    old_style = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path = tmp_path / "numpy1.pkl"
    path.write_bytes(old_style)
    loaded = safe_load_pickle(path)
    np.testing.assert_array_equal(loaded["a"], data["a"])


def test_load_merges_sorts_and_dedups(tmp_path):
    run_dir = tmp_path / "run"
    # step 2 written twice (crash + resume); the later file's copy wins
    write_run(run_dir, {
        2: [step_record(2, [9.0, 9.0], ["A", "A"]), step_record(1, [1.0, 2.0], ["A", "B"])],
        4: [step_record(2, [3.0, 4.0], ["A", "B"]), step_record(3, [5.0, 6.0], ["B", "B"], lr=2e-3)],
    })
    with pytest.warns(UserWarning, match=r"steps \[2\]"):
        cols = load_dotprods(run_dir)
    np.testing.assert_array_equal(cols["step"], [1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(cols["dot_products"], [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(cols["lr"], [1e-3] * 4 + [2e-3] * 2)
    np.testing.assert_array_equal(cols["domain"], ["A", "B", "A", "B", "B", "B"])
    np.testing.assert_array_equal(cols["batch_weight"], [0.5] * 6)
    assert cols.skipped == [] and cols.missing_steps == []


def test_rows_sorted_by_sample_index(tmp_path):
    run_dir = tmp_path / "run"
    record = step_record(1, [1.0, 2.0, 3.0], ["A", "B", "C"])
    record["sample_index"] = np.array([2, 0, 1], dtype=np.int64)
    write_run(run_dir, {1: [record]})
    cols = load_dotprods(run_dir)
    np.testing.assert_array_equal(cols["sample_index"], [0, 1, 2])
    np.testing.assert_array_equal(cols["domain"], ["B", "C", "A"])


def test_corrupt_file_skipped_or_raised(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, {1: [step_record(1, [1.0], ["A"])], 2: [step_record(2, [2.0], ["A"])]})
    bad = run_dir / "grad_dotprods" / "iter_000002.pkl"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.warns(UserWarning, match="iter_000002.pkl"):
        run = read_run(run_dir)
    assert [p for p, _ in run.skipped] == [str(bad)]
    np.testing.assert_array_equal(run.columns["step"], [1])
    with pytest.raises(ResultsFormatError, match="iter_000002.pkl"):
        read_run(run_dir, strict=True)


def test_unknown_schema_version_names_file(tmp_path):
    run_dir = tmp_path / "run"
    os.makedirs(run_dir / "grad_dotprods")
    future = payload([])
    future["schema_version"] = SCHEMA_VERSION + 1
    path = run_dir / "grad_dotprods" / "iter_000001.pkl"
    path.write_bytes(pickle.dumps(future))
    with pytest.raises(ResultsFormatError, match=rf"iter_000001.pkl: schema_version {SCHEMA_VERSION + 1}"):
        read_run(run_dir, strict=True)


def test_per_layer_columns_and_missing_steps(tmp_path):
    run_dir = tmp_path / "run"
    layer = {"wte.weight": np.array([0.5, 1.5], dtype=np.float32)}
    write_run(run_dir, {1: [step_record(1, [2.0, 2.0], ["A", "A"], per_layer=layer)],
                        3: [step_record(3, [1.0], ["A"])]})
    (run_dir / "config.json").write_text('{"max_steps": 4}')
    cols = load_dotprods(run_dir, per_layer=True)
    np.testing.assert_array_equal(cols["per_layer/wte.weight"], [0.5, 1.5, np.nan])
    assert cols.missing_steps == [2, 4]
    assert "per_layer/wte.weight" not in load_dotprods(run_dir)


def test_files_of_another_run_are_not_merged(tmp_path):
    """A pickle copied in from another run (its run_name differs from config.json's) is skipped, not merged."""
    run_dir = tmp_path / "run"
    write_run(run_dir, {2: [step_record(1, [1.0, 2.0], ["A", "B"]), step_record(2, [3.0, 4.0], ["A", "B"])]})
    (run_dir / "config.json").write_text(json.dumps({"run_name": "t", "max_steps": 3}))
    foreign = payload([step_record(3, [7.0, 8.0], ["A", "B"])])
    foreign["run_name"] = "other"
    save_dotprod_pickle(run_dir / "grad_dotprods" / "iter_000003.pkl", foreign)
    with pytest.warns(UserWarning, match="written by run 'other', not 't'"):
        run = read_run(run_dir)
    assert run.columns["step"].tolist() == [1, 1, 2, 2] and run.missing_steps == [3]
    assert [os.path.basename(p) for p, _ in run.skipped] == ["iter_000003.pkl"]
    with pytest.raises(ResultsFormatError, match="files of another run are not merged"):
        read_run(run_dir, strict=True)


def test_the_commands_convert_and_report_a_run(tmp_path):
    """`python -m ghost_results convert RUN` writes the Parquet file beside the pickle, and
    `python -m ghost_results.report RUN` reads the run, as commands in a fresh process."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_dir = tmp_path / "run"
    write_run(run_dir, {2: [step_record(1, [1.0, 2.0], ["A", "B"]), step_record(2, [3.0, -4.0], ["A", "B"])]})
    (run_dir / "config.json").write_text(json.dumps({"run_name": "t", "max_steps": 2}))

    def command(module, *args):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "wrote 1 Parquet file(s)" in command("ghost_results", "convert", str(run_dir))
    assert sorted(os.listdir(run_dir / "grad_dotprods")) == ["iter_000002.parquet", "iter_000002.pkl"]
    command("ghost_results.report", str(run_dir), "--out", str(tmp_path / "report"))
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Complete: steps 1..2" in report
