"""ghost_common.durable.write_atomically: the old file or the whole new one, never a part; full disks named."""
import os
import subprocess
import sys

import pytest

from ghost_common.durable import write_atomically, write_atomically_named


def test_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.bin"
    write_atomically(path, lambda f: f.write(b"old"))
    write_atomically(path, lambda f: f.write(b"new contents"))
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_a_file_named_once_written_replaces_its_name_and_leaves_no_temporary(tmp_path):
    """write_atomically_named: the writer names the file once its bytes are written; a failure leaves nothing."""
    (tmp_path / "b.bin").write_bytes(b"old")
    assert write_atomically_named(tmp_path, "stem", lambda f: f.write(b"new") and "b.bin") == str(tmp_path / "b.bin")
    assert (tmp_path / "b.bin").read_bytes() == b"new" and os.listdir(tmp_path) == ["b.bin"]

    def fail(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically_named(tmp_path, "stem", fail)
    assert os.listdir(tmp_path) == ["b.bin"]


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
from ghost_common.durable import write_atomically
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

    from ghost_common.durable import FileLock

    path = tmp_path / "run.lock"
    first = FileLock(path)
    assert first.acquire()
    assert FileLock(path).holder().startswith(f"pid {os.getpid()} on ")
    first.release()
    path.write_text("")  # a holder between creating the file and writing its line
    assert FileLock(path).holder(wait=0.05) == "another process"
    threading.Timer(0.1, lambda: path.write_text("pid 123 on host since now\n")).start()
    assert FileLock(path).holder(wait=30.0) == "pid 123 on host since now"  # read as soon as it is written


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_a_new_file_gets_the_mode_open_gives_and_a_replaced_one_keeps_its_own(tmp_path, umask_027):
    """New: the mode of a file made by plain open() under the same umask (0o640 here, not mkstemp's 0o600); a
    temporary file left by a killed process of the same pid does not pass its mode on. Replaced: the old file's
    mode, whatever it was."""
    from ghost_common.durable import default_mode, umask

    assert umask() == umask_027 and default_mode() == 0o640 and default_mode(directory=True) == 0o750
    with open(tmp_path / "plain", "wb"):
        pass
    plain = os.stat(tmp_path / "plain").st_mode & 0o7777
    path = tmp_path / "new.json"
    stale = tmp_path / f"new.json.tmp-{os.getpid()}"
    stale.write_bytes(b"left by a killed writer")
    os.chmod(stale, 0o600)
    write_atomically(path, lambda f: f.write(b"{}"))
    assert os.stat(path).st_mode & 0o7777 == plain == 0o640
    for mode in (0o600, 0o664, 0o444):
        os.chmod(path, mode)
        write_atomically(path, lambda f: f.write(b"{}"))
        assert os.stat(path).st_mode & 0o7777 == mode, oct(mode)
    assert sorted(os.listdir(tmp_path)) == ["new.json", "plain"]
