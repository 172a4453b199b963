"""Shared set-up of the integration tests: rows with different target counts, the engine driven by hand,
and the float64 references of one step."""
import copy
import os

import numpy as np
import torch
from transformers import TrainerCallback

from _models import lm_batch, tiny_llama
from _reference import reference_dot_products, reference_train_grad
from ghost_engine import GradDotProdEngine

TOL = 1e-4  # relative error bound for an fp32 model against the float64 reference
ROWS, T = 8, 16


def rel_err(got, ref, scale=0.0):
    got, ref = torch.as_tensor(got).double(), torch.as_tensor(ref).double()
    return float((got - ref).abs().max() / max(float(ref.abs().max()), scale, 1e-30))


class GradCapture(TrainerCallback):
    """transformers.Trainer: every parameter's .grad just before the first optimizer step (after clipping)."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}


def model_and_rows(seed=0):
    """A tiny Llama and ROWS training rows whose tails are not targets (every row has its own target count,
    so a mean per micro-batch and a mean over the step differ), plus 2 validation rows."""
    torch.manual_seed(seed)
    model = tiny_llama()
    g = torch.Generator().manual_seed(seed)
    X, Y = lm_batch(ROWS, T, g)
    for i in range(ROWS):
        Y[i, T - i:] = -100  # row i has T - 1 - i targets
    X_val, Y_val = lm_batch(2, T, g)
    return model, X, Y, X_val, Y_val


def train_items(X, Y):
    return [{"input_ids": X[i], "labels": Y[i]} for i in range(X.shape[0])]


def accept_fsdp_plugin_on_cpu(init):
    """AcceleratorState.__init__ (`init`) that keeps the FSDP plugin on the CPU.

    accelerate 1.16 sets DistributedType.FSDP only for accelerator devices (AcceleratorState.__init__: MULTI_GPU,
    MULTI_XPU, MULTI_NPU, ...); for MULTI_CPU (and a single process) it drops the plugin without a word, so
    Trainer(fsdp=True, use_cpu=True) trains with DDP. Everything after that decision is device-agnostic on the FSDP2
    path (fsdp2_prepare_model's fully_shard on the default CPU mesh, the optimizer's switch to the DTensor shards,
    no_sync between micro-batches, the DTensor-aware clipping): this makes the one decision as accelerate makes it
    for a GPU, and nothing else."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    def keep_fsdp_plugin(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type in (DistributedType.MULTI_CPU, DistributedType.NO):
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    return keep_fsdp_plugin


def sharding_report(model, optimizer) -> dict:
    """What fully_shard did to `model`: its parameters' placements, its FSDP modules, and whether `optimizer` holds
    the DTensor shards (a framework that made the optimizer before sharding must have switched it)."""
    from torch.distributed.fsdp import FSDPModule

    return {"placements": sorted({str(p.placements) for p in model.parameters()}),
            "fsdp_modules": sorted(name or "<root>" for name, m in model.named_modules() if isinstance(m, FSDPModule)),
            "optimizer_holds_shards": all(type(p).__name__ == "DTensor" for group in optimizer.param_groups
                                          for p in group["params"])}


def fsdp_training_args(output_dir, value, processes, **overrides):
    """The Trainer FSDP2 check's settings: 2 optimizer steps of 8 rows (2 micro-batches, gradient clipping at 0.5,
    which both steps' gradients exceed), on 2 processes under FSDP2 (per process 2 rows per micro-batch;
    first_order: resharded after forward, auto: kept unsharded) or on 1 process unsharded (4 rows).
    first_order with SGD; auto with the Trainer's AdamW (so adamw), weight decay and eps 1e-3: AdamW's first update
    is lr·g/(|g| + eps), which turns float32 round-off of a gradient element near 0 into lr/eps times as much in
    the weight (1e4 at eps 1e-6), and the two runs sum the gradients in other orders."""
    from transformers import TrainingArguments

    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=4 // processes,
                    gradient_accumulation_steps=2, max_steps=2, warmup_steps=0, max_grad_norm=0.5, use_cpu=True,
                    report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                    train_sampling_strategy="sequential")
    if value == "first_order":
        settings.update(optim="sgd", learning_rate=0.1)
    else:
        settings.update(learning_rate=1e-2, weight_decay=0.1, adam_epsilon=1e-3)
    if processes > 1:
        settings.update(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": value == "first_order"})
    return TrainingArguments(**{**settings, **overrides})


def assert_same_records(sharded_dir, single_dir, steps=2, tol=1e-5):
    """The run of several processes (sharded_dir) recorded what the run of one process (single_dir) recorded, step by
    step, row by row (matched by sample index: the processes file their rows in another order): every step's rows,
    their dot products (total and every parameter; relative to the step's largest), batch weights and target counts,
    and the step's lr, training and validation losses, to `tol`. Returns (sharded run, single run)."""
    from ghost_results.results_io import read_run

    sharded, single = (read_run(d, per_layer=True, strict=True) for d in (sharded_dir, single_dir))
    assert sharded.value == single.value and sharded.missing_steps == single.missing_steps == []
    assert sharded.config["world_size"] == 2 and single.config["world_size"] == 1
    layers = sorted(k for k in single.columns if k.startswith("per_layer/"))
    assert layers and layers == sorted(k for k in sharded.columns if k.startswith("per_layer/"))
    assert sorted(set(single.columns["step"])) == sorted(set(sharded.columns["step"])) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        rows = [run.columns["step"] == step for run in (sharded, single)]
        order = [np.argsort(run.columns["sample_index"][r], kind="stable") for run, r in zip((sharded, single), rows)]
        got, want = ({k: run.columns[k][r][o] for k in run.columns}
                     for run, r, o in zip((sharded, single), rows, order))
        np.testing.assert_array_equal(got["sample_index"], want["sample_index"])
        np.testing.assert_array_equal(got["token_count"], want["token_count"])
        for name in ["dot_products", "batch_weight", "train_loss", "val_loss", "lr"] + layers:
            assert rel_err(got[name], want[name]) <= tol, (step, name, rel_err(got[name], want[name]))
    return sharded, single


def assert_same_weights(weights, model, tol=1e-5):
    """{name: full tensor} (gathered from the shards) equal `model`'s parameters to `tol` relative."""
    params = dict(model.named_parameters())
    assert set(weights) == set(params)
    for name, p in params.items():
        assert rel_err(weights[name], p.detach()) <= tol, (name, rel_err(weights[name], p.detach()))


def reference_step(model, X, Y, X_val, Y_val):
    """float64 reference of one optimizer step over rows X, Y at the model's parameters: per-parameter dot
    products [B], the gradient of the mean loss over all the step's targets, that loss, the validation loss."""
    ref_model = copy.deepcopy(model).double()
    dots = reference_dot_products(ref_model, X, Y, X_val, Y_val)
    grads = reference_train_grad(ref_model, X, Y)
    with torch.no_grad():
        loss = float(ref_model(input_ids=X, labels=Y).loss)
        val_loss = float(ref_model(input_ids=X_val, labels=Y_val).loss)
    return dots, grads, loss, val_loss


def engine_by_hand(model, micro_batches, X_val, Y_val, autocast=False):
    """The README's loop over micro-batches [(X, Y, loss_multiplier)]: (DotProductResult, {name: grad})."""
    model = copy.deepcopy(model)
    engine = GradDotProdEngine(model, val_batch=(X_val, Y_val))
    engine.attach()
    for X, Y, multiplier in micro_batches:
        Xc, Yc = engine.prepare_forward_input(X, Y, loss_multiplier=multiplier)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=Xc, labels=Yc).loss
        (loss * multiplier).backward()
    engine.prepare_gradients()
    result = engine.aggregate_and_log()
    engine.detach()
    return result, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def check_step(columns, step, model, X, Y, X_val, Y_val, prefix=""):
    """The recorded rows of `step` equal the float64 reference on that step's rows (dot products, total and
    per parameter; target counts; the step's training loss, a mean over all its targets; the validation
    loss). Returns the step's sample indices (recorded order), the reference gradient of the step's mean
    loss and that loss."""
    rows = columns["step"] == step
    index = columns["sample_index"][rows]
    ref_dots, ref_grads, ref_loss, ref_val_loss = reference_step(model, X[index], Y[index], X_val, Y_val)
    total = sum(ref_dots.values())
    assert rel_err(columns["dot_products"][rows], total) <= TOL
    floor = 1e-6 * float(total.abs().max())
    for name, ref in ref_dots.items():
        assert rel_err(columns[f"per_layer/{prefix}{name}"][rows], ref, floor) <= TOL, name
    counts = (Y[index, 1:] != -100).sum(1)
    assert (columns["token_count"][rows] == counts.numpy()).all()
    assert abs(columns["train_loss"][rows][0] - ref_loss) <= 1e-5 * ref_loss
    assert abs(columns["val_loss"][rows][0] - ref_val_loss) <= 1e-5 * ref_val_loss
    return index, ref_grads, ref_loss


def assert_grads_close(grads, ref_grads, prefix=""):
    floor = 1e-6 * max(float(r.abs().max()) for r in ref_grads.values())
    for name, ref in ref_grads.items():
        assert rel_err(grads[prefix + name], ref, floor) <= TOL, name


class StepCapture(TrainerCallback):
    """transformers.Trainer: the parameters, the optimizer's groups and its state just before optimizer step
    `at` (1-based), to rebuild that step's model and optimizer (`rebuild`)."""

    def __init__(self, model, at):
        self.model, self.at, self.groups = model, at, None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step + 1 != self.at:
            return
        from ghost_integrations.core import _torch_optimizer

        optimizer = _torch_optimizer(optimizer)
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.kind = type(optimizer)
        self.params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.groups = [({k: v for k, v in group.items() if k != "params"}, [names[id(p)] for p in group["params"]])
                       for group in optimizer.param_groups]
        self.state = {names[id(p)]: copy.deepcopy(s) for p, s in optimizer.state.items()}

    def rebuild(self, template):
        """(model, optimizer) as they were before step `at`; `template`: a model of the same architecture."""
        model = copy.deepcopy(template)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.params[n])
        params = dict(model.named_parameters())
        optimizer = self.kind([{**hyper, "params": [params[n] for n in names]} for hyper, names in self.groups])
        for n, s in self.state.items():
            optimizer.state[params[n]] = copy.deepcopy(s)
        return model, optimizer


# ---- val_batch in every documented form (docs/INTEGRATIONS.md, "Batches, validation rows, provenance")

VAL_BATCH_FORMS = ["input_ids_alone", "labels_and_attention_mask", "attention_mask_without_labels",
                   "position_ids_and_provenance"]


def val_batch_form(form, X_val, Y_val, rows):
    """(val_batch as the user gives it, the model inputs that define the validation loss, {key: [rows] tensor}
    every training item carries besides input_ids and labels). The attention mask has real padding: row 0 is
    left-padded (4 positions), row 1 right-padded (6), so it changes what the validation rows' tokens see."""
    T = X_val.shape[1]
    mask = torch.ones_like(X_val)
    mask[0, :4] = 0
    mask[1, T - 6:] = 0
    masked_labels = Y_val.masked_fill(mask == 0, -100)
    if form == "input_ids_alone":  # labels default to the input_ids
        return {"input_ids": X_val}, {"input_ids": X_val, "labels": X_val}, {}
    if form == "labels_and_attention_mask":  # the form of the bug report (item 10)
        val_batch = {"input_ids": X_val, "labels": masked_labels, "attention_mask": mask}
        return val_batch, dict(val_batch), {}
    if form == "attention_mask_without_labels":  # labels default to the input_ids, -100 where the mask is 0
        return ({"input_ids": X_val, "attention_mask": mask},
                {"input_ids": X_val, "labels": X_val.masked_fill(mask == 0, -100), "attention_mask": mask}, {})
    if form == "position_ids_and_provenance":  # another per-row tensor (also in the training batches)
        # packed sequences: positions restart where a document starts (transformers then masks attention across
        # documents in training, with no cache); row 0 holds two documents of 8 tokens, row 1 one of 5 and one of 11
        positions = torch.stack([torch.arange(T) % 8, torch.cat([torch.arange(5), torch.arange(T - 5)])])
        val_batch = {"input_ids": X_val, "labels": Y_val, "position_ids": positions, "domain": "DM Mathematics",
                     "doc_id": torch.tensor([7, 9]), "token_offset": [100, 2000], "sample_index": [5, 6]}
        train_positions = torch.stack([torch.cat([torch.arange(4 + i), torch.arange(T - 4 - i)]) for i in range(rows)])
        return val_batch, {"input_ids": X_val, "labels": Y_val, "position_ids": positions}, {
            "position_ids": train_positions}
    raise ValueError(form)


def reference_with_inputs(model, train_inputs, val_inputs):
    """float64, plain autograd, one training row at a time, every input given to the model (attention_mask,
    position_ids, ...) as a training framework runs it (no key/value cache): ({param name: [B] <grad l_i, grad L_val>},
    L_val)."""
    ref = copy.deepcopy(model).double()
    ref.config.use_cache = False  # as the Trainer sets it; transformers reads packed sequences from position_ids then
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    val_loss = ref(**val_inputs).loss
    val_grad = torch.autograd.grad(val_loss, list(params.values()))
    rows = train_inputs["input_ids"].shape[0]
    dots = {n: torch.zeros(rows, dtype=torch.float64) for n in params}
    for i in range(rows):
        loss = ref(**{k: v[i:i + 1] for k, v in train_inputs.items()}).loss
        for n, g, v in zip(params, torch.autograd.grad(loss, list(params.values())), val_grad):
            dots[n][i] = (g * v).sum()
    return dots, float(val_loss.detach())


def check_val_batch_form(form, columns, run_dir, model, train_inputs, val_inputs, val_batch, prefix=""):
    """The step's recorded rows (columns) equal reference_with_inputs on the same inputs (total and per parameter,
    and the validation loss), the inputs other than input_ids and labels change the reference (so dropping
    them would fail here), and valset.pkl holds the validation rows and the provenance given."""
    from ghost_results.results_io import safe_load_pickle

    index = torch.as_tensor(columns["sample_index"])
    rows = {k: v[index] for k, v in train_inputs.items()}
    ref, ref_val_loss = reference_with_inputs(model, rows, val_inputs)
    total = sum(ref.values())
    assert rel_err(columns["dot_products"], total) <= TOL
    floor = 1e-6 * float(total.abs().max())
    for name, r in ref.items():
        assert rel_err(columns[f"per_layer/{prefix}{name}"], r, floor) <= TOL, name
    assert abs(columns["val_loss"][0] - ref_val_loss) <= 1e-5 * ref_val_loss
    plain = {k: v for k, v in val_inputs.items() if k in ("input_ids", "labels")}
    extra_train = {k: v for k, v in rows.items() if k in ("input_ids", "labels")}
    if len(plain) < len(val_inputs):
        without, _ = reference_with_inputs(model, extra_train, plain)
        assert rel_err(sum(without.values()), total) > 100 * TOL  # the other inputs matter
    valset = safe_load_pickle(os.path.join(run_dir, "valset.pkl"))
    assert valset["schema"] == "graddotprod.valset" and valset["seq_len"] == val_batch["input_ids"].shape[1]
    np.testing.assert_array_equal(valset["tokens"], val_batch["input_ids"].numpy())
    given = {name: val_batch.get(name) for name in ("domain", "doc_id", "token_offset", "sample_index")}
    assert valset["domain"] == ([given["domain"]] * 2 if given["domain"] else ["validation"] * 2)
    for name in ("doc_id", "token_offset", "sample_index"):
        expected = [0, 1] if given[name] is None else list(np.asarray(given[name]))
        assert valset[name].tolist() == expected, name
