"""Run `python -m MODULE ARGS...` and, when it exits, write this process's peak resident memory (ru_maxrss, KiB) to
OUT_DIR/rank<RANK>.txt. `torchrun ... benchmarks/_peak_rss.py OUT_DIR MODULE ARGS...` (benchmarks/fsdp_memory.py)."""
import os
import resource
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's packages


def main():
    out_dir, module, *args = sys.argv[1:]
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        with open(os.path.join(out_dir, f"rank{os.environ.get('RANK', '0')}.txt"), "w") as f:
            f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


if __name__ == "__main__":
    main()
