"""One durable write: a reader sees the old file or the complete new one, and after the call returns
the new one survives a crash or a power cut.

    temporary file beside the target -> write -> flush -> fsync -> rename onto the target -> fsync the directory

The temporary file is removed if anything fails (a full disk, a kill signal turned into an exception).
A full disk is reported as such, naming the file. The new file has the mode open() gives a new file
(0o666 & ~umask) or, replacing one, the mode that one had. FileLock gives a directory one owner at a time.
"""
import errno
import fcntl
import os
import socket
import stat
import time


def write_atomically(path, write) -> None:
    """Call ``write(binary_file)`` on a temporary file, then durably replace ``path`` with it."""
    path = os.fspath(path)
    _write_durably(f"{path}.tmp-{os.getpid()}", write, path)


def write_atomically_named(directory, stem, write) -> str:
    """`write_atomically` for a file whose name is known only once its bytes are written: ``write(binary_file)``
    returns the file's name in `directory`. The temporary file is `directory/<stem>.tmp-PID` (a crash leaves at
    most that, which no reader takes for a complete file). Returns the path written."""
    directory = os.fspath(directory)
    return _write_durably(os.path.join(directory, f"{stem}.tmp-{os.getpid()}"), write, None,
                          lambda name: os.path.join(directory, name))


def _write_durably(tmp, write, path, name_of=None):
    """write(f) into `tmp`, flush, fsync, rename onto `path` (None: name_of(what write returned)), fsync the
    directory."""
    f = None
    try:
        _remove_quietly(tmp)  # one left by a killed process of the same pid would keep its own mode
        with open(tmp, "wb") as raw:
            if path is not None:
                try:
                    os.fchmod(raw.fileno(), stat.S_IMODE(os.stat(path).st_mode))  # a replaced file keeps its mode
                except FileNotFoundError:
                    pass  # a new file: open()'s mode
            f = _RecordingFile(raw)
            returned = write(f)
            f.flush()
            os.fsync(raw.fileno())
        path = path if path is not None else name_of(returned)
        os.replace(tmp, path)
    except BaseException as err:
        _remove_quietly(tmp)
        # a writer may wrap the OSError in its own error (torch.save: "unexpected pos ...")
        cause = err if isinstance(err, OSError) else (f.error if f is not None else None)
        if cause is not None and cause.errno in NO_SPACE:
            raise OSError(cause.errno, f"no space left to write {path or tmp} ({os.strerror(cause.errno)}); free "
                                       "space on that file system and run again") from err
        raise
    fsync_directory(os.path.dirname(os.path.abspath(path)))
    return path


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a quota, a file-size limit


def umask() -> int:
    """The process's umask (read from /proc where it can be, so that no other thread sees it changed)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode open() gives a new file (0o666 & ~umask), os.mkdir a new directory (0o777 & ~umask): for files
    a library writes with its own private mode (mkstemp's 0o600)."""
    return (0o777 if directory else 0o666) & ~umask()


class _RecordingFile:
    """A binary file that remembers the OSError its write() raised, whatever the caller turns it into."""

    def __init__(self, raw):
        self._raw = raw
        self.error = None

    def write(self, data):
        try:
            return self._raw.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self._raw, name)


def fsync_directory(directory) -> None:
    """Make a rename in `directory` durable; some file systems do not allow fsync on a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class FileLock:
    """An exclusive lock on `path` (fcntl.flock) that names its holder inside the file. The operating system
    releases it when the holder exits, however it exits (kill -9 included), so it is never left stale.
    Between machines it is only as good as the file system's flock (local disks: yes; NFS: check)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._fd = None

    def acquire(self, blocking: bool = False) -> bool:
        """Take the lock; without `blocking`, return False at once if another process holds it."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        text = (f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n").encode()
        os.pwrite(fd, text, 0)  # over the previous holder's line, then cut: the file is never left empty
        os.ftruncate(fd, len(text))
        self._fd = fd
        return True

    def holder(self, wait: float = 0.5) -> str:
        """Who holds the lock, as its holder wrote it. A holder that has just taken the lock may not have
        written its line yet (a new, empty file): read again for up to `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            try:
                with open(self.path, encoding="utf-8", errors="replace") as f:
                    text = f.read().strip()
            except OSError:
                return "another process"
            if text or time.monotonic() >= deadline:
                return text or "another process"
            time.sleep(0.01)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
