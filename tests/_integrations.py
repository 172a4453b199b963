"""Shared set-up of the integration tests: rows with different target counts, the engine driven by hand,
and the float64 references of one step."""
import copy

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
        from ghost_engine.integrations.core import _torch_optimizer

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
