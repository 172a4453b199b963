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
  `tokenizers` library), called as the prior implementation called it.
Baselines time tokenization only (documents are read beforehand), which favours them.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

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


def _baseline_batch(texts: list[str]) -> int:
    return sum(len(ids) + 1 for ids in _baseline_tokenizer(texts))  # +1: the EOT appended per document


def run_baseline(kind: str, texts: list[str], workers: int) -> tuple[int, float]:
    batches = [texts[i:i + BASELINE_BATCH_DOCS] for i in range(0, len(texts), BASELINE_BATCH_DOCS)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_baseline, initargs=(kind,)) as pool:
        list(pool.map(_baseline_batch, [["warm up"]] * workers))  # exclude process start and vocabulary load
        start = time.perf_counter()
        tokens = sum(pool.map(_baseline_batch, batches))
    return tokens, time.perf_counter() - start


def run_project(shard: str, workers: int) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = tokenize_sources([ShardSource(shard)], out, workers=workers, progress=False)
    return summary.tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per row")
    parser.add_argument("--copies", type=int, default=1, help="times the sample's train documents are repeated")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as sample_dir:
        sample = write_sample_dataset(sample_dir)["train"]
        records = [json.loads(line) for _, line in ShardSource(sample).items() if line.strip()] * args.copies
        shard = os.path.join(sample_dir, "bench.jsonl.zst")
        write_jsonl_zst(shard, records)
        texts = [r["text"] for r in records]
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
        print(f"input: bundled sample {SAMPLE_FILES['train']} x {args.copies}, {len(texts)} documents, "
              f"{os.path.getsize(shard):,} bytes compressed\n")
        print("| path | workers | tokens | seconds | tokens/s | vs slow BPE |")
        print("|---|---:|---:|---:|---:|---:|")
        for workers in sorted(set(args.workers)):
            results = {
                "slow GPT-2 BPE, batches of 100": min((run_baseline("slow", texts, workers) for _ in range(args.repeats)), key=lambda r: r[1]),
                "transformers GPT2Tokenizer, batches of 100": min((run_baseline("transformers", texts, workers) for _ in range(args.repeats)), key=lambda r: r[1]),
                "pile_tools encoder, batches of 100": min((run_baseline("pile_tools", texts, workers) for _ in range(args.repeats)), key=lambda r: r[1]),
                "pile_tools tokenize": min((run_project(shard, workers) for _ in range(args.repeats)), key=lambda r: r[1]),
            }
            slow_rate = results["slow GPT-2 BPE, batches of 100"][0] / results["slow GPT-2 BPE, batches of 100"][1]
            for name, (tokens, seconds) in results.items():
                rate = tokens / seconds
                print(f"| {name} | {workers} | {tokens:,} | {seconds:.2f} | {rate:,.0f} | {rate / slow_rate:.1f}x |")


if __name__ == "__main__":
    main()
