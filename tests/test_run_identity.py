"""A run's files belong to that run: each carries the run's identity (config.json's run_id), resume and the
loaders take only files of it, and a run directory keeps working after it is moved or renamed. Also: no
command writes into or replaces a run directory (export --out), and an unwritable run directory is a one-line
error before any work. Two GPT2-Tiny runs of the same --run_name, other seeds, under two results directories,
play the run and the foreign run."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ghost_results.results_io import file_header, read_run, safe_load_pickle
from GradDotProd_LM import export, train
from ghost_results.run_directory import read_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, STEPS = 4, 32, 4


def flags(data_dir, results, run_name, seed, *extra):
    return ["--architecture", "GPT2-Tiny", "--batch_size", str(B), "--seq_len", str(T), "--val_batch_size", "2",
            "--max_steps", str(STEPS), "--warmup_step", "2", "--learning_rate", "1e-3", "--eval_interval", "100",
            "--eval_iter", "1", "--eval_bs", "2", "--dot_prod_save_interval", "2", "--checkpoint_interval", "2",
            "--seed", str(seed), "--data_dir", data_dir, "--results_dir", results, "--run_name", run_name, *extra]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """{"ours": run dir, "theirs": run dir}: the same name, other seeds and results directories."""
    made = {}
    for who, seed in (("ours", 42), ("theirs", 7)):
        results = str(tmp_path_factory.mktemp(f"results-{who}"))
        assert train.main(flags(data_dir, results, "base", seed)) == 0
        made[who] = os.path.join(results, "base")
    return made


def copy_run(run_dir, tmp_path, name="base"):
    """A copy of the run to damage, under a fresh results directory: (results dir, run dir)."""
    results = str(tmp_path / "results")
    shutil.copytree(run_dir, os.path.join(results, name))
    return results, os.path.join(results, name)


def listing(run_dir):
    """The run's files (run.lock aside: every launch writes its holder into it)."""
    return sorted(os.path.relpath(os.path.join(root, name), run_dir)
                  for root, _, names in os.walk(run_dir) for name in names if name != "run.lock")


def test_every_file_of_a_run_names_its_identity(runs):
    run_dir = runs["ours"]
    run_id = read_json(os.path.join(run_dir, "config.json"))["run_id"]
    assert run_id and run_id != read_json(os.path.join(runs["theirs"], "config.json"))["run_id"]
    assert torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=True)["run_id"] == run_id
    assert safe_load_pickle(os.path.join(run_dir, "valset.pkl"))["run_id"] == run_id
    assert read_json(os.path.join(run_dir, "training_log.json"))["run_id"] == run_id
    with open(os.path.join(run_dir, "training_log.jsonl")) as f:
        assert {json.loads(line)["run_id"] for line in f} == {run_id}
    dotprod_files = os.listdir(os.path.join(run_dir, "grad_dotprods"))
    assert dotprod_files and {file_header(os.path.join(run_dir, "grad_dotprods", name))["run_id"]
                              for name in dotprod_files} == {run_id}


@pytest.mark.parametrize("foreign", ["checkpoints/latest.pt", "valset.pkl", "training_log.json",
                                     "training_log.jsonl"])
def test_resume_refuses_a_file_of_another_run_and_changes_nothing(runs, data_dir, tmp_path, capsys, foreign):
    """Another run's checkpoint (or valset, or log) copied into the run directory: --resume exits 2 naming it;
    nothing is trained from it, moved or rewritten."""
    results, run_dir = copy_run(runs["ours"], tmp_path)
    shutil.copy(os.path.join(runs["theirs"], foreign), os.path.join(run_dir, foreign))
    before = {name: open(os.path.join(run_dir, name), "rb").read() for name in listing(run_dir)}
    assert train.main(flags(data_dir, results, "base", 42, "--resume", "--max_steps", str(STEPS + 2))) == 2
    err = capsys.readouterr().err
    assert os.path.join(run_dir, foreign) in err and "belongs to another run" in err
    assert {name: open(os.path.join(run_dir, name), "rb").read() for name in listing(run_dir)} == before


def test_eval_only_refuses_a_checkpoint_of_another_run(runs, data_dir, tmp_path, capsys):
    results, run_dir = copy_run(runs["ours"], tmp_path)
    shutil.copy(os.path.join(runs["theirs"], "checkpoints", "latest.pt"), os.path.join(run_dir, "checkpoints"))
    assert train.main(flags(data_dir, results, "base", 42, "--resume", "--eval_only")) == 2
    captured = capsys.readouterr()
    assert "belongs to another run" in captured.err and "eval @" not in captured.out


def test_a_results_file_of_another_run_is_never_merged(runs, tmp_path):
    """The other run's file of steps 3..4, copied over this run's: strict reading names it; otherwise it is
    skipped and only this run's own steps 1..2 are returned, never the other run's numbers."""
    _, run_dir = copy_run(runs["ours"], tmp_path)
    own = read_run(run_dir, strict=True).columns
    theirs = [name for name in os.listdir(os.path.join(runs["theirs"], "grad_dotprods")) if name.startswith("iter_000004.")]
    assert theirs == ["iter_000004.parquet"]  # the default format
    for name in theirs:
        shutil.copy(os.path.join(runs["theirs"], "grad_dotprods", name), os.path.join(run_dir, "grad_dotprods"))
    with pytest.raises(ValueError, match="iter_000004"):
        read_run(run_dir, strict=True)
    with pytest.warns(UserWarning, match="iter_000004"):
        run = read_run(run_dir)
    mine = own["step"] <= 2
    np.testing.assert_array_equal(run.columns["dot_products"], own["dot_products"][mine])
    assert run.missing_steps == [3, 4]


def test_a_moved_and_renamed_run_resumes_with_all_its_steps(runs, data_dir, tmp_path, capsys):
    results, run_dir = copy_run(runs["ours"], tmp_path, name="renamed")
    assert train.main(flags(data_dir, results, "renamed", 42, "--resume", "--max_steps", str(STEPS + 2))) == 0
    run = read_run(run_dir, strict=True)
    assert run.missing_steps == [] and run.skipped == [] and run.duplicate_steps == []
    np.testing.assert_array_equal(np.unique(run.columns["step"]), np.arange(1, STEPS + 3))
    original = read_run(runs["ours"], strict=True).columns
    np.testing.assert_array_equal(run.columns["dot_products"][:len(original["step"])], original["dot_products"])
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["run_name"] == "renamed"
    assert config["run_id"] == read_json(os.path.join(runs["ours"], "config.json"))["run_id"]


@pytest.mark.parametrize("where", ["run", "inside-run", "results", "parent-of-results", "other-run",
                                   "not-an-export"])
def test_export_never_writes_into_or_replaces_a_run(runs, tmp_path, capsys, where):
    results, run_dir = copy_run(runs["ours"], tmp_path)
    other_results, other = copy_run(runs["theirs"], tmp_path / "other")
    plain = tmp_path / "notes"
    plain.mkdir()
    (plain / "keep.txt").write_text("a user's file")
    out = {"run": run_dir, "inside-run": os.path.join(run_dir, "hf"), "results": results,
           "parent-of-results": str(tmp_path), "other-run": other, "not-an-export": str(plain)}[where]
    before = {d: listing(d) for d in (run_dir, other, str(plain))}
    with pytest.raises(SystemExit) as exit_request:
        export.main([run_dir, "--out", out, "--overwrite"])
    assert exit_request.value.code == 2
    assert "--out" in capsys.readouterr().err
    assert {d: listing(d) for d in before} == before


def test_export_replaces_an_earlier_export(runs, tmp_path):
    out = str(tmp_path / "hf")
    export.main([runs["ours"], "--out", out])
    export.main([runs["ours"], "--out", out, "--overwrite"])
    assert json.load(open(os.path.join(out, "graddotprod_export.json")))["step"] == STEPS


def read_only(run_dir):
    """The argv prefix that runs a command with run_dir mounted read-only (a private mount namespace, so that
    root is stopped too), or None where this machine cannot."""
    if os.geteuid() != 0:
        os.chmod(run_dir, 0o555)
        return []
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        return None
    return ["unshare", "-rm", "sh", "-c", f'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && '
            'shift && exec "$@"', run_dir, "--"]


@pytest.mark.parametrize("mode", ["--resume", "--eval_only"])
def test_a_read_only_run_directory_is_a_one_line_error_before_any_work(runs, data_dir, tmp_path, mode):
    results, run_dir = copy_run(runs["ours"], tmp_path)
    prefix = read_only(run_dir)
    if prefix is None:
        pytest.skip("no way to make a read-only directory for root here (no unshare -rm)")
    extra = ["--resume"] + (["--eval_only"] if mode == "--eval_only" else ["--max_steps", str(STEPS + 2)])
    before = listing(run_dir)
    proc = subprocess.run(prefix + [sys.executable, "-m", "GradDotProd_LM.train",
                                    *flags(data_dir, results, "base", 42, *extra)],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    os.chmod(run_dir, 0o755)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "eval @" not in proc.stdout and "step 1/" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and run_dir in errors[0] and "cannot write" in errors[0]
    assert listing(run_dir) == before
