"""One durable write: a reader sees the old file or the complete new one, and after the call returns
the new one survives a crash or a power cut.

    temporary file beside the target -> write -> flush -> fsync -> rename onto the target -> fsync the directory

The temporary file is removed if anything fails (a full disk, a kill signal turned into an exception).
A full disk is reported as such, naming the file.
"""
import errno
import os


def write_atomically(path, write) -> None:
    """Call ``write(binary_file)`` on a temporary file, then durably replace ``path`` with it."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        _remove_quietly(tmp)
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err.errno, f"no space left to write {path} ({os.strerror(err.errno)}); free space "
                                     "on that file system and run again") from err
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_directory(os.path.dirname(os.path.abspath(path)))


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
