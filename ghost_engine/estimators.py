"""The estimators that read the optimizer or the step's batch gradient (docs/METHOD.md section 2.1): one
Estimator object per engine, made by make_estimator(value).

- Estimator (first_order, cosine): the taps compute the values whole; nothing to add.
- AdamPreconditioner (adamw): D, AdamW's update sensitivity with v held at v_{t-1}, handed to the taps for each
  micro-batch (recomputed after each optimizer step, state load or learning-rate change).
- Deferred (second_order, adamw_vt, midpoint): the taps keep every hooked layer's rows; once the step's last
  backward ran, aggregate_and_log() projects them on a vector u built from g_B = .grad and the optimizer
  (Hessian-vector products and validation passes replayed at other parameters included).

Owns: the optimizer's hooks and what is read from it, and the validation forwards it replays. Must not touch:
the taps and the micro-batch state (it reads the rows they kept), the parameters and their .grad (read only),
the optimizer's state (ghost_engine.updates computes the step without taking it).
"""
import contextlib
import warnings

import torch
from torch import nn

from ghost_engine import updates
from ghost_engine.layers import accum_dtype
from ghost_engine.losses import output_field, per_sample_loss, target_counts
from ghost_engine.values import ADAMW, ADAMW_VT, DEFERRED, LR_INSIDE, SECOND_ORDER


def default_val_forward(model, X_val):
    """The logits of ``model(input_ids=X_val)`` (a tensor, or an output with ``logits``)."""
    output = model(input_ids=X_val)
    return output if torch.is_tensor(output) else output_field(output, "logits")


class _ValCall(nn.Module):
    """``val_forward(model, X)`` as a module, so that torch.func.functional_call can swap the model's
    parameters (its names prefixed with "model.") for one call."""

    def __init__(self, model, val_forward):
        super().__init__()
        self.model, self.val_forward = model, val_forward

    def forward(self, X):
        return self.val_forward(self.model, X)


def make_estimator(value: str, model_map, **deferred):
    """The Estimator of ``value``; ``deferred``: Deferred's keyword arguments (model, task, ignore_index,
    val_forward)."""
    if value == ADAMW:
        return AdamPreconditioner(value, model_map)
    if value in DEFERRED:
        return Deferred(value, model_map, **deferred)
    return Estimator(value, model_map)


class Estimator:
    """first_order and cosine: the taps' dot products are the values; the optimizer is not read."""

    def __init__(self, value: str, model_map):
        self.value, self.map, self.optimizer = value, model_map, None

    def check_optimizer(self, optimizer):
        """The update-aware estimators read the coming step from the optimizer, which must hold every hooked
        parameter: "adamw" and "adamw_vt" an Adam/AdamW, "midpoint" an SGD or Adam/AdamW, "second_order" any
        (its learning rates)."""
        if self.value not in LR_INSIDE:
            return
        what = f"value={self.value!r}"
        if optimizer is None or (self.value in (ADAMW, ADAMW_VT) and not isinstance(optimizer, torch.optim.Adam)):
            got = "no optimizer" if optimizer is None else type(optimizer).__name__
            needs = "torch.optim.AdamW (or Adam)" if self.value in (ADAMW, ADAMW_VT) else "optimizer"
            raise ValueError(f"{what} needs the {needs} that steps the model, passed to attach(optimizer); got {got}")
        if self.value != SECOND_ORDER:
            updates.check_supported(optimizer, what)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name in self.map.hooked_params if id(self.map.params[name]) not in held]
        if missing:
            raise ValueError(f"{what}: the optimizer does not hold parameters {missing[:3]}"
                             f"{'...' if len(missing) > 3 else ''}, so their update is unknown")

    def attach(self, optimizer, pending) -> list:
        """Keep ``optimizer`` (checked by check_optimizer) and hook it; ``pending()``: whether a micro-batch of the
        step is prepared or filed and not yet aggregated. Returns the hooks' handles."""
        self.optimizer = optimizer
        return []

    def start_step(self):
        """The first micro-batch of an optimizer step is being prepared."""

    def preconditioner(self):
        """adamw: {parameter name: D} for the coming micro-batch; else None."""
        return None

    def keep(self, finished):
        """A micro-batch's backward ran (its MicroBatchResult)."""

    def dots(self, finished: list, val_batch):
        """Deferred: [P, B_step] the values per hooked parameter of the step's MicroBatchResults; else None (the
        taps' dot products are the values). val_batch: (X_val, Y_val, N_val)."""
        return None


class AdamPreconditioner(Estimator):
    """adamw: D for the coming step, shared by its micro-batches."""

    _cached = None  # (the groups' hyper-parameters, D), until the optimizer steps or loads a state

    def attach(self, optimizer, pending) -> list:
        self.optimizer, self._cached = optimizer, None
        # D is recomputed after each optimizer step or state load (and lr change)
        return [optimizer.register_step_post_hook(self._on_optimizer_change),
                optimizer.register_load_state_dict_post_hook(self._on_optimizer_change)]

    def _on_optimizer_change(self, *args):
        if self._cached is not None:  # D is stale; its tensors are written over by the next _compute
            self._cached = (None, self._cached[1])

    def preconditioner(self) -> dict:
        key = self._hyperparameters()  # once per optimizer step (and lr), shared by its micro-batches
        if self._cached is None or key is None or self._cached[0] != key:
            self._cached = (key, self._compute(self._cached[1] if self._cached is not None else {}))
        return self._cached[1]

    def _hyperparameters(self):
        """The groups' (lr, betas, eps), or None where one is a tensor (then D is recomputed every micro-batch:
        comparing device tensors would synchronise)."""
        key = tuple((group["lr"], *group["betas"], group["eps"]) for group in self.optimizer.param_groups)
        return None if any(torch.is_tensor(x) for group in key for x in group) else key

    def _compute(self, previous: dict) -> dict:
        """{parameter name: D} for the optimizer's coming step, in the accumulation dtype: AdamW's update
        sensitivity with the second moment held at v_{t-1} (updates.fixed_state_sensitivity), written over the
        tensors of `previous` (the last step's D, no longer used). Before the first step v_{t-1} = 0."""
        optimizer, wanted = self.optimizer, {id(self.map.params[name]): name for name in self.map.hooked_params}
        out, fresh = {}, []
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = wanted.get(id(p))
                if name is None:
                    continue
                if "exp_avg_sq" not in optimizer.state.get(p, {}):
                    fresh.append(name)
                out[name] = updates.fixed_state_sensitivity(optimizer, group, p, accum_dtype(p), previous.get(name))
        if fresh:  # stacklevel: the caller of GradDotProdEngine.prepare_forward_input
            warnings.warn(f"value='adamw' before the optimizer's first step: v_0 = 0 for {len(fresh)} parameter(s), "
                          "so D = lr/eps there and the values are about 1/eps times the first-order ones (exactly "
                          "what the fixed-state formula says; see docs/METHOD.md section 2.1)", stacklevel=4)
        return out


class Deferred(Estimator):
    """second_order, adamw_vt, midpoint: phi_i = w_i·<grad l_i, u>, u known once the step's last backward ran."""

    def __init__(self, value: str, model_map, *, model, task: str, ignore_index: int, val_forward=None):
        super().__init__(value, model_map)
        self.model, self.task, self.ignore_index = model, task, ignore_index
        self.val_forward = val_forward or default_val_forward
        self.val_grads = {}  # grad L_val of the step's micro-batches (the same for each)
        self.val_autocast = None  # the autocast (device type, dtype) of the step's forward
        self.stepped = False  # optimizer.step() ran between the step's backward and aggregate_and_log()

    def attach(self, optimizer, pending) -> list:
        self.optimizer = optimizer

        def on_step(*args):
            if pending():
                self.stepped = True

        return [optimizer.register_step_post_hook(on_step)]

    def start_step(self):
        self.stepped = False

    def keep(self, finished):
        self.val_grads, self.val_autocast = finished.val_grads, finished.autocast

    @torch.no_grad()
    def dots(self, finished: list, val_batch) -> torch.Tensor:
        """[P, B_step] <grad l_i, u> per hooked parameter, u the estimator's vector (_vectors): every kept layer
        use projected on u (the projection path of the layer rules; a tied parameter's two uses add up to its
        per-sample gradient)."""
        if self.stepped:
            raise RuntimeError(f"value={self.value!r}: optimizer.step() ran before aggregate_and_log(); the "
                               "estimator needs the step's gradient and the optimizer state before the update")
        vectors = self._vectors(val_batch)
        row = {name: k for k, name in enumerate(self.map.hooked_params)}
        out = []
        for micro_batch in finished:
            raw = torch.zeros_like(micro_batch.per_param)
            for layer, act_tr, grad_tr, act_v, grad_v in micro_batch.deferred:
                if act_tr is None:  # the layer's output got no gradient
                    continue
                totals = {local: vectors[pname] for local, pname in layer.params.items()}
                dots = layer.rule.per_sample_dots(layer.module, act_tr, grad_tr, act_v, grad_v, totals,
                                                  dict.fromkeys(layer.params, False))
                for local, pname in layer.params.items():
                    raw[row[pname]] += dots[local].to(raw.dtype)
            out.append(raw * micro_batch.norm_scale)
        return torch.cat(out, dim=1)

    def _vectors(self, val_batch) -> dict:
        """{hooked parameter: u} with phi_i = w_i·<grad l_i, u> (docs/METHOD.md section 2.1), from g_B = .grad
        (the gradient the coming optimizer step uses) and grad L_val from the taps:
            second_order  u = lr ⊙ (grad L_val - 1/2 H_val (lr ⊙ g_B))
            adamw_vt      u = S(g_B) ⊙ grad L_val
            midpoint      u = S(g_B / 2) ⊙ grad L_val(θ_{t+1}(g_B / 2))
        with S = -dθ_{t+1}/dg the optimizer's update sensitivity (ghost_engine.updates)."""
        optimizer, params, hooked = self.optimizer, self.map.params, self.map.hooked_params
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        val_grads = self.val_grads
        batch = {}
        for name, p in params.items():
            if p.grad is None and name in hooked:
                raise RuntimeError(f"value={self.value!r} reads the step's batch gradient from .grad, but {name}.grad "
                                   "is None: call aggregate_and_log() after the step's last backward and before "
                                   "optimizer.zero_grad()")
            dtype = val_grads[name].dtype if name in val_grads else accum_dtype(p)
            batch[name] = torch.zeros(p.shape, dtype=dtype, device=p.device) if p.grad is None else p.grad.to(dtype)
        if self.value == SECOND_ORDER:
            lr = {name: group_of[id(p)]["lr"] if id(p) in group_of else 0.0 for name, p in params.items()}
            hvp = self._val_hvp(val_batch, {name: lr[name] * g for name, g in batch.items()})
            return {name: lr[name] * (val_grads[name] - 0.5 * hvp[name]) for name in val_grads}
        if self.value == ADAMW_VT:
            return {name: updates.step(optimizer, group_of[id(p)], p, batch[name], update=False)[1].mul_(
                val_grads[name]) for name, p in params.items() if name in val_grads}
        moved, sensitivity = {}, {}  # midpoint: the step with g_B / 2, and its sensitivity there
        for name, p in params.items():
            if id(p) in group_of:
                new, sensitivity[name] = updates.step(optimizer, group_of[id(p)], p, batch[name] / 2)
                moved[name] = new.to(p.dtype)
        val_at_midpoint = self._val_grad_at(val_batch, moved)
        return {name: sensitivity[name].mul_(val_at_midpoint[name]) for name in hooked}

    def _val_loss(self, val_batch, params=None) -> torch.Tensor:
        """L_val (the mean cross-entropy over the validation targets) from ``val_forward``, with the engine's
        taps disarmed, the model in eval mode (no dropout, no activation recomputation; modes restored after)
        and under the autocast of the step's forward; ``params``: {name: tensor} in place of the parameters."""
        X_val, Y_val, n_val_targets = val_batch
        model, modes, autocast = self.model, {m: m.training for m in self.model.modules()}, self.val_autocast
        model.eval()
        try:
            with torch.autocast(*autocast) if autocast else contextlib.nullcontext():
                if params is None:
                    logits = self.val_forward(model, X_val)
                else:
                    logits = torch.func.functional_call(_ValCall(model, self.val_forward),
                                                        {f"model.{n}": t for n, t in params.items()}, (X_val,))
        finally:
            for module, training in modes.items():
                module.training = training
        ce = per_sample_loss(logits, Y_val, self.task, self.ignore_index)
        counts = target_counts(Y_val, self.task, self.ignore_index).to(ce.dtype)
        return (ce * counts).sum() / n_val_targets

    def _val_grad_at(self, val_batch, moved: dict) -> dict:
        """grad L_val at the parameters ``moved`` ({name: tensor}; the others as they are), for the hooked ones."""
        hooked = self.map.hooked_params
        params = {name: moved.get(name, p.detach()).requires_grad_() for name, p in self.map.params.items()}
        with torch.enable_grad():
            loss = self._val_loss(val_batch, params)
            grads = torch.autograd.grad(loss, [params[name] for name in hooked], allow_unused=True)
        return {name: torch.zeros_like(params[name]) if g is None else g for name, g in zip(hooked, grads)}

    def _val_hvp(self, val_batch, direction: dict) -> dict:
        """H_val·direction for the hooked parameters: the gradient of <grad L_val, direction> (double backward;
        attention through PyTorch's math kernel, whose backward is differentiable)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        named, hooked = self.map.params, self.map.hooked_params
        names = list(named)
        params = [named[name] for name in names]
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            grads = torch.autograd.grad(self._val_loss(val_batch), params, create_graph=True, allow_unused=True)
            inner = sum((g * direction[name].to(g.dtype)).sum() for name, g in zip(names, grads) if g is not None)
            hvp = torch.autograd.grad(inner, [named[name] for name in hooked], allow_unused=True)
        return {name: torch.zeros_like(named[name]) if h is None else h for name, h in zip(hooked, hvp)}
