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
