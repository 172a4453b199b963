"""The integrations against the training app: given the app's initial GPT2-Tiny, its training rows in its order,
its validation rows, its AdamW and learning-rate schedule, gradient accumulation 2 and clipping 1.0,
GradDotProdTrainer and GradDotProdCallback record for steps 1 and 2 the values the app records for the same rows
(total and per parameter, weights, losses, learning rates, provenance), in files the same loader reads."""
import copy
import os

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import TrainingArguments

from ghost_integrations import IndexedDataset
from ghost_integrations.hf import GradDotProdTrainer
from ghost_integrations.lightning import GradDotProdCallback, training_loss
from ghost_results.grad_store import GradStore
from ghost_results.results_io import read_run
from GradDotProd_LM import train, training
from GradDotProd_LM.model import build_model
from ghost_results.run_directory import read_json, read_valset_tokens
from pile_tools.reader import PileReader

SEED, B, T, BV, ACCUM, STEPS = 42, 4, 32, 2, 2, 2
PROJECT_DIM = 500  # every run below also keeps projected gradients
COLUMNS = ("token_count", "batch_weight", "lr", "train_loss", "val_loss", "domain", "doc_id", "token_offset")


@pytest.fixture(scope="module")
def app(data_dir, tmp_path_factory):
    """The app's run (steps 1 and 2; the learning rate differs between them) and what it started from."""
    results = str(tmp_path_factory.mktemp("app"))
    assert train.main(["--architecture", "GPT2-Tiny", "--batch_size", str(B), "--seq_len", str(T),
                       "--val_batch_size", str(BV), "--grad_accum", str(ACCUM), "--max_steps", str(STEPS),
                       "--warmup_step", "1", "--lr_decay_steps", "3", "--learning_rate", "1e-3", "--min_lr", "1e-4",
                       "--eval_interval", str(STEPS), "--eval_iter", "1", "--eval_bs", "2",
                       "--dot_prod_save_interval", "1", "--seed", str(SEED), "--data_dir", data_dir,
                       "--results_dir", results, "--run_name", "app", "--project_dim", str(PROJECT_DIM),
                       "--project_dtype", "float32"]) == 0
    run_dir = os.path.join(results, "app")
    cfg = read_json(os.path.join(run_dir, "config.json"))
    assert cfg["grad_clip"] == 1.0 and cfg["optimizer"] == "AdamW"
    torch.manual_seed(cfg["seed"])  # the app's initial weights
    model = build_model(cfg["architecture"], n_positions=max(1024, T), vocab_pad_multiple=cfg["vocab_pad_multiple"],
                        vocab_size=cfg["data_tokenizer"]["vocab_size"])
    reader = PileReader(data_dir, split="train", seed=cfg["seed"])
    items = []  # the rows of steps 1, 2 in the app's order, labels = inputs (the model shifts), with provenance
    for step in range(1, STEPS + 1):
        batch = reader.get_batch(step, B, T)
        tokens = torch.from_numpy(batch.tokens[:, :T])
        items += [{"input_ids": tokens[i], "labels": tokens[i], "domain": batch.domain[i],
                   "doc_id": int(batch.doc_id[i]), "token_offset": int(batch.token_offset[i])} for i in range(B)]
    X_val = torch.from_numpy(read_valset_tokens(run_dir)[:, :T])
    return read_run(run_dir, per_layer=True, strict=True), cfg, model, items, {"input_ids": X_val, "labels": X_val}


def optimizer_and_schedule(model, cfg):
    """The app's AdamW (its weight-decay groups) with its learning rate of step t = schedule index t - 1."""
    optimizer = training.build_optimizer(model, cfg, torch.device("cpu"))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: training.lr_at(i + 1, cfg) / cfg["learning_rate"])
    return optimizer, schedule


def assert_same_rows(got, expected, prefix=""):
    """Every step's rows equal the app's: the same rows in the same order, their values to float32 round-off."""
    np.testing.assert_array_equal(got.columns["step"], expected.columns["step"])
    np.testing.assert_array_equal(got.columns["sample_index"] - B * (got.columns["step"] - 1),
                                  expected.columns["sample_index"])  # index in the training set, in the batch
    for name in COLUMNS:
        if expected.columns[name].dtype.kind in "iUO":
            np.testing.assert_array_equal(got.columns[name], expected.columns[name], err_msg=name)
        else:
            np.testing.assert_allclose(got.columns[name], expected.columns[name], rtol=1e-5, err_msg=name)
    per_parameter = sorted(n for n in expected.columns if n.startswith("per_layer/"))
    assert sorted(n.replace(f"per_layer/{prefix}", "per_layer/") for n in got.columns
                  if n.startswith("per_layer/")) == per_parameter
    for step in range(1, STEPS + 1):
        rows = expected.columns["step"] == step
        scale = np.abs(expected.columns["dot_products"][rows]).max()
        np.testing.assert_allclose(got.columns["dot_products"][rows], expected.columns["dot_products"][rows],
                                   rtol=1e-4, atol=1e-5 * scale, err_msg=f"step {step}")
        for name in per_parameter:
            np.testing.assert_allclose(got.columns[name.replace("per_layer/", f"per_layer/{prefix}")][rows],
                                       expected.columns[name][rows], rtol=1e-4, atol=1e-5 * scale,
                                       err_msg=f"step {step} {name}")


def assert_same_store(run_dir, app_dir, same_names=True):
    """The run's gradient stores hold the app's rows (steps, rows, provenance, learning rates, weights) and, where
    the parameters have the app's names (hence the same matrices), the app's projections."""
    for name in ("grad_store", "grad_store_validation"):
        got, expected = GradStore(os.path.join(run_dir, name)), GradStore(os.path.join(app_dir, name))
        got_prov, expected_prov = got.provenance(), expected.provenance()
        got_prov["row"] -= B * (got_prov["step"] - 1) * (got_prov["row"] >= 0)  # the Trainer's dataset index
        for column in ("step", "row", "doc_id", "token_offset", "domain", "n_tokens"):
            np.testing.assert_array_equal(got_prov[column], expected_prov[column], err_msg=column)
        np.testing.assert_allclose(got_prov["lr"], expected_prov["lr"], rtol=1e-6)
        np.testing.assert_allclose(got_prov["weight"], expected_prov["weight"], rtol=1e-6)
        rows, expected_rows = got.rows(np.arange(len(got))), expected.rows(np.arange(len(expected)))
        if same_names:
            np.testing.assert_allclose(rows, expected_rows, rtol=1e-4, atol=1e-5 * np.abs(expected_rows).max())
        else:
            assert rows.shape == expected_rows.shape and np.isfinite(rows).all() and np.abs(rows).max() > 0


def test_trainer_records_the_apps_values_for_the_same_rows(app, tmp_path):
    expected, cfg, initial, items, val_batch = app
    model = copy.deepcopy(initial)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=B // ACCUM,
                             gradient_accumulation_steps=ACCUM, max_steps=STEPS, max_grad_norm=cfg["grad_clip"],
                             use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
                             train_sampling_strategy="sequential", seed=SEED)
    trainer = GradDotProdTrainer(model=model, args=args, train_dataset=items, val_batch=val_batch,
                                 optimizers=optimizer_and_schedule(model, cfg), run_dir=tmp_path / "run",
                                 save_interval=1, project_dim=PROJECT_DIM, project_dtype="float32",
                                 results_format="both")  # pickles too (the default writes Parquet alone)
    trainer.train()

    files = sorted(os.listdir(tmp_path / "run" / "grad_dotprods"))
    assert files == ["iter_000001.parquet", "iter_000001.pkl", "iter_000002.parquet", "iter_000002.pkl"]
    got = read_run(tmp_path / "run", per_layer=True, strict=True)
    assert [os.path.basename(p) for p in got.files] == ["iter_000001.parquet", "iter_000002.parquet"]
    assert_same_rows(got, expected)
    assert_same_store(tmp_path / "run", os.path.dirname(expected.files[0]).removesuffix("/grad_dotprods"))
    logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]  # the training rows' loss
    np.testing.assert_allclose(logged, [expected.columns["train_loss"][expected.columns["step"] == s][0]
                                        for s in (1, 2)], rtol=1e-4)  # the Trainer logs it rounded


class AppModule(L.LightningModule):
    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg

    def training_step(self, batch, batch_idx):
        return training_loss(self, self.model, batch)

    def configure_optimizers(self):
        optimizer, schedule = optimizer_and_schedule(self.model, self.cfg)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_lightning_records_the_apps_values_for_the_same_rows(app, tmp_path):
    expected, cfg, initial, items, val_batch = app
    trainer = L.Trainer(max_steps=STEPS, accumulate_grad_batches=ACCUM, gradient_clip_val=cfg["grad_clip"],
                        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[GradDotProdCallback(val_batch, run_dir=tmp_path / "run", save_interval=1,
                                                       project_dim=PROJECT_DIM, project_dtype="float32")])
    trainer.fit(AppModule(copy.deepcopy(initial), cfg),
                DataLoader(IndexedDataset(items), batch_size=B // ACCUM, shuffle=False))

    assert sorted(os.listdir(tmp_path / "run" / "grad_dotprods")) == ["iter_000001.parquet", "iter_000002.parquet"]
    got = read_run(tmp_path / "run", per_layer=True, strict=True)
    assert [os.path.basename(p) for p in got.files] == ["iter_000001.parquet", "iter_000002.parquet"]
    assert_same_rows(got, expected, prefix="model.")
    # the parameters are named model.*: the matrices, drawn from the names, differ from the app's
    assert_same_store(tmp_path / "run", os.path.dirname(expected.files[0]).removesuffix("/grad_dotprods"), False)
