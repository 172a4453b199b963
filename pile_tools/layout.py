"""On-disk layout of a tokenized corpus.

    DIR/<split>/ingest.json           state of the split: status, tokenizer, inputs seen, domains, skipped records
    DIR/<split>/<slug>.bin            uint16 (or uint32) tokens of one domain, every document followed by EOT
    DIR/<split>/<slug>.docs.bin       int64 [num_documents]: token offset where each document starts
    DIR/<split>/<slug>.origin.bin     int64 [num_documents, 2]: (index into ingest.json "inputs", line number)
    DIR/<split>/<slug>.json           domain manifest: counts, file names, tokenizer identity

`ingest.json` is replaced atomically; its "status" is "complete" only when every manifest and file it
describes is final. The reader refuses a split whose status is anything else.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from ghost_common.durable import write_atomically

SPLITS = ("train", "validation", "test")
TOKEN_DTYPE = "uint16"
INGEST_FILE = "ingest.json"
SPEC_SUFFIXES = (".json", ".yaml", ".yml")  # a data spec naming other formats' files (pile_tools.data_spec)


def domain_slug(domain: str, taken=()) -> str:
    """File-name form of a Pile domain name: "Gutenberg (PG-19)" -> "gutenberg_pg_19". A name with no
    letters or digits, or one whose form is `taken` by another domain ("Alpha" and "alpha"), gets a
    suffix from a hash of the exact name, so every domain has its own files."""
    slug = re.sub(r"[^a-z0-9]+", "_", domain.lower()).strip("_")[:80] or "domain"
    if slug in taken or slug == "domain":
        slug = f"{slug}_{hashlib.sha1(domain.encode('utf-8')).hexdigest()[:8]}"
    return slug


def domain_paths(split_dir: str, slug: str) -> dict[str, str]:
    return {
        "tokens": os.path.join(split_dir, f"{slug}.bin"),
        "doc_starts": os.path.join(split_dir, f"{slug}.docs.bin"),
        "doc_origin": os.path.join(split_dir, f"{slug}.origin.bin"),
        "manifest": os.path.join(split_dir, f"{slug}.json"),
    }


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to `path` durably: a reader sees either the old or the new file, never a partial one."""
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8")))


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    return split
