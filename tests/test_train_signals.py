"""SIGTERM, or Ctrl-C (SIGINT to the process group), in the middle of a run: the step in flight completes,
pending dot products are flushed, a checkpoint is written, the process exits 128 + the signal's number (130,
143: interrupted, not finished, as a shell reports it), and --resume continues without a gap or a duplicate."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from ghost_results.results_io import read_run
from GradDotProd_LM import train

B = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # config_file.py lives here


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_leaves_a_complete_resumable_run(data_dir, tmp_path, signum):
    results = str(tmp_path / "results")
    flags = ["--architecture", "GPT2-Tiny", "--batch_size", str(B), "--seq_len", "32", "--val_batch_size", "1",
             "--max_steps", "500", "--warmup_step", "2", "--eval_interval", "1000", "--eval_iter", "1",
             "--eval_bs", "2", "--dot_prod_save_interval", "3", "--checkpoint_interval", "1000",
             "--data_dir", data_dir, "--results_dir", results, "--run_name", "stopped"]
    proc = subprocess.Popen([sys.executable, "-m", "GradDotProd_LM.train", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    output = []
    for line in proc.stdout:  # stop it once a step past the first file boundary has finished
        output.append(line)
        if line.startswith("step 4/"):
            os.killpg(proc.pid, signum)  # as Ctrl-C or a scheduler's stop would: the whole process group
            break
    output += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 128 + signum, "".join(output)
    assert f"Stopped by {signum.name}" in "".join(output) and "Traceback" not in "".join(output)
    assert "Done:" not in "".join(output)

    run_dir = os.path.join(results, "stopped")
    stopped_at = torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=True)["step"]
    assert 4 <= stopped_at < 500
    names = os.listdir(os.path.join(run_dir, "grad_dotprods"))
    assert not [n for n in names if ".tmp" in n]
    assert f"iter_{stopped_at:06d}.parquet" in names  # the partial interval was flushed, not lost
    run = read_run(run_dir, strict=True)
    np.testing.assert_array_equal(np.unique(run.columns["step"]), np.arange(1, stopped_at + 1))
    assert run.duplicate_steps == [] and len(run.columns["step"]) == B * stopped_at

    assert train.main(flags + ["--resume", "--max_steps", str(stopped_at + 2)]) == 0
    run = read_run(run_dir, strict=True)
    assert run.missing_steps == [] and run.duplicate_steps == []
    np.testing.assert_array_equal(run.columns["step"], np.repeat(np.arange(1, stopped_at + 3), B))
