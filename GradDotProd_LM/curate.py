"""From values to better data: a run's training corpus without its lowest-valued (or highest-valued, or random)
documents or windows, written as a new tokenized corpus the app trains on with --data_dir.

    python -m GradDotProd_LM.curate RUN --drop_bottom 10% --out DIR [--by document|window]
        [--measure units|tokens] [--convention first_order|raw|step_normalised] [--overwrite]
    graddotprod-curate RUN --drop_top 500 --out DIR            # the 500 highest-valued documents
    graddotprod-curate RUN --drop_random 10% --seed 1 --out DIR  # as many, drawn at random (a control)

RUN is a run directory, or the name of a run under the results directory. Its values are the report's:
`ghost_results.analysis.compute_values` with the run's estimator and --convention, summed per document
(domain, doc_id: the document a window starts in) or per window (domain, token_offset) by `analysis.aggregate`.
The corpus is the run's --data_dir (config.json's data_dir), which must be the data the run trained on:
config.json's data_identity is compared with the directory now. It must be in pile_tools' own format: a run on
nanoGPT, Megatron or Hugging Face token files (pile_tools.data_spec) is refused.

What is removed
- The amount is a count (`500`) or a percentage (`10%`, `2.5%`) of the units the run valued (documents or
  windows seen at least once); --measure tokens makes it a number or a share of their tokens instead (a
  document's tokens with its end-of-text token, a window's seq_len tokens). The fewest units that reach the
  amount are removed, in this order: --drop_bottom lowest value first, --drop_top highest first, ties in key
  order (domain, then doc_id or token_offset); --drop_random a seeded random permutation (--seed), so "the same
  number of units, at random" is the control of the other two.
- --by document: a removed document disappears; every other document of the train split is written byte for
  byte (its tokens and end-of-text token), in the source's order. Documents the run never saw have no value
  and are kept (counted in the manifest and the summary).
- --by window: a window is the seq_len tokens [token_offset, token_offset + seq_len) of its domain's token file
  that the model trained on; windows can overlap and cross document boundaries. Removing windows cuts the
  union of their spans out of the documents they cover: the text tokens of a document outside that union are
  kept, each maximal run of them becomes one document of the new corpus (those tokens, then the end-of-text
  token), in order; a document the union covers entirely disappears. End-of-text tokens are boundaries, not
  text: a window over one is not a reason to drop or merge anything. Every kept text token is the source's,
  in the source's order; documents no removed window touches are byte-identical.

DIR receives train/ (the kept documents, written by pile_tools.split_writer like a tokenization, each with its
source document's origin), every other split of the corpus (validation, test: the app evaluates and takes its
validation rows from them) copied byte for byte, curation.json (what was removed and why: run, run_id,
estimator, convention, unit, amount, each removed unit's key, value and token count), removed.md (a table of
the removed units with their text, decoded with the corpus' tokenizer) and removed.jsonl (the same, one JSON
object a line, with up to --text_chars characters of text). It is written under a temporary name beside DIR and
renamed: DIR appears whole or not at all. An existing non-empty DIR is refused unless --overwrite, which
replaces only an earlier curation (a directory holding curation.json).

Bad input exits 2 with the reason: no such run, a run without dot products, a data directory missing or changed
since the run, an amount out of range, an existing DIR.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ghost_common.durable import default_mode, fsync_directory
from ghost_common.flags import FlagParser
from ghost_results import analysis
from ghost_results.report import code_cell, dominant_steps, shorten
from ghost_results.results_io import ResultsFormatError, read_run
from pile_tools.identity import data_identity, describe_data_change
from GradDotProd_LM import settings
from pile_tools.data_spec import data_format
from pile_tools.layout import SPLITS
from pile_tools.reader import PileReader
from pile_tools.subset import copy_split, split_state, write_subset

MANIFEST = "curation.json"
REMOVED_MD = "removed.md"
REMOVED_JSONL = "removed.jsonl"
SCHEMA = "graddotprod.curation"
SNIPPET_CHARS = 300
DROPS = ("bottom", "top", "random")
BY = ("document", "window")
MEASURES = ("units", "tokens")


class CurationError(ValueError):
    """Bad input: the command line exits 2 with this message; nothing was written."""


@dataclass(frozen=True)
class Amount:
    """How much to remove: `count` units or tokens, or `percent` of them (exact decimal)."""

    text: str
    count: int | None = None
    percent: Fraction | None = None

    def target(self, total: int) -> int:
        """The number (of units or tokens) to reach out of `total`: the count, or ceil(percent * total / 100)."""
        if self.count is not None:
            return self.count
        return math.ceil(self.percent * total / 100)


def parse_amount(text: str) -> Amount:
    """`500` (a count >= 0) or `10%` / `2.5%` (a percentage in [0, 100]); argparse.ArgumentTypeError otherwise."""
    raw = text.strip()
    if raw.endswith("%"):
        try:
            percent = Fraction(raw[:-1].strip())
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a percentage (e.g. 10%)") from None
        if not 0 <= percent <= 100:
            raise argparse.ArgumentTypeError(f"{text!r}: a percentage must lie in [0%, 100%]")
        return Amount(raw, percent=percent)
    try:
        count = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count (e.g. 500) nor a percentage (e.g. 10%)") \
            from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a count must be >= 0")
    return Amount(raw, count=count)


# ---------------------------------------------------------------------------------------------------------------
# The run, its data, its values


def resolve_run_dir(run: str) -> str:
    """RUN as a directory, else <results dir>/RUN (CurationError if neither exists)."""
    try:
        found = settings.resolve_run_dir(run)
        results_dir = None if found else settings.load_settings().results_dir
    except (OSError, ValueError) as err:  # the settings file named or found cannot be read
        raise CurationError(str(err)) from None
    if found is None:
        raise CurationError(f"RUN {run!r}: no such run (neither a directory nor a run under {results_dir})")
    return found


def load_run_values(run_dir: str, convention: str, strict: bool, all_steps: bool = False):
    """(run, per-row values, convention used) of a run that holds dot products; the run's columns without the
    steps the report leaves out (an AdamW run's first two, analysis.steps_left_out) unless `all_steps`, which
    run.config["steps_left_out"] lists."""
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise CurationError(f"{run_dir} has no config.json: not a run directory of the app")
    if not os.path.isdir(os.path.join(run_dir, "grad_dotprods")):
        raise CurationError(f"{run_dir} has no results (no grad_dotprods/): was it trained with --method "
                            "GradDotProd and a validation batch?")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skipped files are listed in the manifest
            run = read_run(run_dir, strict=strict)
    except (ResultsFormatError, OSError, ValueError) as err:
        raise CurationError(f"{run_dir}: cannot read its results ({err})") from None
    if run.num_rows == 0:
        raise CurationError(f"{run_dir} has no results: no dot-product file of the run holds a step (was it "
                            "stopped before its first --dot_prod_save_interval?)")
    if run.value == "cosine" and convention == "first_order":
        convention = "raw"  # as the report: a cosine run's values are its cosines
    left_out = [] if all_steps else analysis.steps_left_out(run.columns, run.config)
    if left_out:
        run = dataclasses.replace(run, columns=analysis.without_steps(run.columns, left_out))
    run.config = {**run.config, "steps_left_out": [int(s) for s in left_out]}
    values = analysis.compute_values(run.columns, convention, run.value)
    return run, np.asarray(values, dtype=np.float64), convention


def check_data(config: dict, run_dir: str) -> str:
    """The run's data directory, checked to be what the run trained on."""
    data_dir = config.get("data_dir")
    if not data_dir:
        raise CurationError(f"{run_dir}/config.json names no data_dir: the run's corpus is unknown (runs of the "
                            "integrations are not curated from a pile_tools corpus)")
    if not os.path.exists(data_dir):
        raise CurationError(f"the run's data directory {data_dir} (config.json's data_dir) is missing")
    try:
        kind = data_format(data_dir)
    except ValueError as err:
        raise CurationError(f"the run's data: {err}") from None
    if kind != "native":
        what = "a data spec" if kind == "spec" else f"a {kind} dataset"
        raise CurationError(f"the run trained on {data_dir} ({what}), not a pile_tools corpus: curation writes "
                            "pile_tools' format from a corpus in that format only (its documents' origins and "
                            "tokenizer files); tokenize the texts with `python -m pile_tools tokenize` to curate them")
    saved = config.get("data_identity")
    if not isinstance(saved, dict):
        raise CurationError(f"{run_dir}/config.json records no data_identity: cannot tell whether {data_dir} is "
                            "still the data the run trained on")
    change = describe_data_change(saved, data_identity(data_dir))
    if change:
        raise CurationError(f"the data under {data_dir} changed since the run ({change}): its values name "
                            "documents and offsets of the old data; restore it or curate a run of this data")
    if config.get("data_changes"):
        raise CurationError(f"{run_dir} continued on changed data (config.json's data_changes: "
                            f"{config['data_changes']}); its values mix two corpora, so none is curated from them")
    return data_dir


@dataclass
class Units:
    """The run's valued units (documents or windows), one entry per unit, in key order."""

    by: str
    table: dict  # analysis.aggregate's columns
    tokens: np.ndarray  # int64: tokens of each unit (a document with its EOT; a window's span)
    spans: np.ndarray  # int64 [n, 2]: [start, end) in the domain's token file (a document's text; a window)

    def __len__(self):
        return len(self.tokens)

    def key(self, i: int) -> dict:
        name = "doc_id" if self.by == "document" else "token_offset"
        return {"domain": str(self.table["domain"][i]), name: int(self.table[name][i])}


def valued_units(run, values: np.ndarray, by: str, reader: PileReader) -> Units:
    """The documents or windows of the run with their summed values, checked against the corpus."""
    table = analysis.aggregate(run.columns, values, by="document" if by == "document" else "sample")
    domains = np.asarray(table["domain"]).astype(str)
    missing = sorted(set(domains) - set(reader.domains))
    if missing:
        raise CurationError(f"the run trained on domains {missing} that {reader.split_dir} does not hold: the "
                            "data is not the run's")
    spans = np.zeros((len(domains), 2), dtype=np.int64)
    tokens = np.zeros(len(domains), dtype=np.int64)
    for domain in np.unique(domains):
        rows = np.flatnonzero(domains == domain)
        starts, n_tokens = reader.document_starts(domain), reader.num_tokens(domain)
        if by == "document":
            doc = np.asarray(table["doc_id"])[rows].astype(np.int64)
            if doc.min() < 0 or doc.max() >= len(starts):
                raise CurationError(f"the run names document {int(doc.max())} of {domain!r}, which has "
                                    f"{len(starts)}: the data is not the run's")
            ends = np.append(starts[1:], n_tokens)
            spans[rows, 0], spans[rows, 1] = starts[doc], ends[doc] - 1  # text; the EOT sits at the end
            tokens[rows] = ends[doc] - starts[doc]
        else:
            offset = np.asarray(table["token_offset"])[rows].astype(np.int64)
            length = np.asarray(table["token_count"])[rows].astype(np.int64) + 1  # targets + 1: the seq_len inputs
            if offset.min() < 0 or (offset + length).max() > n_tokens:
                raise CurationError(f"the run names windows of {domain!r} beyond its {n_tokens} tokens: the data "
                                    "is not the run's")
            spans[rows, 0], spans[rows, 1] = offset, offset + length
            tokens[rows] = length
    return Units(by, table, tokens, spans)


def removal_order(values: np.ndarray, drop: str, seed: int) -> np.ndarray:
    """Unit positions in the order they are removed: lowest value first (bottom), highest first (top), ties in
    key order; a seeded random permutation (random)."""
    if drop == "bottom":
        return analysis.rank({"value": values}, lowest=True)
    if drop == "top":
        return analysis.rank({"value": values})
    return np.random.default_rng(seed).permutation(len(values))


def how_many(order: np.ndarray, unit_tokens: np.ndarray, amount: Amount, measure: str, by: str) -> int:
    """The fewest units, taken in `order`, that reach the amount (in units or in their tokens)."""
    unit_name = "documents" if by == "document" else "windows"
    if measure == "units":
        total, target = len(order), amount.target(len(order))
        if target > total:
            raise CurationError(f"{amount.text}: the run valued {total} {unit_name}, fewer than that")
        return target
    cumulative = np.cumsum(unit_tokens[order])
    total = int(cumulative[-1]) if len(cumulative) else 0
    target = amount.target(total)
    if target > total:
        raise CurationError(f"{amount.text} tokens: the {len(order)} {unit_name} the run valued hold {total} tokens, "
                            "fewer than that")
    return 0 if target == 0 else int(np.searchsorted(cumulative, target, side="left")) + 1


# ---------------------------------------------------------------------------------------------------------------
# What is kept


def document_pieces(reader: PileReader, removed: dict) -> tuple[dict, dict]:
    """Every document of every domain but the removed ones, whole: ({domain: [n, 3] (doc, text start, text
    end)}, per-domain counts). removed: {domain: set of doc_ids}."""
    pieces, counts = {}, {}
    for domain in reader.domains:
        starts, n_tokens = np.asarray(reader.document_starts(domain)), reader.num_tokens(domain)
        ends = np.append(starts[1:], n_tokens) - 1
        keep = np.ones(len(starts), dtype=bool)
        keep[np.fromiter(removed.get(domain, ()), dtype=np.int64)] = False
        doc = np.flatnonzero(keep)
        pieces[domain] = np.stack([doc, starts[doc], ends[doc]], axis=1)
        counts[domain] = {"documents_removed": int((~keep).sum()),
                          "tokens_removed": int(((ends + 1 - starts)[~keep]).sum())}
    return pieces, counts


def merge_spans(spans: np.ndarray) -> np.ndarray:
    """The union of [start, end) spans as sorted disjoint spans [m, 2]."""
    if not len(spans):
        return np.zeros((0, 2), dtype=np.int64)
    spans = spans[np.argsort(spans[:, 0], kind="stable")]
    merged = [list(spans[0])]
    for start, end in spans[1:].tolist():
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return np.asarray(merged, dtype=np.int64)


def window_pieces(reader: PileReader, removed: dict) -> tuple[dict, dict]:
    """Every document with the union of the removed windows' spans cut out of its text: ({domain: [n, 3] (doc,
    start, end)} of the maximal kept runs, in order; per-domain counts). removed: {domain: [m, 2] spans}."""
    pieces, counts = {}, {}
    for domain in reader.domains:
        starts, n_tokens = np.asarray(reader.document_starts(domain)), reader.num_tokens(domain)
        ends = np.append(starts[1:], n_tokens) - 1  # text [starts, ends); the EOT at ends
        cuts = {}  # doc -> [[start, end)], sorted, disjoint, inside the text
        for a, b in merge_spans(np.asarray(removed.get(domain, np.zeros((0, 2))), dtype=np.int64)).tolist():
            first, last = np.searchsorted(starts, [a, b - 1], side="right") - 1
            for doc in range(int(first), int(last) + 1):
                s, e = max(a, int(starts[doc])), min(b, int(ends[doc]))
                if s < e:
                    cuts.setdefault(doc, []).append((s, e))
        rows, cut_tokens, emptied = [], 0, 0
        for doc in range(len(starts)):
            if doc not in cuts:
                rows.append((doc, int(starts[doc]), int(ends[doc])))
                continue
            position, kept_any = int(starts[doc]), False
            for s, e in cuts[doc]:
                if s > position:
                    rows.append((doc, position, s))
                    kept_any = True
                cut_tokens += e - s
                position = e
            if position < ends[doc]:
                rows.append((doc, position, int(ends[doc])))
                kept_any = True
            emptied += not kept_any
        pieces[domain] = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        counts[domain] = {"documents_cut": len(cuts), "documents_removed": emptied,
                          "text_tokens_removed": cut_tokens, "documents_written": len(rows)}
    return pieces, counts


# ---------------------------------------------------------------------------------------------------------------
# Text of what was removed


class Decoder:
    """The corpus' tokenizer, for the text of removed units; `reason` says why there is none."""

    def __init__(self, identity: dict, tokenizer_file: str | None):
        self.decode, self.reason = None, ""
        from pile_tools.tokenizer import load_gpt2_tokenizer, load_tokenizer

        name = identity.get("name")
        if tokenizer_file is None and name == "gpt2-bpe":
            try:
                tokenizer = load_gpt2_tokenizer()
            except (OSError, ValueError) as err:
                self.reason = f"GPT-2's vocabulary cannot be loaded ({err})"
                return
        elif tokenizer_file is None:
            self.reason = (f"the corpus was tokenized with {name!r} ({identity.get('sha256', '')}); pass "
                           "--tokenizer FILE.json to show the text")
            return
        else:
            try:
                tokenizer = load_tokenizer(tokenizer_file, eot_token=identity.get("eot_token"))
            except (OSError, ValueError) as err:
                raise CurationError(f"--tokenizer {tokenizer_file}: {err}") from None
        if tokenizer.identity != identity:
            if tokenizer_file is not None:
                raise CurationError(f"--tokenizer {tokenizer_file} is not the corpus' tokenizer "
                                    f"({tokenizer.identity} against the corpus' {identity})")
            self.reason = "the installed GPT-2 vocabulary differs from the corpus' (its files' sha256)"
            return
        self.decode = tokenizer.decode


# ---------------------------------------------------------------------------------------------------------------
# Writing


def out_problem(out: str, run_dir: str, data_dir: str, overwrite: bool) -> str | None:
    """Why DIR must not receive the curated corpus (None if it may)."""
    real = os.path.realpath(out)

    def inside(path, directory):
        return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)

    for directory, what in ((os.path.realpath(data_dir), "the run's data directory"),
                            (os.path.realpath(run_dir), "the run directory")):
        if inside(real, directory) or inside(directory, real):
            return f"--out {out} is, holds or lies inside {what} {directory}: pick a directory outside it"
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            return f"--out {out} exists and is not a directory"
        entries = os.listdir(out)
        if entries and not overwrite:
            return f"--out {out} exists and is not empty; pass --overwrite to replace an earlier curation"
        if entries and not os.path.isfile(os.path.join(out, MANIFEST)):
            return (f"--out {out} is not an earlier curation (no {MANIFEST}); --overwrite replaces only that or an "
                    "empty directory: pick another --out")
    return None


def _fsync_tree(directory: str) -> None:
    for root, dirs, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        os.chmod(root, default_mode(directory=True))  # mkdtemp makes the top private
        fsync_directory(root)


def _replace_directory(tmp: str, out: str) -> None:
    """Rename tmp onto out. An existing out (checked by out_problem) is moved aside first, put back if the rename
    fails, and deleted once the new one is in place."""
    parent = os.path.dirname(out)
    if not os.path.lexists(out):
        os.replace(tmp, out)
        fsync_directory(parent)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
    previous = os.path.join(old, "previous")
    try:
        os.replace(out, previous)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(previous, out)  # the earlier curation stays
            raise
        fsync_directory(parent)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)
        f.write("\n")


def curate(run: str, out: str, drop: str = "bottom", amount: Amount | str = "10%", by: str = "document",
           measure: str = "units", seed: int = 0, convention: str = "first_order", overwrite: bool = False,
           tokenizer_file: str | None = None, text_chars: int = 2000, strict: bool = False,
           argv: list | None = None, all_steps: bool = False) -> dict:
    """Write the curated corpus to `out` (module docstring); returns the manifest. CurationError on bad input,
    before anything is written."""
    if drop not in DROPS or by not in BY or measure not in MEASURES or convention not in analysis.CONVENTIONS:
        raise CurationError(f"drop={drop!r}, by={by!r}, measure={measure!r}, convention={convention!r}: one of "
                            f"{DROPS}, {BY}, {MEASURES}, {analysis.CONVENTIONS}")
    try:
        amount = parse_amount(amount) if isinstance(amount, str) else amount
    except argparse.ArgumentTypeError as err:
        raise CurationError(str(err)) from None
    run_dir = resolve_run_dir(run)
    run_obj, values, convention = load_run_values(run_dir, convention, strict, all_steps)
    config = run_obj.config
    data_dir = check_data(config, run_dir)
    out = os.path.abspath(out)
    problem = out_problem(out, run_dir, data_dir, overwrite)
    if problem:
        raise CurationError(problem)
    try:
        reader = PileReader(data_dir, split="train")
        identity = split_state(data_dir, "train")["tokenizer"]
    except ValueError as err:
        raise CurationError(f"the run's data {data_dir}: {err}") from None
    units = valued_units(run_obj, values, by, reader)
    order = removal_order(np.asarray(units.table["value"]), drop, seed)
    chosen = order[:how_many(order, units.tokens, amount, measure, by)]
    decoder = Decoder(identity, tokenizer_file)

    if by == "document":
        removed = {}
        for i in chosen:
            removed.setdefault(str(units.table["domain"][i]), set()).add(int(units.table["doc_id"][i]))
        pieces, counts = document_pieces(reader, removed)
    else:
        removed = {}
        for i in chosen:
            removed.setdefault(str(units.table["domain"][i]), []).append(units.spans[i])
        pieces, counts = window_pieces(reader, {d: np.asarray(s) for d, s in removed.items()})
    manifest = _manifest(run_obj, run_dir, data_dir, config, convention, drop, amount, by, measure, seed, units,
                         chosen, reader, counts, argv)
    dominant = dominant_steps(run_obj.columns["step"], values)
    if dominant:  # as the report's caution: a few steps (a loss spike, say) decide the sums and the ranking
        manifest["run_warnings"]["dominant_steps"] = [[step, share] for step, share in dominant]
    splits = [s for s in SPLITS if s != "train" and os.path.isdir(os.path.join(data_dir, s))]
    manifest["splits_copied"] = splits
    manifest["text"] = "decoded" if decoder.decode else f"not decoded: {decoder.reason}"

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        write_subset(data_dir, "train", tmp, pieces, note={
            "curation": MANIFEST, "run": run_dir, "run_id": run_obj.run_id, "drop": drop, "amount": amount.text,
            "by": by})
        for split in splits:
            copy_split(data_dir, split, tmp)
        _write_removed(tmp, manifest, units, chosen, reader, decoder, text_chars)
        _write_json(os.path.join(tmp, MANIFEST), manifest)
        _fsync_tree(tmp)
        _replace_directory(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _manifest(run, run_dir, data_dir, config, convention, drop, amount, by, measure, seed, units, chosen, reader,
              counts, argv) -> dict:
    table, n = units.table, len(units)
    removed = []
    for rank, i in enumerate(chosen.tolist(), start=1):
        entry = {"rank": rank, **units.key(i), "value": float(table["value"][i]), "token_count": int(units.tokens[i]),
                 "occurrences": int(table["occurrences"][i])}
        if by == "window":
            entry["doc_id"] = int(table["doc_id"][i])  # the document the window starts in
        removed.append(entry)
    valued_docs = {}
    for domain, doc in zip(np.asarray(table["domain"]).astype(str), np.asarray(table["doc_id"], dtype=np.int64)):
        valued_docs.setdefault(domain, set()).add(int(doc))
    domains = {}
    for domain in reader.domains:
        starts, n_tokens = np.asarray(reader.document_starts(domain)), reader.num_tokens(domain)
        entry = {"documents": len(starts), "tokens": int(n_tokens), **counts[domain]}
        if by == "document":
            seen = np.zeros(len(starts), dtype=bool)
            seen[sorted(valued_docs.get(domain, ()))] = True
            sizes = np.diff(np.append(starts, n_tokens))
            entry.update(documents_valued=int(seen.sum()), documents_unvalued_kept=int((~seen).sum()),
                         tokens_unvalued_kept=int(sizes[~seen].sum()))
        else:
            domain_rows = np.asarray(table["domain"]).astype(str) == domain
            covered = merge_spans(units.spans[domain_rows])
            entry.update(windows_valued=int(domain_rows.sum()),
                         tokens_outside_every_window=int(n_tokens - (covered[:, 1] - covered[:, 0]).sum()))
        domains[domain] = entry
    removed_tokens = int(units.tokens[chosen].sum())
    valued_tokens = int(units.tokens.sum())
    what = {"bottom": "the lowest-valued", "top": "the highest-valued", "random": "randomly drawn"}[drop]
    unit = "documents" if by == "document" else "windows"
    return {
        "schema": SCHEMA, "schema_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": argv,
        "run": run_dir, "run_name": config.get("run_name"), "run_id": run.run_id, "estimator": run.value,
        "convention": convention, "by": by, "drop": drop, "amount": amount.text, "measure": measure,
        "seed": seed if drop == "random" else None,
        "reason": f"{what} {amount.text} of the {n} {unit} the run valued"
                  + (" (by their tokens)" if measure == "tokens" else ""),
        "source_data_dir": data_dir, "source_data_identity": config.get("data_identity"),
        "valued_units": n, "removed_units": len(chosen), "removed_fraction_units": len(chosen) / n if n else 0.0,
        "valued_tokens": valued_tokens, "removed_unit_tokens": removed_tokens,
        "removed_fraction_tokens": removed_tokens / valued_tokens if valued_tokens else 0.0,
        "window_removal": None if by == "document" else (
            "the union of the removed windows' [token_offset, token_offset + seq_len) spans is cut out of the "
            "documents' text; each maximal kept run of a document is written as one document with an "
            "end-of-text token"),
        "unvalued": ("documents the run never saw have no value and are kept unchanged" if by == "document" else
                     "tokens outside every recorded window have no value and are kept"),
        "run_warnings": {"skipped_files": [[path, reason] for path, reason in run.skipped],
                         "missing_steps": list(run.missing_steps),
                         "steps_left_out": run.config["steps_left_out"]},
        "domains": domains,
        "removed": removed,
    }


def _write_removed(directory: str, manifest: dict, units: Units, chosen: np.ndarray, reader: PileReader,
                   decoder: Decoder, text_chars: int) -> None:
    """removed.md (a table with text snippets) and removed.jsonl (each unit with up to text_chars characters)."""
    by = units.by
    lines = [f"# Removed from the training data of `{manifest['run_name']}`", "",
             f"- Run: `{manifest['run']}` (run_id `{manifest['run_id']}`), estimator `{manifest['estimator']}`, "
             f"convention `{manifest['convention']}`.",
             f"- Removed: {manifest['reason']}: {manifest['removed_units']} {by}s, "
             f"{manifest['removed_unit_tokens']:,} of their {manifest['valued_tokens']:,} tokens.",
             ]
    if by == "document":
        unseen = sum(d["documents_unvalued_kept"] for d in manifest["domains"].values())
        unseen_tokens = sum(d["tokens_unvalued_kept"] for d in manifest["domains"].values())
        lines.append(f"- Kept unchanged: {unseen:,} documents ({unseen_tokens:,} tokens) the run never saw (no value).")
    else:
        cut = sum(d["text_tokens_removed"] for d in manifest["domains"].values())
        outside = sum(d["tokens_outside_every_window"] for d in manifest["domains"].values())
        lines += [f"- Windows are cut out of their documents: {cut:,} text tokens removed (overlapping windows "
                  "counted once); the rest of each document is kept in pieces.",
                  f"- Kept: {outside:,} tokens outside every window the run recorded (no value)."]
    dominant = manifest["run_warnings"].get("dominant_steps")
    if dominant:
        lines.append(f"- Caution: step(s) {', '.join(str(step) for step, _ in dominant)} hold "
                     f"{100 * sum(share for _, share in dominant):.0f}% of the summed |value|, so they decide much of "
                     "this ranking (`--convention step_normalised` weighs every step alike).")
    lines.append(f"- Copied unchanged: {', '.join(manifest['splits_copied']) or 'no other split'}.")
    if not decoder.decode:
        lines.append(f"- Text: {manifest['text']}.")
    key_header = "doc" if by == "document" else "token offset | doc"
    lines += ["", f"| # | value | domain | {key_header} | tokens | occurrences | text |",
              "|---:|---:|---|---:|" + ("---:|" if by == "window" else "") + "---:|---:|---|"]
    with open(os.path.join(directory, REMOVED_JSONL), "w", encoding="utf-8") as jsonl:
        for entry, i in zip(manifest["removed"], chosen.tolist()):
            start, end = (int(x) for x in units.spans[i])
            text = ""
            if decoder.decode:
                text = decoder.decode(reader.read_tokens(entry["domain"], start, end - start))
            key = str(entry["doc_id"]) if by == "document" else f"{entry['token_offset']} | {entry['doc_id']}"
            lines.append(f"| {entry['rank']} | {entry['value']:.4g} | {entry['domain']} | {key} | "
                         f"{entry['token_count']:,} | {entry['occurrences']} | "
                         f"{code_cell(shorten(text, SNIPPET_CHARS)) if text else ''} |")
            shown = text if text_chars == 0 else text[:text_chars]
            jsonl.write(json.dumps({**entry, "text": shown, "text_truncated": len(shown) < len(text)},
                                   ensure_ascii=False) + "\n")
    with open(os.path.join(directory, REMOVED_MD), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> FlagParser:
    parser = FlagParser(prog="python -m GradDotProd_LM.curate",
                        description="Write a run's training corpus without its lowest-valued (or highest-valued, "
                                    "or random) documents or windows, as a new tokenized corpus for --data_dir.")
    parser.add_argument("run", metavar="RUN", help="a run directory, or a run name under the results directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="the corpus directory to write")
    drops = parser.add_mutually_exclusive_group(required=True)
    drops.add_argument("--drop_bottom", type=parse_amount, metavar="N|P%",
                       help="remove the N (or P%%) lowest-valued units")
    drops.add_argument("--drop_top", type=parse_amount, metavar="N|P%", help="remove the highest-valued units")
    drops.add_argument("--drop_random", type=parse_amount, metavar="N|P%",
                       help="remove units drawn at random (--seed): the control of the other two")
    parser.add_argument("--by", choices=BY, default="document",
                        help="unit: document (domain, doc_id) or window (domain, token_offset) [document]")
    parser.add_argument("--measure", choices=MEASURES, default="units",
                        help="what N or P%% counts: units, or their tokens [units]")
    parser.add_argument("--seed", type=int, default=0, help="the draw of --drop_random [0]")
    parser.add_argument("--convention", choices=analysis.CONVENTIONS, default="first_order",
                        help="value convention, as the report's [first_order]")
    parser.add_argument("--tokenizer", metavar="FILE.json", default=None,
                        help="the corpus' tokenizer.json, to show the removed text of a corpus not tokenized with "
                             "GPT-2's BPE")
    parser.add_argument("--text_chars", type=int, default=2000,
                        help="characters of text per unit in removed.jsonl; 0: all [2000]")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it holds an earlier curation")
    parser.add_argument("--strict", action="store_true",
                        help="fail on an unreadable results file instead of curating without it")
    parser.add_argument("--all_steps", action="store_true",
                        help="value every step, an AdamW run's first two too (left out by default, as the report "
                             "leaves them out: docs/FIDELITY.md finds no per-step estimator faithful there)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.text_chars < 0:
        parser.error(f"--text_chars must be >= 0, got {args.text_chars}")
    drop, amount = next((name, getattr(args, f"drop_{name}")) for name in DROPS
                        if getattr(args, f"drop_{name}") is not None)
    try:
        manifest = curate(args.run, args.out, drop=drop, amount=amount, by=args.by, measure=args.measure,
                          seed=args.seed, convention=args.convention, overwrite=args.overwrite,
                          tokenizer_file=args.tokenizer, text_chars=args.text_chars, strict=args.strict, argv=argv,
                          all_steps=args.all_steps)
    except CurationError as err:
        parser.error(str(err))
    except OSError as err:  # a full disk, permissions: nothing is left under DIR's name
        print(f"graddotprod-curate: error: {err}", file=sys.stderr)
        return 1
    print(summary(manifest, args.out))
    return 0


def summary(manifest: dict, out: str) -> str:
    by = manifest["by"]
    lines = [f"removed {manifest['removed_units']} {by}s ({manifest['removed_unit_tokens']:,} tokens): "
             f"{manifest['reason']}"]
    if by == "document":
        unseen = sum(d["documents_unvalued_kept"] for d in manifest["domains"].values())
        lines.append(f"kept {unseen} documents the run never saw (no value)")
    else:
        cut = sum(d["text_tokens_removed"] for d in manifest["domains"].values())
        lines.append(f"cut {cut:,} text tokens out of "
                     f"{sum(d['documents_cut'] for d in manifest['domains'].values())} documents")
    dominant = manifest["run_warnings"].get("dominant_steps")
    if dominant:
        lines.append(f"caution: step(s) {', '.join(str(step) for step, _ in dominant)} hold "
                     f"{100 * sum(share for _, share in dominant):.0f}% of the summed |value| of the run, so they "
                     "decide much of the ranking (a loss spike? --convention step_normalised weighs every step alike)")
    for path, reason in manifest["run_warnings"]["skipped_files"]:
        lines.append(f"note: the run's file {path} was skipped ({reason})")
    if manifest["run_warnings"]["missing_steps"]:
        lines.append(f"note: {len(manifest['run_warnings']['missing_steps'])} steps of the run have no results")
    left_out = manifest["run_warnings"]["steps_left_out"]
    if left_out:
        lines.append(f"note: steps {', '.join(map(str, left_out))} (AdamW's first updates) are left out of the "
                     "values, as the report leaves them out; --all_steps keeps them")
    lines.append(f"copied {', '.join(manifest['splits_copied']) or 'no other split'} unchanged; wrote {out} "
                 f"({MANIFEST}, {REMOVED_MD}, {REMOVED_JSONL}); train on it with --data_dir {out}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
