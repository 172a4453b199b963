"""Files of one run directory, Results/<run_name>/ (layout in docs/training.md).

    config.json          resolved flags + environment: everything needed to rerun
    training_log.json    {"steps": [per-step records], "evals": [evaluation records]}
    valset.pkl           validation tokens and their provenance (plain python/numpy)
    grad_dotprods/iter_XXXXXX.pkl   steps (previous file, XXXXXX], schema in ghost_engine.results_io
    checkpoints/latest.pt

Every file is written durably (ghost_engine.durable: temporary file, fsync, rename, fsync of the directory),
so a reader never sees half a file and a written file survives a crash.
"""
import json
import os
import pickle
import re

import numpy as np

from ghost_engine.durable import write_atomically
from ghost_engine.results_io import DOTPROD_DIR, SCHEMA_NAME, SCHEMA_VERSION, save_dotprod_pickle

VALSET_SCHEMA = "graddotprod.valset"
VALSET_SCHEMA_VERSION = 1
_ITER_FILE = re.compile(r"^iter_(\d+)\.pkl$")


def write_json(path, obj):
    write_atomically(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_valset(run_dir, val_batch, config):
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
    write_atomically(os.path.join(run_dir, "valset.pkl"), lambda f: pickle.dump(payload, f, protocol=4))


def dotprod_file(run_dir, last_step):
    return os.path.join(run_dir, DOTPROD_DIR, f"iter_{last_step:06d}.pkl")


def flush_dotprods(run_dir, run_name, world_size, pending):
    """Write the pending step records (ascending steps) as iter_<last step>.pkl; empties `pending`."""
    if not pending:
        return None
    os.makedirs(os.path.join(run_dir, DOTPROD_DIR), exist_ok=True)
    path = dotprod_file(run_dir, pending[-1]["step"])
    save_dotprod_pickle(path, {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "run_name": run_name,
                               "world_size": world_size, "steps": list(pending)})
    pending.clear()
    return path


def drop_dotprods_after(run_dir, step):
    """Remove dot-product files of steps after `step` (written after the checkpoint a run resumes
    from; the resumed run writes them again) and stray temporary files. Returns the removed paths."""
    directory = os.path.join(run_dir, DOTPROD_DIR)
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        match = _ITER_FILE.match(name)
        if (match and int(match.group(1)) > step) or ".tmp-" in name:
            os.remove(os.path.join(directory, name))
            removed.append(name)
    return removed


def read_training_log(run_dir, up_to_step):
    """The run's log, keeping only records of steps <= up_to_step (those a resumed run does not redo)."""
    path = os.path.join(run_dir, "training_log.json")
    if not os.path.exists(path):
        return {"steps": [], "evals": []}
    log = read_json(path)
    return {kind: [r for r in log.get(kind, []) if r["step"] <= up_to_step] for kind in ("steps", "evals")}
