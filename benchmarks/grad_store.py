"""The gradient store: write speed, sequential read bandwidth of its shard files, and query throughput.

    python -m benchmarks.grad_store [--rows 200000] [--dim 4096] [--blocks 16] [--dtype bfloat16]
                                    [--shard-rows 8192] [--chunk-rows 16384] [--queries 16] [--reps 2] [--dir DIR]

Writes a synthetic store (--rows Gaussian rows of --dim columns in --blocks equal blocks, 22 domains) with
ghost_results.grad_store.GradStoreWriter in a temporary directory, then measures:
- read: the shard files (rows and provenance) read sequentially in 64 MiB blocks with readinto() into one
  preallocated buffer. Right after writing, the files sit in the page cache when memory allows: this is the
  warm-cache bandwidth (memory copy speed), the bound the queries are compared with; a cold-cache figure needs
  the page cache dropped (root), which this script does not do.
- query: ghost_results.grad_query.score_store with --queries queries, top 20, for raw, cosine and precond
  (its preconditioner fitted first, the fit timed apart). "first pass" is a fresh GradStore, whose shards are
  verified (sha256 of every file) as they are reached; the other rows reuse a reader that has verified them.
  Rows/s, the bytes/s they imply (bytes_per_row: rows plus provenance), and that ÷ the read bandwidth
  (the target is >= 0.5). Median of --reps.
"""
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from benchmarks.results_load import PILE_DOMAINS
from ghost_common.flags import FlagParser
from ghost_results.grad_query import Preconditioner, score_store
from ghost_results.grad_store import GradStore, GradStoreWriter, bytes_per_row

READ_BLOCK = 64 * 2**20
ROWS_PER_STEP = 64


def synthesise(directory, rows, dim, n_blocks, dtype, shard_rows, seed=0):
    """Write the store; returns the seconds it took (random numbers included)."""
    rng = np.random.default_rng(seed)
    width = dim // n_blocks
    blocks = [[f"h.{i}.weight", i * width, dim if i == n_blocks - 1 else (i + 1) * width] for i in range(n_blocks)]
    start = time.perf_counter()
    with GradStoreWriter(directory, blocks, dtype=dtype, shard_rows=shard_rows,
                         meta={"identity": "benchmark", "seed": seed}) as writer:
        for first in range(0, rows, shard_rows):
            n = min(shard_rows, rows - first)
            steps = (first + np.arange(n)) // ROWS_PER_STEP
            writer.append(rng.standard_normal((n, dim), dtype=np.float32), {
                "step": steps, "row": (first + np.arange(n)) % ROWS_PER_STEP, "doc_id": rng.integers(0, 10**8, n),
                "token_offset": rng.integers(0, 10**10, n), "domain": np.array(PILE_DOMAINS)[rng.integers(0, 22, n)],
                "lr": 6e-4, "weight": 1.0 / ROWS_PER_STEP, "n_tokens": 1024})
    return time.perf_counter() - start


def read_bandwidth(store: GradStore) -> float:
    """Bytes/s reading every shard file sequentially into one preallocated buffer."""
    buffer = bytearray(READ_BLOCK)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    for shard in store.shards:
        for kind in ("rows", "prov"):
            with open(os.path.join(store.directory, shard[f"{kind}_file"]), "rb", buffering=0) as f:
                while True:
                    n = f.readinto(view)
                    if not n:
                        break
                    total += n
    return total / (time.perf_counter() - start)


def timed(function, reps):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_parser():
    parser = FlagParser(prog="python -m benchmarks.grad_store", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=4096, help="K, the columns of a row")
    parser.add_argument("--blocks", type=int, default=16, help="equal blocks of columns (preconditioner blocks)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--shard_rows", type=int, default=8192)
    parser.add_argument("--chunk_rows", type=int, default=16384, help="rows a query reads at a time")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2, help="repetitions of each timing (median)")
    parser.add_argument("--dir", default=None, help="where to write the store (default: a temporary directory)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    root = tempfile.mkdtemp(prefix="grad_store_", dir=args.dir)
    try:
        seconds = synthesise(root, args.rows, args.dim, args.blocks, args.dtype, args.shard_rows)
        row_bytes = bytes_per_row(args.dim, args.dtype)
        store_bytes = args.rows * row_bytes
        print(f"store: {args.rows:,} rows x K={args.dim} {args.dtype}, {args.blocks} blocks, {row_bytes:,} bytes a "
              f"row, {store_bytes / 2**30:.2f} GiB; written in {seconds:.1f}s ({store_bytes / seconds / 2**20:,.0f} "
              f"MiB/s, random numbers, conversion, sha256 and fsync included)", flush=True)
        bandwidth = statistics.median(read_bandwidth(GradStore(root)) for _ in range(max(args.reps, 2)))
        print(f"read: {bandwidth / 2**20:,.0f} MiB/s (sequential readinto, 64 MiB blocks, warm page cache)", flush=True)
        queries = np.random.default_rng(1).standard_normal((args.queries, args.dim))
        reader = GradStore(root)
        start = time.perf_counter()
        preconditioner = Preconditioner.fit(reader, chunk_rows=args.chunk_rows)
        fit_seconds = time.perf_counter() - start
        print(f"precond fit: {fit_seconds:.1f}s (dense per-block F in float64, one pass)\n", flush=True)
        print(f"{'score':<26} | {'seconds':>8} | {'rows/s':>11} | {'MiB/s':>8} | {'÷ read':>6}")
        print("-" * 27 + "+" + "-" * 10 + "+" + "-" * 13 + "+" + "-" * 10 + "+" + "-" * 7)
        cases = [("raw (first pass, verifies)", "raw", lambda: GradStore(root)), ("raw", "raw", lambda: reader),
                 ("cosine", "cosine", lambda: reader), ("precond", "precond", lambda: reader)]
        for label, score, store_of in cases:
            seconds = timed(lambda: score_store(store_of(), queries, score=score, top=20, chunk_rows=args.chunk_rows,
                                                preconditioner=preconditioner), args.reps)
            rate = store_bytes / seconds
            print(f"{label:<26} | {seconds:>8.2f} | {args.rows / seconds:>11,.0f} | {rate / 2**20:>8,.0f} | "
                  f"{rate / bandwidth:>6.2f}", flush=True)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
