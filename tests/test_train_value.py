"""The app's --value flag: the engine's estimator, kept in config.json and in every dot-product file."""
import json
import os

import numpy as np
import pytest

from ghost_engine import engine
from ghost_results import analysis, report, results_io
from ghost_results.results_io import load_run, safe_load_pickle
from GradDotProd_LM import train
from pile_tools import ensure_sample_dataset


def test_results_io_knows_the_engine_estimators():
    assert results_io.VALUES == engine.VALUES


@pytest.mark.parametrize("flags, message", [
    (["--value", "second_order"], "--value: invalid choice"),
    (["--value", "cosine", "--method", "Regular"], "--value cosine needs --method GradDotProd"),
    (["--value", "adamw", "--optimizer", "SGD"], "--value adamw needs --optimizer AdamW"),
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
    for name in ("iter_000001.pkl", "iter_000002.pkl"):
        assert safe_load_pickle(str(run_dir / "grad_dotprods" / name))["value"] == "cosine"
    values = load_run(str(run_dir), strict=True).columns["dot_products"]
    assert values.shape == (4,) and np.all(np.abs(values) <= 1.0) and np.any(values != 0)
    assert report.main([str(run_dir), "--out", str(tmp_path / "report")]) == 0  # its values are the cosines
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Estimator: `cosine`" in text and "cosine similarity" in text


def test_values_follow_the_estimator():
    """first_order: lr * w * dot; adamw: w * dot (the learning rate is inside D); cosine: no first-order form."""
    columns = {"dot_products": np.array([2.0, -4.0]), "lr": np.array([0.5, 0.5]), "batch_weight": np.array([0.25, 0.75]),
               "step": np.array([1, 1])}
    np.testing.assert_allclose(analysis.compute_values(columns), [0.25, -1.5])
    np.testing.assert_allclose(analysis.compute_values(columns, value="adamw"), [0.5, -3.0])
    np.testing.assert_allclose(analysis.compute_values(columns, "raw", value="cosine"), [2.0, -4.0])
    with pytest.raises(ValueError, match="cosine run has no first-order value"):
        analysis.compute_values(columns, value="cosine")
