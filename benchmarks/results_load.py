"""Loading a run's dot products: Parquet against pickle, load time and peak memory.

    python -m benchmarks.results_load [--steps 2000] [--rows 64] [--interval 10] [--reps 3] [--dir DIR]

Synthesises one run the size of a GPT-2 Small valuation run (--steps steps x --rows rows, per-parameter
values for GPT-2 Small's 148 parameters, one file per --interval steps, the 22 Pile domains) twice: as the
app's pickles and as its Parquet files (the writers of ghost_results.results_io). Each (format, columns) is
then loaded --reps times, every time in a fresh Python process, with ghost_results.results_io.load_run;
the table gives the median load time and the largest peak RSS of the loading process (ru_maxrss, imports
included), and the RSS after the imports alone.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from ghost_common.flags import FlagParser
from ghost_results.results_io import SCHEMA_NAME, SCHEMA_VERSION, save_dotprod_parquet, save_dotprod_pickle

PILE_DOMAINS = ("Pile-CC", "PubMed Central", "Books3", "OpenWebText2", "ArXiv", "Github", "FreeLaw", "StackExchange",
                "USPTO Backgrounds", "PubMed Abstracts", "Gutenberg (PG-19)", "OpenSubtitles", "Wikipedia (en)",
                "DM Mathematics", "Ubuntu IRC", "BookCorpus2", "EuroParl", "HackerNews", "YoutubeSubtitles",
                "PhilPapers", "NIH ExPorter", "Enron Emails")
WRITERS = {"pickle": save_dotprod_pickle, "parquet": save_dotprod_parquet}
SUFFIXES = {"pickle": "pkl", "parquet": "parquet"}


def gpt2_small_parameter_names(n_layer=12):
    """The 148 trainable parameters of GPT-2 Small (the tied wte/lm_head counted once)."""
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        for module in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names += [f"transformer.h.{i}.{module}.weight", f"transformer.h.{i}.{module}.bias"]
    return names + ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def synthesise(root, steps, rows, interval, seed=0):
    """Write the run in both formats under root/<format>/; returns {format: run_dir}."""
    rng = np.random.default_rng(seed)
    names = gpt2_small_parameter_names()
    run_dirs = {fmt: os.path.join(root, fmt) for fmt in WRITERS}
    for run_dir in run_dirs.values():
        os.makedirs(os.path.join(run_dir, "grad_dotprods"))
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"run_name": "bench", "max_steps": steps}, f)
    pending = []
    for step in range(1, steps + 1):
        per_layer = {name: rng.standard_normal(rows).astype(np.float32) for name in names}
        pending.append({
            "step": step, "lr": 6e-4, "train_loss": 3.0, "val_loss": 3.1,
            "dot_products": np.sum(list(per_layer.values()), axis=0, dtype=np.float32),
            "batch_weights": np.full(rows, 1.0 / rows, dtype=np.float32),
            "token_counts": np.full(rows, 1023, dtype=np.int64),
            "domain": [PILE_DOMAINS[i] for i in rng.integers(0, len(PILE_DOMAINS), rows)],
            "token_offset": rng.integers(0, 10**10, rows), "doc_id": rng.integers(0, 10**8, rows),
            "sample_index": np.arange(rows, dtype=np.int64), "per_layer": per_layer,
        })
        if step % interval == 0 or step == steps:
            payload = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "run_name": "bench",
                       "world_size": 1, "steps": pending}
            for fmt, write in WRITERS.items():
                write(os.path.join(run_dirs[fmt], "grad_dotprods", f"iter_{step:06d}.{SUFFIXES[fmt]}"), payload)
            pending = []
    return run_dirs


LOADER = """
import json, resource, sys, time
from ghost_results.results_io import read_run
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
run = read_run(sys.argv[1], per_layer=sys.argv[2] == "1", strict=True)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "imported_kb": imported, "rows": run.num_rows, "columns": len(run.columns)}))
"""


def measure(run_dir, per_layer, reps):
    """Load in `reps` fresh processes: (median seconds, max peak RSS MiB, max RSS after imports MiB, rows,
    columns)."""
    results = []
    for _ in range(reps):
        done = subprocess.run([sys.executable, "-c", LOADER, run_dir, "1" if per_layer else "0"],
                              capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return (statistics.median(r["seconds"] for r in results), max(r["peak_kb"] for r in results) / 1024,
            max(r["imported_kb"] for r in results) / 1024, results[0]["rows"], results[0]["columns"])


def disk_mib(run_dir):
    directory = os.path.join(run_dir, "grad_dotprods")
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)) / 2**20


def build_parser():
    parser = FlagParser(prog="python -m benchmarks.results_load", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=64, help="training rows per step (the global batch)")
    parser.add_argument("--interval", type=int, default=10, help="steps per file (--dot_prod_save_interval)")
    parser.add_argument("--reps", type=int, default=3, help="fresh processes per measurement")
    parser.add_argument("--dir", default=None, help="where to write the run (default: a temporary directory)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    root = tempfile.mkdtemp(prefix="results_load_", dir=args.dir)
    try:
        start = time.perf_counter()
        run_dirs = synthesise(root, args.steps, args.rows, args.interval)
        print(f"synthesised {args.steps} steps x {args.rows} rows x {len(gpt2_small_parameter_names())} parameters, "
              f"{-(-args.steps // args.interval)} files per format, in {time.perf_counter() - start:.0f}s; "
              f"median of {args.reps} fresh processes", flush=True)
        print(f"{'format':<8} | {'per_layer':<9} | {'MiB on disk':>11} | {'load s':>7} | {'peak RSS MiB':>12} | "
              f"{'after imports MiB':>17} | {'rows':>7} | {'columns':>7}")
        print("-" * 9 + "+" + "-" * 11 + "+" + "-" * 13 + "+" + "-" * 9 + "+" + "-" * 14 + "+" + "-" * 19 + "+"
              + "-" * 9 + "+" + "-" * 8)
        for per_layer in (False, True):
            for fmt in WRITERS:
                seconds, peak, imported, rows, columns = measure(run_dirs[fmt], per_layer, args.reps)
                print(f"{fmt:<8} | {str(per_layer):<9} | {disk_mib(run_dirs[fmt]):>11.1f} | {seconds:>7.3f} | "
                      f"{peak:>12,.0f} | {imported:>17,.0f} | {rows:>7,} | {columns:>7}", flush=True)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
