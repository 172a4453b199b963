"""--keep_checkpoints: the series checkpoints/step_XXXXXX.pt beside latest.pt (ghost_results.run_directory).

One GPT2-Tiny run of 6 steps keeps every checkpoint of --checkpoint_interval 2 (--keep_checkpoints 0); its
latest.pt is read while it trains, so each kept file is compared with the checkpoint the run had at that step.
A copy of it resumed from step 2 with --keep_checkpoints 2 sets the later files aside, trains steps 3..6 again
and keeps exactly steps 4 and 6, equal to the uninterrupted run's. The owner's rules on small files:
tests/test_run_directory.py.
"""
import json
import os
import shutil

import pytest
import torch
from test_train_runs import tiny_flags

from ghost_results.run_directory import checkpoint_path
from GradDotProd_LM import export, train, training

SERIES = ["--checkpoint_interval", "2", "--eval_interval", "100", "--max_steps", "6"]


def model_of(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_model(found, expected):
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, rtol=1e-6, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def series(data_dir, tmp_path_factory):
    """(results dir, run dir, {step: the model latest.pt held at that step}) of a run keeping every checkpoint."""
    results = str(tmp_path_factory.mktemp("results"))
    run_dir = os.path.join(results, "all")
    seen = {}
    real_report = training.report_progress

    def read_latest(step, *args):  # before step s's checkpoint: latest.pt is step s - 1's
        if step in (3, 5):
            seen[step - 1] = model_of(checkpoint_path(run_dir))
        real_report(step, *args)

    training.report_progress = read_latest
    try:
        assert train.main(tiny_flags(data_dir, results, "all", *SERIES, "--keep_checkpoints", "0")) == 0
    finally:
        training.report_progress = real_report
    seen[6] = model_of(checkpoint_path(run_dir))
    return results, run_dir, seen


def test_keep_0_keeps_every_interval_checkpoint_as_it_was(series):
    _, run_dir, seen = series
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [
        "latest.pt", "step_000002.pt", "step_000004.pt", "step_000006.pt"]
    for step, model in seen.items():
        state = torch.load(checkpoint_path(run_dir, step), weights_only=True)
        assert state["step"] == step and state["run_id"] == json.load(open(os.path.join(run_dir, "config.json")))[
            "run_id"]
        assert_same_model(state["model"], model)
    # the newest kept file is latest.pt's own file: no extra bytes
    assert os.stat(checkpoint_path(run_dir, 6)).st_ino == os.stat(checkpoint_path(run_dir)).st_ino


def test_resume_sets_later_step_files_aside_and_keeps_the_last_2(series, data_dir, tmp_path):
    results, run_dir, seen = series
    copy = os.path.join(str(tmp_path), "all")
    shutil.copytree(run_dir, copy)
    os.remove(checkpoint_path(copy))  # copytree copied the hard link as a file: link it again, as the run left it
    os.link(checkpoint_path(copy, 6), checkpoint_path(copy))
    # back to the state of step 2, as docs/training.md says: latest.pt removed first, since it is the newest kept
    # checkpoint's own file (a copy over it would overwrite step_000006.pt through the link)
    os.remove(checkpoint_path(copy))
    shutil.copyfile(checkpoint_path(copy, 2), checkpoint_path(copy))
    flags = tiny_flags(data_dir, str(tmp_path), "all", *SERIES, "--keep_checkpoints", "2", "--resume")
    assert train.main(flags) == 0
    assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == ["latest.pt", "step_000004.pt", "step_000006.pt"]
    set_aside = sorted(os.path.relpath(os.path.join(root, name), os.path.join(copy, "superseded"))
                       .split(os.sep, 1)[1] for root, _, names in os.walk(os.path.join(copy, "superseded"))
                       for name in names if root.endswith("checkpoints"))
    assert set_aside == ["checkpoints/step_000004.pt", "checkpoints/step_000006.pt"]  # moved, never deleted
    superseded = os.path.join(copy, "superseded")
    for step in (4, 6):  # and as they were
        [moved] = [os.path.join(root, f"step_{step:06d}.pt") for root, _, names in os.walk(superseded)
                   if f"step_{step:06d}.pt" in names]
        assert torch.load(moved, weights_only=True)["step"] == step
        assert_same_model(model_of(moved), seen[step])
    for step in (4, 6):
        assert_same_model(model_of(checkpoint_path(copy, step)), seen[step])
    with open(os.path.join(copy, "config.json")) as f:
        assert json.load(f)["keep_checkpoints"] == 2


def test_export_a_kept_step(series, tmp_path):
    _, run_dir, _ = series
    out = str(tmp_path / "hf-step-4")
    assert export.main([run_dir, "--out", out, "--step", "4"]) == 0
    with open(os.path.join(out, "graddotprod_export.json")) as f:
        info = json.load(f)
    assert info["step"] == 4 and info["checkpoint"] == os.path.abspath(checkpoint_path(run_dir, 4))


def test_bad_keep_checkpoints_exits_2_as_a_flag_or_in_yaml(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    dirs = ["--data_dir", str(tmp_path / "data"), "--results_dir", str(tmp_path / "results")]
    assert train.main(["--keep_checkpoints", "-1"] + dirs) == 2
    assert "--keep_checkpoints: must be an integer >= 0" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("keep_checkpoints: two\n")
    assert train.main(["--config", str(tmp_path / "c.yaml")] + dirs) == 2
    assert "key keep_checkpoints: must be an integer >= 0, got 'two'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "results")
