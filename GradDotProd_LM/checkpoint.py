"""Checkpoints that `torch.load(weights_only=True)` can read: tensors, numbers, strings, lists, dicts.

This module makes a checkpoint's bytes (`checkpoint_writer`) and reads them back; where they go, in which
order and how durably (checkpoints/latest.pt, the kept series step_XXXXXX.pt) is the run directory's owner's
business, ghost_results.run_directory.RunDirectory.checkpoint.

A checkpoint is written only after the step's dot products were flushed, so the files under
grad_dotprods/ always cover exactly steps 1..checkpoint step when training resumes from it. It carries the
run's identity ("run_id"): a resume takes only a checkpoint of its own run. A checkpoint only ever holds
finite weights and optimizer state (`nonfinite_state`): after a divergence the last finite one is kept.
"""
import random

import numpy as np
import torch

from ghost_results.run_directory import checkpoint_path

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


def checkpoint_writer(model, optimizer, step, config):
    """`write(binary_file)` of the checkpoint of `step`: the state as it is now, saved when called."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,  # optimizer steps completed; the next step trains on the reader's batch step + 1
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "run_id": config.get("run_id"),
        "config": {k: v for k, v in config.items()
                   if isinstance(v, (int, float, str, bool, type(None))) or k in ("model_config", "data_tokenizer")},
    }
    return lambda f: torch.save(state, f)


def nonfinite_state(model, optimizer):
    """Names of the model's and optimizer's floating-point tensors holding a NaN or an infinity ([] if none):
    one fused reduction per tensor, a single synchronisation."""
    tensors = {f"model.{name}": t for name, t in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optimizer.state[{index}].{key}": v for key, v in state.items() if torch.is_tensor(v)})
    names = [name for name, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(tensors[name]).all() for name in names]).cpu()
    return [name for name, ok in zip(names, finite.tolist()) if not ok]


def load_checkpoint(run_dir, map_location="cpu", step=None):
    """The checkpoint dict (latest.pt, or the kept one of `step`), read with weights_only=True (no code runs
    on load)."""
    path = checkpoint_path(run_dir, step)
    state = torch.load(path, map_location=map_location, weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, this code reads {CHECKPOINT_FORMAT}")
    return state
