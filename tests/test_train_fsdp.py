"""./train.sh --fsdp: the app's model sharded with FSDP2 over 2 gloo processes equals one unsharded process, and
its sharded checkpoints (torch.distributed.checkpoint) survive kill -9 and resume on 2 processes and on 1.

One run of each kind, steps 1..6, checkpoints every 2 steps:
- `one`: 1 process, no sharding, never interrupted (the reference);
- `two`: torchrun --nproc_per_node 2 --fsdp, killed with SIGKILL (every process) while rank 0 is about to commit
  the sharded checkpoint of step 4: its shards are written, the checkpoint is not complete; then resumed on 2
  processes with --fsdp --replicate_degree 2 (HSDP: the checkpoint read into other placements);
- `two_on_one`: a copy of the killed run, resumed on 1 process.
Both resumed runs restart from step 2 and must equal `one`: each step once, its dot products and losses and the
final weights within float32 round-off (the two processes reduce the gradient in another order). Export then
writes the sharded checkpoint's weights as a Hugging Face model."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ghost_results.grad_store import GradStore
from ghost_results.results_io import read_run
from ghost_results.run_directory import has_checkpoint, sharded_checkpoint_path, sharded_checkpoint_steps
from GradDotProd_LM import export, train
from GradDotProd_LM.checkpoint import read_sharded_weights
from GradDotProd_LM.model import build_model

B, STEPS = 4, 6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAUSE_INSIDE = os.path.join(REPO, "tests", "_pause_inside.py")
TOL = 1e-5


def flags(data_dir, results, run_name, *extra):
    # SGD: the weights move by the (clipped) gradients, so equal weights mean equal reduced gradients
    return ["--architecture", "GPT2-Tiny", "--batch_size", str(B), "--seq_len", "32", "--val_batch_size", "2",
            "--max_steps", str(STEPS), "--optimizer", "SGD", "--learning_rate", "0.1", "--min_lr", "0.01",
            "--warmup_step", "0", "--grad_clip", "1", "--grad_accum", "2", "--eval_interval", "3",
            "--eval_iter", "1", "--eval_bs", "2", "--dot_prod_save_interval", "2", "--checkpoint_interval", "2",
            "--value", "first_order", "--project_dim", "400", "--project_dtype", "float32", "--data_dir", data_dir, "--results_dir", results, "--run_name", run_name,
            *extra]


def step_losses(run_dir):
    with open(os.path.join(run_dir, "training_log.json")) as f:
        return [(record["step"], record["loss"]) for record in json.load(f)["steps"]]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def processes_naming(text):
    """Pids of the processes whose command line holds `text` (torchrun starts its workers in sessions of their
    own: killing its process group would leave them running)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def kill_9_at_commit(args, marker, log):
    """torchrun --fsdp, paused when rank 0 enters the 2nd sharded checkpoint commit; every process SIGKILLed."""
    with open(log, "w") as out:
        proc = subprocess.Popen(torchrun(PAUSE_INSIDE, marker, "call:ghost_results.run_directory:RunDirectory."
                                         "commit_sharded_checkpoint", "2", "GradDotProd_LM.train", *args),
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.time() + 240
        while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        paused = os.path.exists(marker)
        for pid in processes_naming(marker):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
    with open(log) as f:
        assert paused, f.read()[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes through /proc")
def test_fsdp_equals_one_process_and_its_sharded_checkpoint_resumes_on_two_and_one_process_after_kill_9(
        data_dir, tmp_path, capsys):
    results = str(tmp_path / "results")
    assert train.main(flags(data_dir, results, "one")) == 0
    two = os.path.join(results, "two")
    kill_9_at_commit(flags(data_dir, results, "two", "--fsdp"), str(tmp_path / "paused"), tmp_path / "killed.txt")
    # the kill left step 2's checkpoint complete and step 4's shards in a partial directory, never read
    assert sharded_checkpoint_steps(two) == [2]
    assert os.path.isfile(os.path.join(sharded_checkpoint_path(two, 2), "app_state.json"))
    assert os.path.isdir(sharded_checkpoint_path(two, 4, partial=True))
    assert not os.path.exists(os.path.join(two, "checkpoints", "latest.pt"))
    shutil.copytree(two, os.path.join(results, "two_on_one"))
    os.remove(os.path.join(results, "two_on_one", "run.lock"))  # the copy is another run directory's

    # resumed as HSDP (2 replicas of 1 shard): the checkpoint the Shard(0) run wrote, read into other placements
    resumed = subprocess.run(torchrun("-m", "GradDotProd_LM.train", *flags(data_dir, results, "two", "--fsdp",
                                                                             "--replicate_degree", "2", "--resume")),
                             capture_output=True, text=True, timeout=300, cwd=REPO,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Resuming {two} from step 2" in resumed.stdout and "2 process(es)" in resumed.stdout
    with open(os.path.join(two, "config.json")) as f:
        assert json.load(f)["replicate_degree"] == 2
    assert sharded_checkpoint_steps(two) == [STEPS]  # --keep_checkpoints 1: the newest alone, no partial left
    assert os.listdir(os.path.join(two, "checkpoints")) == [os.path.basename(sharded_checkpoint_path(two, STEPS))]
    assert train.main(flags(data_dir, results, "two_on_one", "--fsdp", "--resume")) == 0
    assert has_checkpoint(os.path.join(results, "two_on_one"))

    one = read_run(os.path.join(results, "one"), strict=True)
    scale = np.abs(one.columns["dot_products"]).max()
    for name in ("two", "two_on_one"):
        run = read_run(os.path.join(results, name), strict=True)
        assert run.missing_steps == [] and run.duplicate_steps == []
        np.testing.assert_array_equal(run.columns["step"], np.repeat(np.arange(1, STEPS + 1), B))
        for key in ("sample_index", "token_offset", "doc_id"):
            np.testing.assert_array_equal(run.columns[key], one.columns[key])
        np.testing.assert_allclose(run.columns["dot_products"], one.columns["dot_products"], rtol=TOL,
                                   atol=TOL * scale, err_msg=name)
        np.testing.assert_allclose(run.columns["train_loss"], one.columns["train_loss"], rtol=TOL, err_msg=name)
        losses, expected = (step_losses(os.path.join(results, n)) for n in (name, "one"))
        assert [s for s, _ in losses] == list(range(1, STEPS + 1))
        np.testing.assert_allclose([v for _, v in losses], [v for _, v in expected], rtol=TOL, err_msg=name)

    # each rank projects its rows; rank 0 stores them all: the stores equal the unsharded run's, steps 1..6 once
    stores = {name: GradStore(os.path.join(results, name, "grad_store")) for name in ("one", "two", "two_on_one")}
    expected = stores["one"].rows(np.arange(len(stores["one"])))
    assert len(stores["one"]) == B * STEPS
    for name in ("two", "two_on_one"):
        assert stores[name].provenance().drop(columns=["lr", "weight"]).equals(
            stores["one"].provenance().drop(columns=["lr", "weight"])), name
        np.testing.assert_allclose(stores[name].rows(np.arange(len(stores[name]))), expected, rtol=TOL,
                                   atol=TOL * np.abs(expected).max(), err_msg=name)

    reference = torch.load(os.path.join(results, "one", "checkpoints", "latest.pt"), weights_only=True)["model"]
    torch.manual_seed(42)  # the runs' seed: their initial weights
    initial = build_model("GPT2-Tiny").state_dict()
    assert max((reference[k] - initial[k]).abs().max().item() for k in reference) > 1e-3  # training moved them
    sharded = read_sharded_weights(sharded_checkpoint_path(two, STEPS))
    on_one = torch.load(os.path.join(results, "two_on_one", "checkpoints", "latest.pt"), weights_only=True)["model"]
    for weights in (sharded, on_one):
        assert set(weights) == set(reference)
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, rtol=TOL, atol=TOL, msg=key)

    # export reads the sharded checkpoint: the Hugging Face model holds its weights (the vocabulary unpadded)
    assert export.main([two, "--out", str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).state_dict()
    for key, value in exported.items():
        torch.testing.assert_close(value, sharded[key][:value.shape[0]] if value.dim() else sharded[key], msg=key)

    # a damaged sharded checkpoint (a process's shard file lost): --resume exits 2 naming it and changes nothing
    os.remove(os.path.join(sharded_checkpoint_path(two, STEPS), "__1_0.distcp"))
    before = sorted(os.listdir(os.path.join(two, "grad_dotprods")))
    assert train.main(flags(data_dir, results, "two", "--resume", "--replicate_degree", "1",
                            "--max_steps", str(STEPS + 2))) == 2
    assert f"cannot read the checkpoint {sharded_checkpoint_path(two, STEPS)}" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(two, "grad_dotprods"))) == before


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 2**20, 8 * 2**20))


def test_a_full_disk_at_the_sharded_checkpoint_keeps_every_step_written(data_dir, tmp_path):
    """Files may not exceed 8 MiB (every process of torchrun inherits the limit): the dot-product files fit, each
    process's ~27 MiB shard does not. Every process's save fails together, the run stops, steps 1..2 keep their
    dot products, no checkpoint is complete (only a partial directory, never read), and --resume refuses to redo
    the steps instead of deleting them."""
    results = str(tmp_path / "results")
    args = flags(data_dir, results, "full", "--fsdp", "--max_steps", "4")
    done = subprocess.run(torchrun("-m", "GradDotProd_LM.train", *args), capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          preexec_fn=_limit_file_size)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert "steps 1..2 have their dot products and log; continue from the last checkpoint (step 0)" in out, out[-3000:]
    assert "OSError: cannot write the sharded checkpoint" in out and "MiB free" in out
    run_dir = os.path.join(results, "full")
    assert sorted(set(read_run(run_dir, strict=True).columns["step"])) == [1, 2]
    assert sharded_checkpoint_steps(run_dir) == [] and not has_checkpoint(run_dir)
    assert os.path.isdir(sharded_checkpoint_path(run_dir, 2, partial=True))
    assert not [n for n in os.listdir(os.path.join(run_dir, "grad_dotprods")) if ".tmp-" in n]
    resumed = subprocess.run([sys.executable, "-m", "GradDotProd_LM.train", *args, "--resume"], capture_output=True,
                             text=True, timeout=300, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert resumed.returncode == 2 and "has no checkpoint" in resumed.stderr, resumed.stderr[-3000:]
    assert sorted(set(read_run(run_dir, strict=True).columns["step"])) == [1, 2]


def test_a_complete_sharded_checkpoint_of_the_step_is_not_written_again(tmp_path, monkeypatch):
    """A failure in the step after a resume saves the resumed step again; its sharded checkpoint is complete and
    holds that very state, so nothing is written (replacing a complete directory is a removal then a rename, and a
    kill between them would lose the checkpoint). Another step is saved as usual."""
    from types import SimpleNamespace

    from GradDotProd_LM import training

    cfg = {"results_dir": str(tmp_path), "run_name": "run"}
    os.makedirs(sharded_checkpoint_path(str(tmp_path / "run"), 4))
    calls = []
    monkeypatch.setattr(training, "nonfinite_state", lambda model, optimizer: [])
    monkeypatch.setattr(training, "save_sharded", lambda *args: calls.append("save"))
    monkeypatch.setattr(training.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(training.dist, "get_world_size", lambda: 2)
    files = SimpleNamespace(sync=lambda: calls.append("sync"),
                            prepare_sharded_checkpoint=lambda step: calls.append(f"prepare {step}"),
                            commit_sharded_checkpoint=lambda step, state: calls.append(f"commit {step}"))
    state = SimpleNamespace(sharded=True, model=None, optimizer=None)
    assert training.save_all(cfg, 4, state, files, master=True) == [] and calls == ["sync"]
    monkeypatch.setattr(training, "app_state", lambda step, cfg, world: {})
    calls.clear()
    assert training.save_all(cfg, 5, state, files, master=True) == []
    assert calls == ["sync", "prepare 5", "barrier", "save", "commit 5", "barrier"]
