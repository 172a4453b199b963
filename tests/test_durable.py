"""ghost_engine.durable.write_atomically: the old file or the whole new one, never a part; full disks named."""
import os
import subprocess
import sys

import pytest

from ghost_engine.durable import write_atomically


def test_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.bin"
    write_atomically(path, lambda f: f.write(b"old"))
    write_atomically(path, lambda f: f.write(b"new contents"))
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_a_failing_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    write_atomically(path, lambda f: f.write(b"old"))

    def half_then_fail(f):
        f.write(b"partial")
        raise KeyboardInterrupt  # a signal in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, half_then_fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_a_full_disk_is_named_and_keeps_the_old_file(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk (EFBIG, as ENOSPC would be): a clear error naming the file."""
    path = tmp_path / "latest.pt"
    path.write_bytes(b"old checkpoint")
    script = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # report EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from ghost_engine.durable import write_atomically
try:
    write_atomically({str(path)!r}, lambda f: f.write(b"x" * 100_000))
except OSError as err:
    print(err)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert f"no space left to write {path}" in out.stdout, out.stderr
    assert path.read_bytes() == b"old checkpoint" and os.listdir(tmp_path) == ["latest.pt"]


def test_a_lock_names_its_holder_even_while_it_is_being_taken(tmp_path):
    """The holder's line replaces the previous one in place (never an empty file once written); a reader that
    finds the file empty (a holder that has just created it) reads again until the line is there."""
    import threading

    from ghost_engine.durable import FileLock

    path = tmp_path / "run.lock"
    first = FileLock(path)
    assert first.acquire()
    assert FileLock(path).holder().startswith(f"pid {os.getpid()} on ")
    first.release()
    path.write_text("")  # a holder between creating the file and writing its line
    assert FileLock(path).holder(wait=0.05) == "another process"
    threading.Timer(0.1, lambda: path.write_text("pid 123 on host since now\n")).start()
    assert FileLock(path).holder(wait=30.0) == "pid 123 on host since now"  # read as soon as it is written
