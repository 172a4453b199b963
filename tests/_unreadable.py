"""Run `python -m MODULE ARGS...` with one file unreadable, as a non-root user or a failing disk sees it.

    python tests/_unreadable.py PATH HOW MODULE [ARGS...]

HOW is one of
    eacces          every open() of PATH raises PermissionError (EACCES), as `chmod 000 PATH` does for anyone
                    but root (the tests run as root, for whom permissions do not stop a read);
    eacces-from:N   the N-th and later opens of PATH raise it (the file became unreadable during the run);
    eio-from:N      the N-th and later opens of PATH succeed, its first half reads, and reading on raises OSError(EIO)
                    (a bad sector in the middle).
Test support only: the code under test runs unchanged; builtins.open is wrapped before the module runs, for PATH
alone.
"""
import builtins
import errno
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's packages


class _FailingReads:
    """A binary file that reads its first `limit` bytes, then raises OSError(EIO)."""

    def __init__(self, raw, limit):
        self._raw, self._limit = raw, limit

    def read(self, size=-1):
        left = self._limit - self._raw.tell()
        if left <= 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return self._raw.read(left if size < 0 else min(size, left))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()

    def __getattr__(self, name):
        return getattr(self._raw, name)


def main():
    path, how, module, *args = sys.argv[1:]
    target = os.path.realpath(path)
    kind, _, first = how.partition("-from:")
    first = int(first or 1)
    original = builtins.open
    opened = 0

    def open_(file, *a, **k):
        nonlocal opened
        if isinstance(file, (str, bytes, os.PathLike)) and os.path.realpath(file) == target:
            opened += 1
            if opened >= first:
                if kind == "eacces":
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
                return _FailingReads(original(file, *a, **k), os.path.getsize(target) // 2)
        return original(file, *a, **k)

    builtins.open = open_
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
