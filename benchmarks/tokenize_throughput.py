"""Tokens per second on the bundled sample's train shard: the project's tokenize path against baselines
that tokenize one batch of 100 documents at a time in a pool of the same number of processes.

    python benchmarks/tokenize_throughput.py [--workers 1 2] [--repeats 2] [--copies 1]

The input is the sample's train shard, optionally repeated --copies times in one .jsonl.zst (repeats
favour the slow BPE, whose word cache then hits more often, as real Pile text would not).

Rows:
- pile_tools tokenize: the whole `tokenize_sources` run (decompress, parse, tokenize, write, fsync).
- pile_tools encoder, batches of 100: `pile_tools.tokenizer` alone, called like the baselines.
- slow GPT-2 BPE, batches of 100: OpenAI's pure-Python algorithm (`pile_tools.slow_bpe`), the algorithm
  transformers' former slow `GPT2Tokenizer` implemented; transformers 5 no longer ships that class.
- transformers GPT2Tokenizer, batches of 100: transformers 5's `GPT2Tokenizer` (backed by the Rust
  `tokenizers` library), one batch of 100 documents per call.
Baselines time tokenization only (documents are read beforehand), which favours them.

Two rates per row: tokens per wall-clock second, and tokens per CPU-second (CPU time of every process
doing the work: pool workers' time inside the tokenizer calls for the batch rows; the main process plus
its reaped workers for `pile_tools tokenize`). On a shared machine the wall-clock rate swings with other
load; the CPU-second rate barely does, and it is the like-for-like per-core comparison.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from ghost_common.flags import FlagParser
from pile_tools.jsonl_io import ShardSource, write_jsonl_zst
from pile_tools.sample_data import SAMPLE_FILES, write_sample_dataset
from pile_tools.tokenize_corpus import tokenize_sources
from pile_tools.tokenizer import default_vocab_dir

BASELINE_BATCH_DOCS = 100
_baseline_tokenizer = None


def _init_baseline(kind: str) -> None:
    global _baseline_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the pool size is the core count
    if kind == "pile_tools":
        from pile_tools.tokenizer import load_gpt2_tokenizer

        _baseline_tokenizer = load_gpt2_tokenizer().encode_batch
    elif kind == "slow":
        from pile_tools.slow_bpe import SlowGPT2BPE

        _baseline_tokenizer = SlowGPT2BPE().encode_batch
    else:
        from transformers import GPT2Tokenizer

        with open(os.path.join(default_vocab_dir(), "encoder.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        with open(os.path.join(default_vocab_dir(), "vocab.bpe"), encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:-1]]
        tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
        _baseline_tokenizer = lambda texts: tokenizer(texts)["input_ids"]


def _baseline_batch(texts: list[str]) -> tuple[int, float]:
    cpu_start = time.process_time()
    tokens = sum(len(ids) + 1 for ids in _baseline_tokenizer(texts))  # +1: the EOT appended per document
    return tokens, time.process_time() - cpu_start


def run_baseline(kind: str, texts: list[str], workers: int) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds) of tokenizing `texts` in batches of 100 with a pool of `workers`."""
    batches = [texts[i:i + BASELINE_BATCH_DOCS] for i in range(0, len(texts), BASELINE_BATCH_DOCS)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_baseline, initargs=(kind,)) as pool:
        list(pool.map(_baseline_batch, [["warm up"]] * workers))  # exclude process start and vocabulary load
        start = time.perf_counter()
        results = list(pool.map(_baseline_batch, batches))
        wall = time.perf_counter() - start
    return sum(t for t, _ in results), wall, sum(c for _, c in results)


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_project(shard: str, workers: int) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds) of a whole `tokenize_sources` run, worker start-up included."""
    with tempfile.TemporaryDirectory() as out:
        cpu_start, start = _cpu_seconds(), time.perf_counter()
        summary = tokenize_sources([ShardSource(shard)], out, workers=workers, progress=False)
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    return summary.tokens, wall, cpu


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per row")
    parser.add_argument("--copies", type=int, default=1, help="times the sample's train documents are repeated")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    with tempfile.TemporaryDirectory() as sample_dir:
        sample = write_sample_dataset(sample_dir)["train"]
        records = [json.loads(line) for _, line in ShardSource(sample).items() if line.strip()] * args.copies
        shard = os.path.join(sample_dir, "bench.jsonl.zst")
        write_jsonl_zst(shard, records)
        texts = [r["text"] for r in records]
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
        print(f"input: bundled sample {SAMPLE_FILES['train']} x {args.copies}, {len(texts)} documents, "
              f"{os.path.getsize(shard):,} bytes compressed\n")
        print("| path | workers | tokens | wall s | tokens/s | vs slow BPE | CPU s | tokens/CPU-s | vs slow BPE |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        runs = {
            "slow GPT-2 BPE, batches of 100": lambda w: run_baseline("slow", texts, w),
            "transformers GPT2Tokenizer, batches of 100": lambda w: run_baseline("transformers", texts, w),
            "pile_tools encoder, batches of 100": lambda w: run_baseline("pile_tools", texts, w),
            "pile_tools tokenize": lambda w: run_project(shard, w),
        }
        for workers in sorted(set(args.workers)):
            # Rows interleaved within each repeat, so slow phases of a shared machine hit them all alike.
            trials = {name: [] for name in runs}
            for _ in range(args.repeats):
                for name, run in runs.items():
                    trials[name].append(run(workers))
            best = {name: (min(t[1] for t in ts), min(t[2] for t in ts), ts[0][0]) for name, ts in trials.items()}
            slow_wall, slow_cpu, slow_tokens = best["slow GPT-2 BPE, batches of 100"]
            for name, (wall, cpu, tokens) in best.items():
                print(f"| {name} | {workers} | {tokens:,} | {wall:.2f} | {tokens / wall:,.0f} | {slow_wall / wall:.1f}x "
                      f"| {cpu:.2f} | {tokens / cpu:,.0f} | {slow_cpu / cpu:.1f}x |")


if __name__ == "__main__":
    main()
