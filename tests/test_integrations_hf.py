"""GradDotProdTrainer (ghost_integrations.hf) against the float64 torch.func reference, the plain
Trainer and the engine driven by hand: dot products, .grad, the logged loss, the files it writes."""
import copy
import functools
import importlib.util
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from _integrations import (TOL, VAL_BATCH_FORMS, GradCapture, StepCapture, assert_grads_close, assert_same_records,
                           assert_same_weights, check_step, check_val_batch_form, engine_by_hand, fsdp_training_args,
                           model_and_rows, reference_step, rel_err, train_items, val_batch_form)
from _models import tiny_llama
from _reference import (adamw_sensitivity, reference_adamw_values, reference_dot_products, reference_train_grad,
                        reference_update_values)
from ghost_engine import disable_dropout
from ghost_integrations import hf
from ghost_results.results_io import file_header, read_run, safe_load_pickle
from pile_tools import ensure_sample_dataset

# These tests check first-order values against the float64 reference; the default value ("auto": adamw under
# the Trainer's AdamW) has its own test, test_update_aware_value_equals_the_reference[auto].
GradDotProdTrainer = functools.partial(hf.GradDotProdTrainer, value="first_order")

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def training_args(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    max_steps=2, learning_rate=1e-3, max_grad_norm=0.0, use_cpu=True, report_to=[],
                    save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    return TrainingArguments(**{**settings, **overrides})


def run_dir_of(args):
    return os.path.join(args.output_dir, "graddotprod")


@pytest.mark.parametrize("accumulation", [1, 2])
def test_step_equals_reference_and_regular_trainer(tmp_path, accumulation):
    """num_items_in_batch on (the Trainer's default for a causal LM), rows with different target counts,
    random order: step 1's dot products and .grad are the float64 reference's, the logged loss is the
    training rows' loss, and .grad and the logged loss are the plain Trainer's."""
    model, X, Y, X_val, Y_val = model_and_rows(0)
    initial = copy.deepcopy(model)
    args = training_args(tmp_path / "graddotprod", per_device_train_batch_size=4 // accumulation,
                         gradient_accumulation_steps=accumulation)
    capture = GradCapture(model)
    trainer = GradDotProdTrainer(model=model, args=args, train_dataset=train_items(X, Y), callbacks=[capture],
                                 val_batch={"input_ids": X_val, "labels": Y_val}, save_interval=1)
    assert trainer.model_accepts_loss_kwargs  # so the Trainer passes num_items_in_batch
    trainer.train()

    run = read_run(run_dir_of(args), per_layer=True, strict=True)
    assert run.config["run_name"] == "graddotprod" and run.config["max_steps"] == 2
    assert run.missing_steps == [] and len(run.files) == 2
    files = [os.path.join(run.run_dir, "grad_dotprods", name)
             for name in os.listdir(os.path.join(run.run_dir, "grad_dotprods"))]
    assert sorted(map(os.path.basename, files)) == ["iter_000001.parquet", "iter_000002.parquet"]  # the default
    assert {file_header(path)["run_id"] for path in files} == {run.config["run_id"]}
    np.testing.assert_array_equal(run.columns["step"], np.repeat([1, 2], 4))
    index, ref_grads, ref_loss = check_step(run.columns, 1, initial, X, Y, X_val, Y_val)
    assert_grads_close(capture.grads, ref_grads)  # the gradient of the mean over all the step's targets
    assert abs(trainer.state.log_history[0]["loss"] - ref_loss) <= 1e-5 * ref_loss
    counts = (Y[index, 1:] != -100).sum(1).double()
    np.testing.assert_allclose(run.columns["batch_weight"][:4], counts / counts.sum(), rtol=1e-6)
    assert run.columns["lr"][0] == pytest.approx(1e-3)

    regular_model = copy.deepcopy(initial)
    regular_capture = GradCapture(regular_model)
    regular = Trainer(model=regular_model, args=training_args(tmp_path / "regular", max_steps=1,
                                                              per_device_train_batch_size=4 // accumulation,
                                                              gradient_accumulation_steps=accumulation),
                      train_dataset=train_items(X, Y), callbacks=[regular_capture])
    regular.train()
    for name, grad in regular_capture.grads.items():
        torch.testing.assert_close(capture.grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(regular.state.log_history[0]["loss"], rel=1e-6)


@pytest.mark.parametrize("form", VAL_BATCH_FORMS)
def test_every_documented_val_batch_key_gives_the_reference_values(tmp_path, form):
    """val_batch as docs/INTEGRATIONS.md documents it: input_ids alone (labels default to them); labels and an
    attention_mask with real padding (the bug report's form, which raised 'expected one of (first_order, ...)'); an
    attention_mask without labels (they default to input_ids, -100 where the mask is 0); another per-row tensor
    (position_ids, also in the training items) with the rows' provenance. Step 1 equals the float64 reference run on
    the same inputs; training batches without an attention_mask are given one of ones beside the validation rows';
    valset.pkl holds the validation rows and their provenance."""
    model, X, Y, X_val, Y_val = model_and_rows(9)
    val_batch, val_inputs, extra = val_batch_form(form, X_val, Y_val, X.shape[0])
    items = [{**item, **{k: v[i] for k, v in extra.items()}} for i, item in enumerate(train_items(X, Y))]
    initial = copy.deepcopy(model)
    args = training_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=1)
    trainer = GradDotProdTrainer(model=model, args=args, train_dataset=items, val_batch=val_batch)
    trainer.train()
    run = read_run(run_dir_of(args), per_layer=True, strict=True)
    check_val_batch_form(form, run.columns, run_dir_of(args), initial, {"input_ids": X, "labels": Y, **extra},
                         val_inputs, val_batch)


def test_val_batch_mistakes_are_named(tmp_path):
    """A val_batch entry with another number of rows, provenance of another length, and a per-row input only the
    validation rows carry (the model would see it for them alone) are errors naming the entry."""
    from ghost_integrations.core import ValuationRun

    model, X, Y, X_val, Y_val = model_and_rows(3)
    with pytest.raises(ValueError, match=r"val_batch\['attention_mask'\] must be a tensor with 2 rows"):
        ValuationRun(model, {"input_ids": X_val, "attention_mask": torch.ones_like(X_val[:1])}, tmp_path, "r")
    with pytest.raises(ValueError, match=r"val_batch\['doc_id'\] has 3 entries for 2 validation rows"):
        ValuationRun(model, {"input_ids": X_val, "doc_id": [1, 2, 3]}, tmp_path, "r")
    run = ValuationRun(model, {"input_ids": X_val, "position_ids": torch.arange(X_val.shape[1]).expand_as(X_val)},
                       tmp_path, "r")
    batch = {"input_ids": X[:2], "labels": Y[:2], "sample_index": torch.arange(2)}
    with pytest.raises(ValueError, match="val_batch has 'position_ids' but the training batch does not"):
        run.forward(model, batch, 1.0)


def test_a_resumed_run_keeps_its_valset_or_records_new_rows_beside_it(tmp_path):
    """begin() writes valset.pkl; a resumed begin (start_step > 0) with the same rows leaves it as it is, with other
    rows writes valset_from_step_XXXXXX.pkl beside it (as the app's --accept_data_change); a new run replaces it."""
    from ghost_integrations.core import ValuationRun
    from ghost_results.results_io import safe_load_pickle

    model, X, Y, X_val, Y_val = model_and_rows(3)

    def begin(rows, start_step):
        run = ValuationRun(model, {"input_ids": rows}, tmp_path, "r")
        run.begin(start_step, 4, {})
        run.finish()

    def run_id():
        with open(tmp_path / "config.json") as f:
            return json.load(f)["run_id"]

    begin(X_val, 0)
    first_id = run_id()
    assert first_id and safe_load_pickle(tmp_path / "valset.pkl")["run_id"] == first_id
    written = os.stat(tmp_path / "valset.pkl").st_ino  # a replacement is a new file (renamed onto it)
    begin(X_val, 2)
    assert os.stat(tmp_path / "valset.pkl").st_ino == written
    assert run_id() == first_id  # a resumed run keeps its identity
    assert not [n for n in os.listdir(tmp_path) if n.startswith("valset_from")]
    begin(X[:2], 2)
    np.testing.assert_array_equal(safe_load_pickle(tmp_path / "valset.pkl")["tokens"], X_val.numpy())
    np.testing.assert_array_equal(safe_load_pickle(tmp_path / "valset_from_step_000003.pkl")["tokens"], X[:2].numpy())
    begin(X[2:4], 0)
    np.testing.assert_array_equal(safe_load_pickle(tmp_path / "valset.pkl")["tokens"], X[2:4].numpy())
    assert run_id() != first_id  # a run begun at step 0 is a new run


@pytest.mark.parametrize("value", ["midpoint", "adamw_vt", "auto"])
def test_update_aware_value_equals_the_reference(tmp_path, value):
    """value='midpoint'/'adamw_vt', and the default ('auto', which is adamw under an AdamW), with the Trainer's
    own AdamW (weight-decay groups), num_items_in_batch and clipping off: step 2's values (AdamW's state from
    step 1) equal the real AdamW step's on a float64 copy (tests/_reference.py), and the files name the
    estimator. (AdamW's sensitivity is steep where |g| is near eps: at step 1 it is lr·eps/(|g|+eps)², which
    float32 round-off of g decides; step 2 and eps 1e-6 keep the float32 run comparable with a float64
    reference.)"""
    model, X, Y, X_val, Y_val = model_and_rows(5)
    args = training_args(tmp_path / "graddotprod", per_device_train_batch_size=4, gradient_accumulation_steps=1,
                         max_steps=2, learning_rate=5e-2, weight_decay=0.1, warmup_steps=0, adam_epsilon=1e-6)
    template = copy.deepcopy(model)
    capture = StepCapture(model, at=2)
    given = {} if value == "auto" else {"value": value}
    trainer = hf.GradDotProdTrainer(model=model, args=args, train_dataset=train_items(X, Y), callbacks=[capture],
                                    val_batch={"input_ids": X_val, "labels": Y_val}, save_interval=1, **given)
    trainer.train()
    run = read_run(run_dir_of(args), per_layer=True, strict=True)
    recorded = "adamw" if value == "auto" else value
    assert run.value == recorded and run.config["value"] == recorded and run.config["optimizer"] == "AdamW"
    assert len(capture.groups) == 2 and capture.state  # decay and no-decay groups; AdamW's state after step 1
    rows = run.columns["step"] == 2
    index = run.columns["sample_index"][rows]
    ref_model, ref_optimizer = capture.rebuild(template)
    if recorded == "adamw":
        D = adamw_sensitivity(ref_optimizer, dict(ref_model.named_parameters()))
        ref = reference_adamw_values(copy.deepcopy(ref_model).double(), X[index], Y[index], X_val, Y_val, D)
    else:
        ref = reference_update_values(ref_model, ref_optimizer, X[index], Y[index], X_val, Y_val, value)
    total = sum(ref.values())
    assert rel_err(run.columns["dot_products"][rows], total) <= TOL
    # each parameter's part to 2·TOL of itself or of a tenth of the total's scale (float32 round-off of g near
    # eps: 1.05e-4 seen for adamw_vt with transformers 5.25)
    for name, r in ref.items():
        assert rel_err(run.columns[f"per_layer/{name}"][rows], r, 0.1 * float(total.abs().max())) <= 2 * TOL, name
    if recorded == "adamw":  # a first-order column would cost one more product per layer: not recorded
        assert "first_order_dot_products" not in run.columns
        return
    # the first-order dot products of the same rows, recorded beside the estimator's
    first_order = sum(reference_dot_products(copy.deepcopy(ref_model).double(), X[index],
                                             Y[index], X_val, Y_val).values())
    assert rel_err(run.columns["first_order_dot_products"][rows], first_order) <= TOL


def test_torch_compile_records_the_reference_values(tmp_path):
    """TrainingArguments(torch_compile=True): the Trainer compiles the model the engine already hooks (aot_eager,
    the graph autograd runs; inductor gave the same on a manual run); step 1 is the float64 reference's."""
    model, X, Y, X_val, Y_val = model_and_rows(0)
    initial = copy.deepcopy(model)
    args = training_args(tmp_path / "graddotprod", per_device_train_batch_size=4, gradient_accumulation_steps=1,
                         max_steps=1, torch_compile=True, torch_compile_backend="aot_eager")
    trainer = GradDotProdTrainer(model=model, args=args, train_dataset=train_items(X, Y),
                                 val_batch={"input_ids": X_val, "labels": Y_val}, save_interval=1)
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)  # it did compile
    check_step(read_run(run_dir_of(args), per_layer=True, strict=True).columns, 1, initial, X, Y, X_val, Y_val)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_records_the_reference_values(tmp_path, reentrant):
    """TrainingArguments(gradient_checkpointing=True), either checkpoint implementation: the layers run again in
    the backward; step 1 is still the float64 reference's."""
    model, X, Y, X_val, Y_val = model_and_rows(0)
    initial = copy.deepcopy(model)
    args = training_args(tmp_path / "graddotprod", per_device_train_batch_size=4, gradient_accumulation_steps=1,
                         max_steps=1, gradient_checkpointing=True,
                         gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    trainer = GradDotProdTrainer(model=model, args=args, train_dataset=train_items(X, Y),
                                 val_batch={"input_ids": X_val, "labels": Y_val}, save_interval=1)
    trainer.train()
    assert model.is_gradient_checkpointing
    check_step(read_run(run_dir_of(args), per_layer=True, strict=True).columns, 1, initial, X, Y, X_val, Y_val)


def test_lora_fine_tuning_records_the_reference_values(tmp_path):
    """A peft LoRA model (frozen base weights, trainable lora_A/lora_B linear layers inside peft's modules) in the
    Trainer: the dot products over the trainable parameters, total and per parameter, are the float64
    reference's."""
    from peft import LoraConfig, get_peft_model

    model, X, Y, X_val, Y_val = model_and_rows(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A's dot products zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    initial = copy.deepcopy(model)
    args = training_args(tmp_path / "graddotprod", per_device_train_batch_size=4, gradient_accumulation_steps=1,
                         max_steps=1)
    trainer = GradDotProdTrainer(model=model, args=args, train_dataset=train_items(X, Y),
                                 val_batch={"input_ids": X_val, "labels": Y_val}, save_interval=1)
    trainer.train()
    columns = read_run(run_dir_of(args), per_layer=True, strict=True).columns
    index = columns["sample_index"]
    ref = reference_dot_products(copy.deepcopy(initial).double(), X[index], Y[index], X_val, Y_val)
    assert len(ref) == 8 and all("lora_" in name for name in ref)  # 2 layers x (q, v) x (A, B)
    total = sum(ref.values())
    assert rel_err(columns["dot_products"], total) <= TOL
    for name, r in ref.items():
        assert rel_err(columns[f"per_layer/{name}"], r, 0.1 * float(total.abs().max())) <= TOL, name


def test_bf16_equals_the_engine_driven_by_hand(tmp_path):
    """bf16 autocast, gradient accumulation 2: the Trainer's numbers are those of the README's loop on the
    same micro-batches with the same loss multipliers, and close to the float64 reference."""
    model, X, Y, X_val, Y_val = model_and_rows(1)
    initial = copy.deepcopy(model)
    args = training_args(tmp_path, bf16=True, max_steps=1, train_sampling_strategy="sequential")
    capture = GradCapture(model)
    trainer = GradDotProdTrainer(model=model, args=args, train_dataset=train_items(X, Y), callbacks=[capture],
                                 val_batch={"input_ids": X_val, "labels": Y_val}, run_name="bf16",
                                 results_format="pickle")
    trainer.train()

    assert os.listdir(os.path.join(run_dir_of(args), "grad_dotprods")) == ["iter_000001.pkl"]
    run = read_run(run_dir_of(args), strict=True)
    assert run.config["run_name"] == "bf16" and run.config["bf16"]
    np.testing.assert_array_equal(run.columns["sample_index"], [0, 1, 2, 3])  # micro-batches 0-1, 2-3
    counts = (Y[:4, 1:] != -100).sum(1)
    multipliers = [float(counts[:2].sum() / counts.sum()), float(counts[2:].sum() / counts.sum())]
    result, grads = engine_by_hand(initial, [(X[0:2], Y[0:2], multipliers[0]), (X[2:4], Y[2:4], multipliers[1])],
                                   X_val, Y_val, autocast=True)
    got = torch.from_numpy(run.columns["dot_products"])
    assert rel_err(got, result.dot_products) <= 1e-5
    for name, grad in grads.items():
        assert rel_err(capture.grads[name], grad) <= 1e-5, name
    ref_dots, ref_grads, _, _ = reference_step(initial, X[:4], Y[:4], X_val, Y_val)
    assert rel_err(got, sum(ref_dots.values())) < 5e-2
    assert max(rel_err(capture.grads[n], ref_grads[n]) for n in ref_grads) < 5e-2


def test_the_example_runs_and_the_report_reads_its_run(tmp_path):
    """examples/hf_trainer_llama.py for 2 steps on the bundled sample: the report decodes the windows'
    text from the provenance the Trainer recorded."""
    spec = importlib.util.spec_from_file_location("hf_trainer_llama", os.path.join(REPO, "examples",
                                                                                   "hf_trainer_llama.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data_dir = ensure_sample_dataset(str(tmp_path / "sample"))
    path = example.main(["--steps", "2", "--results_dir", str(tmp_path / "results"), "--data_dir", data_dir])

    run = read_run(tmp_path / "results" / "hf_llama_example", strict=True)
    assert run.missing_steps == [] and run.num_rows == 16 and run.config["data_dir"] == data_dir
    assert set(run.columns["domain"]) <= {"Github", "DM Mathematics", "Python Documentation", "Software Licenses"}
    with open(path) as f:
        text = f.read()
    assert "Complete: steps 1..2 in 1 dot-product file" in text and "Validation domain: DM Mathematics" in text
    top = text.split("## Top 5 samples")[1].split("##")[0]
    assert top.count("`") >= 10  # five rows, each with its text snippet
    # the validation section: valset.pkl's rows (the example's DM Mathematics windows), their text decoded
    validation = text.split("## Validation batch")[1].split("\n## ")[0]
    assert "no valset.pkl" not in validation
    val_rows = [line for line in validation.splitlines() if line.startswith("| DM Mathematics |")]
    assert len(val_rows) == 2 and all(line.count("`") == 2 for line in val_rows)


def pad_collator(features):
    """Pads to the longest row of the batch: input_ids 0, labels -100, attention_mask 0."""
    T = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": torch.zeros(len(features), T, dtype=torch.long),
             "labels": torch.full((len(features), T), -100, dtype=torch.long),
             "attention_mask": torch.zeros(len(features), T, dtype=torch.long)}
    for i, f in enumerate(features):
        length = len(f["input_ids"])
        batch["input_ids"][i, :length] = torch.as_tensor(f["input_ids"])
        batch["labels"][i, :length] = torch.as_tensor(f["labels"])
        batch["attention_mask"][i, :length] = 1
    return batch


def test_rows_of_other_lengths_than_the_validation_rows(tmp_path):
    """A `datasets.Dataset` with columns the model does not take (one of them the rows' domain) and a collator
    padding to the longest row: micro-batches longer (16) and shorter (10) than the validation rows (12).
    Each row's dot product equals the reference on the row alone, unpadded; the domains are recorded."""
    import datasets

    model, X, Y, X_val, Y_val = model_and_rows(2)
    X_val, Y_val = X_val[:, :12], Y_val[:, :12]
    lengths = [16, 9, 8, 10]
    domains = ["Github", "ArXiv", "Github", "FreeLaw"]
    items = datasets.Dataset.from_list([{"input_ids": X[i, :n].tolist(), "labels": Y[i, :n].tolist(),
                                         "domain": domains[i], "text": f"row {i}"} for i, n in enumerate(lengths)])
    initial = copy.deepcopy(model)
    args = training_args(tmp_path, max_steps=1, train_sampling_strategy="sequential")
    capture = GradCapture(model)
    trainer = GradDotProdTrainer(model=model, args=args, train_dataset=items, data_collator=pad_collator,
                                 callbacks=[capture], val_batch={"input_ids": X_val, "labels": Y_val})
    trainer.train()

    columns = read_run(run_dir_of(args), strict=True).columns
    np.testing.assert_array_equal(columns["sample_index"], [0, 1, 2, 3])
    assert list(columns["domain"]) == domains and list(columns["token_offset"]) == [0, 1, 2, 3]
    ref_model = copy.deepcopy(initial).double()
    rows = [(X[i:i + 1, :n], Y[i:i + 1, :n]) for i, n in enumerate(lengths)]
    ref = torch.cat([sum(reference_dot_products(ref_model, x, y, X_val, Y_val).values()) for x, y in rows])
    assert rel_err(columns["dot_products"], ref) <= 1e-4
    counts = [int((y[:, 1:] != -100).sum()) for _, y in rows]
    ref_grads = {}
    for (x, y), n in zip(rows, counts):
        for name, grad in reference_train_grad(ref_model, x, y).items():
            ref_grads[name] = ref_grads.get(name, 0) + grad * n / sum(counts)
    assert_grads_close(capture.grads, ref_grads)


def test_unsupported_settings_raise_and_evaluation_is_the_plain_trainers(tmp_path):
    model, X, Y, X_val, Y_val = model_and_rows(3)
    val_batch = {"input_ids": X_val, "labels": Y_val}
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        GradDotProdTrainer(model=model, args=training_args(tmp_path, label_smoothing_factor=0.1),
                           train_dataset=train_items(X, Y), val_batch=val_batch)
    with pytest.raises(ValueError, match="results_format='csv'"):
        GradDotProdTrainer(model=model, args=training_args(tmp_path), train_dataset=train_items(X, Y),
                           val_batch=val_batch, results_format="csv")
    with pytest.raises(ValueError, match="model_init"):
        GradDotProdTrainer(model_init=lambda: copy.deepcopy(model), args=training_args(tmp_path),
                           train_dataset=train_items(X, Y), val_batch=val_batch)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(train_items(X, Y))

    trainer = GradDotProdTrainer(model=model, args=training_args(tmp_path), train_dataset=Stream(),
                                 val_batch=val_batch)
    with pytest.raises(ValueError, match="not a map-style dataset"):
        trainer.get_train_dataloader()
    plain = Trainer(model=model, args=training_args(tmp_path), eval_dataset=train_items(X, Y))
    assert trainer.evaluate(train_items(X, Y))["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-6)


def test_deepspeed_fsdp1_and_tensor_parallelism_are_refused_naming_fsdp2(tmp_path, monkeypatch):
    """Refused when the Trainer is built, before any file, each naming what to use: FSDP1 (fsdp_config version 1; built
    on the CPU with accept_fsdp_plugin_on_cpu, and sync_module_states off, which FSDP1 refuses on the CPU); tensor
    parallelism and DeepSpeed by the same check on a Trainer that reports them (a tensor-parallel model needs a
    tp_plan load over several processes; DeepSpeed is not installed here and TrainingArguments(deepspeed=...) needs
    it)."""
    from accelerate.state import AcceleratorState

    from _integrations import accept_fsdp_plugin_on_cpu

    model, X, Y, X_val, Y_val = model_and_rows(3)
    val_batch = {"input_ids": X_val, "labels": Y_val}
    environment = dict(os.environ)  # accelerate records an FSDP plugin in ACCELERATE_USE_FSDP
    monkeypatch.setattr(AcceleratorState, "__init__", accept_fsdp_plugin_on_cpu(AcceleratorState.__init__))
    try:
        fsdp1 = training_args(tmp_path, fsdp=True, fsdp_config={"version": 1, "sync_module_states": False})
        with pytest.raises(ValueError, match=r"does not support FSDP1 \(fsdp_config version 1: FlatParameters.*use "
                                             r"FSDP2, fsdp_config=\{'version': 2\}"):
            GradDotProdTrainer(model=model, args=fsdp1, train_dataset=train_items(X, Y), val_batch=val_batch)
    finally:
        os.environ.clear()
        os.environ.update(environment)
    monkeypatch.undo()

    trainer = GradDotProdTrainer(model=model, args=training_args(tmp_path), train_dataset=train_items(X, Y),
                                 val_batch=val_batch)
    trainer.get_tp_size = lambda: 2
    with pytest.raises(ValueError, match=r"tensor, context or sequence parallelism \(layers see a shard .*use FSDP2 "
                                         r"or DDP\)"):
        trainer._check_supported()
    del trainer.get_tp_size
    trainer.is_deepspeed_enabled = True
    with pytest.raises(ValueError, match=r"DeepSpeed \(ZeRO-3 gathers every parameter inside DeepSpeed.s own hooks.*"
                                         r"use FSDP2, TrainingArguments\(fsdp=True, fsdp_config=\{'version': 2\}\), "
                                         r"or DDP\)"):
        trainer._check_supported()
    assert not os.path.exists(run_dir_of(training_args(tmp_path)))


def test_a_model_with_dropout_is_refused_before_training(tmp_path):
    """A model with dropout probabilities > 0 is refused when the Trainer is built, whatever its mode now
    (from_pretrained leaves it in eval mode; the Trainer calls model.train() at every step), naming the modules and
    the config field; disable_dropout is a way out, and the run is then the float64 reference's."""
    _, X, Y, X_val, Y_val = model_and_rows(4)
    torch.manual_seed(4)
    model = tiny_llama(attention_dropout=0.1).eval()
    initial = copy.deepcopy(model)
    args = training_args(tmp_path / "graddotprod", per_device_train_batch_size=4, gradient_accumulation_steps=1,
                         max_steps=1)
    val_batch = {"input_ids": X_val, "labels": Y_val}
    with pytest.raises(ValueError, match=r"dropout is active: 2 module\(s\) \(in training mode, where training puts "
                                         r"them\) .*model.layers.0.self_attn.attention_dropout = 0.1 \(LlamaAttention\)"
                                         r".*GradDotProdTrainer refuses \(training calls model.train\(\) before every "
                                         r"step, so model.eval\(\) is no way out\)\. Set dropout to 0: build the model "
                                         r"with attention_dropout = 0 .*ghost_engine.disable_dropout\(model\)"):
        GradDotProdTrainer(model=model, args=args, train_dataset=train_items(X, Y), val_batch=val_batch)
    assert not os.path.exists(run_dir_of(args))
    disable_dropout(model)
    disable_dropout(initial)
    trainer = GradDotProdTrainer(model=model, args=args, train_dataset=train_items(X, Y), val_batch=val_batch,
                                 save_interval=1)
    trainer.train()
    check_step(read_run(run_dir_of(args), per_layer=True, strict=True).columns, 1, initial, X, Y, X_val, Y_val)


def test_two_processes_gather_every_row_on_rank_0(tmp_path):
    """torchrun, 2 CPU processes (gloo), 2 micro-batches of 2 rows each: step 1 holds all 8 rows; their dot
    products, the DDP-averaged .grad and the logged loss are the float64 reference's over the 8 rows."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, TESTS]))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              os.path.join(TESTS, "_hf_ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    model, X, Y, X_val, Y_val = model_and_rows(4)
    run = read_run(os.path.join(tmp_path, "graddotprod"), per_layer=True, strict=True)
    assert run.config["world_size"] == 2 and run.missing_steps == []
    np.testing.assert_array_equal(run.columns["sample_index"][run.columns["step"] == 1], np.arange(8))
    index, ref_grads, ref_loss = check_step(run.columns, 1, model, X, Y, X_val, Y_val)
    assert_grads_close(torch.load(os.path.join(tmp_path, "grads.pt")), ref_grads)
    with open(os.path.join(tmp_path, "log_history.json")) as f:
        assert abs(json.load(f)[0]["loss"] - ref_loss) <= 1e-5 * ref_loss
    counts = (Y[:, 1:] != -100).sum(1).double()
    np.testing.assert_allclose(run.columns["batch_weight"][:8], counts / counts.sum(), rtol=1e-6)


def test_fsdp2_on_two_processes_equals_one_unsharded_process(tmp_path):
    """accelerate's FSDP2 plugin (TrainingArguments(fsdp=True, fsdp_config={"version": 2})) under torchrun, 2 CPU
    processes (gloo), value first_order (SGD; resharded after forward) and the default auto (the Trainer's AdamW, so
    adamw; kept unsharded): accelerate applies fully_shard to the blocks, the embedding, the final norm with the output
    layer and the model, and swaps the optimizer's parameters for the DTensor shards; the engine is built on the
    sharded model. Two steps of 8 rows (2 micro-batches per process, no gradient sync between them, clipping at 0.5)
    record, per step and row, what one unsharded process records for the same 8 rows (2 micro-batches of 4): dot
    products (total and every parameter), batch weights, losses, lr; the logged losses and gradient norms, and the
    weights after the 2 steps are the same. accelerate keeps the FSDP plugin on the CPU only with
    _integrations.accept_fsdp_plugin_on_cpu (a test-only relaxation of the one device check; see there)."""
    values = ["first_order", "auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([REPO, TESTS]))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              os.path.join(TESTS, "_hf_fsdp_worker.py"), str(tmp_path), *values]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    for value in values:
        with open(tmp_path / value / "sharding.json") as f:
            sharding = json.load(f)
        assert sharding == {"placements": ["(Shard(dim=0),)"], "optimizer_holds_shards": True,
                            "fsdp_modules": ["<root>", "lm_head", "model.embed_tokens", "model.layers.0",
                                             "model.layers.1", "model.norm"]}
        model, X, Y, X_val, Y_val = model_and_rows(4)
        args = fsdp_training_args(tmp_path / f"single_{value}", value, processes=1)
        single = hf.GradDotProdTrainer(model=model, args=args, train_dataset=train_items(X, Y), value=value,
                                       val_batch={"input_ids": X_val, "labels": Y_val}, save_interval=1)
        single.train()
        sharded, _ = assert_same_records(tmp_path / value / "graddotprod", run_dir_of(args))
        assert sharded.value == ("first_order" if value == "first_order" else "adamw")
        assert sharded.config["fsdp_version"] == 2 and "fsdp_version" not in read_run(run_dir_of(args)).config
        with open(tmp_path / value / "log_history.json") as f:
            logged = [entry for entry in json.load(f) if "loss" in entry]
        expected = [entry for entry in single.state.log_history if "loss" in entry]
        assert len(logged) == len(expected) == 2
        for got, want in zip(logged, expected):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5) and want["grad_norm"] > 0.5
        assert_same_weights(torch.load(tmp_path / value / "weights.pt"), model)


@pytest.mark.parametrize("save_interval", [1, 4])
def test_resume_from_checkpoint_sets_aside_later_steps_and_writes_them_again(tmp_path, save_interval):
    """Resuming from the step-2 checkpoint of a 4-step run: the files of steps 3-4 move to superseded/, the
    resumed run writes them again, equal to the uninterrupted run's, and no step is read twice. With records
    written every 4 steps, the Trainer's checkpoint of step 2 wrote steps 1-2 first (else the resume set aside the
    file of steps 1-4 and redid only 3-4: steps 1-2 were lost)."""
    model, X, Y, X_val, Y_val = model_and_rows(8)

    def trainer():
        args = training_args(tmp_path, max_steps=4, gradient_accumulation_steps=1, save_strategy="steps",
                             save_steps=2)
        return GradDotProdTrainer(model=copy.deepcopy(model), args=args, train_dataset=train_items(X, Y),
                                  val_batch={"input_ids": X_val, "labels": Y_val}, save_interval=save_interval)

    trainer().train()
    uninterrupted = read_run(tmp_path / "graddotprod", strict=True).columns
    trainer().train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a step in two files would warn
        resumed = read_run(tmp_path / "graddotprod", strict=True)
    assert resumed.duplicate_steps == [] and resumed.missing_steps == []
    superseded = os.listdir(tmp_path / "graddotprod" / "superseded")
    assert sorted(os.listdir(tmp_path / "graddotprod" / "superseded" / superseded[0] / "grad_dotprods")) == (
        ["iter_000003.parquet", "iter_000004.parquet"] if save_interval == 1 else ["iter_000004.parquet"])
    np.testing.assert_array_equal(resumed.columns["step"], uninterrupted["step"])
    np.testing.assert_allclose(resumed.columns["dot_products"], uninterrupted["dot_products"], rtol=1e-6)


def test_a_run_directory_held_by_another_run_is_refused(tmp_path):
    """One run a directory, as for the app: a Trainer into a directory whose run.lock is held raises RunBusyError
    before writing anything (two runs in one directory set each other's files aside and mixed their steps)."""
    from ghost_results.run_directory import RunBusyError, RunDirectory

    model, X, Y, X_val, Y_val = model_and_rows(4)
    held = RunDirectory(tmp_path / "graddotprod").acquire()
    try:
        trainer = GradDotProdTrainer(model=copy.deepcopy(model), args=training_args(tmp_path, max_steps=1),
                                     train_dataset=train_items(X, Y), val_batch={"input_ids": X_val, "labels": Y_val})
        with pytest.raises(RunBusyError, match="is in use by"):
            trainer.train()
        assert sorted(os.listdir(tmp_path / "graddotprod")) == ["run.lock"]
    finally:
        held.release()
    trainer.train()  # released: the directory is the run's
    assert read_run(tmp_path / "graddotprod", strict=True).missing_steps == []
