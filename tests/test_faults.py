"""Faults injected into real training processes (docs/RELIABILITY.md): kill -9 inside a dot-product pickle write,
a checkpoint write and an evaluation, two launches of one run at once, a file-size limit (a full disk) during
the checkpoint write. Each checks that nothing written before the fault is lost and that resumed runs equal
an uninterrupted one. Faults of tokenize are in test_pile_tokenize.py, of run files in test_train_runs.py."""
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ghost_results.results_io import read_run

B, STEPS = 4, 12
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flags(data_dir, results, run_name, *extra):
    return ["--architecture", "GPT2-Tiny", "--batch_size", str(B), "--seq_len", "32", "--val_batch_size", "1",
            "--max_steps", str(STEPS), "--warmup_step", "2", "--eval_interval", "5", "--eval_iter", "1",
            "--eval_bs", "2", "--dot_prod_save_interval", "2", "--checkpoint_interval", "3", "--seed", "7",
            "--data_dir", data_dir, "--results_dir", results, "--run_name", run_name, *extra]


def launch(args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "GradDotProd_LM.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), **kwargs)


def run(args, **kwargs):
    proc = launch(args, **kwargs)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory):
    results = str(tmp_path_factory.mktemp("baseline"))
    code, out = run(flags(data_dir, results, "base"))
    assert code == 0, out
    return read_run(os.path.join(results, "base"), strict=True)


PAUSE_INSIDE = os.path.join(REPO, "tests", "_pause_inside.py")
DOTPROD_FILE, CHECKPOINT = r"grad_dotprods/iter_\d+\.parquet$", r"checkpoints/latest\.pt$"
EVALUATION = "GradDotProd_LM.evaluate:Evaluator.evaluate"


def kill_inside(args, what, n, tmp_path):
    """Launch training paused inside the n-th `what` (tests/_pause_inside.py), snapshot the run directory
    while it sleeps there, kill -9 it. Returns (snapshot {path: bytes}, what the pause names, output)."""
    marker, log = str(tmp_path / f"paused-{n}-{time.time_ns()}"), tmp_path / f"out-{time.time_ns()}.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, PAUSE_INSIDE, marker, what, str(n), "GradDotProd_LM.train", *args],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.time() + 120
        while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        paused = os.path.exists(marker)
        run_dir = os.path.join(args[args.index("--results_dir") + 1], args[args.index("--run_name") + 1])
        files = snapshot(run_dir) if paused else {}
        proc.kill()
        proc.wait(timeout=60)
    output = log.read_text()
    assert paused and proc.returncode == -signal.SIGKILL, output
    with open(marker) as f:
        return files, f.read(), output


def snapshot(run_dir):
    """Every complete file of the run (not the lock, not a temporary file of a write in flight)."""
    files = {}
    for root, _, names in os.walk(run_dir):
        for name in names:
            if ".tmp-" not in name and name != "run.lock":
                with open(os.path.join(root, name), "rb") as f:
                    files[os.path.relpath(os.path.join(root, name), run_dir)] = f.read()
    return files


def test_kill_9_inside_a_dot_product_write_a_checkpoint_write_and_an_evaluation_then_resume_equals_an_uninterrupted_run(
        data_dir, baseline, tmp_path):
    """SIGKILL three times, each while the process is inside one of these moments (which occurrence is drawn at
    random): a dot-product file (Parquet, the default) half written, a checkpoint half written, an evaluation; --resume after each.
    The kill leaves the previous file and checkpoint intact; every dot-product file and log line written before
    a kill survives (in place or moved to superseded/); the steps end 1..N once each, equal to the run never
    killed, with no temporary file left."""
    results = str(tmp_path / "results")
    run_dir = os.path.join(results, "killed")
    args = flags(data_dir, results, "killed")
    rng = random.Random(1234)
    before = []  # the snapshots taken inside each fault

    # 1. inside the 3rd..5th dot-product file write (iter_4, 6 or 8: after the first checkpoint, at step 3)
    files, path, output = kill_inside(args, f"write:{DOTPROD_FILE}", rng.randint(3, 5), tmp_path)
    before.append(files)
    outputs = [output]
    assert os.path.getsize(_temporary(path)) > 0
    assert os.path.relpath(path, run_dir) not in files  # the file being written is not there yet
    # 2. inside the 1st or 2nd checkpoint write of the resumed run: the previous checkpoint stays readable
    checkpoint = os.path.join(run_dir, "checkpoints", "latest.pt")
    previous = torch.load(checkpoint, weights_only=True)["step"]
    files, path, output = kill_inside(args + ["--resume"], f"write:{CHECKPOINT}", rng.randint(1, 2), tmp_path)
    before.append(files)
    outputs.append(output)
    assert path == checkpoint and os.path.getsize(_temporary(path)) > 0
    assert torch.load(checkpoint, weights_only=True)["step"] in (previous, previous + 3)
    # 3. inside the 1st or 2nd evaluation of the resumed run
    files, _, output = kill_inside(args + ["--resume"], f"call:{EVALUATION}", rng.randint(1, 2), tmp_path)
    before.append(files)
    outputs.append(output)
    evaluated_step = int(re.findall(r"^step (\d+)/", output, re.M)[-1])
    assert evaluated_step % 5 == 0 or evaluated_step == STEPS
    assert f"eval @ step {evaluated_step}:" not in output

    code, out = run(args + ["--resume"])
    assert code == 0, out
    resumed = read_run(run_dir, strict=True)
    assert resumed.missing_steps == [] and resumed.duplicate_steps == []
    for key in ("step", "sample_index", "dot_products", "train_loss", "val_loss"):
        np.testing.assert_allclose(resumed.columns[key], baseline.columns[key], rtol=1e-6, atol=0, err_msg=key)
    with open(os.path.join(run_dir, "training_log.json")) as f:
        log = json.load(f)
    assert [r["step"] for r in log["steps"]] == list(range(1, STEPS + 1))
    assert [r["step"] for r in log["evals"]] == [5, 10, 12]
    # every file and log line written before a kill is still there: in place if the next launch resumed
    # from a checkpoint that covers it, else moved, byte for byte, to superseded/
    starts = [int(re.search(r"^Resuming .* from step (\d+)", o, re.M).group(1)) for o in outputs[1:] + [out]]
    after = snapshot(run_dir)
    for files, start in zip(before, starts):
        for name, data in files.items():
            if name.startswith("grad_dotprods"):
                if int(re.search(r"iter_(\d+)", name).group(1)) <= start:
                    assert after[name] == data, name
                else:
                    assert data in [d for n, d in after.items() if n.startswith("superseded") and n.endswith(
                        name)], f"{name} of a step after the checkpoint at {start} was not moved aside"
            elif name == "training_log.jsonl":
                for line in data.splitlines():
                    where = "training_log.jsonl" if json.loads(line)["step"] <= start else "superseded"
                    assert any(n.startswith(where) and n.endswith("training_log.jsonl") and line in d.splitlines()
                               for n, d in after.items()), line
        assert files["valset.pkl"] == after["valset.pkl"]
    leftovers = [os.path.join(root, n) for root, _, names in os.walk(run_dir) for n in names if ".tmp-" in n]
    assert leftovers == []


def _temporary(path):
    """The temporary file of a write in flight to `path` (one writer: one match)."""
    directory = os.path.dirname(path)
    (name,) = [n for n in os.listdir(directory) if n.startswith(os.path.basename(path) + ".tmp-")]
    return os.path.join(directory, name)


def test_two_launches_of_one_run_at_once_never_mix(data_dir, tmp_path):
    """Same --run_name, two seeds, started together: one trains, the other exits 2; the run directory holds
    the winner's seed, its steps once each, and nothing of the loser."""
    results = str(tmp_path / "results")
    procs = [launch(flags(data_dir, results, "shared", "--seed", str(seed))) for seed in (1, 2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)]
    assert "is in use by pid" in loser or "already holds a run" in loser
    winner_seed = (1, 2)[[p.returncode for p in procs].index(0)]

    run_dir = os.path.join(results, "shared")
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["seed"] == winner_seed
    merged = read_run(run_dir, strict=True)
    assert merged.missing_steps == [] and merged.duplicate_steps == [] and merged.skipped == []


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 2**20, 8 * 2**20))


def test_a_full_disk_at_the_checkpoint_keeps_every_step_written(data_dir, tmp_path):
    """Files may not exceed 8 MiB: the dot-product pickles fit, the ~80 MiB checkpoint does not. The run
    stops naming the file and the cause, keeps every step's dot products and leaves no partial file;
    --resume then refuses to redo those steps instead of deleting them."""
    results = str(tmp_path / "results")
    args = flags(data_dir, results, "full")
    code, out = run(args, preexec_fn=_limit_file_size)
    assert code != 0
    assert "no space left to write" in out and "latest.pt" in out
    run_dir = os.path.join(results, "full")
    written = read_run(run_dir, strict=True)
    # steps 1..3 are written before the checkpoint of step 3, the first one, fails (twice: at step 3, and
    # again when the failure handler tries to save)
    assert sorted(set(written.columns["step"])) == [1, 2, 3]
    assert "could not save after the failure" in out
    for sub in ("grad_dotprods", "checkpoints"):
        directory = os.path.join(run_dir, sub)
        assert not [n for n in (os.listdir(directory) if os.path.isdir(directory) else []) if ".tmp-" in n]
    code, out = run(args + ["--resume"])
    assert code == 2 and "has no checkpoint" in out
    assert sorted(set(read_run(run_dir, strict=True).columns["step"])) == [1, 2, 3]
