"""The training app's experiment log: training_log.jsonl holds every step once through kill -9 and resume and
is flushed every step; --report_to csv, tensorboard and wandb (offline) receive the same numbers; a sink
that cannot be used is a start-up error. Runs: GPT2-Tiny on the bundled sample (helpers of test_faults.py
and test_train_runs.py)."""
import csv
import glob
import json
import os
import random
import signal
import struct
import sys
import time

import numpy as np
import pytest
import torch

from ghost_results.results_io import read_run
from GradDotProd_LM import experiment_log, train, training
from ghost_results.results_io import set_aside_after
from test_faults import launch, run
from test_faults import flags as fault_flags
from test_train_runs import HardCrash, tiny_flags


def read_jsonl(path):
    with open(path, "rb") as f:
        return [json.loads(line) for line in f]


def of_kind(records, kind):
    return [r for r in records if r["kind"] == kind]


def test_kill_9_keeps_every_completed_step_line_and_resume_logs_each_step_once(data_dir, tmp_path):
    """SIGKILL right after the progress line of step 5 (printed after that step's log line): every step up
    to 5 has its complete line. --resume moves the lines after its checkpoint aside and logs steps 1..N
    once each; the per-domain sums equal the sums of the saved dot products, the CSV equals the log."""
    results, steps_in_run = str(tmp_path / "results"), 7
    args = fault_flags(data_dir, results, "killed", "--report_to", "csv", "--max_steps", str(steps_in_run))
    proc = launch(args)
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("step 5/"):
            time.sleep(random.Random(11).uniform(0.0, 0.3))
            break
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(output)
    run_dir = os.path.join(results, "killed")
    path = os.path.join(run_dir, "training_log.jsonl")
    with open(path, "rb") as f:
        before = f.read()
    assert before.endswith(b"\n")  # no torn line: each line is one write
    killed = read_jsonl(path)
    steps = [r["step"] for r in of_kind(killed, "step")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 5
    checkpoint = torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=True)["step"]

    code, out = run(args + ["--resume"])
    assert code == 0, out
    records = read_jsonl(path)
    assert [r["step"] for r in of_kind(records, "step")] == list(range(1, steps_in_run + 1))
    assert [r["step"] for r in of_kind(records, "eval")] == [5, 7]  # every 5 steps and the last
    # the lines of steps the resumed run redid were moved aside, not lost
    later = b"".join(line for line, r in zip(before.splitlines(keepends=True), killed) if r["step"] > checkpoint)
    set_aside = glob.glob(os.path.join(run_dir, "superseded", "*", "training_log.jsonl"))
    assert [open(p, "rb").read() for p in set_aside] == ([later] if later else [])
    with open(path, "rb") as f:
        assert f.read().startswith(before[:len(before) - len(later)])

    columns = read_run(run_dir, strict=True).columns
    with open(os.path.join(run_dir, "training_log.json")) as f:
        summary = json.load(f)["steps"]
    for record, saved in zip(of_kind(records, "step"), summary, strict=True):
        assert {k: record[k] for k in saved} == saved
        rows = columns["step"] == record["step"]
        expected = {d: float(np.sum(columns["dot_products"][rows & (columns["domain"] == d)], dtype=np.float64))
                    for d in record["dot_products_by_domain"]}
        assert set(columns["domain"][rows]) <= set(expected)
        np.testing.assert_allclose(list(record["dot_products_by_domain"].values()), list(expected.values()),
                                   rtol=1e-6, atol=1e-6 * np.abs(columns["dot_products"]).max())
    with open(os.path.join(run_dir, "training_log.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == list(range(1, steps_in_run + 1))
    for row, record in zip(rows, of_kind(records, "step")):
        assert (float(row["loss"]), float(row["lr"])) == (record["loss"], record["lr"])
        assert {d: float(row[f"dot_products/{d}"]) for d in record["dot_products_by_domain"]} == \
            record["dot_products_by_domain"]


def wandb_history(run_file):
    """{step: {key: value}} from a W&B offline run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    with open(run_file, "rb") as f:
        data = f.read()
    position, payload, history, run_info = 7, b"", {}, None  # after the 7-byte ':W&B' header
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, chunk_type = struct.unpack("<IHB", data[position:position + 7])
        payload += data[position + 7:position + 7 + length]
        position += 7 + length
        if chunk_type in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                row = history.setdefault(record.history.step.num, {})
                row.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
            elif record.WhichOneof("record_type") == "run":
                run_info = record.run
    return history, run_info


def wandb_launches(pattern, launches, timeout=30.0):
    """wandb_history of each offline run file matching `pattern`, in name (start time) order, once there are
    `launches` of them and each holds history: W&B writes the file from its own service process, which may
    still be writing it when finish() has returned (seen once under a loaded CI machine: the second launch's
    file without its records)."""
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(glob.glob(pattern))
        found = [wandb_history(path) for path in files]
        if (len(files) == launches and all(history for history, _ in found)) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_csv_tensorboard_and_wandb_get_every_step_once_across_a_resume(data_dir, tmp_path, monkeypatch):
    """A crash in step 5 after the checkpoint of step 3, then --resume: the CSV and TensorBoard hold steps
    1..6 once with the log's values (TensorBoard purges the crashed launch's steps 4 and 5); W&B has one
    offline run per launch, the resumed one with steps 4..6."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    flags = tiny_flags(data_dir, str(tmp_path / "results"), "sinks", "--checkpoint_interval", "3",
                       "--report_to", "csv,tensorboard,wandb")
    real_report = training.report_progress

    def crash_in_step_5(step, *args):
        if step == 5:
            raise HardCrash
        real_report(step, *args)

    monkeypatch.setattr(training, "report_progress", crash_in_step_5)
    with pytest.raises(HardCrash):
        train.main(flags)
    monkeypatch.setattr(training, "report_progress", real_report)
    assert train.main(flags + ["--resume"]) == 0

    run_dir = str(tmp_path / "results" / "sinks")
    records = read_jsonl(os.path.join(run_dir, "training_log.jsonl"))
    steps, evals = of_kind(records, "step"), of_kind(records, "eval")
    assert [r["step"] for r in steps] == list(range(1, 7)) and [r["step"] for r in evals] == [3, 6]
    expected = {}  # tag -> {step: value}, as the sinks name them
    for r in steps:
        for key in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"):
            expected.setdefault(key, {})[r["step"]] = r[key]
        for domain, total in r["dot_products_by_domain"].items():
            expected.setdefault(f"dot_products/{domain}", {})[r["step"]] = total
    for r in evals:
        for split in ("train", "validation", "test"):
            expected.setdefault(f"eval/{split}/loss", {})[r["step"]] = r[split]["loss"]
            for domain, loss in r[split]["domains"].items():
                expected.setdefault(f"eval/{split}/{domain}", {})[r["step"]] = loss
    assert len(expected) == 6 + 4 + 3 * (1 + 4)  # the sample's four domains

    for name, kind in (("training_log.csv", steps), ("eval_log.csv", evals)):
        with open(os.path.join(run_dir, name), newline="") as f:
            rows = list(csv.DictReader(f))
        assert [int(row["step"]) for row in rows] == [r["step"] for r in kind]
        for tag, values in expected.items():
            if any(tag in row for row in rows):
                assert {int(row["step"]): float(row[tag]) for row in rows} == values, tag

    accumulator = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={SCALARS: 0})
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) == set(expected)
    for tag, values in expected.items():
        events = accumulator.Scalars(tag)
        assert [e.step for e in events] == sorted(values), tag  # each step once: 4 and 5 were purged
        np.testing.assert_array_equal([e.value for e in events], np.float32([values[s] for s in sorted(values)]))

    launches = wandb_launches(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"), 2)
    assert len(launches) == 2  # one W&B run per launch
    (crashed, crashed_run), (resumed, resumed_run) = launches
    assert sorted(crashed) == [1, 2, 3, 4, 5] and sorted(resumed) == [4, 5, 6]
    assert crashed_run.run_group == resumed_run.run_group == "sinks"
    assert resumed_run.display_name == "sinks from step 4"
    for tag, values in expected.items():
        assert {s: row[tag] for s, row in resumed.items() if tag in row} == {s: v for s, v in values.items() if s > 3}


def test_a_run_started_before_the_jsonl_gets_one_on_resume(data_dir, tmp_path):
    """A run directory without training_log.jsonl (written by an older version): --resume seeds it from
    training_log.json, so the .jsonl still holds every step once."""
    flags = tiny_flags(data_dir, str(tmp_path), "old", "--max_steps", "1", "--warmup_step", "0")
    assert train.main(flags) == 0
    run_dir = str(tmp_path / "old")
    os.remove(os.path.join(run_dir, "training_log.jsonl"))
    assert train.main(flags + ["--resume", "--max_steps", "2"]) == 0
    records = read_jsonl(os.path.join(run_dir, "training_log.jsonl"))
    assert [(r["kind"], r["step"]) for r in records] == [("step", 1), ("eval", 1), ("step", 2), ("eval", 2)]
    with open(os.path.join(run_dir, "training_log.json")) as f:
        summary = json.load(f)
    assert [{k: r[k] for k in saved} for r, saved in zip(of_kind(records, "step"), summary["steps"])] == \
        summary["steps"]


def test_set_aside_after_moves_later_files_of_both_formats_and_later_log_lines(tmp_path):
    """Resume from step 2: the iter files of step 4 (pickle and Parquet) and the log lines of steps 3, 4 and a
    torn line go to superseded/<time>/; the lines of steps 1, 2 and the files of step 2 stay."""
    run_dir = tmp_path / "run"
    (run_dir / "grad_dotprods").mkdir(parents=True)
    for name in ("iter_000002.pkl", "iter_000002.parquet", "iter_000004.pkl", "iter_000004.parquet",
                 "iter_000004.parquet.tmp-123"):
        (run_dir / "grad_dotprods" / name).write_bytes(b"x")
    kept = b"".join(json.dumps({"kind": "step", "step": s}).encode() + b"\n" for s in (1, 2)) + \
        json.dumps({"kind": "eval", "step": 2}).encode() + b"\n"
    later = b"".join(json.dumps({"kind": "step", "step": s}).encode() + b"\n" for s in (3, 4)) + b'{"kind": "st'
    (run_dir / "training_log.jsonl").write_bytes(kept + later)

    moved, destination = set_aside_after(str(run_dir), 2)
    assert sorted(moved) == ["iter_000004.parquet", "iter_000004.pkl", "training_log.jsonl"]
    assert sorted(os.listdir(run_dir / "grad_dotprods")) == ["iter_000002.parquet", "iter_000002.pkl"]
    assert (run_dir / "training_log.jsonl").read_bytes() == kept
    assert open(os.path.join(destination, "training_log.jsonl"), "rb").read() == later
    assert sorted(os.listdir(os.path.join(destination, "grad_dotprods"))) == ["iter_000004.parquet",
                                                                              "iter_000004.pkl"]
    # a second resume within the same second keeps the first one's files
    (run_dir / "training_log.jsonl").write_bytes(kept + later)
    _, again = set_aside_after(str(run_dir), 2)
    assert again != destination and open(os.path.join(destination, "training_log.jsonl"), "rb").read() == later


def test_a_sink_without_its_package_or_that_cannot_start_is_a_start_up_error(data_dir, tmp_path, monkeypatch,
                                                                              capsys):
    """--report_to wandb without the wandb package: exit 2 naming the flag and the extra, nothing written.
    A sink that fails to start (e.g. W&B without a login): exit 2 naming it, before any step."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    flags = tiny_flags(data_dir, str(tmp_path), "no-wandb", "--report_to", "csv,wandb")
    assert train.main(flags) == 2
    err = capsys.readouterr().err
    assert "--report_to wandb: needs the package(s) wandb" in err and '".[logging]"' in err
    assert not os.path.exists(tmp_path / "no-wandb")

    def cannot_start(*args):
        raise RuntimeError("api_key not configured")

    monkeypatch.setitem(experiment_log.SINK_CLASSES, "csv", cannot_start)
    assert train.main(tiny_flags(data_dir, str(tmp_path), "no-login", "--report_to", "csv")) == 2
    captured = capsys.readouterr()
    assert "--report_to csv: cannot start it (RuntimeError: api_key not configured)" in captured.err
    assert "step 1/" not in captured.out and not os.path.exists(tmp_path / "no-login" / "config.json")
