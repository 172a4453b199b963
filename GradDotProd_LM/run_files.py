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

Identity: a run's `run_id` (a random hex string made when the run starts, config.json's "run_id") is written
into every one of these files (each log line, the dot-product files, valset.pkl, every checkpoint). Resume
and the loaders take only files of that identity and refuse others by name; the directory's name plays no
part, so a run directory can be moved or renamed. Runs started before identities existed have none
(config.json lacks "run_id") and are matched by name, as they were written.

Every file but the appended training_log.jsonl is written durably (ghost_common.durable: temporary file,
fsync, rename, fsync of the directory), so a reader never sees half a file and a written file survives a
crash. training_log.jsonl is flushed every step and fsynced before every checkpoint.
"""
import hashlib
import json
import os
import tempfile

import numpy as np

from ghost_common.durable import FileLock, write_atomically
from ghost_results.valset import write_valset_file


class ForeignRunFile(ValueError):
    """A file in the run directory was written by another run; it is not resumed from and not merged."""

    def __init__(self, path, found, expected):
        super().__init__(f"{path} belongs to another run (run_id {found!r}, this run is {expected!r}): it was "
                         "copied or moved here; nothing was resumed from it or changed. Move it away and "
                         "restore this run's own file, or start a new --run_name")


def check_identity(path, found, expected):
    """Raise ForeignRunFile unless a file's run_id is the run's; a run without an identity (started before
    identities existed) accepts anything, as it always did."""
    if expected is not None and found != expected:
        raise ForeignRunFile(path, found, expected)


def write_json(path, obj):
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_valset(run_dir, val_batch, config, name="valset.pkl"):
    """valset.pkl: the validation rows the dot products were taken against, and the run they belong to
    (schema: ghost_results.valset)."""
    write_valset_file(os.path.join(run_dir, name), val_batch.tokens,  # [Bv, seq_len + 1]; the model sees [:, :seq_len]
                      config["seq_len"], val_batch.domain, val_batch.doc_id, val_batch.token_offset,
                      val_batch.sample_index, val_domain=config["val_domain"], data_dir=config["data_dir"],
                      run_id=config.get("run_id"))


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


def read_valset_tokens(run_dir, run_id=None):
    """The validation rows saved with the run (None if it has no valset.pkl); ForeignRunFile if another run
    wrote it."""
    from ghost_results.results_io import safe_load_pickle

    path = os.path.join(run_dir, "valset.pkl")
    if not os.path.exists(path):
        return None
    try:
        payload = safe_load_pickle(path)
        tokens = np.asarray(payload["tokens"], dtype=np.int64)
    except Exception as err:  # truncated, hostile or not a valset: the unpickler raises several types
        raise DamagedRunFile(path, err) from err
    check_identity(path, payload.get("run_id"), run_id)
    return tokens


def unwritable(run_dir):
    """None if this process can write the run directory (or create it), else a one-line error naming the
    path. Tried, not inferred from permission bits: a read-only mount stops root too, and root ignores modes."""
    existing = run_dir
    while not os.path.isdir(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    probes = [existing] + [os.path.join(run_dir, sub) for sub in ("grad_dotprods", "checkpoints")
                           if existing == run_dir and os.path.isdir(os.path.join(run_dir, sub))]
    for directory in probes:
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
            os.close(fd)
            os.remove(probe)
        except OSError as err:
            return (f"cannot write in {directory} ({os.strerror(err.errno) if err.errno else err}); the run's "
                    "files could not be saved. Make it writable or pass another --results_dir")
    for name in ("training_log.jsonl", "training_log.csv", "eval_log.csv"):  # appended in place
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            try:
                open(path, "ab").close()
            except OSError as err:
                return (f"cannot append to {path} ({os.strerror(err.errno) if err.errno else err}); make it "
                        "writable")
    return None


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


def read_training_log(run_dir, up_to_step, run_id=None):
    """The run's log, keeping only records of steps <= up_to_step (those a resumed run does not redo), with
    the run's identity under "run_id"; ForeignRunFile if training_log.json or a line of training_log.jsonl
    names another run."""
    path = os.path.join(run_dir, "training_log.json")
    log = {"run_id": run_id, "steps": [], "evals": []}
    if os.path.exists(path):
        try:
            saved = read_json(path)
            log.update({kind: [r for r in saved.get(kind, []) if r["step"] <= up_to_step]
                        for kind in ("steps", "evals")})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise DamagedRunFile(path, err) from err
        check_identity(path, saved.get("run_id"), run_id)
    lines = os.path.join(run_dir, "training_log.jsonl")
    if run_id is not None and os.path.exists(lines):
        with open(lines, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    found = json.loads(line).get("run_id")
                except (ValueError, AttributeError):
                    continue  # a torn or damaged line: set aside on resume, never read as a record
                check_identity(f"{lines} line {number}", found, run_id)
    return log
