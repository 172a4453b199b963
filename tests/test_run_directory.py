"""ghost_results.run_directory.RunDirectory on small files: the checkpoint series (links, pruning, a stop between
intervals, a file system without hard links, a kill between latest.pt and its link), the step sinks (appended,
flushed with the dot products, cut at the resume step, closed). Real runs: tests/test_checkpoint_series.py."""
import os

from ghost_results.run_directory import RunDirectory, checkpoint_path, kept_checkpoint_steps


def opened(tmp_path, keep, start_step=0):
    files = RunDirectory(tmp_path / "run")
    files.open(start_step, run_id="r", run_name="run", checkpoint_interval=2, keep_checkpoints=keep)
    return files


def payload(step):
    return lambda f: f.write(f"state of step {step}".encode())


def test_series_links_prunes_and_a_stop_between_intervals_updates_latest_only(tmp_path):
    files = opened(tmp_path, keep=2)
    for step in (2, 3, 4, 6, 7):  # 3 and 7: a stop signal or a failure between intervals
        files.checkpoint(step, payload(step))
    assert kept_checkpoint_steps(files.path) == [4, 6]
    assert open(checkpoint_path(files.path), "rb").read() == b"state of step 7"
    assert open(checkpoint_path(files.path, 6), "rb").read() == b"state of step 6"
    assert os.listdir(os.path.join(files.path, "checkpoints")) and not [
        n for n in os.listdir(os.path.join(files.path, "checkpoints")) if ".tmp-" in n]
    one = opened(tmp_path / "one", keep=1)
    one.checkpoint(2, payload(2))
    assert kept_checkpoint_steps(one.path) == []  # the default: latest.pt alone, as before the series


def test_without_hard_links_the_step_file_is_a_copy(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    files = opened(tmp_path, keep=0)
    files.checkpoint(2, payload(2))
    files.checkpoint(4, payload(4))
    assert open(checkpoint_path(files.path, 2), "rb").read() == b"state of step 2"
    assert os.stat(checkpoint_path(files.path, 4)).st_ino != os.stat(checkpoint_path(files.path)).st_ino


def test_a_kill_between_latest_and_its_link_is_repaired_on_resume(tmp_path, monkeypatch):
    files = opened(tmp_path, keep=0)
    files.checkpoint(2, payload(2))
    monkeypatch.setattr(files, "_link_step_checkpoint", lambda step: None)  # killed after latest.pt was written
    files.checkpoint(4, payload(4))
    assert kept_checkpoint_steps(files.path) == [2]
    resumed = opened(tmp_path, keep=0, start_step=4)  # the app resumes from latest.pt, step 4
    assert kept_checkpoint_steps(resumed.path) == [2, 4]
    assert open(checkpoint_path(resumed.path, 4), "rb").read() == b"state of step 4"


class RecordingSink:
    """A step sink that records what the owner asks of it."""

    def __init__(self):
        self.calls = []

    def append(self, rows, prov):
        self.calls.append(("append", rows, prov))

    def flush(self):
        self.calls.append(("flush",))

    def drop_steps_after(self, step):
        self.calls.append(("drop_steps_after", step))

    def close(self):
        self.calls.append(("close",))


def test_step_sinks_are_appended_flushed_with_the_dot_products_cut_on_resume_and_closed(tmp_path):
    sink = RecordingSink()
    files = RunDirectory(tmp_path / "run")
    files.open(4, run_id="r", run_name="run", save_interval=2, step_sinks={"gradients": sink})
    assert sink.calls == [("drop_steps_after", 4)]  # a resume from step 4 redoes what the sink holds after it
    for step in (5, 6):
        files.record_step({"step": step, "lr": 0.1, "loss": 1.0}, artifacts={"gradients": (f"rows {step}", step)},
                          log=False)
    assert sink.calls[1:] == [("append", "rows 5", 5), ("append", "rows 6", 6), ("flush",)]  # step 6: the interval
    files.keep_until(6)
    files.sync()
    files.close()
    assert sink.calls[4:] == [("drop_steps_after", 6), ("flush",), ("close",)]
