"""Files of one run directory, Results/<run_name>/ (layout in docs/training.md).

    config.json          resolved flags + environment: everything needed to rerun
    training_log.json    {"steps": [per-step records], "evals": [evaluation records]}, at checkpoints
    training_log.jsonl   the same records, one line each, appended every step (GradDotProd_LM.experiment_log)
    valset.pkl           validation tokens and their provenance (plain python/numpy)
    grad_dotprods/iter_XXXXXX.pkl, .parquet   steps (previous file, XXXXXX], schema in ghost_engine.results_io
    checkpoints/latest.pt
    run.lock             held by the process training the run (RunLock)
    superseded/<time>/   files and log lines of steps after the checkpoint a resume started from, moved aside

Every file but the appended training_log.jsonl is written durably (ghost_engine.durable: temporary file,
fsync, rename, fsync of the directory), so a reader never sees half a file and a written file survives a
crash. training_log.jsonl is flushed every step and fsynced before every checkpoint.
"""
import hashlib
import json
import os
import pickle
import time

import numpy as np

from ghost_engine.durable import FileLock, fsync_directory, write_atomically
from ghost_engine.results_io import (DOTPROD_DIR, ITER_FILE, RESULTS_FORMATS, SCHEMA_NAME, SCHEMA_VERSION,
                                     save_dotprod_parquet, save_dotprod_pickle)

VALSET_SCHEMA = "graddotprod.valset"
VALSET_SCHEMA_VERSION = 1
TRAINING_LOG_JSONL = "training_log.jsonl"
_SAVERS = {"pickle": save_dotprod_pickle, "parquet": save_dotprod_parquet}


def write_json(path, obj):
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_valset(run_dir, val_batch, config, name="valset.pkl"):
    """valset.pkl: the validation rows the dot products were taken against."""
    payload = {
        "schema": VALSET_SCHEMA, "schema_version": VALSET_SCHEMA_VERSION,
        "val_domain": config["val_domain"], "seq_len": config["seq_len"], "data_dir": config["data_dir"],
        "tokens": np.asarray(val_batch.tokens, dtype=np.int64),  # [Bv, seq_len + 1]; the model sees [:, :seq_len]
        "domain": [str(d) for d in val_batch.domain],
        "token_offset": np.asarray(val_batch.token_offset, dtype=np.int64),
        "doc_id": np.asarray(val_batch.doc_id, dtype=np.int64),
        "sample_index": np.asarray(val_batch.sample_index, dtype=np.int64),
    }
    write_atomically(os.path.join(run_dir, name), lambda f: pickle.dump(payload, f, protocol=4))


def data_identity(data_dir):
    """What the run's data is: {relative path: sha256} of every manifest (ingest.json and the per-domain
    .json files) and {relative path: size} of every token file. Cheap to compute (no token file is read);
    any ingest, added domain or changed split changes it."""
    identity = {}
    for root, _, names in sorted(os.walk(data_dir)):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, data_dir)
            if name.endswith(".json"):
                with open(path, "rb") as f:
                    identity[rel] = hashlib.sha256(f.read()).hexdigest()
            elif name.endswith(".bin"):
                identity[rel] = os.path.getsize(path)
    return identity


def describe_data_change(saved, now):
    """One line naming what differs between two data identities."""
    added = sorted(set(now) - set(saved))
    removed = sorted(set(saved) - set(now))
    changed = sorted(k for k in set(now) & set(saved) if now[k] != saved[k])
    parts = [f"{label} {names[:4]}{'...' if len(names) > 4 else ''}"
             for label, names in (("added", added), ("removed", removed), ("changed", changed)) if names]
    return "; ".join(parts)


def read_valset_tokens(run_dir):
    """The validation rows saved with the run (None if it has no valset.pkl)."""
    from ghost_engine.results_io import safe_load_pickle

    path = os.path.join(run_dir, "valset.pkl")
    return safe_load_pickle(path)["tokens"] if os.path.exists(path) else None


def dotprod_file(run_dir, last_step, results_format="pickle"):
    return os.path.join(run_dir, DOTPROD_DIR, f"iter_{last_step:06d}{RESULTS_FORMATS[results_format]}")


def flush_dotprods(run_dir, run_name, world_size, pending, formats=("pickle",)):
    """Write the pending step records (ascending steps) as iter_<last step>.pkl and/or .parquet (the same
    rows; `formats` from --results_format); empties `pending`. Returns the paths written."""
    if not pending:
        return []
    os.makedirs(os.path.join(run_dir, DOTPROD_DIR), exist_ok=True)
    payload = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "run_name": run_name,
               "world_size": world_size, "steps": list(pending)}
    paths = []
    for results_format in formats:
        paths.append(dotprod_file(run_dir, pending[-1]["step"], results_format))
        _SAVERS[results_format](paths[-1], payload)
    pending.clear()
    return paths


def dotprod_steps_on_disk(run_dir):
    """Last steps of the run's iter_XXXXXX.pkl / .parquet files, ascending, each once."""
    directory = os.path.join(run_dir, DOTPROD_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted({int(m.group(1)) for m in map(ITER_FILE.match, os.listdir(directory)) if m})


def split_log_lines(data, step):
    """training_log.jsonl's bytes -> (kept, later): the leading complete lines of steps <= `step`, and the
    rest from the first line that is later, torn (no newline: a kill in the middle of a write) or not JSON."""
    kept = 0
    for line in data.splitlines(keepends=True):
        try:
            record = json.loads(line) if line.endswith(b"\n") else None
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] > step:
            break
        kept += len(line)
    return data[:kept], data[kept:]


def set_aside_after(run_dir, step):
    """Move what a resumed run is about to redo, everything of steps after `step` (the checkpoint it resumes
    from), to superseded/<UTC time>/: the dot-product files (both formats) and the lines of
    training_log.jsonl (the file is cut after the last line of step <= `step`). Removes stray temporary
    files of interrupted writes. Nothing complete is deleted. Returns (moved names, destination or None)."""
    for sub in (DOTPROD_DIR, "checkpoints"):
        directory = os.path.join(run_dir, sub)
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if ".tmp-" in name:  # a write that never completed (kill -9, full disk): no data in it
                os.remove(os.path.join(directory, name))
    directory = os.path.join(run_dir, DOTPROD_DIR)
    later = sorted(name for name in (os.listdir(directory) if os.path.isdir(directory) else [])
                   if ITER_FILE.match(name) and int(ITER_FILE.match(name).group(1)) > step)
    log_path = os.path.join(run_dir, TRAINING_LOG_JSONL)
    kept_lines, later_lines = b"", b""
    if os.path.exists(log_path):
        with open(log_path, "rb") as f:
            kept_lines, later_lines = split_log_lines(f.read(), step)
    if not later and not later_lines:
        return [], None
    destination = base = os.path.join(run_dir, "superseded", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    attempt = 1
    while os.path.exists(destination):  # two resumes within a second: the earlier one's files stay
        destination, attempt = f"{base}-{attempt}", attempt + 1
    moved = []
    if later:
        os.makedirs(os.path.join(destination, DOTPROD_DIR), exist_ok=True)
        for name in later:
            os.replace(os.path.join(directory, name), os.path.join(destination, DOTPROD_DIR, name))
            moved.append(name)
        fsync_directory(os.path.join(destination, DOTPROD_DIR))
        fsync_directory(directory)
    if later_lines:
        # the copy first: a crash before the cut leaves the lines in both places, never in neither
        os.makedirs(destination, exist_ok=True)
        write_atomically(os.path.join(destination, TRAINING_LOG_JSONL), lambda f: f.write(later_lines))
        with open(log_path, "r+b") as f:
            f.truncate(len(kept_lines))
            os.fsync(f.fileno())
        moved.append(TRAINING_LOG_JSONL)
    return moved, destination


class RunBusyError(RuntimeError):
    """Another process holds the run directory."""


class RunLock:
    """A run directory is owned by one process (rank 0 of one launch) at a time: <run_dir>/run.lock."""

    def __init__(self, run_dir):
        self._lock = FileLock(os.path.join(run_dir, "run.lock"))
        self.path = self._lock.path

    def acquire(self):
        if not self._lock.acquire(blocking=False):
            raise RunBusyError(f"{os.path.dirname(self.path)} is in use by {self._lock.holder()}; wait for it to "
                               "finish, stop it, or pick another --run_name")
        return self

    def release(self):
        self._lock.release()


def read_training_log(run_dir, up_to_step):
    """The run's log, keeping only records of steps <= up_to_step (those a resumed run does not redo)."""
    path = os.path.join(run_dir, "training_log.json")
    if not os.path.exists(path):
        return {"steps": [], "evals": []}
    log = read_json(path)
    return {kind: [r for r in log.get(kind, []) if r["step"] <= up_to_step] for kind in ("steps", "evals")}
