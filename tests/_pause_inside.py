"""Run `python -m MODULE ARGS...`, but stop it inside one chosen moment, so that a test can kill -9 it there.

    python tests/_pause_inside.py MARKER WHAT N MODULE [ARGS...]

WHAT is one of
    write:REGEX              the N-th durable write (ghost_common.durable.write_atomically) of a path matching REGEX
                             pauses with half of the file's bytes in its temporary file (not fsynced, not renamed);
    call:MODULE:QUALNAME     the N-th call of that function pauses once it has been entered.
On pausing, the file MARKER is created (naming the paused write or call) and the process sleeps until it is
killed. Test support only: the code under test runs unchanged, the chosen function is wrapped before the
module runs.
"""
import functools
import importlib
import io
import os
import re
import runpy
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's packages


def pause(marker, what):
    with open(f"{marker}.part", "w") as f:
        f.write(what)
    os.replace(f"{marker}.part", marker)
    while True:
        time.sleep(3600)


def pause_in_write(marker, pattern, n):
    import ghost_common.durable as durable

    original = durable.write_atomically
    count = 0

    def write_atomically(path, write):
        nonlocal count
        if re.search(pattern, os.fspath(path)):
            count += 1
            if count == n:
                def half_then_pause(f):
                    buffer = io.BytesIO()
                    write(buffer)
                    data = buffer.getvalue()
                    f.write(data[:len(data) // 2])
                    f.flush()
                    pause(marker, os.fspath(path))
                return original(path, half_then_pause)
        return original(path, write)

    durable.write_atomically = write_atomically
    for module in list(sys.modules.values()):  # modules that imported it by name before now
        if getattr(module, "write_atomically", None) is original:
            module.write_atomically = write_atomically


def pause_in_call(marker, target, n):
    module_name, _, qualname = target.partition(":")
    owner = importlib.import_module(module_name)
    *outer, name = qualname.split(".")
    for part in outer:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    count = 0

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        nonlocal count
        count += 1
        if count == n:
            pause(marker, qualname)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def main():
    marker, what, n, module, *args = sys.argv[1:]
    kind, _, target = what.partition(":")
    {"write": pause_in_write, "call": pause_in_call}[kind](marker, target, int(n))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
