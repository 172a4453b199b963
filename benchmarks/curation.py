"""Curation by In-Run Data Shapley on a corpus with planted noise: does a model trained without the lowest-valued
documents do better than one trained on everything, on a random thinning of the same size, or without the
highest-valued documents?

    python -m benchmarks.curation [--drop 25%] [--seeds 5] [--steps 150] [--batch_size 8] [--seq_len 64]
        [--math_docs 120] [--noise_docs 16] [--vocab 2048] [--work_dir DIR] [--out Results/curation] [--threads 1]

1. Corpus, built here offline. Target: generated school mathematics (`pile_tools.dm_math`), domain
   "DM Mathematics", in the validation split (the valuation's rows and the validation loss) and the test split
   (held out from everything). Train split, all in one domain ("Mixed", so that no label gives the noise away),
   shuffled: --math_docs clean mathematics documents of 20 question/answer pairs, and --noise_docs documents of
   each of four planted kinds, about a mathematics document's length each:
     shuffled      mathematics documents with their GPT-2 tokens in random order (the same tokens, no structure)
     random_bytes  random bytes (32..255) read as Latin-1 text
     boilerplate   one web page of cookie banner and footer text, the same document repeated
     unrelated     chunks of software licence texts installed on the machine (the sample's Software Licenses)
   --vocab V trains a byte-level BPE of V tokens on the train split (the `tokenizers` library, offline) and
   tokenizes with it (`pile_tools tokenize --tokenizer`): the model's embedding and head then have V rows,
   which makes a CPU step about four times cheaper than with GPT-2's 50257 (--vocab 0: GPT-2's BPE).
2. Valuation: one GradDotProd run of the app (GPT2-Tiny, AdamW, --learning_rate, warmup 10, cosine to a tenth,
   --steps, seed 0, --val_batch_size validation rows of the target), values of --convention (first order).
3. Curation with `graddotprod-curate` (GradDotProd_LM.curate) by document, --drop of the valued documents' tokens
   (--measure tokens, so every thinned corpus loses the same number of tokens, up to one document):
   bottom (the lowest-valued), top (the highest-valued), random (a seeded draw, one per training seed).
4. Retraining: Regular runs of the app with the same flags, on the full, bottom-curated, randomly thinned and
   top-thinned corpora, for each seed 0..--seeds-1 (seed s: the same initial weights for every corpus). Each
   run's final evaluation (the app's Evaluator: --eval_iter batches of --eval_bs rows) gives the validation and
   the test loss of the target.
5. Tables (markdown, printed): final loss per corpus, mean ± sample standard deviation over seeds and per seed,
   the difference to the full corpus paired by seed; what each curation removed, by planted kind, in documents
   and tokens, against the corpus' own shares; the valuation run's document values by planted kind.
   CSV: --out/curation_runs.csv, --out/curation_removed.csv.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from benchmarks._common import format_table, positive_int, write_csv
from ghost_common.flags import FlagParser
from ghost_results import analysis
from ghost_results.results_io import read_run
from GradDotProd_LM import curate as curation
from GradDotProd_LM import train
from pile_tools.dm_math import dm_math_documents
from pile_tools.reader import PileReader

TARGET = "DM Mathematics"
TRAIN_DOMAIN = "Mixed"
KINDS = ("clean", "shuffled", "random_bytes", "boilerplate", "unrelated")
NOISE = KINDS[1:]
VARIANTS = ("full", "bottom", "random", "top")
PAIRS_PER_DOCUMENT = 20
BOILERPLATE = (
    "We use cookies to improve your experience on our site. By continuing to browse you agree to our use of "
    "cookies. Accept all cookies | Manage preferences | Reject non-essential cookies. Home | About us | Products | "
    "Services | Blog | Careers | Contact | Sign in | Register. Subscribe to our newsletter for the latest news, "
    "offers and updates. Enter your email address. Subscribe. Follow us on social media. Share this page. Print "
    "this page. Back to top. Copyright 2024 Example Company Ltd. All rights reserved. Privacy policy | Terms of "
    "use | Cookie policy | Accessibility | Sitemap. This website is operated by Example Company Ltd, registered "
    "in England and Wales, company number 01234567. Registered office: 1 Example Street, London. Prices include "
    "VAT where applicable. Delivery times are estimates. Items in your basket are not reserved. Your basket is "
    "empty. Continue shopping. Customer service is available Monday to Friday, 9am to 5pm. Frequently asked "
    "questions. Returns and refunds. Track your order. Gift cards. Store locator. Download our app.")


def build_parser() -> FlagParser:
    parser = FlagParser(prog="python -m benchmarks.curation", description=__doc__.split("\n")[0])
    parser.add_argument("--drop", type=curation.parse_amount, default=curation.parse_amount("25%"),
                        help="share (P%%) or number of the valued documents' tokens each thinned corpus loses [25%%]")
    parser.add_argument("--seeds", type=positive_int, default=5, help="training seeds per corpus [5]")
    parser.add_argument("--steps", type=positive_int, default=150, help="optimizer steps of every run [150]")
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--seq_len", type=positive_int, default=64)
    parser.add_argument("--val_batch_size", type=positive_int, default=8, help="validation rows of the valuation [8]")
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--eval_iter", type=positive_int, default=4)
    parser.add_argument("--eval_bs", type=positive_int, default=8)
    parser.add_argument("--math_docs", type=positive_int, default=120, help="clean mathematics documents [120]")
    parser.add_argument("--noise_docs", type=positive_int, default=16, help="documents of each planted kind [16]")
    parser.add_argument("--vocab", type=int, default=2048,
                        help="byte-level BPE trained on the train split, of this many tokens; 0: GPT-2's [2048]")
    parser.add_argument("--work_dir", default=None, help="corpora and runs (kept) [a temporary directory, removed]")
    parser.add_argument("--out", default="Results/curation", help="directory of the CSV files [Results/curation]")
    parser.add_argument("--convention", choices=analysis.CONVENTIONS, default="first_order",
                        help="value convention of the curation (graddotprod-curate --convention) [first_order]")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads [1: on a shared 2-core machine, 2 threads ran 10x slower]")
    return parser


# ---------------------------------------------------------------------------------------------------------- corpus

def noise_documents(kind: str, count: int, rng: random.Random, target_tokens: int, gpt2) -> list[str]:
    """`count` planted documents of one kind, each about `target_tokens` GPT-2 tokens."""
    if kind == "shuffled":
        docs = []
        for text in dm_math_documents(count, PAIRS_PER_DOCUMENT, seed=rng.randrange(1 << 30)):
            ids = gpt2.encode(text)
            rng.shuffle(ids)
            docs.append(gpt2.decode(ids))
        return docs
    if kind == "random_bytes":
        docs = []
        for _ in range(count):
            text = ""
            while len(gpt2.encode(text)) < target_tokens:
                text += bytes(rng.randrange(32, 256) for _ in range(64)).decode("latin-1")
            docs.append(text)
        return docs
    if kind == "boilerplate":
        return [BOILERPLATE] * count
    from pile_tools.sample_data import license_documents

    chunks, current = [], ""
    for text in license_documents():
        for line in text.splitlines(keepends=True):
            current += line
            if len(gpt2.encode(current)) >= target_tokens:
                chunks.append(current)
                current = ""
    if len(chunks) < count:
        raise SystemExit(f"--noise_docs {count}: the licence texts on this machine give {len(chunks)} chunks")
    return rng.sample(chunks, count)


def build_corpus(args, directory: str) -> dict:
    """Write the three splits as JSONL, tokenize them into directory/tokenized; returns {"data_dir", "kinds"
    (kind of each train line, 1-based lines at index line - 1), "tokenizer" (its file or None)}."""
    from pile_tools.cli import main as pile_tools_main
    from pile_tools.tokenizer import load_gpt2_tokenizer

    gpt2 = load_gpt2_tokenizer()
    rng = random.Random(0)
    clean = dm_math_documents(args.math_docs, PAIRS_PER_DOCUMENT, seed=0)
    target = int(np.mean([len(gpt2.encode(t)) for t in clean]))
    records = [(text, "clean") for text in clean]
    for kind in NOISE:
        records += [(text, kind) for text in noise_documents(kind, args.noise_docs, rng, target, gpt2)]
    rng.shuffle(records)
    splits = {"train": [(text, TRAIN_DOMAIN) for text, _ in records],
              "validation": [(t, TARGET) for t in dm_math_documents(8, PAIRS_PER_DOCUMENT, seed=101)],
              "test": [(t, TARGET) for t in dm_math_documents(8, PAIRS_PER_DOCUMENT, seed=202)]}
    os.makedirs(os.path.join(directory, "jsonl"), exist_ok=True)
    paths = {}
    for split, rows in splits.items():
        paths[split] = os.path.join(directory, "jsonl", f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t, "meta": {"pile_set_name": d}}) + "\n" for t, d in rows)
    tokenizer_file = None
    if args.vocab:
        tokenizer_file = os.path.join(directory, "tokenizer.json")
        train_bpe([t for t, _ in splits["train"]], args.vocab, tokenizer_file)
    data_dir = os.path.join(directory, "tokenized")
    for split, path in paths.items():
        extra = ["--tokenizer", tokenizer_file] if tokenizer_file else []
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            code = pile_tools_main(["tokenize", "--input", path, "--output", data_dir, "--split", split,
                                    "--workers", "1", "--no_progress", *extra])
        if code:
            raise SystemExit(f"tokenizing {path} failed ({code})")
    kinds = [kind for _, kind in records]
    with open(os.path.join(directory, "kinds.json"), "w") as f:
        json.dump(kinds, f)  # the planted kind of each train line
    return {"data_dir": data_dir, "kinds": kinds, "tokenizer": tokenizer_file}


def train_bpe(texts: list, vocab: int, path: str) -> None:
    """A byte-level BPE of `vocab` tokens (with <|endoftext|>) trained on `texts`, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(path)


# ---------------------------------------------------------------------------------------------------------- runs

def train_flags(args, data_dir: str, results_dir: str, name: str, seed: int, method: str) -> list:
    return ["--method", method, "--architecture", "GPT2-Tiny", "--batch_size", str(args.batch_size),
            "--seq_len", str(args.seq_len), "--val_batch_size", str(args.val_batch_size),
            "--val_domain", TARGET, "--max_steps", str(args.steps), "--warmup_step", "10",
            "--learning_rate", str(args.learning_rate), "--min_lr", str(args.learning_rate / 10),
            "--eval_interval", str(args.steps), "--eval_iter", str(args.eval_iter), "--eval_bs", str(args.eval_bs),
            "--dot_prod_save_interval", str(args.steps), "--checkpoint_interval", str(args.steps),
            "--seed", str(seed), "--data_dir", data_dir, "--results_dir", results_dir, "--run_name", name]


def run_app(flags: list, log_path: str) -> str:
    """Train with the app in this process (its output into log_path); returns the run directory."""
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = train.main(flags)
    if code != 0:
        raise SystemExit(f"training failed (exit {code}); see {log_path}")
    return os.path.join(flags[flags.index("--results_dir") + 1], flags[flags.index("--run_name") + 1])


def final_losses(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "training_log.json")) as f:
        last = json.load(f)["evals"][-1]
    return {"validation": last["validation"]["domains"][TARGET], "test": last["test"]["domains"][TARGET]}


def values_by_kind(run_dir: str, reader: PileReader, kinds: list, convention: str) -> list:
    """Per planted kind: documents, how many the run valued, their mean and median value, the share below zero."""
    run = read_run(run_dir)
    table = analysis.aggregate(run.columns, analysis.compute_values(run.columns, convention, run.value),
                               by="document")
    of_doc = np.array([kinds[reader.document_source(TRAIN_DOMAIN, int(doc))[1] - 1] for doc in table["doc_id"]])
    rows = []
    for kind in KINDS:
        values = np.asarray(table["value"])[of_doc == kind]
        rows.append({"kind": kind, "documents": kinds.count(kind), "valued": len(values),
                     "mean": float(values.mean()) if len(values) else float("nan"),
                     "median": float(np.median(values)) if len(values) else float("nan"),
                     "negative": float((values < 0).mean()) if len(values) else float("nan")})
    return rows


def removed_by_kind(manifest: dict, reader: PileReader, kinds: list) -> dict:
    """{kind: [documents, tokens]} of what a curation removed (the kind of a document from its source line)."""
    counts = {kind: [0, 0] for kind in KINDS}
    for entry in manifest["removed"]:
        _, line = reader.document_source(entry["domain"], entry["doc_id"])
        counts[kinds[line - 1]][0] += 1
        counts[kinds[line - 1]][1] += entry["token_count"]
    return counts


# ---------------------------------------------------------------------------------------------------------- main

def mean_std(values: list) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.work_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="curation-"))
        os.makedirs(work, exist_ok=True)
        results = os.path.join(work, "runs")
        corpus = build_corpus(args, os.path.join(work, "corpus"))
        data_dir, kinds = corpus["data_dir"], corpus["kinds"]
        reader = PileReader(data_dir, split="train")
        print(f"corpus: {len(kinds)} train documents, {reader.num_tokens(TRAIN_DOMAIN):,} tokens "
              f"({'BPE of %d tokens' % args.vocab if args.vocab else 'GPT-2 BPE'}) in {data_dir}", flush=True)

        flags = train_flags(args, data_dir, results, "valued", 0, "GradDotProd")
        print("$ python -m GradDotProd_LM.train " + " ".join(flags), flush=True)
        valued = run_app(flags, os.path.join(work, "valued.log"))
        print(f"valuation run: {time.perf_counter() - started:.0f} s", flush=True)

        corpora, removed_rows = {"full": {s: data_dir for s in range(args.seeds)}}, []
        tokenizer = ["--tokenizer", corpus["tokenizer"]] if corpus["tokenizer"] else []
        for variant in ("bottom", "top", "random"):
            corpora[variant] = {}
            for seed in range(args.seeds) if variant == "random" else (None,):
                out = os.path.join(work, "corpora", variant + ("" if seed is None else f"-{seed}"))
                command = [valued, f"--drop_{variant}", args.drop.text, "--measure", "tokens", "--by", "document",
                           "--convention", args.convention, "--out", out, "--overwrite", *tokenizer]
                command += [] if seed is None else ["--seed", str(seed)]
                if seed in (None, 0):
                    print("$ graddotprod-curate " + " ".join(command), flush=True)
                with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                    if curation.main(command) != 0:
                        raise SystemExit(f"graddotprod-curate {' '.join(command)} failed")
                with open(os.path.join(out, curation.MANIFEST)) as f:
                    manifest = json.load(f)
                counts = removed_by_kind(manifest, reader, kinds)
                removed_rows.append({"variant": variant, "draw": seed, **{f"{k}_docs": counts[k][0] for k in KINDS},
                                     **{f"{k}_tokens": counts[k][1] for k in KINDS}})
                for s in range(args.seeds) if seed is None else (seed,):
                    corpora[variant][s] = out

        runs = []
        for seed in range(args.seeds):
            for variant in VARIANTS:
                name = f"{variant}-seed{seed}"
                run_dir = run_app(train_flags(args, corpora[variant][seed], results, name, seed, "Regular"),
                                  os.path.join(work, name + ".log"))
                runs.append({"variant": variant, "seed": seed, "train_tokens":
                             PileReader(corpora[variant][seed], split="train").num_tokens(TRAIN_DOMAIN),
                             **final_losses(run_dir)})
                print(f"  {name}: validation {runs[-1]['validation']:.4f}, test {runs[-1]['test']:.4f} "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
        report(args, runs, removed_rows, reader, kinds, final_losses(valued),
               values_by_kind(valued, reader, kinds, args.convention))
    print(f"\ntotal {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def report(args, runs: list, removed_rows: list, reader: PileReader, kinds: list, valued_losses: dict,
           kind_values: list) -> None:
    write_csv(os.path.join(args.out, "curation_runs.csv"), runs, ["variant", "seed", "train_tokens", "validation",
                                                                  "test"])
    removed_columns = ["variant", "draw"] + [f"{k}_{u}" for k in KINDS for u in ("docs", "tokens")]
    write_csv(os.path.join(args.out, "curation_removed.csv"), removed_rows, removed_columns)
    seeds = sorted({r["seed"] for r in runs})
    loss = {(r["variant"], r["seed"]): r for r in runs}
    print(f"\n### Final loss on the target (DM Mathematics), {args.steps} steps, {len(seeds)} seeds\n")
    print("| corpus | train tokens | validation loss | test loss | test − full (paired) | test per seed |")
    print("|---|---:|---:|---:|---:|---|")
    names = {"full": "full", "bottom": f"bottom {args.drop.text} dropped (curated)",
             "random": f"random {args.drop.text} dropped", "top": f"top {args.drop.text} dropped"}
    for variant in VARIANTS:
        rows = [loss[variant, s] for s in seeds]
        diffs = [loss[variant, s]["test"] - loss["full", s]["test"] for s in seeds]
        print(f"| {names[variant]} | {rows[0]['train_tokens']:,} | {mean_std([r['validation'] for r in rows])} | "
              f"{mean_std([r['test'] for r in rows])} | {'' if variant == 'full' else mean_std(diffs)} | "
              f"{', '.join(format(r['test'], '.4f') for r in rows)} |")
    print(f"\n(The valuation run, GradDotProd on the full corpus with seed 0: validation "
          f"{valued_losses['validation']:.4f}, test {valued_losses['test']:.4f}.)")

    total = {kind: [0, 0] for kind in KINDS}
    starts = list(reader.document_starts(TRAIN_DOMAIN)) + [reader.num_tokens(TRAIN_DOMAIN)]
    for doc in range(len(starts) - 1):
        kind = kinds[reader.document_source(TRAIN_DOMAIN, doc)[1] - 1]
        total[kind][0] += 1
        total[kind][1] += starts[doc + 1] - starts[doc]
    print("\n### What each curation removed: planted noise share (documents / tokens)\n")
    print("| removed | documents | tokens | noise share, documents | noise share, tokens | " +
          " | ".join(NOISE) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(NOISE))

    def line(label, counts):
        docs, tokens = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
        noise_docs, noise_tokens = sum(counts[k][0] for k in NOISE), sum(counts[k][1] for k in NOISE)
        cells = [f"{counts[k][0]}/{sum(1 for x in kinds if x == k)}" for k in NOISE]
        print(f"| {label} | {docs} | {tokens:,} | {noise_docs / max(docs, 1):.1%} | "
              f"{noise_tokens / max(tokens, 1):.1%} "
              f"| " + " | ".join(cells) + " |")

    line("(the whole train split)", total)
    for row in removed_rows:
        label = {"bottom": "bottom (lowest-valued)", "top": "top (highest-valued)", "random": "random"}[row["variant"]]
        label += "" if row["draw"] is None else f", draw {row['draw']}"
        line(label, {k: [row[f"{k}_docs"], row[f"{k}_tokens"]] for k in KINDS})

    print(f"\n### Document values of the valuation run by planted kind ({args.convention}, summed over its windows)\n")
    print("| kind | documents | valued | mean value | median value | share < 0 |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in kind_values:
        print(f"| {row['kind']} | {row['documents']} | {row['valued']} | {row['mean']:.3g} | {row['median']:.3g} | "
              f"{row['negative']:.0%} |")
    print(f"\nCSV: {os.path.join(args.out, 'curation_runs.csv')}, {os.path.join(args.out, 'curation_removed.csv')}")


if __name__ == "__main__":
    sys.exit(main())
