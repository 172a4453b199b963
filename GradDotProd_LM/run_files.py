"""Files of one run directory, Results/<run_name>/ (layout in docs/training.md).

    config.json          resolved flags + environment: everything needed to rerun
    training_log.json    {"steps": [per-step records], "evals": [evaluation records]}
    valset.pkl           validation tokens and their provenance (plain python/numpy)
    grad_dotprods/iter_XXXXXX.pkl   steps (previous file, XXXXXX], schema in ghost_engine.results_io
    checkpoints/latest.pt
    run.lock             held by the process training the run (RunLock)
    superseded/<time>/   files of steps after the checkpoint a resume started from, moved aside

Every file is written durably (ghost_engine.durable: temporary file, fsync, rename, fsync of the directory),
so a reader never sees half a file and a written file survives a crash.
"""
import hashlib
import json
import os
import pickle
import re
import time

import numpy as np

from ghost_engine.durable import FileLock, fsync_directory, write_atomically
from ghost_engine.results_io import DOTPROD_DIR, SCHEMA_NAME, SCHEMA_VERSION, save_dotprod_pickle

VALSET_SCHEMA = "graddotprod.valset"
VALSET_SCHEMA_VERSION = 1
_ITER_FILE = re.compile(r"^iter_(\d+)\.pkl$")


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


def dotprod_file(run_dir, last_step):
    return os.path.join(run_dir, DOTPROD_DIR, f"iter_{last_step:06d}.pkl")


def flush_dotprods(run_dir, run_name, world_size, pending, value="first_order"):
    """Write the pending step records (ascending steps) as iter_<last step>.pkl; empties `pending`. `value`: the
    engine's estimator, what the records' dot_products hold."""
    if not pending:
        return None
    os.makedirs(os.path.join(run_dir, DOTPROD_DIR), exist_ok=True)
    path = dotprod_file(run_dir, pending[-1]["step"])
    save_dotprod_pickle(path, {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "run_name": run_name,
                               "world_size": world_size, "value": value, "steps": list(pending)})
    pending.clear()
    return path


def dotprod_steps_on_disk(run_dir):
    """Last steps of the run's iter_XXXXXX.pkl files, ascending."""
    directory = os.path.join(run_dir, DOTPROD_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_FILE.match, os.listdir(directory)) if m)


def set_aside_after(run_dir, step):
    """Move the dot-product files of steps after `step` (written after the checkpoint a run resumes from;
    the resumed run writes those steps again) to superseded/<UTC time>/, and remove stray temporary
    files of interrupted writes. Nothing complete is deleted. Returns (moved names, destination or None)."""
    for sub in (DOTPROD_DIR, "checkpoints"):
        directory = os.path.join(run_dir, sub)
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if ".tmp-" in name:  # a write that never completed (kill -9, full disk): no data in it
                os.remove(os.path.join(directory, name))
    later = [s for s in dotprod_steps_on_disk(run_dir) if s > step]
    if not later:
        return [], None
    destination = os.path.join(run_dir, "superseded", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
                               DOTPROD_DIR)
    os.makedirs(destination, exist_ok=True)
    moved = []
    for last_step in later:
        name = os.path.basename(dotprod_file(run_dir, last_step))
        os.replace(dotprod_file(run_dir, last_step), os.path.join(destination, name))
        moved.append(name)
    fsync_directory(destination)
    fsync_directory(os.path.join(run_dir, DOTPROD_DIR))
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
