"""torchrun with 2 CPU processes (gloo) against 1 process on the same global batch: same dot products,
same losses, same parameters within fp32 tolerance."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ghost_results.grad_store import GradStore
from ghost_results.results_io import read_run
from GradDotProd_LM import train
from GradDotProd_LM.model import build_model

B, STEPS = 4, 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # config_file.py lives here


# a --model_config file: OPT, whose feed-forward block sees rows flattened to [rows·T, d] (each rank has its own rows)
OPT_JSON = dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=64, max_position_embeddings=64)


def flags(data_dir, results_dir, run_name, model_flags=("--architecture", "GPT2-Tiny")):
    # SGD with a large step: the parameters then move by the summed gradients, so comparing them compares
    # the DDP-averaged training gradients directly (Adam's first steps would amplify round-off near g = 0).
    return [*model_flags, "--batch_size", str(B), "--seq_len", "32", "--val_batch_size", "2",
            "--max_steps", str(STEPS), "--optimizer", "SGD", "--learning_rate", "0.5", "--min_lr", "0.05",
            "--warmup_step", "0", "--grad_clip", "0", "--eval_interval", str(STEPS), "--eval_iter", "1",
            "--eval_bs", "2", "--dot_prod_save_interval", "2", "--data_dir", data_dir,
            "--results_dir", results_dir, "--run_name", run_name]


@pytest.mark.parametrize("model, value", [("GPT2-Tiny", "first_order"), ("Llama-Tiny", "first_order"),
                                          ("Pythia-14M", "first_order"), ("opt.json", "first_order"),
                                          ("Llama-Tiny-lowrank", "first_order"), ("GPT2-Tiny", "midpoint")])
def test_two_gloo_processes_equal_one_process(model, value, data_dir, tmp_path):
    """midpoint: each rank projects its rows on a vector built from the all-reduced .grad."""
    results = str(tmp_path / "results")
    model_config = OPT_JSON if model == "opt.json" else None
    if model_config is not None:
        (tmp_path / model).write_text(json.dumps(model_config))
        model_flags = ("--model_config", str(tmp_path / model))
    else:
        model_flags = ("--architecture", model.removesuffix("-lowrank"))
    lowrank = dict(attention="lowrank", attention_rank=4, attention_block=8) if model.endswith("-lowrank") else {}
    model_flags += tuple(arg for key, v in lowrank.items() for arg in (f"--{key}", str(v)))  # 4 blocks of 8 positions
    if model == "GPT2-Tiny" and value == "first_order":  # each rank projects its rows; rank 0 stores them all
        model_flags += ("--project_dim", "400", "--project_dtype", "float32")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "GradDotProd_LM.train", *flags(data_dir, results, "two", model_flags), "--value", value]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    with open(os.path.join(results, "two", "config.json")) as f:
        assert json.load(f)["attention"] == lowrank.get("attention", "standard")
    assert train.main(flags(data_dir, results, "one", model_flags) + ["--value", value]) == 0

    two, one = read_run(os.path.join(results, "two"), strict=True), read_run(os.path.join(results, "one"), strict=True)
    assert two.missing_steps == [] and two.duplicate_steps == []
    np.testing.assert_array_equal(two.columns["step"], np.repeat(np.arange(1, STEPS + 1), B))
    np.testing.assert_array_equal(two.columns["sample_index"], one.columns["sample_index"])
    np.testing.assert_array_equal(two.columns["token_offset"], one.columns["token_offset"])
    np.testing.assert_allclose(two.columns["batch_weight"], one.columns["batch_weight"], rtol=1e-7)
    scale = np.abs(one.columns["dot_products"]).max()
    np.testing.assert_allclose(two.columns["dot_products"], one.columns["dot_products"], rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(two.columns["train_loss"], one.columns["train_loss"], rtol=1e-5)

    if "--project_dim" in model_flags:
        stores = [GradStore(os.path.join(results, run, "grad_store")) for run in ("two", "one")]
        assert stores[0].provenance().drop(columns=["lr", "weight"]).equals(
            stores[1].provenance().drop(columns=["lr", "weight"]))
        one_rows = stores[1].rows(np.arange(len(stores[1])))
        np.testing.assert_allclose(stores[0].rows(np.arange(len(stores[0]))), one_rows, rtol=1e-4,
                                   atol=1e-5 * np.abs(one_rows).max())

    def params(run):
        return torch.load(os.path.join(results, run, "checkpoints", "latest.pt"), weights_only=True)["model"]

    p_two, p_one = params("two"), params("one")
    torch.manual_seed(42)  # the runs' seed: their initial weights
    initial = build_model(model.removesuffix("-lowrank"), model_config=model_config, **lowrank).state_dict()
    assert max((p_one[k] - initial[k]).abs().max().item() for k in p_one) > 1e-2  # training moved them
    for name, value in p_one.items():
        torch.testing.assert_close(p_two[name], value, rtol=1e-5, atol=1e-5, msg=name)
