"""Checkpoints that `torch.load(weights_only=True)` can read: tensors, numbers, strings, lists, dicts.

This module makes a checkpoint's bytes (`checkpoint_writer`) and reads them back; where they go, in which
order and how durably (checkpoints/latest.pt, the kept series step_XXXXXX.pt) is the run directory's owner's
business, ghost_results.run_directory.RunDirectory.checkpoint.

A checkpoint is written only after the step's dot products were flushed, so the files under
grad_dotprods/ always cover exactly steps 1..checkpoint step when training resumes from it. It carries the
run's identity ("run_id"): a resume takes only a checkpoint of its own run. A checkpoint only ever holds
finite weights and optimizer state (`nonfinite_state`): after a divergence the last finite one is kept.

A run trained with --fsdp writes sharded checkpoints instead (checkpoints/step_XXXXXX.dcp/): the model's and the
optimizer's state dicts through torch.distributed.checkpoint (every process writes its shards; the keys are the
parameters' names, so any number of processes, or one, reads them back: `restore`), and `app_state` (step,
identity, settings, random generators) as JSON beside them. `restore` reads whichever of the two kinds is
newest into a model sharded or not. PyTorch reads a sharded checkpoint's `.metadata` with pickle: resume or
export only sharded checkpoints you trust.
"""
import base64
import contextlib
import json
import os
import random
import shutil
import warnings

import numpy as np
import torch

from ghost_engine.model_map import is_dtensor
from ghost_results.run_directory import (SHARDED_APP_STATE, checkpoint_path, sharded_checkpoint_path,
                                         sharded_checkpoint_steps)

CHECKPOINT_FORMAT = 1


def rng_state():
    """Every random generator's state in weights_only-safe types."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def _saved_config(config):
    return {k: v for k, v in config.items()
            if isinstance(v, (int, float, str, bool, type(None))) or k in ("model_config", "data_tokenizer")}


def checkpoint_writer(model, optimizer, step, config):
    """`write(binary_file)` of the checkpoint of `step`: the state as it is now, saved when called."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,  # optimizer steps completed; the next step trains on the reader's batch step + 1
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "run_id": config.get("run_id"),
        "config": _saved_config(config),
    }
    return lambda f: torch.save(state, f)


# ---------------------------------------------------------------- sharded checkpoints (--fsdp)

def _bytes_text(t):
    return base64.b64encode(t.numpy().tobytes()).decode()


def _text_bytes(text):
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def app_state(step, config, world_size):
    """A sharded checkpoint's record beside its tensors (JSON): what a .pt checkpoint holds but the state dicts,
    the random generators in text."""
    rng = rng_state()
    rng["torch"], rng["cuda"] = _bytes_text(rng["torch"]), [_bytes_text(t) for t in rng["cuda"]]
    rng["numpy"]["keys"] = rng["numpy"]["keys"].tolist()
    return {"format": CHECKPOINT_FORMAT, "kind": "sharded", "step": step, "run_id": config.get("run_id"),
            "world_size": world_size, "config": _saved_config(config), "rng": rng}


def read_app_state(directory):
    """A sharded checkpoint's record (`app_state`), its random generators' states as tensors again."""
    with open(os.path.join(directory, SHARDED_APP_STATE)) as f:
        state = json.load(f)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("kind") != "sharded":
        raise ValueError(f"{directory} is not a sharded checkpoint of this app (format {CHECKPOINT_FORMAT})")
    rng = state["rng"]
    rng["torch"], rng["cuda"] = _text_bytes(rng["torch"]), [_text_bytes(t) for t in rng["cuda"]]
    rng["numpy"]["keys"] = torch.tensor(rng["numpy"]["keys"], dtype=torch.int64)
    return state


def save_sharded(model, optimizer, directory):
    """Every process writes its shards of the model's and the optimizer's state into `directory` (collective;
    each file fsynced before this returns on any process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _as_error("write", directory):
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 storage_writer=dcp.FileSystemWriter(directory, sync_files=True))


def _load_sharded(model, optimizer, directory):
    """The sharded checkpoint in `directory` into `model` (sharded or not) and `optimizer`, whatever number of
    processes wrote it (collective when a process group is up)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    _dcp_load(state, directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def read_sharded_weights(directory):
    """{name: tensor} of the model in a sharded checkpoint, whole, read by this process alone (export)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    weights = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in entries.items()
               if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    _dcp_load({"model": weights}, directory, alone=True)
    return weights


def _dcp_load(state, directory, alone=False):
    """torch.distributed.checkpoint.load of `directory` into `state`: collective when a process group is up
    (unless `alone`), else by this process (without the warning PyTorch then gives each time)."""
    import torch.distributed.checkpoint as dcp

    alone = alone or not torch.distributed.is_initialized()
    with warnings.catch_warnings(), _as_error("read", directory):
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.FileSystemReader(directory), no_dist=alone)


@contextlib.contextmanager
def _as_error(action, directory):
    """torch.distributed.checkpoint's CheckpointException (a BaseException: `except Exception` would let it
    through the app's failure handling) as an OSError naming the directory and each process's failure."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as err:
        causes = [cause[0] if isinstance(cause, tuple) else cause for _, cause in sorted(err.failures.items())]
        listed = "; ".join(f"process {rank}: {type(cause).__name__}: {cause}"
                           for rank, cause in zip(sorted(err.failures), causes))
        raise OSError(f"cannot {action} the sharded checkpoint {directory} ({listed}; {_free_space(directory)})") \
            from err


def free_space(path):
    """(the nearest existing directory of `path`, the bytes free on its file system)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return path, shutil.disk_usage(path).free


def _free_space(path):
    """How much room the file system of `path` has left (a full disk shows in DCP's errors only as a short
    write)."""
    try:
        return f"its file system has {free_space(path)[1] / 2**20:,.0f} MiB free"
    except OSError:
        return "its file system cannot be read"


def newest_checkpoint(run_dir):
    """(path, step) of the run's newest checkpoint, latest.pt or a sharded one (a run may have switched
    between --fsdp and not), or None; (latest.pt, None) if latest.pt cannot be read."""
    found = []
    steps = sharded_checkpoint_steps(run_dir)
    if steps:
        found.append((sharded_checkpoint_path(run_dir, steps[-1]), steps[-1]))
    path = checkpoint_path(run_dir)
    if os.path.exists(path):
        try:
            found.append((path, int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])))
        except Exception:  # truncated or corrupt: returned as it is, so that reading it names the damage
            return path, None
    return max(found, key=lambda entry: entry[1]) if found else None


def restore(model, optimizer, path):
    """Load the checkpoint at `path` (latest.pt or a sharded checkpoint's directory) into `model` and
    `optimizer`, sharded (FSDP2) or not, and return its record: step, run_id, rng, config."""
    if os.path.isdir(path):
        state = read_app_state(path)
        _load_sharded(model, optimizer, path)
        return state
    saved = _read_pt(path)
    if _sharded(model):  # a run checkpointed without --fsdp, resumed with it: each process keeps its shards
        _load_whole_into_sharded(model, optimizer, saved)
    else:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    return saved


def _load_whole_into_sharded(model, optimizer, saved):
    """Whole tensors (a latest.pt) into an FSDP2 model and its optimizer: each process copies its shard of
    every weight and of every optimizer state shaped like its parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def shard_of(whole, like):
        return distribute_tensor(whole.to(like.dtype), like.device_mesh, like.placements)

    targets = model.state_dict()
    missing = set(targets) - set(saved["model"])
    if missing:
        raise ValueError(f"the checkpoint lacks {sorted(missing)[:3]}")
    with torch.no_grad():
        for key, target in targets.items():
            whole = saved["model"][key]
            (target.to_local() if isinstance(target, DTensor) else target).copy_(
                shard_of(whole, target).to_local() if isinstance(target, DTensor) else whole)
    optimizer.load_state_dict(saved["optimizer"])  # positions as the app builds its groups, sharded or not
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape \
                        and not isinstance(value, DTensor):
                    state[key] = shard_of(value, p)


def _sharded(model):
    return any(is_dtensor(p) for p in model.parameters())


def nonfinite_state(model, optimizer):
    """Names of the model's and optimizer's floating-point tensors holding a NaN or an infinity ([] if none):
    one fused reduction per tensor, a single synchronisation. Sharded (FSDP2): each process checks its shards
    and every process gets the same names (one all-reduce)."""
    tensors = {f"model.{name}": t for name, t in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.state[{index}].{key}": v for key, v in state.items() if torch.is_tensor(v)})
    tensors = {name: t.to_local() if hasattr(t, "to_local") else t for name, t in tensors.items()}
    names = [name for name, t in tensors.items() if t.is_floating_point()]
    if not names:
        return []
    bad = torch.stack([(~torch.isfinite(tensors[name])).any() for name in names]).float()
    if _sharded(model):
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return [name for name, flag in zip(names, bad.cpu().tolist()) if flag]


def load_checkpoint(run_dir, map_location="cpu", step=None):
    """The checkpoint dict (latest.pt, or the kept one of `step`), read with weights_only=True (no code runs
    on load)."""
    return _read_pt(checkpoint_path(run_dir, step), map_location)


def _read_pt(path, map_location="cpu"):
    state = torch.load(path, map_location=map_location, weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, this code reads {CHECKPOINT_FORMAT}")
    return state
