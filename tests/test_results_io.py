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


# ---------------------------------------------------------------------------
# Run identity (run_id) and content digests


def flip_low_bit_of(path, value):
    """Flip the lowest mantissa bit of the one float32 `value` stored in the file (a one-ulp change, the silent
    kind of damage): the value's 4 bytes must occur exactly once in the file."""
    data = bytearray(path.read_bytes())
    needle = np.float32(value).tobytes()
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, f"{value} not stored once, plainly, in {path}"
    data[at] ^= 0x01  # little-endian: the first byte holds the lowest mantissa bits
    path.write_bytes(bytes(data))


def run_with_id(run_dir, files, run_id, run_name="t", formats=("pickle",), config=True):
    """files: {iteration: [step_record, ...]} written by flush_dotprods as run `run_name` with `run_id`; config.json
    with both (config=False: none)."""
    for steps in files.values():
        results_io.flush_dotprods(run_dir, run_name, 1, list(steps), formats, run_id=run_id)
    if config:
        (run_dir / "config.json").write_text(json.dumps({"run_name": run_name, "run_id": run_id}))


def test_new_run_id_is_fresh_hex():
    ids = {results_io.new_run_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in ids)


def test_content_digest_follows_its_documented_format():
    """content_digest against sha256 computed here by hand from the docstring's description."""
    import hashlib

    identity = {"schema": "graddotprod.dotprods", "schema_version": 1, "run_name": "t", "run_id": "ab12",
                "world_size": 2, "value": "first_order"}
    columns = {"step": np.array([1, 2], dtype=np.int64), "domain": np.array(["Github", "Ä"]),
               "dot_products": np.array([0.5, -1.0], dtype=np.float32)}

    def framed(data):
        return len(data).to_bytes(8, "little") + data

    expected = b"graddotprod.content.v1" + framed(
        b'{"run_id":"ab12","run_name":"t","schema":"graddotprod.dotprods","schema_version":1,"value":"first_order",'
        b'"world_size":2}')
    expected += framed(b"domain") + framed(b"str") + framed((2).to_bytes(8, "little")) + \
        framed((6).to_bytes(8, "little") + (2).to_bytes(8, "little")) + framed("GithubÄ".encode())
    expected += framed(b"dot_products") + framed(b"<f4") + framed((2).to_bytes(8, "little")) + \
        (8).to_bytes(8, "little") + bytes.fromhex("0000003f000080bf")
    expected += framed(b"step") + framed(b"<i8") + framed((2).to_bytes(8, "little")) + \
        (16).to_bytes(8, "little") + (1).to_bytes(8, "little") + (2).to_bytes(8, "little")
    assert results_io.content_digest(identity, columns) == hashlib.sha256(expected).hexdigest()
    assert results_io.content_digest(dict(identity, run_id="ab13"), columns) != hashlib.sha256(expected).hexdigest()


def test_flush_stores_run_id_and_the_same_digests_in_both_formats(tmp_path):
    """The pickle payload and the Parquet metadata carry run_id and equal content digests, which are those of
    the columns load_run returns; run_id=None (a writer not given one) writes neither key and still loads."""
    import pyarrow.parquet as pq

    run_dir = tmp_path / "run"
    layer = {"wte.weight": np.array([0.25, -2.0], dtype=np.float32)}
    pending = [step_record(1, [1.5, -0.5], ["A", "B"], per_layer=layer)]
    paths = results_io.flush_dotprods(run_dir, "t", 1, pending, ("pickle", "parquet"), run_id="c0ffee")
    assert pending == [] and [os.path.basename(p) for p in paths] == ["iter_000001.pkl", "iter_000001.parquet"]
    stored = safe_load_pickle(paths[0])
    metadata = json.loads(pq.read_schema(paths[1]).metadata[b"graddotprod"])
    assert stored["run_id"] == metadata["run_id"] == "c0ffee"
    for key in results_io.DIGEST_KEYS:
        assert stored[key] == metadata[key] and len(stored[key]) == 64
    (run_dir / "config.json").write_text(json.dumps({"run_name": "t", "run_id": "c0ffee"}))
    for path in paths:  # each format alone
        alone = tmp_path / os.path.basename(path)
        os.makedirs(alone / "grad_dotprods")
        (alone / "config.json").write_text(json.dumps({"run_name": "t", "run_id": "c0ffee"}))
        os.link(path, alone / "grad_dotprods" / os.path.basename(path))
        run = read_run(alone, per_layer=True, strict=True)
        assert run.unverified == [] and run.run_id == "c0ffee"
        identity = {"schema": "graddotprod.dotprods", "schema_version": 1, "run_name": "t", "run_id": "c0ffee",
                    "world_size": 1, "value": "first_order"}
        assert results_io.content_digests(identity, run.columns) == tuple(stored[k] for k in results_io.DIGEST_KEYS)

    legacy_writer = tmp_path / "no-id"
    paths = results_io.flush_dotprods(legacy_writer, "t", 1, [step_record(1, [1.0], ["A"])], ("pickle", "parquet"))
    assert "run_id" not in safe_load_pickle(paths[0])
    assert b"run_id" not in pq.read_schema(paths[1]).metadata[b"graddotprod"]
    run = read_run(legacy_writer, strict=True)
    assert run.unverified == [] and run.run_id is None and run.columns["dot_products"].tolist() == [1.0]


def test_a_file_of_another_run_with_the_same_name_is_refused_by_its_run_id(tmp_path):
    """Another run named 't' (another run_id, or none: a file from before run ids) copied into grad_dotprods/,
    even for the run's own steps: strict raises naming the file and both ids; otherwise it is skipped and the
    run's own rows come back unchanged."""
    run_dir = tmp_path / "run"
    own = {2: [step_record(1, [1.0, 2.0], ["A", "B"]), step_record(2, [3.0, 4.0], ["A", "B"])],
           4: [step_record(3, [5.0, 6.0], ["A", "B"]), step_record(4, [7.0, 8.0], ["A", "B"])]}
    run_with_id(run_dir, own, "1d0f")
    expected = read_run(run_dir, strict=True).columns
    other = tmp_path / "other"
    run_with_id(other, {3: [step_record(2, [-9.0, -9.0], ["A", "B"]), step_record(3, [-9.0, -9.0], ["A", "B"])]},
                "beef")
    foreign = run_dir / "grad_dotprods" / "iter_000003.pkl"
    os.replace(other / "grad_dotprods" / "iter_000003.pkl", foreign)
    with pytest.raises(ResultsFormatError, match=r"iter_000003.pkl: written by run 't' with run_id beef, not by this "
                                                 r"run \('t', run_id 1d0f from config.json\)"):
        read_run(run_dir, strict=True)
    with pytest.warns(UserWarning, match="iter_000003.pkl") as caught:
        run = read_run(run_dir)
    assert not any("more than one file" in str(w.message) for w in caught)
    assert [p for p, _ in run.skipped] == [str(foreign)] and run.duplicate_steps == []
    for name, values in expected.items():
        np.testing.assert_array_equal(run.columns[name], values, err_msg=name)

    save_dotprod_pickle(foreign, payload([step_record(3, [-9.0, -9.0], ["A", "B"])]))  # no run_id at all
    with pytest.raises(ResultsFormatError, match="iter_000003.pkl: written by run 't' without a run_id, but this run"):
        read_run(run_dir, strict=True)
    with pytest.warns(UserWarning, match="unknown identity"):
        np.testing.assert_array_equal(read_run(run_dir).columns["dot_products"], expected["dot_products"])


def test_a_renamed_run_keeps_its_files(tmp_path):
    """A run moved to a new name and resumed: its files carry both names and one run_id, config.json the new
    name; every file is merged, with no warning."""
    import warnings

    run_dir = tmp_path / "renamed"
    run_with_id(run_dir, {2: [step_record(1, [1.0], ["A"]), step_record(2, [2.0], ["A"])]}, "5eed", run_name="base",
                formats=("pickle", "parquet"))
    run_with_id(run_dir, {3: [step_record(3, [3.0], ["A"])]}, "5eed", run_name="renamed", formats=("pickle", "parquet"))
    (run_dir / "config.json").write_text(json.dumps({"run_name": "renamed", "run_id": "5eed", "max_steps": 3}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = read_run(run_dir, strict=True)
    assert run.columns["step"].tolist() == [1, 2, 3] and run.columns["dot_products"].tolist() == [1.0, 2.0, 3.0]
    assert run.missing_steps == [] and run.skipped == [] and len(run.files) == 2


def test_without_config_json_the_id_most_files_carry_decides(tmp_path):
    run_dir = tmp_path / "run"
    run_with_id(run_dir, {1: [step_record(1, [1.0], ["A"])], 3: [step_record(3, [3.0], ["A"])]}, "aaaa", config=False)
    results_io.flush_dotprods(run_dir, "t", 1, [step_record(2, [-1.0], ["A"])], ("pickle",), run_id="bbbb")
    with pytest.warns(UserWarning, match=r"iter_000002.pkl: written by run 't' with run_id bbbb"):
        run = read_run(run_dir)
    assert run.run_id == "aaaa" and run.columns["step"].tolist() == [1, 3] and run.missing_steps == [2]


def test_files_written_before_run_ids_and_digests_still_load(tmp_path):
    """Legacy files (no run_id, no digests) of a legacy run (config.json without run_id) load as before, listed
    as unverified; a file with a run_id in such a run is merged by its run_name."""
    run_dir = tmp_path / "run"
    os.makedirs(run_dir / "grad_dotprods")
    legacy = payload([step_record(1, [1.0, 2.0], ["A", "B"])])
    legacy_path = run_dir / "grad_dotprods" / "iter_000001.pkl"
    legacy_path.write_bytes(pickle.dumps(legacy, protocol=4))  # as the writer before this change did
    results_io.flush_dotprods(run_dir, "t", 1, [step_record(2, [3.0], ["A"])], ("pickle",), run_id="abcd")
    (run_dir / "config.json").write_text(json.dumps({"run_name": "t", "max_steps": 2}))
    run = read_run(run_dir, strict=True)
    assert run.columns["dot_products"].tolist() == [1.0, 2.0, 3.0]
    assert run.unverified == [str(legacy_path)] and run.run_id is None
    os.remove(run_dir / "config.json")  # the files decide: a run_id, so the file without one is refused
    with pytest.warns(UserWarning, match="iter_000001.pkl: written by run 't' without a run_id"):
        assert read_run(run_dir).columns["step"].tolist() == [2]


def test_a_flipped_bit_in_a_pickle_only_run_is_named(tmp_path):
    """One bit of one stored dot product: strict raises naming the file ("content hash mismatch"); otherwise the
    file is skipped and the rest returned. A damaged identity field is caught the same way."""
    run_dir = tmp_path / "run"
    run_with_id(run_dir, {1: [step_record(1, [0.75, 1234.5678], ["A", "B"])], 2: [step_record(2, [2.0], ["A"])]},
                "f00d")
    bad = run_dir / "grad_dotprods" / "iter_000001.pkl"
    intact = safe_load_pickle(bad)
    flip_low_bit_of(bad, 1234.5678)
    with pytest.raises(ResultsFormatError, match=r"iter_000001.pkl: content hash mismatch \(content_sha256\): "
                                                 "the file is damaged"):
        read_run(run_dir, strict=True)
    with pytest.warns(UserWarning, match="iter_000001.pkl: content hash mismatch"):
        run = read_run(run_dir)
    assert run.columns["step"].tolist() == [2] and [p for p, _ in run.skipped] == [str(bad)]

    altered = dict(intact, world_size=2)  # an identity field changed, the digest kept
    bad.write_bytes(pickle.dumps(altered, protocol=4))
    with pytest.raises(ResultsFormatError, match="iter_000001.pkl: content hash mismatch"):
        read_run(run_dir, strict=True)
    del altered["content_sha256"], altered["per_layer_sha256"]  # a run_id without digests: never written so
    bad.write_bytes(pickle.dumps(altered, protocol=4))
    with pytest.raises(ResultsFormatError, match="iter_000001.pkl: carries a run_id but no content digest"):
        read_run(run_dir, strict=True)


def test_per_layer_values_are_checked_when_read(tmp_path):
    """A damaged per-layer value is named when per-layer columns are read; a load without them neither reads nor
    returns it, and succeeds."""
    run_dir = tmp_path / "run"
    layer = {"h.0.mlp.c_fc.weight": np.array([0.5, 4321.125], dtype=np.float32)}
    run_with_id(run_dir, {1: [step_record(1, [1.0, 2.0], ["A", "B"], per_layer=layer)]}, "0a0b")
    flip_low_bit_of(run_dir / "grad_dotprods" / "iter_000001.pkl", 4321.125)
    with pytest.raises(ResultsFormatError, match=r"content hash mismatch \(per_layer_sha256\)"):
        read_run(run_dir, per_layer=True, strict=True)
    assert read_run(run_dir, strict=True).columns["dot_products"].tolist() == [1.0, 2.0]


def test_a_payload_edited_after_it_was_read_is_not_written_with_its_old_digest(tmp_path):
    run_dir = tmp_path / "run"
    (path,) = results_io.flush_dotprods(run_dir, "t", 1, [step_record(1, [1.0], ["A"])], ("pickle",), run_id="ab")
    loaded = safe_load_pickle(path)
    save_dotprod_pickle(tmp_path / "same.pkl", loaded)  # unchanged: its digests are kept
    assert safe_load_pickle(tmp_path / "same.pkl")["content_sha256"] == loaded["content_sha256"]
    loaded["steps"][0]["dot_products"][0] = 5.0
    with pytest.raises(ResultsFormatError, match="content hash does not match its content"):
        save_dotprod_pickle(tmp_path / "edited.pkl", loaded)
    del loaded["content_sha256"], loaded["per_layer_sha256"]
    save_dotprod_pickle(tmp_path / "edited.pkl", loaded)
    assert safe_load_pickle(tmp_path / "edited.pkl")["content_sha256"] != safe_load_pickle(path)["content_sha256"]


def test_a_config_json_run_id_that_is_not_a_string_is_named(tmp_path):
    run_dir = tmp_path / "run"
    run_with_id(run_dir, {1: [step_record(1, [1.0], ["A"])]}, "ab")
    (run_dir / "config.json").write_text(json.dumps({"run_name": "t", "run_id": 7}))
    with pytest.raises(ResultsFormatError, match=r"config.json: 'run_id' must be a non-empty str, got 7"):
        read_run(run_dir)


def test_long_domain_labels_cannot_blow_up_memory(tmp_path):
    """A pickle of a few hundred KB whose domain list repeats one 200,000-character label on 20,000 rows would
    be 16 GB as fixed-width strings: refused naming it; and a one-row file with a long label cannot widen a
    whole run's domain column."""
    run_dir = tmp_path / "run"
    os.makedirs(run_dir / "grad_dotprods")
    label = "x" * 200_000
    rows = 20_000
    record = step_record(1, np.zeros(rows), [label] * rows)
    hostile = run_dir / "grad_dotprods" / "iter_000001.pkl"
    hostile.write_bytes(pickle.dumps(payload([record]), protocol=4))  # pickle memoizes the label: stored once
    assert hostile.stat().st_size < 2_000_000
    with pytest.raises(ResultsFormatError, match=r"iter_000001.pkl: its domain column would take 16,000,000,000 bytes"):
        read_run(run_dir, strict=True)

    wide = tmp_path / "wide"
    write_run(wide, {i: [step_record(i, np.zeros(5000), ["A"] * 5000)] for i in range(1, 4)})
    write_run(wide, {4: [step_record(4, [1.0], ["y" * 1_000_000])]})  # 4 MB as one row: fine on its own
    with pytest.warns(UserWarning, match=r"iter_000004.pkl: a domain label of 1,000,000 characters would make"):
        run = read_run(wide)
    assert run.columns["step"].tolist() == [1] * 5000 + [2] * 5000 + [3] * 5000


def test_a_flipped_bit_in_a_pickles_global_is_damage_not_an_attack(tmp_path):
    """A bit flipped inside "numpy._core.multiarray" makes the pickle name a global that is not allowed; being one
    bit away from an allowed one, it is reported as damage: strict raises naming the file, otherwise the file is
    skipped and the Parquet file of the same steps read. A global further away is still an unsafe pickle."""
    run_dir = tmp_path / "run"
    run_with_id(run_dir, {1: [step_record(1, [1.0, 2.0], ["A", "B"])], 2: [step_record(2, [3.0], ["A"])]}, "ab")
    bad = run_dir / "grad_dotprods" / "iter_000001.pkl"
    data = bytearray(bad.read_bytes())
    at = data.find(b"numpy._core.multiarray")
    assert at >= 0
    data[at + len("numpy._core.multi")] ^= 0x02  # "a" -> "c"
    bad.write_bytes(bytes(data))
    with pytest.raises(ResultsFormatError, match=r"iter_000001.pkl: .*names global 'numpy._core.multicrray.*', "
                                                 "one flipped bit away from 'numpy._core.multiarray"):
        read_run(run_dir, strict=True)
    with pytest.warns(UserWarning, match="iter_000001.pkl"):
        assert read_run(run_dir).columns["step"].tolist() == [2]
    results_io.flush_dotprods(tmp_path / "twin", "t", 1, [step_record(1, [1.0, 2.0], ["A", "B"])], ("parquet",),
                              run_id="ab")
    os.replace(tmp_path / "twin" / "grad_dotprods" / "iter_000001.parquet", run_dir / "grad_dotprods" /
               "iter_000001.parquet")
    os.remove(run_dir / "grad_dotprods" / "iter_000002.pkl")
    assert read_run(run_dir, strict=True).columns["dot_products"].tolist() == [1.0, 2.0]  # the pickle not needed
    data[at:at + len(b"numpy._core.multiarray")] = b"numpy._core.multixxxxx"  # five bytes changed: not damage
    bad.write_bytes(bytes(data))
    os.remove(run_dir / "grad_dotprods" / "iter_000001.parquet")
    with pytest.raises(UnsafePickleError, match="refusing to load global 'numpy._core.multixxxxx"):
        read_run(run_dir)


DTYPE_STATES = """
import pickle, sys
import numpy as np
from ghost_results.results_io import ResultsFormatError, safe_load_pickle
raw = pickle.dumps({"a": np.array([1.5, 2.5], dtype=np.float64), "n": np.arange(2)}, protocol=4)
flags_tail = b"J\\xff\\xff\\xff\\xffJ\\xff\\xff\\xff\\xffK\\x00t"  # dtype state: ..., elsize, alignment, flags=0
assert b"\\x8c\\x02f8\\x94\\x89\\x88\\x87" in raw and b"\\x8c\\x02i8" in raw and flags_tail in raw
singleton = raw.replace(b"\\x8c\\x02f8\\x94\\x89\\x88\\x87", b"\\x8c\\x02f8\\x94\\x89\\x89\\x87")  # copy=False
singleton = singleton.replace(flags_tail, flags_tail[:-2] + b"\\x10t")  # then BUILD sets NEEDS_INIT on it
datetime = raw.replace(b"\\x8c\\x02i8", b"\\x8c\\x02m8")  # one flipped bit: a timedelta without its metadata
for name, data in (("singleton", singleton), ("datetime", datetime)):
    path = sys.argv[1] + "/" + name + ".pkl"
    open(path, "wb").write(data)
    try:
        loaded = safe_load_pickle(path)
        print(name, "loaded", loaded["a"].tolist(), loaded["a"].dtype.flags, np.dtype("f8").flags)
    except ResultsFormatError as err:
        print(name, "refused", err)
"""


def test_a_pickle_cannot_hand_numpy_a_dtype_state_it_would_trust(tmp_path):
    """numpy's dtype.__setstate__ trusts its input: a results pickle's dtype flags (1: holds object pointers,
    8, 16, 63) never reach an array or scalar, which are built with a clean dtype; a pickled dtype is always a
    copy, so a pickle cannot change numpy's float64 for the whole process; and a dtype results files never hold
    (a one-bit flip of "i8" into "m8", which crashed the process) is refused naming the file."""
    import subprocess
    import sys

    raw = pickle.dumps({"a": np.array([1.5, 2.5], dtype=np.float64), "s": np.float64(7.0)}, protocol=4)
    tail = b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"
    assert raw.count(tail) == 1  # one float64 dtype, which the scalar shares (pickle memo)
    for flags in (1, 8, 16, 63):
        path = tmp_path / f"flags{flags}.pkl"
        path.write_bytes(raw.replace(tail, tail[:-2] + bytes([flags]) + b"t"))
        loaded = safe_load_pickle(path)
        assert type(loaded["a"]) is np.ndarray and loaded["a"].tolist() == [1.5, 2.5]
        assert loaded["a"].dtype.flags == np.dtype(np.float64).flags and loaded["s"] == 7.0
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", DTYPE_STATES, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "singleton loaded [1.5, 2.5] 0 0"
    assert lines[1].startswith(f"datetime refused {tmp_path}/datetime.pkl: asks for dtype 'm8', which results "
                               "files never hold"), lines
