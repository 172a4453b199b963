"""Results at scale: a 100K-step run's step files, compacted, read whole and scanned lazily.

    python -m benchmarks.results_scale [--steps 100000] [--interval 10] [--rows 64] [--n_layer 1]
                                       [--steps_per_file 10000] [--range 1000] [--jobs 2] [--dir DIR]

Synthesises a run the shape of a 100,000-step pretraining run: --steps / --interval step files
(grad_dotprods/iter_XXXXXX.parquet, written by the app's writer, ghost_results.results_io.flush_dotprods, with the
run's identity and digests) of --interval steps x --rows rows, the 22 Pile domains, per-parameter values of a
GPT-2 of --n_layer layers. Then, in this one process, one after the other on the same files (all in the page
cache: they were just written):

  1. read_run of the whole run from its step files (per-layer columns not read, every file verified);
  2. python -m ghost_results compact (ghost_results.compact.compact, --steps_per_file steps a file);
  3. read_run of the whole run from the compacted files (the same columns, bit for bit, checked);
  4. scan_run of one domain of one --range-step range (its rows counted against read_run's, checked).

The table gives the file counts before and after compaction and each time; the last line the two ratios the
issue asks for (compacted files / step files, scan / whole read_run).
"""
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pyarrow.dataset as ds

from benchmarks.results_load import PILE_DOMAINS, gpt2_small_parameter_names
from ghost_common.flags import FlagParser
from ghost_results.compact import compact
from ghost_results.results_io import flush_dotprods, read_run
from ghost_results.scan import scan_run

RUN_ID = "00000000000000000000000000b3c4a1"


def _write_files(run_dir, lasts, interval, rows, names, seed):
    """Write the step files ending at each step of `lasts` (one process's share)."""
    rng = np.random.default_rng(seed)
    for last in lasts:
        pending = []
        for step in range(last - interval + 1, last + 1):
            per_layer = {name: rng.standard_normal(rows).astype(np.float32) for name in names}
            pending.append({
                "step": step, "lr": 6e-4, "train_loss": 3.0, "val_loss": 3.1,
                "dot_products": rng.standard_normal(rows).astype(np.float32),
                "batch_weights": np.full(rows, 1.0 / rows, dtype=np.float32),
                "token_counts": np.full(rows, 1023, dtype=np.int64),
                "domain": [PILE_DOMAINS[i] for i in rng.integers(0, len(PILE_DOMAINS), rows)],
                "token_offset": rng.integers(0, 10**10, rows), "doc_id": rng.integers(0, 10**8, rows),
                "sample_index": np.arange(rows, dtype=np.int64), "per_layer": per_layer})
        flush_dotprods(run_dir, "scale", 1, pending, ("parquet",), run_id=RUN_ID)
    return len(lasts)


def synthesise(run_dir, steps, interval, rows, n_layer, jobs):
    names = gpt2_small_parameter_names(n_layer) if n_layer > 0 else []
    os.makedirs(os.path.join(run_dir, "grad_dotprods"))
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"run_name": "scale", "run_id": RUN_ID, "max_steps": steps}, f)
    lasts = list(range(interval, steps + 1, interval))
    shares = [lasts[i::jobs] for i in range(jobs)]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        sum(pool.map(_write_files, [run_dir] * jobs, shares, [interval] * jobs, [rows] * jobs, [names] * jobs,
                     range(jobs)))
    return len(lasts), len(names)


def files_in(run_dir):
    return len(os.listdir(os.path.join(run_dir, "grad_dotprods")))


def mib(run_dir):
    directory = os.path.join(run_dir, "grad_dotprods")
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)) / 2**20


def timed(call):
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def build_parser():
    parser = FlagParser(prog="python -m benchmarks.results_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--interval", type=int, default=10, help="steps per step file (--dot_prod_save_interval)")
    parser.add_argument("--rows", type=int, default=64, help="training rows per step (the global batch)")
    parser.add_argument("--n_layer", type=int, default=1,
                        help="per-parameter columns of a GPT-2 of this many layers (0: none; 12: GPT-2 Small's 148)")
    parser.add_argument("--steps_per_file", type=int, default=10_000, help="compact's --steps_per_file")
    parser.add_argument("--range", type=int, default=1000, help="steps the lazy scan selects")
    parser.add_argument("--domain", default="ArXiv", help="the domain the lazy scan selects")
    parser.add_argument("--jobs", type=int, default=2, help="processes writing the step files")
    parser.add_argument("--dir", default=None, help="where to write the run (default: a temporary directory)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    root = tempfile.mkdtemp(prefix="results_scale_", dir=args.dir)
    run_dir = os.path.join(root, "run")
    try:
        (n_files, n_layers), seconds = timed(lambda: synthesise(run_dir, args.steps, args.interval, args.rows,
                                                                args.n_layer, args.jobs))
        print(f"synthesised {args.steps:,} steps x {args.rows} rows, {n_layers} per-parameter columns: {n_files:,} "
              f"step files, {mib(run_dir):,.0f} MiB, in {seconds:.0f} s ({args.jobs} processes)", flush=True)
        rows = []
        before_files, before_mib = files_in(run_dir), mib(run_dir)
        whole, seconds = timed(lambda: read_run(run_dir, strict=True))
        rows.append(("read_run, whole run, step files", before_files, before_mib, seconds, whole.num_rows))
        done, seconds = timed(lambda: compact(run_dir, steps_per_file=args.steps_per_file))
        assert not done.left, done.left
        after_files = files_in(run_dir)
        rows.append(("compact", after_files, mib(run_dir), seconds, None))
        compacted, read_seconds = timed(lambda: read_run(run_dir, strict=True))
        for name, values in whole.columns.items():
            assert np.array_equal(values, compacted.columns[name]), name
        rows.append(("read_run, whole run, compacted", after_files, mib(run_dir), read_seconds, compacted.num_rows))
        first = args.steps // 2 + 1
        last = first + args.range - 1
        selection = (ds.field("step") >= first) & (ds.field("step") <= last) & (ds.field("domain") == args.domain)
        table, scan_seconds = timed(lambda: scan_run(run_dir).to_table(
            columns=["step", "sample_index", "domain", "dot_products", "batch_weight", "lr"], filter=selection))
        columns = compacted.columns
        chosen = (columns["step"] >= first) & (columns["step"] <= last) & (columns["domain"] == args.domain)
        expected = int(chosen.sum())
        assert table.num_rows == expected, (table.num_rows, expected)
        rows.append((f"scan_run, {args.domain}, steps {first:,}..{last:,}", after_files, None, scan_seconds,
                     table.num_rows))
        print(f"{'what':<42} | {'files':>6} | {'MiB':>6} | {'seconds':>8} | {'rows':>10}")
        print("-" * 43 + "+" + "-" * 8 + "+" + "-" * 8 + "+" + "-" * 10 + "+" + "-" * 11)
        for what, files, size, seconds, n in rows:
            print(f"{what:<42} | {files:>6,} | {'' if size is None else f'{size:,.0f}':>6} | {seconds:>8.3f} | "
                  f"{'' if n is None else f'{n:,}':>10}")
        print(f"compacted files / step files: {after_files:,} / {before_files:,} = {after_files / before_files:.2%}; "
              f"scan_run / read_run of the whole compacted run: {scan_seconds:.3f} / {read_seconds:.3f} s = "
              f"{scan_seconds / read_seconds:.2%} (of the step files' read_run: "
              f"{scan_seconds / rows[0][3]:.2%})", flush=True)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
