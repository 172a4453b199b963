"""GradDotProdCallback (ghost_integrations.lightning) against the float64 torch.func reference, plain
Lightning and the engine driven by hand: dot products, .grad, the logged loss, the files it writes."""
import copy
import json

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from _integrations import (VAL_BATCH_FORMS, assert_grads_close, assert_same_records, assert_same_weights, check_step,
                           check_val_batch_form, engine_by_hand, model_and_rows, rel_err, train_items, val_batch_form)
from _models import tiny_llama
from _reference import reference_train_grad, reference_update_values
from ghost_integrations import IndexedDataset
from ghost_integrations.lightning import GradDotProdCallback, training_loss
from ghost_results.results_io import read_run


class LitLM(L.LightningModule):
    """The user's module: the one line of glue is training_loss(...) in place of self.model(**batch).loss."""

    def __init__(self, model, manual=False):
        super().__init__()
        self.model = model
        self.automatic_optimization = not manual
        self.logged, self.first_grads = [], None

    def training_step(self, batch, batch_idx):
        loss = training_loss(self, self.model, batch)
        self.log("train_loss", loss)
        self.logged.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_before_optimizer_step(self, optimizer):
        if self.first_grads is None:
            self.first_grads = {n: p.grad.detach().clone() for n, p in self.named_parameters()}


class FSDP2LM(LitLM):
    """LitLM sharded by FSDP2 under ModelParallelStrategy (configure_model: fully_shard on every decoder block and on
    the Hugging Face model, over the data-parallel mesh), unsharded under other strategies; SGD or AdamW."""

    def __init__(self, model, optimizer):
        super().__init__(model)
        self.optimizer_name = optimizer

    def configure_model(self):
        if self.device_mesh is None:  # not ModelParallelStrategy
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return torch.optim.AdamW(self.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1)  # eps: see fsdp_training_args


def fsdp_rows():
    """Rows where every position is a target: Lightning averages micro-batch means, which the 2 processes group
    otherwise than 1 process (rows 0, 2 | 4, 6 and 1, 3 | 5, 7 against 0-3 | 4-7); with equal target counts both are
    the mean over the step's targets."""
    model, X, _, X_val, Y_val = model_and_rows(6)
    return model, X, X.clone(), X_val, Y_val


def fsdp_fit(out_dir, value, strategy):
    """2 optimizer steps of 8 rows (accumulate_grad_batches=2, clipping at 0.5) of FSDP2LM with the callback: on 2
    processes under `strategy` (ModelParallelStrategy) with 2 rows per micro-batch, or on 1 ("auto") with 4;
    value first_order with SGD, auto with AdamW. Returns (trainer, module)."""
    import os

    from lightning.pytorch.strategies import ModelParallelStrategy

    model, X, Y, X_val, Y_val = fsdp_rows()
    module = FSDP2LM(model, "sgd" if value == "first_order" else "adamw")
    processes = 2 if isinstance(strategy, ModelParallelStrategy) else 1
    callback = GradDotProdCallback({"input_ids": X_val, "labels": Y_val}, run_dir=os.path.join(out_dir, "run"),
                                   save_interval=1, value=value)
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, gradient_clip_val=0.5, accelerator="cpu",
                        devices=processes, strategy=strategy, callbacks=[callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(out_dir))
    trainer.fit(module, DataLoader(IndexedDataset(train_items(X, Y)), batch_size=4 // processes, shuffle=False))
    return trainer, module


def fit(module, items, tmp_path, callback=None, steps=2, precision="32-true", indexed=True, accumulate=2, **kwargs):
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=accumulate, precision=precision, accelerator="cpu", devices=1,
                        **kwargs,
                        callbacks=[callback] if callback else [], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    data = IndexedDataset(items) if indexed else items
    trainer.fit(module, DataLoader(data, batch_size=2, shuffle=False))
    return trainer


def test_accumulated_step_equals_reference_and_plain_lightning(tmp_path):
    """accumulate_grad_batches=2, rows with different target counts: step 1's dot products are the float64
    reference's, .grad is plain Lightning's (the mean of the micro-batch means, halved), the loss
    training_step logs is the training rows' loss, and the run is in the app's format."""
    model, X, Y, X_val, Y_val = model_and_rows(5)
    initial = copy.deepcopy(model)
    module = LitLM(model)
    callback = GradDotProdCallback({"input_ids": X_val, "labels": Y_val}, run_dir=tmp_path / "run", save_interval=1)
    fit(module, train_items(X, Y), tmp_path, callback)

    run = read_run(tmp_path / "run", per_layer=True, strict=True)
    assert run.config["run_name"] == "run" and run.config["max_steps"] == 2 and len(run.files) == 2
    assert run.missing_steps == []
    np.testing.assert_array_equal(run.columns["sample_index"], np.arange(8))  # micro-batches 0-1, 2-3 | 4-5, 6-7
    check_step(run.columns, 1, initial, X, Y, X_val, Y_val, prefix="model.")
    micro = [(X[0:2], Y[0:2]), (X[2:4], Y[2:4])]
    ref_model = copy.deepcopy(initial).double()
    ref_grads = [reference_train_grad(ref_model, x, y) for x, y in micro]
    assert_grads_close(module.first_grads, {n: (ref_grads[0][n] + ref_grads[1][n]) / 2 for n in ref_grads[0]},
                       prefix="model.")
    with torch.no_grad():
        ref_losses = [float(ref_model(input_ids=x, labels=y).loss) for x, y in micro]
    np.testing.assert_allclose(module.logged[:2], ref_losses, rtol=1e-5)
    counts = (Y[:4, 1:] != -100).sum(1).double()
    weights = torch.cat([counts[:2] / counts[:2].sum(), counts[2:] / counts[2:].sum()]) / 2
    np.testing.assert_allclose(run.columns["batch_weight"][:4], weights, rtol=1e-6)
    assert run.columns["lr"][0] == pytest.approx(0.1)

    plain = LitLM(copy.deepcopy(initial))  # no callback: training_loss is the model's loss
    fit(plain, train_items(X, Y), tmp_path / "plain", steps=1)
    for name, grad in plain.first_grads.items():
        torch.testing.assert_close(module.first_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    np.testing.assert_allclose(module.logged[:2], plain.logged[:2], rtol=1e-6)


@pytest.mark.parametrize("form", VAL_BATCH_FORMS)
def test_every_documented_val_batch_key_gives_the_reference_values(tmp_path, form):
    """The callback with val_batch in every documented form (see the Trainer's test of the same name): step 1 (two
    micro-batches of 2 rows) equals the float64 reference run on the same inputs; valset.pkl holds the validation
    rows and their provenance."""
    model, X, Y, X_val, Y_val = model_and_rows(9)
    model.config.use_cache = False  # as in training (the Trainer sets it): position_ids then mark packed sequences
    val_batch, val_inputs, extra = val_batch_form(form, X_val, Y_val, X.shape[0])
    items = [{**item, **{k: v[i] for k, v in extra.items()}} for i, item in enumerate(train_items(X, Y))]
    initial = copy.deepcopy(model)
    callback = GradDotProdCallback(val_batch, run_dir=tmp_path / "run")
    fit(LitLM(model), items, tmp_path, callback, steps=1, accumulate=1)
    run = read_run(tmp_path / "run", per_layer=True, strict=True)
    check_val_batch_form(form, run.columns, tmp_path / "run", initial, {"input_ids": X, "labels": Y, **extra},
                         val_inputs, val_batch, prefix="model.")


def test_bf16_mixed_equals_the_engine_driven_by_hand(tmp_path):
    model, X, Y, X_val, Y_val = model_and_rows(6)
    initial = copy.deepcopy(model)
    module = LitLM(model)
    callback = GradDotProdCallback({"input_ids": X_val, "labels": Y_val}, run_dir=tmp_path / "run")
    fit(module, train_items(X, Y), tmp_path, callback, steps=1, precision="bf16-mixed")

    columns = read_run(tmp_path / "run", strict=True).columns
    result, grads = engine_by_hand(initial, [(X[0:2], Y[0:2], 0.5), (X[2:4], Y[2:4], 0.5)], X_val, Y_val,
                                   autocast=True)
    assert rel_err(columns["dot_products"], result.dot_products) <= 1e-5
    for name, grad in grads.items():
        assert rel_err(module.first_grads["model." + name], grad) <= 1e-5, name


def test_unsupported_use_raises_and_outside_a_trainer_the_loss_is_the_models(tmp_path):
    model, X, Y, X_val, Y_val = model_and_rows(7)
    batch = {"input_ids": X[:2], "labels": Y[:2], "sample_index": torch.arange(2)}
    torch.testing.assert_close(training_loss(LitLM(model), model, batch), model(input_ids=X[:2], labels=Y[:2]).loss)
    val_batch = {"input_ids": X_val, "labels": Y_val}
    with pytest.raises(ValueError, match="results_format='csv'"):
        GradDotProdCallback(val_batch, results_format="csv")
    with pytest.raises(ValueError, match="manual optimization"):
        fit(LitLM(model, manual=True), train_items(X, Y), tmp_path, GradDotProdCallback(val_batch), accumulate=1)
    with pytest.raises(ValueError, match="sample_index"):  # rows without their index in the training set
        fit(LitLM(model), train_items(X, Y), tmp_path, GradDotProdCallback(val_batch), indexed=False)


def test_deepspeed_fsdp1_and_tensor_parallelism_are_refused_naming_fsdp2():
    """The strategy check at fit start, on each strategy object (DeepSpeed is not installed here and Lightning's
    FSDPStrategy needs a GPU, so no Trainer can be built with them on this machine; a tensor-parallel mesh is refused
    in a real 2-process fit in test_fsdp2_on_two_processes_equals_one_unsharded_process): DeepSpeed, FSDP1 and a
    tensor-parallel mesh are refused naming ModelParallelStrategy with fully_shard; ModelParallelStrategy whose
    configure_model sharded nothing is refused (no process would average the gradients)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    model, *_ = model_and_rows(3)
    module = LitLM(model)

    def check(strategy):
        trainer = SimpleNamespace(strategy=strategy, gradient_clip_val=None, precision_plugin=None,
                                  optimizers=[torch.optim.SGD(module.parameters(), lr=0.1)])
        GradDotProdCallback._check_supported(trainer, module)

    def model_parallel(tensor_parallel):
        strategy = ModelParallelStrategy(data_parallel_size=2 // tensor_parallel, tensor_parallel_size=tensor_parallel)
        strategy._device_mesh = {"tensor_parallel": SimpleNamespace(size=lambda: tensor_parallel)}  # as set up
        return strategy

    way_out = r"use ModelParallelStrategy\(data_parallel_size=<processes>, tensor_parallel_size=1\) with fully_shard"
    with pytest.raises(ValueError, match=r"DeepSpeedStrategy \(ZeRO-3 gathers every parameter inside DeepSpeed.s "
                                         r"own hooks.*" + way_out):
        check(DeepSpeedStrategy.__new__(DeepSpeedStrategy))  # its __init__ needs deepspeed installed
    with pytest.raises(ValueError, match=r"FSDPStrategy \(FSDP1: FlatParameters.*" + way_out):
        check(FSDPStrategy())
    with pytest.raises(ValueError, match=r"tensor parallelism \(ModelParallelStrategy's tensor_parallel mesh "
                                         r"dimension has size 2.*" + way_out):
        check(model_parallel(2))
    with pytest.raises(ValueError, match=r"ModelParallelStrategy without fully_shard \(configure_model sharded "
                                         r"nothing.*" + way_out):
        check(model_parallel(1))


def test_a_model_with_dropout_is_refused_at_fit_start(tmp_path):
    """Lightning calls model.train() before training: a model with dropout probabilities > 0 is refused at fit start,
    whatever its mode now, before any step or file, naming the modules and the config field."""
    _, X, Y, X_val, Y_val = model_and_rows(8)
    module = LitLM(tiny_llama(attention_dropout=0.1).eval())
    with pytest.raises(ValueError, match=r"model.model.layers.0.self_attn.attention_dropout = 0.1 \(LlamaAttention\)"
                                         r".*GradDotProdCallback refuses \(training calls model.train\(\) before every "
                                         r"step, so model.eval\(\) is no way out\)\. Set dropout to 0: build the model "
                                         r"with attention_dropout = 0 .*ghost_engine.disable_dropout\(model\)"):
        fit(module, train_items(X, Y), tmp_path, GradDotProdCallback({"input_ids": X_val, "labels": Y_val}))
    assert module.logged == []  # no training step ran
    assert not (tmp_path / "graddotprod").exists()


def test_ddp_on_two_processes_gathers_every_row_on_rank_0(tmp_path):
    """Lightning's DDP strategy under torchrun (2 CPU processes, gloo), 2 micro-batches of 2 rows per rank:
    step 1 holds all 8 rows on rank 0, equal to the float64 reference over those rows, and .grad is plain
    Lightning DDP's (the same script without the callback)."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(tests)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([repo, tests]))
    for extra in ([], ["plain"]):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", os.path.join(tests, "_lightning_ddp_worker.py"), str(tmp_path), *extra],
                              env=env, capture_output=True, text=True, timeout=300, cwd=repo)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    model, X, Y, X_val, Y_val = model_and_rows(4)
    run = read_run(tmp_path / "run", per_layer=True, strict=True)
    assert run.config["world_size"] == 2 and run.missing_steps == []
    assert sorted(run.columns["sample_index"][run.columns["step"] == 1]) == list(range(8))
    check_step(run.columns, 1, model, X, Y, X_val, Y_val, prefix="model.")
    grads, plain = torch.load(tmp_path / "grads.pt"), torch.load(tmp_path / "grads_plain.pt")
    assert set(grads) == set(plain)
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fsdp2_on_two_processes_equals_one_unsharded_process(tmp_path):
    """Lightning's ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) under torchrun, 2 CPU processes
    (gloo; the strategy needs no GPU), the module's configure_model applying fully_shard to the blocks and the model,
    value first_order (SGD) and the default auto (AdamW, so adamw): two steps of 8 rows (2 micro-batches of 2 per
    process, clipping at 0.5) record, per step and row, what one unsharded process records for the same rows (2
    micro-batches of 4): dot products (total and every parameter), batch weights, losses, lr; the weights after the 2
    steps are the same. A tensor-parallel mesh (1 x 2) is refused at fit start, naming the way out."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(tests)
    values = ["first_order", "auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([repo, tests]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(tests, "_lightning_fsdp_worker.py"), str(tmp_path), *values],
                          env=env, capture_output=True, text=True, timeout=300, cwd=repo)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    for value in values:
        with open(tmp_path / value / "sharding.json") as f:
            assert json.load(f) == {"placements": ["(Shard(dim=0),)"], "optimizer_holds_shards": True,
                                    "fsdp_modules": ["model", "model.model.layers.0", "model.model.layers.1"]}
        _, module = fsdp_fit(tmp_path / f"single_{value}", value, "auto")
        sharded, _ = assert_same_records(tmp_path / value / "run", tmp_path / f"single_{value}" / "run")
        assert sharded.value == ("first_order" if value == "first_order" else "adamw")
        assert_same_weights(torch.load(tmp_path / value / "weights.pt"), module)
    refusal = (tmp_path / "tensor_parallel.txt").read_text()
    assert "tensor parallelism (ModelParallelStrategy's tensor_parallel mesh dimension has size 2" in refusal
    assert "tensor_parallel_size=1) with fully_shard on self.device_mesh['data_parallel']" in refusal


def test_midpoint_value_equals_the_reference(tmp_path):
    """value='midpoint' with the module's SGD and two accumulated micro-batches: step 1's values equal the real
    SGD step's on a float64 copy (tests/_reference.py), g_B being the mean of the micro-batch means; clipping,
    which Lightning applies after the callback's hook, is refused."""
    model, X, Y, X_val, Y_val = model_and_rows(8)
    initial = copy.deepcopy(model)
    callback = GradDotProdCallback({"input_ids": X_val, "labels": Y_val}, run_dir=tmp_path / "run", save_interval=1,
                                   value="midpoint")
    fit(LitLM(model), train_items(X, Y), tmp_path, callback, steps=1)
    run = read_run(tmp_path / "run", per_layer=True, strict=True)
    assert run.value == "midpoint"
    ref = reference_update_values(initial, torch.optim.SGD(initial.parameters(), lr=0.1), X[:4], Y[:4], X_val, Y_val,
                                  "midpoint", micro_batches=2)
    total = sum(ref.values())
    assert rel_err(run.columns["dot_products"], total) <= 1e-4
    for name, r in ref.items():
        assert rel_err(run.columns[f"per_layer/model.{name}"], r, 1e-6 * float(total.abs().max())) <= 1e-4, name
    with pytest.raises(ValueError, match="gradient_clip_val"):
        fit(LitLM(copy.deepcopy(initial)), train_items(X, Y), tmp_path / "clip",
            GradDotProdCallback({"input_ids": X_val, "labels": Y_val}, value="midpoint"), gradient_clip_val=1.0)


def test_fit_from_a_checkpoint_continues_the_run(tmp_path):
    """fit(ckpt_path=...) of the step-2 checkpoint of a 4-step run: the run continues (its run_id, start_step 2,
    steps 1-2 kept), only the files of steps 3-4 are set aside, and every step is read once. Lightning restores the
    step after on_fit_start: begun there, the run started at step 0 and set every earlier step aside. With
    records written every 4 steps, the checkpoint of step 2 wrote steps 1-2 first."""
    import os

    from lightning.pytorch.callbacks import ModelCheckpoint

    model, X, Y, X_val, Y_val = model_and_rows(8)

    def fit(ckpt=None):
        callback = GradDotProdCallback({"input_ids": X_val, "labels": Y_val}, run_dir=str(tmp_path / "run"),
                                       save_interval=4, value="first_order")
        checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1,
                                      filename="{step}")
        trainer = L.Trainer(max_steps=4, accelerator="cpu", devices=1, callbacks=[callback, checkpoints],
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=str(tmp_path))
        trainer.fit(LitLM(copy.deepcopy(model)), DataLoader(IndexedDataset(train_items(X, Y)), batch_size=2),
                    ckpt_path=ckpt)

    fit()
    first = json.loads((tmp_path / "run" / "config.json").read_text())
    uninterrupted = read_run(tmp_path / "run", strict=True).columns
    fit(str(tmp_path / "ckpt" / "step=2.ckpt"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["run_id"] == first["run_id"] and config["start_step"] == 2
    resumed = read_run(tmp_path / "run", strict=True)
    assert resumed.missing_steps == [] and resumed.duplicate_steps == []
    early = resumed.columns["step"] <= 2  # kept as written (Lightning's data order after a restart is its own)
    np.testing.assert_array_equal(resumed.columns["dot_products"][early],
                                  uninterrupted["dot_products"][uninterrupted["step"] <= 2])
    [moved] = os.listdir(tmp_path / "run" / "superseded")
    assert os.listdir(tmp_path / "run" / "superseded" / moved / "grad_dotprods") == ["iter_000004.parquet"]


def test_parameter_groups_of_other_rates_are_refused_where_one_rate_is_recorded(tmp_path):
    """first_order records one learning rate per step (value lr·w·dot): groups at other rates would make the
    recorded values wrong for all but the first group, so the step raises naming the rates."""
    model, X, Y, X_val, Y_val = model_and_rows(4)

    class TwoRates(LitLM):
        def configure_optimizers(self):
            embedding = list(self.model.get_input_embeddings().parameters())
            rest = [p for p in self.parameters() if all(p is not e for e in embedding)]
            return torch.optim.SGD([{"params": embedding, "lr": 0.001}, {"params": rest, "lr": 0.1}])

    callback = GradDotProdCallback({"input_ids": X_val, "labels": Y_val}, run_dir=str(tmp_path / "run"),
                                   value="first_order")
    with pytest.raises(ValueError, match=r"learning rates \[0.001, 0.1\]; value='first_order' records one"):
        fit(TwoRates(copy.deepcopy(model)), train_items(X, Y), tmp_path, callback, steps=1, accumulate=1)
