"""A subset of a tokenized split, written in pile_tools' own format, and a split copied byte for byte.

    write_subset(source_dir, "train", out_dir, pieces, note)   kept pieces of the source's documents
    copy_split(source_dir, "validation", out_dir)              the split's files, unchanged

`pieces` says, per domain, which token ranges of the source to keep: int64 rows (doc_id, start, end), each the
tokens [start, end) of the domain's token file, inside the text of document doc_id (never its end-of-text
token). Each piece is written as one document of the new split: those tokens, then the end-of-text id. A whole
document kept is the piece (doc_id, text start, text end), so it is copied byte for byte with its end-of-text
token. Every written document keeps its source document's origin (input file and line), and ingest.json keeps
the source's inputs, so `PileReader.document_source` still names where the text came from. The split is written
through `SplitWriter`, like a tokenization (the same files, manifests, dtype and tokenizer identity); its
ingest.json records the source and `note` under "subset_of". Domains with no piece are left out.

Neither function makes its output durable as a whole: the caller writes into a fresh directory and renames it.
"""
from __future__ import annotations

import copy
import os
import shutil

import numpy as np

from pile_tools.layout import INGEST_FILE, check_split, domain_paths, read_json
from pile_tools.split_writer import SplitWriter


def split_state(data_dir: str, split: str) -> dict:
    """The ingest.json of a complete split (a ValueError naming it otherwise)."""
    check_split(split)
    path = os.path.join(data_dir, split, INGEST_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{os.path.join(data_dir, split)} is not a tokenized split (no {INGEST_FILE})")
    state = read_json(path)
    if not isinstance(state, dict) or state.get("status") != "complete":
        raise ValueError(f"{path}: the split is not complete (status {state.get('status')!r}); finish its tokenization")
    return state


def split_files(data_dir: str, split: str) -> list[str]:
    """The file names of a complete split, relative to its directory: ingest.json and each domain's four files."""
    state = split_state(data_dir, split)
    names = [INGEST_FILE]
    for info in state["domains"].values():
        names += [os.path.basename(p) for p in domain_paths(os.path.join(data_dir, split), info["slug"]).values()]
    return names


def copy_split(source_dir: str, split: str, out_dir: str) -> list[str]:
    """Copy a complete split's files byte for byte into out_dir/<split> (fsynced); returns their names."""
    names = split_files(source_dir, split)
    target = os.path.join(out_dir, split)
    os.makedirs(target, exist_ok=True)
    for name in names:
        shutil.copyfile(os.path.join(source_dir, split, name), os.path.join(target, name))
        with open(os.path.join(target, name), "rb") as f:
            os.fsync(f.fileno())
    return names


def write_subset(source_dir: str, split: str, out_dir: str, pieces: dict, note: dict | None = None) -> dict:
    """Write out_dir/<split> holding `pieces` of the source split (module docstring); returns its ingest.json state.

    pieces: {domain: int64 [n, 3] (doc_id, start, end)}, written in the given order (documents in source order
    keep the source's order)."""
    source = split_state(source_dir, split)
    unknown = sorted(set(pieces) - set(source["domains"]))
    if unknown:
        raise ValueError(f"domains {unknown} are not in {os.path.join(source_dir, split)}")
    eot_id = int(source["tokenizer"]["eot_id"])
    dtype = np.dtype(source.get("dtype", "uint16"))
    target = os.path.join(out_dir, split)
    if os.path.exists(os.path.join(target, INGEST_FILE)):
        raise ValueError(f"{target} already holds a split; write a subset into a new directory")
    writer = SplitWriter(target, split, source["tokenizer"], source["options"].get("domains"),
                         token_dtype=source.get("dtype", "uint16"))
    try:
        for record in source["inputs"]:  # the same inputs at the same indices: origins stay valid
            _, copied = writer.input_record(record["fingerprint"], record["name"], record["path"])
            copied.update(copy.deepcopy(record))
        writer.state["skipped_count"] = source.get("skipped_count", 0)
        writer.state["skipped"] = copy.deepcopy(source.get("skipped", []))
        writer.state["subset_of"] = {"data_dir": os.path.abspath(source_dir), "split": split, **(note or {})}
        source_split = os.path.join(source_dir, split)
        for domain in source["domains"]:  # the source's order: the same slugs
            rows = np.asarray(pieces.get(domain, np.zeros((0, 3), np.int64)), dtype=np.int64).reshape(-1, 3)
            if not len(rows):
                continue
            _write_domain(writer, domain, source_split, source["domains"][domain], rows, dtype, eot_id)
        writer.complete()
    finally:
        writer.close()
    return writer.state


def _write_domain(writer: SplitWriter, domain: str, source_split: str, info: dict, rows: np.ndarray,
                  dtype: np.dtype, eot_id: int) -> None:
    paths = domain_paths(source_split, info["slug"])
    n_tokens, n_docs = int(info["num_tokens"]), int(info["num_documents"])
    tokens = np.memmap(paths["tokens"], dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
    starts = np.fromfile(paths["doc_starts"], dtype=np.int64, count=n_docs)
    origins = np.fromfile(paths["doc_origin"], dtype=np.int64, count=2 * n_docs).reshape(n_docs, 2)
    ends = np.append(starts[1:], n_tokens) - 1  # the end-of-text token of each document sits here
    doc, start, end = rows[:, 0], rows[:, 1], rows[:, 2]
    bad = (doc < 0) | (doc >= n_docs)
    bad[~bad] |= (start[~bad] < starts[doc[~bad]]) | (end[~bad] > ends[doc[~bad]]) | (start[~bad] > end[~bad])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{domain!r}: piece (doc {doc[i]}, tokens [{start[i]}, {end[i]})) is not a range inside "
                         f"one document's text of {source_split} ({int(bad.sum())} such pieces)")
    piece = np.empty(int((end - start).max()) + 1, dtype=dtype)
    for d, s, e in rows.tolist():
        n = e - s
        piece[:n] = tokens[s:e]
        piece[n] = eot_id
        writer.append_document(domain, piece[:n + 1], int(origins[d, 0]), int(origins[d, 1]))
