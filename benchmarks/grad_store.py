"""The gradient store: write speed, sequential read bandwidth of its shard files, and query throughput.

    python -m benchmarks.grad_store [--dims 1024 16384] [--store_mib 1024] [--queries 1 16 64]
                                    [--scores raw cosine precond trajectory] [--dtype bfloat16] [--blocks 16]
                                    [--shard_rows 8192] [--chunk_rows 65536] [--reps 5] [--threads N] [--dir DIR]

For every K in --dims, writes a synthetic store of about --store_mib MiB (Gaussian rows of K columns in --blocks
equal blocks, 64 rows a step, 22 domains, one document a row) with ghost_results.grad_store.GradStoreWriter in
a temporary directory, then measures, in one run:
- read: the shard files (rows and provenance) read sequentially in 64 MiB blocks with readinto() into one
  preallocated buffer, warm (in the page cache, as right after writing: memory copy speed) and cold (each file's
  pages dropped from the page cache first with posix_fadvise(DONTNEED), which needs no root: the virtual disk's
  speed, which a host cache below the VM may still help). Median of --reps each. The target of the query
  throughput is half the WARM figure: the stricter bound.
- query: ghost_results.grad_query.score_store, top 20, for every --scores and --queries: "raw (first pass)" is
  a fresh GradStore, whose shards are verified (sha256 of every file) as they are reached, warm and cold; the
  other rows reuse a reader that has verified them, its files in the page cache. precond uses a preconditioner
  fitted first (the fit timed apart); trajectory scores raw against 8 checkpoints spread over the steps and
  builds the per-document table (one document a row here: its worst case). Rows/s, the bytes/s they imply
  (bytes_per_row: rows plus provenance), the read bandwidth measured right before each repetition (warm; cold
  for the cold first pass), and the query's speed / that read's: the median of the per-repetition ratios (the
  machine may be shared: a ratio of two timings taken together is steadier than either). The other column
  divides by the median read of the opposite kind measured after writing. Median of --reps, fastest beside it.
"""
import gc
import glob
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.results_load import PILE_DOMAINS
from ghost_common.flags import FlagParser
from ghost_results.grad_query import Preconditioner, score_store
from ghost_results.grad_store import GradStore, GradStoreWriter, bytes_per_row, usable_cpus

READ_BLOCK = 64 * 2**20
ROWS_PER_STEP = 64
CHECKPOINTS = 8


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


def shard_files(directory):
    return sorted(glob.glob(os.path.join(directory, "shard-*.npy")))


def drop_from_page_cache(directory) -> None:
    """Drop the store's shard files from the page cache (clean pages that no process maps; no root needed)."""
    gc.collect()  # readers no longer referenced unmap their shards
    for path in shard_files(directory):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bandwidth(directory, cold: bool) -> float:
    """Bytes/s reading every shard file sequentially into one preallocated buffer."""
    if cold:
        drop_from_page_cache(directory)
    view = memoryview(bytearray(READ_BLOCK))
    total = 0
    start = time.perf_counter()
    for path in shard_files(directory):
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total / (time.perf_counter() - start)


def timed_against_reads(function, reps, directory, cold: bool):
    """Per repetition, one read of the store's files (cold: dropped from the page cache first) and then one call
    of `function` (cold: dropped again first), so that both see the machine as it is at that moment. Returns the
    call's (median, fastest) seconds, the median read bandwidth (bytes/s) and the median per-repetition ratio
    of the call's speed to the read's."""
    times, reads, ratios = [], [], []
    for _ in range(reps):
        reads.append(read_bandwidth(directory, cold))
        if cold:
            drop_from_page_cache(directory)
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
        ratios.append(1 / (times[-1] * reads[-1]))  # x (store bytes / time) / read bytes/s, x = store bytes
    return statistics.median(times), min(times), statistics.median(reads), statistics.median(ratios)


def build_parser():
    parser = FlagParser(prog="python -m benchmarks.grad_store", description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 16384], help="K, the columns of a row")
    parser.add_argument("--store_mib", type=float, default=1024, help="store size per K (rows and provenance)")
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 16, 64], help="Q, queries scored at once")
    parser.add_argument("--scores", nargs="+", default=["raw", "cosine", "precond", "trajectory"],
                        choices=("raw", "cosine", "precond", "trajectory"))
    parser.add_argument("--blocks", type=int, default=16, help="equal blocks of columns (preconditioner blocks)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--shard_rows", type=int, default=8192)
    parser.add_argument("--chunk_rows", type=int, default=65536, help="rows a query reads at a time")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each timing (median)")
    parser.add_argument("--threads", type=int, default=None, help="score_store's workers [the usable CPUs]")
    parser.add_argument("--dir", default=None, help="where to write the stores (default: a temporary directory)")
    return parser


def measure_dim(args, dim, root) -> list:
    """Write one store of K=dim, print its lines; returns the table rows."""
    row_bytes = bytes_per_row(dim, args.dtype)
    rows = max(args.shard_rows, int(args.store_mib * 2**20 // row_bytes))
    store_bytes = rows * row_bytes
    seconds = synthesise(root, rows, dim, args.blocks, args.dtype, args.shard_rows)
    print(f"\nstore K={dim}: {rows:,} rows x {dim} {args.dtype}, {args.blocks} blocks, {row_bytes:,} bytes a row, "
          f"{store_bytes / 2**30:.2f} GiB; written in {seconds:.1f}s ({store_bytes / seconds / 2**20:,.0f} MiB/s, "
          "random numbers, conversion, sha256 and fsync included)", flush=True)
    warm_reads, cold_reads = [], []
    for _ in range(max(args.reps, 2)):  # alternated, so that both see the same machine
        cold_reads.append(read_bandwidth(root, cold=True))
        warm_reads.append(read_bandwidth(root, cold=False))
    warm, cold = statistics.median(warm_reads), statistics.median(cold_reads)
    print(f"read K={dim}: warm {warm / 2**20:,.0f} MiB/s, cold {cold / 2**20:,.0f} MiB/s (sequential readinto, "
          "64 MiB blocks; cold = dropped from the page cache with posix_fadvise)", flush=True)
    rng = np.random.default_rng(1)
    queries = {q: rng.standard_normal((q, dim)) for q in args.queries}
    table = []

    def measure(label, q, run, cold_case):
        median, fastest, read, ratio = timed_against_reads(run, args.reps, root, cold_case)
        rate = store_bytes / median
        ratio *= store_bytes
        line = (dim, label, q, median, fastest, rows / median, rate / 2**20, read / 2**20,
                rate / warm if cold_case else ratio, ratio if cold_case else rate / cold)
        table.append(line)
        print(format_line(line), flush=True)

    # First passes before any reader of this process maps the files: posix_fadvise leaves mapped pages cached.
    q_first = 16 if 16 in args.queries else args.queries[0]
    first_pass = lambda: score_store(GradStore(root), queries[q_first], top=20, chunk_rows=args.chunk_rows,
                                     threads=args.threads)
    first_pass()  # warm up (threads, imports); its reader is gone when it returns
    measure("raw (first pass, warm)", q_first, first_pass, False)
    measure("raw (first pass, cold)", q_first, first_pass, True)

    reader = GradStore(root)
    steps = reader.records()["step"]
    checkpoints = np.linspace(steps.min(), steps.max(), CHECKPOINTS).round().astype(int).tolist()
    preconditioner = None
    if "precond" in args.scores:
        start = time.perf_counter()
        with threadpool_limits(1, user_api="blas"):  # a multi-threaded BLAS crawls on a shared 2-core machine
            preconditioner = Preconditioner.fit(reader, chunk_rows=args.chunk_rows)
        print(f"precond fit K={dim}: {time.perf_counter() - start:.1f}s (one pass, float64, one BLAS thread)",
              flush=True)
    for score in args.scores:
        for q in args.queries:
            if score == "trajectory":
                trajectory = {c: np.roll(queries[q], i, axis=1) for i, c in enumerate(checkpoints)}  # [Q, K] each
                run = lambda: score_store(reader, trajectory, trajectory=True, top=20, chunk_rows=args.chunk_rows,
                                          threads=args.threads)
            else:
                run = lambda: score_store(reader, queries[q], score=score, top=20, chunk_rows=args.chunk_rows,
                                          preconditioner=preconditioner, threads=args.threads)
            measure(score, q, run, False)
    return table


HEADER = (f"{'K':>5} | {'score':<22} | {'Q':>2} | {'median s':>8} | {'fastest s':>9} | {'rows/s':>10} | "
          f"{'MiB/s':>6} | {'read MiB/s':>10} | {'/ warm read':>11} | {'/ cold read':>11}")


def format_line(line) -> str:
    dim, label, q, median, fastest, rows_per_s, mib, read, warm, cold = line
    return (f"{dim:>5} | {label:<22} | {q:>2} | {median:>8.3f} | {fastest:>9.3f} | {rows_per_s:>10,.0f} | "
            f"{mib:>6,.0f} | {read:>10,.0f} | {warm:>11.2f} | {cold:>11.2f}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    threads = usable_cpus() if args.threads is None else args.threads
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({usable_cpus()} usable), numpy {np.__version__}, "
          f"score_store threads {threads}; load average at start {os.getloadavg()[0]:.1f}", flush=True)
    table = []
    for dim in args.dims:
        root = tempfile.mkdtemp(prefix="grad_store_", dir=args.dir)
        try:
            table += measure_dim(args, dim, root)
        finally:
            shutil.rmtree(root)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; target: query MiB/s / warm read >= 0.5\n")
    print(HEADER)
    print("-" * len(HEADER))
    for line in table:
        print(format_line(line))


if __name__ == "__main__":
    main()
