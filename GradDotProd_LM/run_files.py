"""Files of one run directory, Results/<run_name>/ (layout in docs/training.md).

    config.json          resolved flags + environment: everything needed to rerun
    training_log.json    {"steps": [per-step records], "evals": [evaluation records]}, at checkpoints
    training_log.jsonl   the same records, one line each, appended every step (GradDotProd_LM.experiment_log)
    valset.pkl           validation tokens and their provenance (plain python/numpy)
    grad_dotprods/iter_XXXXXX.pkl, .parquet   steps (previous file, XXXXXX], schema in ghost_results.results_io
                         (which also writes them and sets aside those of steps a resume redoes)
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

import numpy as np

from ghost_engine.durable import FileLock, write_atomically
from ghost_results.valset import VALSET_SCHEMA, VALSET_SCHEMA_VERSION, write_valset_file  # noqa: F401 (names kept here)


def write_json(path, obj):
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_valset(run_dir, val_batch, config, name="valset.pkl"):
    """valset.pkl: the validation rows the dot products were taken against (schema: ghost_results.valset)."""
    write_valset_file(os.path.join(run_dir, name), val_batch.tokens,  # [Bv, seq_len + 1]; the model sees [:, :seq_len]
                      config["seq_len"], val_batch.domain, val_batch.doc_id, val_batch.token_offset,
                      val_batch.sample_index, val_domain=config["val_domain"], data_dir=config["data_dir"])


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


class DamagedRunFile(ValueError):
    """A file of the run directory cannot be read; the message names it and what to do."""

    def __init__(self, path, err):
        super().__init__(f"cannot read {path} ({type(err).__name__}: {err}); restore it from a backup, or keep "
                         "this run's results and start a new --run_name")


def read_valset_tokens(run_dir):
    """The validation rows saved with the run (None if it has no valset.pkl)."""
    from ghost_results.results_io import safe_load_pickle

    path = os.path.join(run_dir, "valset.pkl")
    if not os.path.exists(path):
        return None
    try:
        return np.asarray(safe_load_pickle(path)["tokens"], dtype=np.int64)
    except Exception as err:  # truncated, hostile or not a valset: the unpickler raises several types
        raise DamagedRunFile(path, err) from err


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
    try:
        log = read_json(path)
        return {kind: [r for r in log.get(kind, []) if r["step"] <= up_to_step] for kind in ("steps", "evals")}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DamagedRunFile(path, err) from err
