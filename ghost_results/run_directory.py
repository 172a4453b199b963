"""The one owner of a run directory, Results/<run_name>/: every file name, the order the files are written in
and how durably. The training app (GradDotProd_LM.training) and the framework integrations
(ghost_integrations.core.ValuationRun) both write their run through a `RunDirectory`; neither knows a file name.

    config.json          the run's settings and environment (the caller's record), with its identity "run_id"
    valset.pkl           the validation rows (schema: ghost_results.valset); valset_from_step_XXXXXX.pkl when
                         a resumed run is valued against other rows
    training_log.json    {"run_id", "steps": [per-step records], "evals": [evaluation records]}, at checkpoints
    training_log.jsonl   the same records, one line each, appended every step by the caller's log hook (the
                         app's GradDotProd_LM.experiment_log, which also feeds the --report_to sinks)
    grad_dotprods/iter_XXXXXX.parquet, .pkl   steps (previous file, XXXXXX] (format: ghost_results.results_io)
    grad_dotprods/compact_XXXXXX_YYYYYY.parquet   step files XXXXXX..YYYYYY merged by `python -m ghost_results
                         compact` (ghost_results.compact), which holds run.lock while it works
    checkpoints/latest.pt            the newest checkpoint (its bytes come from the caller: `write(file)`)
    checkpoints/step_XXXXXX.pt       with keep_checkpoints != 1: the checkpoints of checkpoint_interval steps,
                                     hard links of latest.pt's file (no extra bytes), the newest N kept
    checkpoints/step_XXXXXX.dcp/     a sharded checkpoint (the app's --fsdp; torch.distributed.checkpoint: every
                                     process writes its part, the caller's `app_state.json` beside them),
                                     written as step_XXXXXX.dcp.partial/ and renamed once complete; the newest
                                     is the run's latest, older ones are kept as the .pt series is
    run.lock             held by the process training the run (`acquire`)
    superseded/<time>/   files and log lines of steps after the step a resume started from, moved aside

Besides the dot products a run may hold more per-step artifacts ("step sinks", e.g. a store of projected
per-sample gradients): objects with `append(rows, prov)`, `flush()`, `drop_steps_after(step)` and `close()`.
The owner flushes them whenever it writes the dot products, has them drop the steps after the resume step when
a run resumes, and closes them with the run.

Identity: a run's `run_id` (a random hex string made when the run starts, config.json's "run_id") is written
into every file (each log line, the dot-product files, valset.pkl, every checkpoint). Resume and the loaders
take only files of that identity and refuse others by name (`ForeignRunFile`); the directory's name plays no
part, so a run directory can be moved or renamed. Runs started before identities existed have none
(config.json lacks "run_id") and are matched by name, as they were written.

Order and durability (docs/RELIABILITY.md): every file but the appended training_log.jsonl is written durably
(ghost_common.durable: temporary file, fsync, rename, fsync of the directory), so a reader never sees half a
file and a written file survives a crash. A checkpoint at step s is written only after the dot products and
log of steps 1..s (`sync`), so a resume from it finds exactly the files of the steps it does not redo. A kept
step checkpoint is linked only after latest.pt is durable, and older ones are removed only after it is. A
sharded checkpoint exists under its final name only once every part and its app state are durable (the rename
is its commit); older checkpoints, of either kind, are removed only after that.

This module needs the standard library, numpy and the rest of ghost_results; never torch (checkpoint bytes
are the caller's `write(binary_file)`).
"""
import json
import os
import shutil
import tempfile

import numpy as np

from ghost_common.durable import FileLock, fsync_directory, write_atomically
from ghost_results.grad_store import MANIFEST, GradStoreWriter, read_manifest
from ghost_results.results_io import (CHECKPOINT_DIR, SHARDED_CHECKPOINT, STEP_CHECKPOINT_FILE, TRAINING_LOG_JSONL,
                                      ResultsFormatError,
                                      file_formats, flush_dotprods, new_run_id, safe_load_pickle, set_aside_after)
from ghost_results.valset import VALSET_FILE, write_valset_file

CONFIG_FILE = "config.json"
TRAINING_LOG_JSON = "training_log.json"
LATEST_CHECKPOINT = "latest.pt"
LOCK_FILE = "run.lock"
GRAD_STORE = "grad_store"  # every training row's projected gradient (ghost_results.grad_store), --project_dim
GRAD_STORE_VALIDATION = "grad_store_validation"  # Π of what the dot products are taken against, one row per step


def checkpoint_path(run_dir, step=None):
    """checkpoints/latest.pt, or the kept checkpoint of `step` (checkpoints/step_XXXXXX.pt)."""
    return os.path.join(run_dir, CHECKPOINT_DIR, LATEST_CHECKPOINT if step is None else f"step_{step:06d}.pt")


def kept_checkpoint_steps(run_dir):
    """The steps of the run's kept checkpoints (checkpoints/step_XXXXXX.pt), ascending."""
    return _steps_named(run_dir, STEP_CHECKPOINT_FILE)


PARTIAL = ".partial"
SHARDED_APP_STATE = "app_state.json"  # in a sharded checkpoint: the caller's record beside the tensors


def sharded_checkpoint_path(run_dir, step, partial=False):
    """checkpoints/step_XXXXXX.dcp, the sharded checkpoint of `step` (partial: the directory it is written in)."""
    return os.path.join(run_dir, CHECKPOINT_DIR, f"step_{step:06d}.dcp" + (PARTIAL if partial else ""))


def sharded_checkpoint_steps(run_dir):
    """The steps of the run's complete sharded checkpoints (checkpoints/step_XXXXXX.dcp/), ascending."""
    return _steps_named(run_dir, SHARDED_CHECKPOINT)


def has_checkpoint(run_dir):
    """True if the run holds a checkpoint to resume from: latest.pt or a complete sharded checkpoint."""
    return os.path.exists(checkpoint_path(run_dir)) or bool(sharded_checkpoint_steps(run_dir))


def _steps_named(run_dir, pattern):
    directory = os.path.join(run_dir, CHECKPOINT_DIR)
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(m.group(1)) for m in map(pattern.match, names) if m)


# ---------------------------------------------------------------------------------------------- identity


class ForeignRunFile(ValueError):
    """A file in the run directory was written by another run; it is not resumed from and not merged."""

    def __init__(self, path, found, expected):
        super().__init__(f"{path} belongs to another run (run_id {found!r}, this run is {expected!r}): it was "
                         "copied or moved here; nothing was resumed from it or changed. Move it away and "
                         "restore this run's own file, or start a new --run_name")


class DamagedRunFile(ValueError):
    """A file of the run directory cannot be read; the message names it and what to do."""

    def __init__(self, path, err):
        super().__init__(f"cannot read {path} ({type(err).__name__}: {err}); restore it from a backup, or keep "
                         "this run's results and start a new --run_name")


def check_identity(path, found, expected):
    """Raise ForeignRunFile unless a file's run_id is the run's; a run without an identity (started before
    identities existed) accepts anything, as it always did."""
    if expected is not None and found != expected:
        raise ForeignRunFile(path, found, expected)


def write_json(path, obj):
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1, default=str).encode()))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_config(run_dir):
    """The run's config.json."""
    return read_json(os.path.join(run_dir, CONFIG_FILE))


def resumed_run_id(run_dir, start_step):
    """The identity of a run (re)started at `start_step`: a resumed run (start_step > 0) keeps the one its
    config.json records (None: a run written before identities); a run starting at step 0 is a new run."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if start_step > 0 and os.path.exists(path):
        try:
            saved = read_json(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {path} ({type(err).__name__}: {err}) to resume its run") from err
        if isinstance(saved, dict) and saved.get("run_id") is not None:
            return str(saved["run_id"])
        return None
    return new_run_id()


def read_valset_tokens(run_dir, run_id=None):
    """The validation rows saved with the run (None if it has no valset.pkl); ForeignRunFile if another run
    wrote it."""
    path = os.path.join(run_dir, VALSET_FILE)
    if not os.path.exists(path):
        return None
    try:
        payload = safe_load_pickle(path)
        tokens = np.asarray(payload["tokens"], dtype=np.int64)
    except Exception as err:  # truncated, hostile or not a valset: the unpickler raises several types
        raise DamagedRunFile(path, err) from err
    check_identity(path, payload.get("run_id"), run_id)
    return tokens


def read_training_log(run_dir, up_to_step, run_id=None):
    """The run's log, keeping only records of steps <= up_to_step (those a resumed run does not redo), with
    the run's identity under "run_id"; ForeignRunFile if training_log.json or a line of training_log.jsonl
    names another run."""
    path = os.path.join(run_dir, TRAINING_LOG_JSON)
    log = {"run_id": run_id, "steps": [], "evals": []}
    if os.path.exists(path):
        try:
            saved = read_json(path)
            log.update({kind: [r for r in saved.get(kind, []) if r["step"] <= up_to_step]
                        for kind in ("steps", "evals")})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise DamagedRunFile(path, err) from err
        check_identity(path, saved.get("run_id"), run_id)
    lines = os.path.join(run_dir, TRAINING_LOG_JSONL)
    if run_id is not None and os.path.exists(lines):
        with open(lines, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    found = json.loads(line).get("run_id")
                except (ValueError, AttributeError):
                    continue  # a torn or damaged line: set aside on resume, never read as a record
                check_identity(f"{lines} line {number}", found, run_id)
    return log


# ---------------------------------------------------------------------------------------------- one owner


def unwritable(run_dir):
    """None if this process can write the run directory (or create it), else a one-line error naming the
    path. Tried, not inferred from permission bits: a read-only mount stops root too, and root ignores modes."""
    existing = run_dir
    while not os.path.isdir(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    probes = [existing] + [os.path.join(run_dir, sub) for sub in ("grad_dotprods", CHECKPOINT_DIR)
                           if existing == run_dir and os.path.isdir(os.path.join(run_dir, sub))]
    for directory in probes:
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
            os.close(fd)
            os.remove(probe)
        except OSError as err:
            return (f"cannot write in {directory} ({os.strerror(err.errno) if err.errno else err}); the run's "
                    "files could not be saved. Make it writable or pass another --results_dir")
    for name in (TRAINING_LOG_JSONL, "training_log.csv", "eval_log.csv"):  # appended in place
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
        self._lock = FileLock(os.path.join(run_dir, LOCK_FILE))
        self.path = self._lock.path

    def acquire(self):
        if not self._lock.acquire(blocking=False):
            raise RunBusyError(f"{os.path.dirname(self.path)} is in use by {self._lock.holder()}; wait for it to "
                               "finish, stop it, or pick another --run_name")
        return self

    def release(self):
        self._lock.release()


def validation_vector(value: str) -> str:
    """What GRAD_STORE_VALIDATION's rows project under the engine's `value`: the vector its dot products are
    taken against (cosine and the deferred estimators: ∇L_val, which their first-order part uses)."""
    return "D ⊙ ∇L_val" if value == "adamw" else "∇L_val"


def grad_store_artifacts(rows, record) -> dict:
    """A step's gradient-store rows {sink name: (rows, provenance)}, taken out of its gathered `rows`
    (ghost_engine.recording: "projections" [B, K], and "val_projection" [K] when the step had validation rows)."""
    n = len(rows["sample_index"])
    prov = {"step": np.full(n, record["step"]), "row": rows["sample_index"], "doc_id": rows["doc_id"],
            "token_offset": rows["token_offset"], "domain": np.asarray(rows["domain"]),
            "lr": np.full(n, record["lr"]), "weight": rows["batch_weights"], "n_tokens": rows["token_counts"]}
    artifacts = {GRAD_STORE: (rows.pop("projections"), prov)}
    val = rows.pop("val_projection", None)
    if val is not None:
        artifacts[GRAD_STORE_VALIDATION] = (val[None], {
            "step": np.array([record["step"]]), "row": np.array([-1]), "doc_id": np.array([-1]),
            "token_offset": np.array([-1]), "domain": np.array(["validation"]), "lr": np.array([record["lr"]]),
            "weight": np.ones(1), "n_tokens": np.zeros(1, dtype=np.int64)})
    return artifacts


class RunDirectory:
    """Rank 0's owner of one run directory: `acquire` (the lock), `open` (identity, set-aside, log), then
    `write_config` and `write_valset`; per step `record_step`; `flush`, `sync`, `checkpoint`; `close`,
    `release`. Every file name and the order of the writes are here (module docstring)."""

    def __init__(self, run_dir, run_id=None):
        self.path = os.fspath(run_dir)
        self._lock = RunLock(self.path)
        self.run_id, self.start_step, self.last_checkpoint = run_id, 0, None
        self.log = {"run_id": None, "steps": [], "evals": []}  # training_log.json's records
        self.pending = []  # dot-product step records not yet written
        self.step_sinks = {}  # name -> a writer of per-step artifacts beside the dot products
        self.log_hook = None  # the caller's writer of training_log.jsonl and its sinks (step, eval, sync, close)
        self.config = None  # config.json as last written

    # ------------------------------------------------------------------ holding the directory
    def acquire(self):
        """Hold run.lock (RunBusyError naming the holder if another process does)."""
        self._lock.acquire()
        return self

    def release(self, remove_if_empty=False):
        """Let go of run.lock; remove_if_empty: a run stopped before writing anything leaves no trace."""
        self._lock.release()
        if remove_if_empty and os.path.isdir(self.path) and os.listdir(self.path) == [LOCK_FILE]:
            os.remove(self._lock.path)
            os.rmdir(self.path)

    # ------------------------------------------------------------------ creating or resuming
    def open(self, start_step, *, run_id, run_name, world_size=1, results_format="parquet", value="first_order",
             save_interval=1, checkpoint_interval=None, keep_checkpoints=1, step_sinks=None):
        """Start or resume the run at `start_step`: read its log of the steps kept (DamagedRunFile or
        ForeignRunFile before anything is changed), set aside the files and log lines of later steps (and
        have every step sink drop them). Returns (moved names, their destination or None)."""
        self.run_id, self.run_name, self.world_size, self.value = run_id, run_name, world_size, value
        self.formats, self.results_format = file_formats(results_format), results_format
        self.save_interval, self.checkpoint_interval = save_interval, checkpoint_interval
        self.keep_checkpoints, self.start_step = keep_checkpoints, start_step
        self.log = read_training_log(self.path, start_step, run_id)  # before anything is moved
        os.makedirs(self.path, exist_ok=True)
        try:
            moved = set_aside_after(self.path, start_step)  # files and log lines of steps to redo
        except ResultsFormatError as err:  # a compacted file that cannot be split at start_step: nothing moved
            raise DamagedRunFile(getattr(err, "path", self.path), err) from err
        self._remove_partial_checkpoints()  # sharded checkpoints a kill interrupted: never complete, never read
        self.last_checkpoint = start_step if has_checkpoint(self.path) else None
        if self.last_checkpoint and self._in_series(start_step) and os.path.exists(checkpoint_path(self.path)) \
                and start_step not in sharded_checkpoint_steps(self.path) \
                and not os.path.exists(checkpoint_path(self.path, start_step)):
            self._link_step_checkpoint(start_step)  # a kill between latest.pt and its link: link it now
        for name, sink in (step_sinks or {}).items():
            self.add_step_sink(name, sink)
        return moved

    def add_step_sink(self, name, sink):
        """Hold `sink` (append, flush, drop_steps_after, close) beside the dot products; it drops what it
        holds of steps after the step the run (re)started from."""
        sink.drop_steps_after(self.start_step)
        self.step_sinks[name] = sink

    def open_grad_stores(self, projection, *, dtype="bfloat16", seq_len=None, data=None, validation=True,
                         value="first_order"):
        """The run's gradient stores (ghost_results.grad_store) as step sinks: every training row's projected
        gradient (GRAD_STORE) and, with validation rows, the projection of what the step's dot products were
        taken against (GRAD_STORE_VALIDATION; `value`: the engine's estimator, its manifest's "vector" says
        which: ∇L_val, or D ⊙ ∇L_val under adamw). projection: the engine's Projection.describe(); data: where
        the rows come from ({"source", "kind", "split"}, for the texts of a query's answer). ValueError naming
        the store if one of the run's was written with another projection, precision or validation vector."""
        blocks = [[name, start, stop] for name, _, _, start, stop in projection["blocks"]]
        meta = {"identity": self.run_id, "projection": projection, "seq_len": seq_len, "data": data or {},
                "model": {"kind": "run", "path": self.path, "step": None, "run_id": self.run_id}}
        stores = [(GRAD_STORE, dict(meta, kind="in_run"))]
        if validation:
            vector, path = validation_vector(value), os.path.join(self.path, GRAD_STORE_VALIDATION)
            if os.path.exists(os.path.join(path, MANIFEST)):  # checked before any store is opened (and trimmed)
                try:
                    theirs = read_manifest(path)["meta"].get("vector", validation_vector("first_order"))
                except (OSError, ValueError) as err:
                    raise ValueError(f"{path}: {err}") from None
                if theirs != vector:  # a store from before "vector" holds Π(∇L_val)
                    raise ValueError(f"{path} holds the projections of {theirs} (a run before the validation "
                                     f"projection followed --value), this run's are of {vector}: set the store "
                                     "aside (its rows stay valid for their steps) or start a new --run_name")
            stores.append((GRAD_STORE_VALIDATION, dict(meta, kind="in_run_validation", value=value, vector=vector)))
        for name, store_meta in stores:
            path = os.path.join(self.path, name)
            try:
                writer = GradStoreWriter(path, blocks, dtype=dtype, meta=store_meta)
            except (ValueError, RuntimeError) as err:
                raise ValueError(f"{path}: {err}") from None
            self.add_step_sink(name, writer)

    def write_config(self, record):
        """config.json: the caller's record of the run, with its identity."""
        self.config = dict(record, run_id=self.run_id)
        write_json(os.path.join(self.path, CONFIG_FILE), self.config)

    def write_valset(self, tokens, seq_len, provenance, *, val_domain=None, data_dir=None, changed=None):
        """valset.pkl: the validation rows (`provenance`: domain, doc_id, token_offset, sample_index, one per
        row). A run that has one keeps it; rows other than its own go to valset_from_step_XXXXXX.pkl (the step
        they are first used in). changed: whether the rows differ from valset.pkl's (None: compare here; a run
        starting at step 0 then writes valset.pkl afresh)."""
        path = os.path.join(self.path, VALSET_FILE)
        exists = os.path.exists(path)
        if changed is None:
            fresh = self.start_step == 0 or not exists
            changed = not fresh and not self._holds_valset(path, tokens)
        else:
            fresh = not exists
        if not fresh and not changed:
            return
        name = VALSET_FILE if fresh else f"valset_from_step_{self.start_step + 1:06d}.pkl"
        write_valset_file(os.path.join(self.path, name), tokens, seq_len, provenance["domain"],
                          provenance["doc_id"], provenance["token_offset"], provenance["sample_index"],
                          val_domain=val_domain, data_dir=data_dir, run_id=self.run_id)

    @staticmethod
    def _holds_valset(path, tokens):
        try:
            return np.array_equal(np.asarray(safe_load_pickle(path)["tokens"]), tokens)
        except Exception:  # unreadable or not a valset: leave it, record these rows beside it
            return False

    def write_eval_only(self, step, result, run_id):
        """eval_only_step_XXXXXX.json: an evaluation of the checkpoint of `step` that trained nothing (the run
        is not opened: it is read, not held)."""
        write_json(os.path.join(self.path, f"eval_only_step_{step:06d}.json"),
                   {"run_id": run_id, "step": step, "eval": result})

    # ------------------------------------------------------------------ steps
    def record_step(self, record, rows=None, by_domain=None, artifacts=None, log=True):
        """A completed step: `record` {"step", "loss", "lr", "val_loss", ...} is its log line (log=False: the
        run keeps no log), `rows` its dot-product rows (ghost_engine.recording), `artifacts` {sink name: (rows,
        prov)} its other per-step artifacts. Rows are written every save_interval steps."""
        step = record["step"]
        if rows is not None:
            self.pending.append(dict(step=step, lr=record["lr"], train_loss=record["loss"],
                                     val_loss=record["val_loss"], **rows))
        for name, (sink_rows, prov) in (artifacts or {}).items():
            self.step_sinks[name].append(sink_rows, prov)
        if step % self.save_interval == 0:
            self.flush()
        if log:
            self.log["steps"].append(record)
            if self.log_hook is not None:
                self.log_hook.step(record, by_domain)

    def record_eval(self, step, result):
        self.log["evals"].append({"step": step, **result})
        if self.log_hook is not None:
            self.log_hook.eval(step, result)

    def keep_until(self, step):
        """Forget the records of steps after `step` (a failure interrupted them)."""
        self.pending[:] = [record for record in self.pending if record["step"] <= step]
        self.log["steps"] = [r for r in self.log["steps"] if r["step"] <= step]
        for sink in self.step_sinks.values():
            sink.drop_steps_after(step)

    def flush(self, durable=False):
        """Write the pending dot products (grad_dotprods/iter_<last step>) and flush every step sink: what it
        buffers, or with durable=False only what fills whole files where the sink has `flush_full` (a gradient
        store's shards: rows after the last checkpoint are computed again on resume anyway)."""
        flush_dotprods(self.path, self.run_name, self.world_size, self.pending, self.formats, value=self.value,
                       run_id=self.run_id)
        for sink in self.step_sinks.values():
            (sink.flush if durable else getattr(sink, "flush_full", sink.flush))()

    def write_log(self):
        write_json(os.path.join(self.path, TRAINING_LOG_JSON), self.log)

    def sync(self):
        """Everything of the steps recorded so far made durable, as a checkpoint needs it: the dot products
        and step sinks, training_log.json, the log hook's lines."""
        self.flush(durable=True)
        self.write_log()
        if self.log_hook is not None:
            self.log_hook.sync()

    def record_divergence(self, step, bad):
        """config.json records that the state after `step` is not finite and where a resume restarts."""
        self.config.setdefault("divergences", []).append(
            {"after_step": step, "nonfinite": bad[:10], "last_finite_checkpoint": self.last_checkpoint or 0})
        write_json(os.path.join(self.path, CONFIG_FILE), self.config)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, step, write):
        """The checkpoint of `step`, its bytes from `write(binary_file)`: checkpoints/latest.pt durably; at a
        checkpoint_interval step with keep_checkpoints != 1 also checkpoints/step_XXXXXX.pt (a hard link of the
        same file), then the kept ones beyond keep_checkpoints (0: all) are removed. Call `sync` first."""
        latest = checkpoint_path(self.path)
        os.makedirs(os.path.dirname(latest), exist_ok=True)
        write_atomically(latest, write)
        self.last_checkpoint = step
        if self._in_series(step):
            self._link_step_checkpoint(step)
            self._prune_step_checkpoints()
        self._prune_sharded_checkpoints(newest=None)  # latest.pt is now the run's latest

    def prepare_sharded_checkpoint(self, step):
        """The empty directory the processes write the sharded checkpoint of `step` into (every process writes
        its part there, at sharded_checkpoint_path(run, step, partial=True)); then `commit_sharded_checkpoint`.
        Call `sync` first."""
        self._remove_partial_checkpoints()
        partial = sharded_checkpoint_path(self.path, step, partial=True)
        os.makedirs(partial)
        return partial

    def commit_sharded_checkpoint(self, step, app_state):
        """Once every process's part of `step` is durable in the partial directory: the caller's `app_state`
        (a JSON object) beside them, durably, then the rename to checkpoints/step_XXXXXX.dcp that makes it the
        run's latest checkpoint; then latest.pt and the sharded checkpoints beyond the series are removed."""
        partial, final = (sharded_checkpoint_path(self.path, step, partial=flag) for flag in (True, False))
        write_json(os.path.join(partial, SHARDED_APP_STATE), app_state)
        fsync_directory(partial)  # the parts' names, written by every process
        if os.path.exists(final):  # a checkpoint of this step from before a resume that went back past it
            shutil.rmtree(final)
        os.replace(partial, final)
        fsync_directory(os.path.dirname(final))
        self.last_checkpoint = step
        latest = checkpoint_path(self.path)
        if os.path.exists(latest):  # a run that checkpointed with latest.pt before: that is older now
            os.remove(latest)
            fsync_directory(os.path.dirname(latest))
        self._prune_sharded_checkpoints(newest=step)

    def _prune_sharded_checkpoints(self, newest):
        """Keep the sharded checkpoint `newest` and those of the series (as _prune_step_checkpoints keeps the
        .pt ones); remove the others."""
        steps = sharded_checkpoint_steps(self.path)
        series = [s for s in steps if self._in_series(s)]
        keep = set(series if self.keep_checkpoints < 1 else series[-self.keep_checkpoints:]) | {newest}
        removed = [s for s in steps if s not in keep]
        for s in removed:
            shutil.rmtree(sharded_checkpoint_path(self.path, s))
        if removed:
            fsync_directory(os.path.join(self.path, CHECKPOINT_DIR))

    def _remove_partial_checkpoints(self):
        directory = os.path.join(self.path, CHECKPOINT_DIR)
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if name.endswith(PARTIAL):
                shutil.rmtree(os.path.join(directory, name))

    def _in_series(self, step):
        return bool(self.checkpoint_interval) and self.keep_checkpoints != 1 and step % self.checkpoint_interval == 0

    def _link_step_checkpoint(self, step):
        """step_XXXXXX.pt as latest.pt's file: a link under a temporary name renamed into place (a copy where the
        file system has no hard links), then the directory fsynced."""
        latest, kept = checkpoint_path(self.path), checkpoint_path(self.path, step)
        tmp = f"{kept}.tmp-{os.getpid()}"
        if os.path.lexists(tmp):
            os.remove(tmp)
        try:
            os.link(latest, tmp)
        except OSError:  # no hard links here (some network and FAT file systems): the bytes again
            with open(latest, "rb") as source:
                write_atomically(kept, lambda f: shutil.copyfileobj(source, f))
            return
        os.replace(tmp, kept)
        fsync_directory(os.path.dirname(kept))

    def _prune_step_checkpoints(self):
        if self.keep_checkpoints < 1:
            return
        for step in kept_checkpoint_steps(self.path)[:-self.keep_checkpoints]:
            os.remove(checkpoint_path(self.path, step))
        fsync_directory(os.path.join(self.path, CHECKPOINT_DIR))

    # ------------------------------------------------------------------ the end
    def close(self, failed=False):
        """Close the log hook and every step sink (what they hold was written by `flush`/`sync`)."""
        if self.log_hook is not None:
            self.log_hook.close(failed=failed)
        for sink in self.step_sinks.values():
            sink.close()
