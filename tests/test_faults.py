"""Faults injected into real training processes (docs/RELIABILITY.md): kill -9 at random points, two launches
of one run at once, a file-size limit (a full disk) during the checkpoint write. Each checks that nothing
written before the fault is lost and that resumed runs equal an uninterrupted one."""
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ghost_results.results_io import load_run

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
    return load_run(os.path.join(results, "base"), strict=True)


def test_kill_9_at_random_points_then_resume_equals_an_uninterrupted_run(data_dir, baseline, tmp_path):
    """SIGKILL three times at random moments (inside a step, a pickle or checkpoint write, an evaluation),
    --resume after each: steps 1..N exactly once, the same dot products as the run never killed."""
    results = str(tmp_path / "results")
    args = flags(data_dir, results, "killed")
    rng = random.Random(1234)
    for attempt in range(3):
        proc = launch(args + (["--resume"] if attempt else []))
        lines = []
        deadline = time.time() + 120
        target = rng.randint(1, STEPS - 2)  # kill after this step's line, plus a random delay into the next
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"step {target}/") or time.time() > deadline:
                time.sleep(rng.uniform(0.0, 0.4))
                break
        proc.kill()
        proc.communicate(timeout=60)
        if proc.returncode == 0:  # it finished before the kill landed: nothing to resume
            break
        assert proc.returncode == -signal.SIGKILL, "".join(lines)
    code, out = run(args + ["--resume"])
    assert code == 0, out
    run_dir = os.path.join(results, "killed")
    resumed = load_run(run_dir, strict=True)
    assert resumed.missing_steps == [] and resumed.duplicate_steps == []
    for key in ("step", "sample_index", "dot_products", "train_loss", "val_loss"):
        np.testing.assert_allclose(resumed.columns[key], baseline.columns[key], rtol=1e-6, atol=0, err_msg=key)
    for sub in ("grad_dotprods", "checkpoints"):
        assert not [n for n in os.listdir(os.path.join(run_dir, sub)) if ".tmp-" in n]


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
    merged = load_run(run_dir, strict=True)
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
    written = load_run(run_dir, strict=True)
    # steps 1..3 are written before the checkpoint of step 3, the first one, fails (twice: at step 3, and
    # again when the failure handler tries to save)
    assert sorted(set(written.columns["step"])) == [1, 2, 3]
    assert "could not save after the failure" in out
    for sub in ("grad_dotprods", "checkpoints"):
        directory = os.path.join(run_dir, sub)
        assert not [n for n in (os.listdir(directory) if os.path.isdir(directory) else []) if ".tmp-" in n]
    code, out = run(args + ["--resume"])
    assert code == 2 and "has no checkpoint" in out
    assert sorted(set(load_run(run_dir, strict=True).columns["step"])) == [1, 2, 3]
