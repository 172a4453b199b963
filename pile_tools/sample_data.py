"""The bundled sample: a small Pile-format corpus built offline from real text found on any machine
with the project installed (see docs/pile_tools.md for what each domain holds).

    Github                Python standard-library source files (.py), one file per document
    DM Mathematics        generated arithmetic/algebra question/answer pairs (`pile_tools.dm_math`)
    Python Documentation  Python's reference-manual topics shipped in `pydoc_data.topics`
    Software Licenses     license texts shipped with Python and with the installed packages

Output is deterministic for a given installation. Document k of each domain (in a fixed order) goes
to validation if k % 20 == 7, to test if k % 20 == 13, else to train.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import random
import sysconfig

from pile_tools.dm_math import dm_math_documents
from pile_tools.jsonl_io import ShardSource, write_jsonl_zst
from pile_tools.layout import INGEST_FILE, SPLITS, read_json

GITHUB_CHAR_BUDGET = 900_000
GITHUB_MAX_FILE_CHARS = 60_000
LICENSE_CHAR_BUDGET = 300_000
LICENSE_MAX_FILE_CHARS = 40_000
DM_MATH_DOCUMENTS = 120
SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
LICENSE_PREFIXES = ("license", "licence", "copying", "notice")
SAMPLE_FILES = {"train": os.path.join("train", "00.jsonl.zst"), "validation": "val.jsonl.zst", "test": "test.jsonl.zst"}


def github_documents() -> list[str]:
    """Standard-library modules in path order, taking every file whose path hash selects it until the budget is used."""
    stdlib = sysconfig.get_paths()["stdlib"]
    paths = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_STDLIB_DIRS)
        paths += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    # A hash of the relative path spreads the picks over the whole library instead of its first packages.
    paths.sort(key=lambda p: hashlib.sha256(os.path.relpath(p, stdlib).encode()).hexdigest())
    docs, used = [], 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if not text.strip() or len(text) > GITHUB_MAX_FILE_CHARS:
            continue
        if used + len(text) > GITHUB_CHAR_BUDGET:
            break
        docs.append(text)
        used += len(text)
    return docs


def python_documentation_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def license_documents() -> list[str]:
    """Distinct license files of Python itself and of the installed distributions, in name order."""
    candidates = [os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")]
    for dist in importlib.metadata.distributions():
        for file in dist.files or []:
            if os.path.basename(str(file)).lower().startswith(LICENSE_PREFIXES):
                candidates.append(str(dist.locate_file(file)))
    texts = {}
    for path in sorted(set(candidates)):
        if not os.path.isfile(path) or os.path.getsize(path) > LICENSE_MAX_FILE_CHARS:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            texts.setdefault(hashlib.sha256(text.encode()).hexdigest(), text)
    docs, used = [], 0
    for text in sorted(texts.values()):
        if used + len(text) > LICENSE_CHAR_BUDGET:
            break
        docs.append(text)
        used += len(text)
    return docs


def split_of(k: int) -> str:
    return {7: "validation", 13: "test"}.get(k % 20, "train")


def sample_records() -> dict[str, list[dict]]:
    """{split: [Pile record]} with the domains interleaved in a fixed shuffled order."""
    domains = {
        "Github": github_documents(),
        "DM Mathematics": dm_math_documents(DM_MATH_DOCUMENTS, seed=0),
        "Python Documentation": python_documentation_documents(),
        "Software Licenses": license_documents(),
    }
    records = {split: [] for split in SPLITS}
    for name, docs in domains.items():
        for k, text in enumerate(docs):
            records[split_of(k)].append({"text": text, "meta": {"pile_set_name": name}})
    for split, recs in records.items():
        random.Random(f"pile_tools sample {split}").shuffle(recs)
    return records


def write_sample_dataset(output_dir: str) -> dict[str, str]:
    """Write the sample as the Pile lays out its files; returns {split: path}."""
    paths = {split: os.path.join(output_dir, rel) for split, rel in SAMPLE_FILES.items()}
    os.makedirs(os.path.join(output_dir, "train"), exist_ok=True)
    for split, recs in sample_records().items():
        write_jsonl_zst(paths[split], recs)
    return paths


def _split_complete(split_dir: str) -> bool:
    state_path = os.path.join(split_dir, INGEST_FILE)
    if not os.path.exists(state_path):
        return False
    state = read_json(state_path)
    return state["status"] == "complete" and bool(state["inputs"]) and all(r["finished"] for r in state["inputs"])


def ensure_sample_dataset(cache_dir: str) -> str:
    """Build the sample under CACHE_DIR/raw and tokenize it into CACHE_DIR/tokenized once.

    Safe when several processes (e.g. DDP ranks) call it at once: a file lock makes one build it.
    """
    from pile_tools.tokenize_corpus import tokenize_sources

    raw_dir = os.path.join(cache_dir, "raw")
    tokenized_dir = os.path.join(cache_dir, "tokenized")
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(_split_complete(os.path.join(tokenized_dir, split)) for split in SPLITS):
            return tokenized_dir
        paths = {split: os.path.join(raw_dir, rel) for split, rel in SAMPLE_FILES.items()}
        if not all(os.path.exists(p) for p in paths.values()):
            paths = write_sample_dataset(raw_dir)
        for split, path in paths.items():
            tokenize_sources([ShardSource(path)], tokenized_dir, split=split, workers=1, progress=False)
    return tokenized_dir
