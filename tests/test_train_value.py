"""The app's --value flag: the engine's estimator, kept in config.json and in every dot-product file."""
import json
import os

import numpy as np
import pytest

from ghost_engine import engine
from ghost_results import analysis, report, results_io
from ghost_results.results_io import read_run
from GradDotProd_LM import train
from pile_tools import ensure_sample_dataset


def test_results_io_knows_the_engine_estimators():
    assert results_io.VALUES == engine.VALUES
    assert results_io.LR_INSIDE == engine.LR_INSIDE


@pytest.mark.parametrize("flags, message", [
    (["--value", "shapley"], "--value: invalid choice"),
    (["--value", "cosine", "--method", "Regular"], "--value cosine needs --method GradDotProd"),
    (["--value", "adamw", "--optimizer", "SGD"], "--value adamw needs --optimizer AdamW"),
    (["--value", "adamw_vt", "--optimizer", "SGD"], "--value adamw_vt needs --optimizer AdamW"),
    (["--value", "midpoint", "--compile"], "--value midpoint runs the engine's hooks eagerly"),
])
def test_bad_value_flags_exit_2(flags, message, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert train.main(["--data_dir", str(tmp_path / "data"), "--results_dir", str(tmp_path / "r")] + flags) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")


def test_a_cosine_run_records_its_estimator(tmp_path):
    data_dir = ensure_sample_dataset(str(tmp_path / "sample"))
    flags = ["--architecture", "GPT2-Tiny", "--batch_size", "2", "--seq_len", "16", "--val_batch_size", "1",
             "--max_steps", "2", "--warmup_step", "1", "--eval_interval", "100", "--dot_prod_save_interval", "1",
             "--data_dir", data_dir, "--results_dir", str(tmp_path / "results"), "--run_name", "cos",
             "--value", "cosine"]
    assert train.main(flags) == 0
    run_dir = tmp_path / "results" / "cos"
    with open(run_dir / "config.json") as f:
        assert json.load(f)["value"] == "cosine"
    for name in ("iter_000001.parquet", "iter_000002.parquet"):
        assert results_io.file_header(run_dir / "grad_dotprods" / name)["value"] == "cosine"
    values = read_run(str(run_dir), strict=True).columns["dot_products"]
    assert values.shape == (4,) and np.all(np.abs(values) <= 1.0) and np.any(values != 0)
    assert report.main([str(run_dir), "--out", str(tmp_path / "report")]) == 0  # its values are the cosines
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Estimator: `cosine`" in text and "cosine similarity" in text


def test_values_follow_the_estimator():
    """first_order: lr * w * dot; adamw: w * dot (the learning rate is inside D); cosine: no first-order form."""
    columns = {"dot_products": np.array([2.0, -4.0]), "lr": np.array([0.5, 0.5]), "batch_weight": np.array([0.25, 0.75]),
               "step": np.array([1, 1])}
    np.testing.assert_allclose(analysis.compute_values(columns), [0.25, -1.5])
    for value in ("adamw", "adamw_vt", "midpoint", "second_order"):
        np.testing.assert_allclose(analysis.compute_values(columns, value=value), [0.5, -3.0])
    np.testing.assert_allclose(analysis.compute_values(columns, "raw", value="cosine"), [2.0, -4.0])
    with pytest.raises(ValueError, match="cosine run has no first-order value"):
        analysis.compute_values(columns, value="cosine")


def test_a_midpoint_run_is_exact_at_step_1(tmp_path):
    """--value midpoint with SGD: step 1's values against the real torch SGD step on a float64 copy of the
    initial model, differentiated along each row's gradient (tests/_reference.py); the report names it."""
    import torch
    from _reference import reference_dot_products, reference_update_values

    from GradDotProd_LM.model import build_model
    from pile_tools.reader import PileReader

    seed, rows, T, val_rows, lr = 7, 3, 16, 2, 0.5
    data_dir = ensure_sample_dataset(str(tmp_path / "sample"))
    flags = ["--architecture", "GPT2-Tiny", "--batch_size", str(rows), "--seq_len", str(T), "--val_batch_size",
             str(val_rows), "--max_steps", "1", "--warmup_step", "1", "--learning_rate", str(lr), "--min_lr", "0",
             "--grad_clip", "0", "--optimizer", "SGD", "--eval_interval", "100", "--dot_prod_save_interval", "1",
             "--seed", str(seed), "--data_dir", data_dir, "--results_dir", str(tmp_path / "results"),
             "--run_name", "mid", "--value", "midpoint"]
    assert train.main(flags) == 0
    run_dir = tmp_path / "results" / "mid"
    run = read_run(str(run_dir), strict=True)
    assert run.value == "midpoint"

    torch.manual_seed(seed)
    model = build_model("GPT2-Tiny")
    X = torch.from_numpy(PileReader(data_dir, split="train", seed=seed).get_batch(1, rows, T).tokens[:, :T])
    X_val = torch.from_numpy(PileReader(data_dir, split="validation", seed=seed).fixed_batch(val_rows, T).tokens[:, :T])
    expected = sum(reference_update_values(model, torch.optim.SGD(model.parameters(), lr=lr), X, X, X_val, X_val,
                                           "midpoint").values()).numpy()
    np.testing.assert_allclose(run.columns["dot_products"], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    dots = sum(reference_dot_products(model.double(), X, X, X_val, X_val).values()).numpy()
    first_order = lr * dots
    assert np.abs(expected - first_order).max() > 1e-2 * np.abs(first_order).max()  # a test that can tell
    # the first-order dot products of the same rows are recorded beside the estimator's, and valued as such
    recorded = run.columns["first_order_dot_products"]
    np.testing.assert_allclose(recorded, dots, rtol=1e-4, atol=1e-4 * np.abs(dots).max())
    np.testing.assert_allclose(analysis.compute_values(run.columns, dots="first_order_dot_products"),
                               first_order * run.columns["batch_weight"], rtol=1e-4,
                               atol=1e-4 * np.abs(first_order).max())
    assert report.main([str(run_dir), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Estimator: `midpoint`" in text and "half the batch gradient" in text
    assert "## Against first-order values" in text and f"({rows} rows, {rows} samples)" in text


def test_the_default_value_under_adamw_is_adamw_and_exact(tmp_path):
    """No --value, the app's AdamW: config.json and the files say adamw, and step 3's values equal
    w_i·<D ⊙ grad L_val, grad l_i> with D from the AdamW state that step started from (the checkpoint kept at
    step 2), float64 per-sample gradients by torch.func (tests/_reference.py); the report names the estimator
    and leaves out steps 1-2, AdamW's first updates."""
    import torch
    from _reference import adamw_sensitivity, reference_adamw_values

    from GradDotProd_LM.checkpoint import load_checkpoint
    from GradDotProd_LM.model import build_model
    from GradDotProd_LM.training import build_optimizer
    from pile_tools.reader import PileReader

    seed, rows, T, val_rows = 5, 3, 16, 2
    data_dir = ensure_sample_dataset(str(tmp_path / "sample"))
    flags = ["--architecture", "GPT2-Tiny", "--batch_size", str(rows), "--seq_len", str(T), "--val_batch_size",
             str(val_rows), "--max_steps", "3", "--warmup_step", "1", "--learning_rate", "1e-3",
             "--grad_clip", "0", "--eval_interval", "100", "--dot_prod_save_interval", "1",
             "--checkpoint_interval", "2", "--keep_checkpoints", "0", "--seed", str(seed), "--data_dir", data_dir,
             "--results_dir", str(tmp_path / "results"), "--run_name", "default"]
    assert train.main(flags) == 0
    run_dir = tmp_path / "results" / "default"
    with open(run_dir / "config.json") as f:
        assert json.load(f)["value"] == "adamw"
    run = read_run(str(run_dir), strict=True)
    assert run.value == "adamw" and sorted(set(run.columns["step"])) == [1, 2, 3]

    saved = load_checkpoint(str(run_dir), step=2)
    model = build_model("GPT2-Tiny")
    model.load_state_dict(saved["model"])
    optimizer = build_optimizer(model, {"optimizer": "AdamW", "learning_rate": 1e-3}, torch.device("cpu"))
    optimizer.load_state_dict(saved["optimizer"])
    step3 = run.columns["step"] == 3
    for group in optimizer.param_groups:
        group["lr"] = float(run.columns["lr"][step3][0])  # the scheduler's rate of step 3
    named = dict(model.named_parameters())
    D = adamw_sensitivity(optimizer, named)
    X = torch.from_numpy(PileReader(data_dir, split="train", seed=seed).get_batch(3, rows, T).tokens[:, :T])
    X_val = torch.from_numpy(PileReader(data_dir, split="validation", seed=seed).fixed_batch(val_rows, T).tokens[:, :T])
    expected = sum(reference_adamw_values(model.double(), X, X, X_val, X_val, D).values()).numpy()
    got = run.columns["dot_products"][step3]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

    assert report.main([str(run_dir), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Estimator: `adamw`" in text and "Steps 1–2 left out" in text
    assert f"Rows: {rows} occurrences" in text  # step 3's rows only
    # --all_steps values every step, with a caution naming AdamW's first two
    assert report.main([str(run_dir), "--out", str(tmp_path / "all"), "--all_steps"]) == 0
    text = (tmp_path / "all" / "report.md").read_text()
    assert f"Rows: {3 * rows} occurrences" in text and "Caution: steps 1–2 are valued" in text
    assert "left out" not in text.split("## Validation batch")[0]


def test_the_default_value_under_sgd_is_first_order(tmp_path):
    """No --value with --optimizer SGD (and a Regular run): first_order, as config.json says; a resume that
    passes --value auto keeps the run's estimator."""
    data_dir = ensure_sample_dataset(str(tmp_path / "sample"))
    common = ["--architecture", "GPT2-Tiny", "--batch_size", "2", "--seq_len", "16", "--max_steps", "1",
              "--warmup_step", "1", "--eval_interval", "100", "--data_dir", data_dir,
              "--results_dir", str(tmp_path / "results")]
    assert train.main(common + ["--optimizer", "SGD", "--run_name", "sgd"]) == 0
    assert train.main(common + ["--method", "Regular", "--run_name", "regular"]) == 0
    for name in ("sgd", "regular"):
        with open(tmp_path / "results" / name / "config.json") as f:
            assert json.load(f)["value"] == "first_order"
    resumed = common + ["--optimizer", "SGD", "--run_name", "sgd", "--resume", "--max_steps", "2", "--value", "auto"]
    assert train.main(resumed) == 0
    assert sorted(set(read_run(str(tmp_path / "results" / "sgd"), strict=True).columns["step"])) == [1, 2]
