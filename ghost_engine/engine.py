"""GradDotProdEngine: per-sample <grad l_i, grad L_val> and the Regular training gradient from one backward.

The public engine: construction, attach()/detach(), and the per-step API (prepare_forward_input, the model's
forward and backward, prepare_gradients, aggregate_and_log), with check_graph, check_loss and the path report.
It composes objects with one job each and holds no maths of its own:
- ghost_engine.model_map: ModelMap, the hooked layers, parameters, ties, exclusions and FSDP2 sharding,
  worked out once at construction;
- ghost_engine.micro_batch: MicroBatch, the state of one micro-batch from prepare_forward_input() to its filing
  (the scales of the dot products and of .grad);
- ghost_engine.tap: Taps and _Tap, the forward hooks and the autograd Function whose backward computes the
  dot products and corrects .grad (how it works: that module's docstring, docs/METHOD.md sections 1-2);
- ghost_engine.checks: Checks, the refusals before any backward (dropout, BatchNorm statistics, a parameter
  used outside its layer, the loss's scale) and the label shapes;
- ghost_engine.estimators: the Estimator of ``value``, for the estimators that read the optimizer or the
  step's batch gradient;
- ghost_engine.result: DotProductResult, its assembly from the micro-batches, the path report;
- ghost_engine.projection: Projection, the fixed matrices and column layout of the projected per-sample gradients
  (``projection=``), which the taps fill from the rules' ``per_sample_projection`` in the same backward.
The layer maths live in ghost_engine.layers (one file per family), dropout detection in ghost_engine.dropout.

Must not touch: the layer maths, the model beyond registering hooks (detach() removes every one).
"""
import weakref

import torch
from torch import nn

from ghost_engine.checks import Checks, check_labels
from ghost_engine.dropout import active_dropout_error, dropout_sites
from ghost_engine.estimators import make_estimator
from ghost_engine.losses import IGNORE_INDEX, TASKS, target_counts
from ghost_engine.micro_batch import MicroBatch
from ghost_engine.layers import accum_dtype
from ghost_engine.model_map import ModelMap, fsdp_sharding, trainable_names
from ghost_engine.projection import Projection, projection_shape
from ghost_engine.result import DotProductResult, assemble, format_path_report, path_report
from ghost_engine.tap import Taps
from ghost_engine.values import ADAMW, ADAMW_VT, COSINE, DEFERRED, FIRST_ORDER, LR_INSIDE, SECOND_ORDER, VALUES

# the value names are imported from here too (ghost_engine.values holds them)
__all__ = ["GradDotProdEngine", "DotProductResult", "LOSS_REDUCTIONS", "VALUES", "DEFERRED", "LR_INSIDE",
           "FIRST_ORDER", "SECOND_ORDER", "ADAMW", "ADAMW_VT", "COSINE"]

LOSS_REDUCTIONS = ("mean", "sum")

_ATTACHED = weakref.WeakKeyDictionary()  # model -> its attached engine (one at a time)


class GradDotProdEngine:
    """Exact <grad l_i, grad L_val> for every training sample i, from one ordinary backward pass.

    Args:
        model: the model (un-wrapped; wrap it in DDP or torch.compile after constructing the engine).
        val_batch: (X_val, Y_val), the fixed validation batch, in the model's input format.
        task: "causal_lm" (labels [R, T], shifted inside the model, -100 ignored), "classification"
            (labels [R]) or "token_classification" (labels [R, T], one per input token, not shifted, -100
            ignored: token classification and masked language modelling).
        loss_reduction: how the model reduces its loss over the concatenated batch: "mean" over all
            counted targets (Hugging Face) or "sum".
        unsupported: "error" (default): a trainable parameter in a module without a layer rule is a
            ValueError. "exclude": such parameters are left out of the dot products (listed in
            ``result.excluded_parameters``) and still get the exact Regular training gradient; their
            modules must not contain supported layers.
        ignore_index: label value that is not a target.
        value: the per-sample estimator (docs/METHOD.md section 2.1, DotProductResult): "first_order" (default)
            <grad l_i, grad L_val>; "adamw" <D ⊙ grad L_val, grad l_i> with D read from the Adam/AdamW optimizer
            given to attach(); "cosine" the cosine of grad l_i and grad L_val; "second_order", "adamw_vt" and
            "midpoint" need the step's batch gradient: the taps keep every hooked layer's training rows until
            aggregate_and_log(), which must run after the step's last backward and before optimizer.step(),
            with .grad holding the gradient the optimizer will use (unscaled); under torch.compile their hooks
            run eagerly (a graph break per layer).
        projection: also keep every training sample's projected gradient Π(grad l_i) (ghost_engine.projection,
            docs/METHOD.md section 7) in ``result.projections`` [B, K], and Π(grad L_val) (value="adamw":
            Π(D ⊙ grad L_val), the vector its dot products are taken against) in ``result.val_projection``: a dict of Projection.for_shapes's sizes and draw (``dim`` per side or
            ``total`` per row, ``dims`` per parameter, ``seed``, ``kind``), or a Projection (one rebuilt from a
            store's description, to project queries in the same space). ``engine.projection`` describes it.
            With ``val_batch=None`` the engine keeps projections only (value="first_order"): no validation rows,
            ``.grad`` as Regular training leaves it, ``result.dot_products`` None.
        val_forward: for "second_order" and "midpoint", which evaluate the validation loss again (at θ_t for
            a Hessian-vector product, at the midpoint parameters): a function (model, X_val) -> logits.
            Default: ``model(input_ids=X_val)`` and its ``logits``.

    Dropout is refused, never valued: the validation rows share the training forward, so it would make grad L_val
    a random draw (ghost_engine/dropout.py; the way out: dropout 0, ``ghost_engine.disable_dropout(model)``, or
    eval mode). Checked at construction, at every armed forward and by the first armed eager forward in each mode.
    """

    def __init__(self, model: nn.Module, val_batch, *, task: str = "causal_lm", loss_reduction: str = "mean",
                 unsupported: str = "error", ignore_index: int = IGNORE_INDEX, value: str = FIRST_ORDER,
                 val_forward=None, projection=None):
        if value not in VALUES:
            raise ValueError(f"value={value!r}; expected one of {VALUES}")
        if val_batch is None and (projection is None or value != FIRST_ORDER):
            raise ValueError("val_batch=None is for an engine that keeps projections only: give projection= and "
                             "value='first_order'")
        self.value = value
        if task not in TASKS:
            raise ValueError(f"task={task!r}; expected one of {TASKS}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction={loss_reduction!r}; expected one of {LOSS_REDUCTIONS}")
        if unsupported not in ("error", "exclude"):
            raise ValueError(f"unsupported={unsupported!r}; expected 'error' or 'exclude'")
        self.model = model
        self.task = task
        self.loss_reduction = loss_reduction
        self.ignore_index = ignore_index
        self.param_names = trainable_names(model)  # id(parameter) -> name, first name under model.named_parameters()
        # dropout would drop units of the validation rows too (ghost_engine/dropout.py): refused now, at every armed
        # forward (model.train() after construction) and, for what no module attribute shows, by the first eager
        # forward's RandomDrawProbe in each mode (Checks)
        sites = dropout_sites(model)
        error = active_dropout_error(model, sites)
        if error is not None:
            raise ValueError(error)
        # FSDP2: the engine is built after fully_shard; each forward uses the unsharded parameters, which
        # the taps and gradient hooks then use too (FSDP reduce-scatters their .grad)
        sharded = fsdp_sharding(model)
        if sharded and unsupported == "exclude":
            raise ValueError("unsupported='exclude' is not supported with FSDP2 (the excluded modules' validation "
                             "rows are recomputed with their parameters, which FSDP holds sharded)")
        if sharded and value not in (FIRST_ORDER, ADAMW):
            raise ValueError(f"value={value!r} is not supported with FSDP2 (it would need the step's whole batch "
                             "gradient or per-sample norms of sharded parameters); use value='first_order' or "
                             "'adamw'")
        self._map = ModelMap(model, self.param_names, unsupported, sharded)
        self.layers, self.excluded_modules = self._map.layers, self._map.excluded_modules
        self.excluded_parameters = self._map.excluded_parameters
        if value == COSINE:
            missing = [f"{layer.name} ({layer.rule.__name__})" for layer in self.layers
                       if not hasattr(layer.rule, "per_sample_sq_norms")]
            if missing:
                raise ValueError(f"value='cosine' needs per-sample gradient norms, which the rules of {missing} "
                                 "do not provide")
        self._mb = MicroBatch(value, loss_reduction, self._map.hooked_params)
        self._taps = Taps(self._map, self._mb, value, loss_reduction)
        self._checks = Checks(model, self._map, self._mb, sites, task, loss_reduction, ignore_index)
        self._estimator = make_estimator(value, self._map, model=model, task=task, ignore_index=ignore_index,
                                         val_forward=val_forward)
        self.projection = None if projection is None else self._projection(projection)
        self._proj_placed = None  # (device, dtype) of the matrices in the micro-batch state
        self._handles = []
        self._finished = []  # MicroBatchResults of the current step
        self._shapes = {}  # layer name -> (training, validation) input shapes of its last forward
        self.X_val = self.Y_val = None
        self.n_val_targets = 0
        if val_batch is not None:
            self.set_val_batch(*val_batch)

    def _projection(self, spec) -> Projection:
        """The Projection of the hooked parameters (from sizes, or a given one that must match their shapes)."""
        shapes = {}
        for layer in self.layers:
            for (local, pname), p in zip(layer.params.items(), layer.tensors):
                shapes.setdefault(pname, projection_shape(layer.rule, local, p))
        shapes = {name: shapes[name] for name in self._map.hooked_params}
        if isinstance(spec, Projection):
            got = {b.name: b.shape for b in spec.blocks}
            if got != shapes:
                raise ValueError("the projection was made for other parameters or shapes: "
                                 f"{sorted(set(got.items()) ^ set(shapes.items()))[:3]}")
            projection = spec
        elif isinstance(spec, dict):
            projection = Projection.for_shapes(shapes, **spec)
        else:
            raise ValueError(f"projection={spec!r}: expected a dict of sizes (dim=, total=, dims=, seed=, kind=) or "
                             "a ghost_engine.projection.Projection")
        self._mb.proj_sizes = [b.stop - b.start for b in projection.blocks]
        return projection

    # ------------------------------------------------------------------ set-up
    def attach(self, optimizer=None):
        """Register the hooks. ``optimizer`` (optional) must only hold this model's parameters."""
        if self._handles:
            raise ValueError("the engine is already attached; call detach() first")
        other = _ATTACHED.get(self.model)
        if other is not None and other is not self:
            raise ValueError("another GradDotProdEngine is attached to this model; call its detach() first "
                             "(two engines would each remove the validation rows' share from .grad)")
        if optimizer is not None:
            model_params = {id(p) for p in self.model.parameters()}
            foreign = [i for group in optimizer.param_groups for i, p in enumerate(group["params"])
                       if id(p) not in model_params]
            if foreign:
                raise ValueError(f"the optimizer holds {len(foreign)} parameter(s) that are not the model's")
        self._estimator.check_optimizer(optimizer)
        current = {name: p for name, p in self.model.named_parameters() if name in self._map.params}
        moved = [name for name, p in self._map.params.items() if current.get(name) is not p]
        if moved:
            raise ValueError(f"parameters {moved[:3]} were replaced since the engine was built (fully_shard does "
                             "this): build the engine after fully_shard, and before DDP / torch.compile")
        self._handles = self._taps.attach(self.model) + self._checks.attach()
        self._handles += self._estimator.attach(optimizer, pending=lambda: bool(self._finished) or self._mb.armed)
        _ATTACHED[self.model] = self
        return self

    def detach(self):
        """Remove every hook and drop all per-step state; the model and optimizer are as before attach()."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._taps.remove_hooks()
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
        self._mb.disarm()
        self._finished = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def set_val_batch(self, X_val: torch.Tensor, Y_val: torch.Tensor):
        """Replace the validation batch (takes effect at the next prepare_forward_input)."""
        if not torch.is_tensor(X_val) or not torch.is_tensor(Y_val):
            raise ValueError("val_batch must be a pair of tensors (X_val, Y_val)")
        if X_val.shape[0] == 0:
            raise ValueError("the validation batch has no rows")
        if Y_val.shape[0] != X_val.shape[0]:
            raise ValueError(f"validation inputs have {X_val.shape[0]} rows but labels have {Y_val.shape[0]}")
        check_labels(Y_val, X_val, "validation", self.task)
        n_val = int(target_counts(Y_val, self.task, self.ignore_index).sum())
        if n_val == 0:
            raise ValueError(f"the validation batch has no targets (every label is {self.ignore_index})")
        self.X_val, self.Y_val, self.n_val_targets = X_val, Y_val, n_val

    @property
    def loss_checked(self) -> bool:
        """Whether the model's loss has been checked against ``loss_reduction`` (see check_loss)."""
        return self._checks.loss_checked

    @property
    def val_batch_size(self) -> int:
        return 0 if self.X_val is None else self.X_val.shape[0]

    # ------------------------------------------------------------------ per step
    def prepare_forward_input(self, X_train: torch.Tensor, Y_train: torch.Tensor, loss_multiplier: float = 1.0):
        """Return ([X_train; X_val], [Y_train; Y_val]) and arm the hooks for this micro-batch.

        ``loss_multiplier``: the factor the model's loss is multiplied by before backward
        (1/grad_accum, a GradScaler scale, ...). The training gradient in ``.grad`` carries it,
        exactly as in Regular training; the dot products do not.
        """
        if not self._handles:
            raise ValueError("call attach() before prepare_forward_input()")
        if X_train.shape[0] == 0:
            raise ValueError("the training batch has no rows")
        if Y_train.shape[0] != X_train.shape[0]:
            raise ValueError(f"training inputs have {X_train.shape[0]} rows but labels have {Y_train.shape[0]}")
        if self.X_val is not None and X_train.shape[1:] != self.X_val.shape[1:]:
            raise ValueError(f"training inputs have shape {tuple(X_train.shape)} but the validation batch "
                             f"{tuple(self.X_val.shape)}: the sequence length (all dims after the first) must match")
        check_labels(Y_train, X_train, "training", self.task)
        if not loss_multiplier > 0:
            raise ValueError(f"loss_multiplier={loss_multiplier} must be positive")
        counts = target_counts(Y_train, self.task, self.ignore_index)
        n_train = int(counts.sum())
        if n_train == 0:
            raise ValueError(f"the training batch has no targets (every label is {self.ignore_index})")
        if self._mb.armed:
            self._finish_micro_batch()
        if not self._finished:  # the first micro-batch of an optimizer step
            self._estimator.start_step()
        first_param = self._map.params[next(iter(self._map.params))]
        if self.projection is not None:
            self._place_projection(X_train.device, accum_dtype(first_param))
        if self.X_val is None:  # projections only
            self._mb.arm(X_train, counts, n_train, 0, 0, loss_multiplier, first_param, None)
            return X_train, Y_train
        if self.X_val.device != X_train.device:  # move the fixed validation batch once, not every step
            self.X_val, self.Y_val = self.X_val.to(X_train.device), self.Y_val.to(Y_train.device)
        self._mb.arm(X_train, counts, n_train, self.X_val.shape[0], self.n_val_targets, loss_multiplier, first_param,
                     self._estimator.preconditioner())
        return torch.cat([X_train, self.X_val]), torch.cat([Y_train, self.Y_val])

    def _place_projection(self, device, dtype):
        """The projection matrices, transposed, on the batch's device in the accumulation dtype (drawn once)."""
        if self._proj_placed == (device, dtype):
            return
        mats = self._mb.proj_mats
        for block in self.projection.blocks:
            drawn = self.projection.matrices(block.name)
            mats[block.name] = tuple(None if m is None else m.t().to(device=device, dtype=dtype).contiguous()
                                     for m in drawn + (None,) * (2 - len(drawn)))
        self._proj_placed = (device, dtype)

    def _finish_micro_batch(self):
        finished = self._mb.finish()
        self._estimator.keep(finished)
        self._shapes.update(finished.seen)
        self._finished.append(finished)

    def prepare_gradients(self):
        """Finish the step's backward passes. ``.grad`` already holds the Regular training gradient of the
        training rows (the taps and parameter hooks correct it inside autograd); this checks the backward
        ran and files the micro-batch's dot products."""
        if self._mb.armed:
            self._finish_micro_batch()
        if not self._finished:
            raise RuntimeError("prepare_gradients() without a prepared and back-propagated batch")

    def aggregate_and_log(self) -> DotProductResult:
        """The dot products of every micro-batch since the last call; clears them."""
        if self._mb.armed:
            self._finish_micro_batch()
        if not self._finished:
            raise RuntimeError("aggregate_and_log() without a prepared and back-propagated batch")
        finished, self._finished = self._finished, []
        dots = self._estimator.dots(finished, (self.X_val, self.Y_val, self.n_val_targets))
        return assemble(finished, self._map.hooked_params, self.excluded_parameters, self.value, dots)

    def check_graph(self, output) -> bool:
        """Check that the forward which produced ``output`` (the model's output for the prepared batch: a tensor,
        or a dict, tuple or object holding tensors) used every hooked parameter only inside the forward of the
        layer(s) holding it. A parameter used by an operation elsewhere (a head computed as
        ``F.linear(h, wte.weight)`` instead of through a module; a layer's weight read outside its forward)
        would give dot products and a ``.grad`` without that use's share, silently, so it raises a ValueError
        naming the parameter and the operations. Walks the autograd graph once; runs by itself on the first
        armed eager forward (call it before the backward, which frees the graph). A compiled forward shows
        its graph as one node, so the check says nothing there: run the first step eagerly to have it.
        Returns True if it checked, False when no output tensor has a graph (or the micro-batch is not armed)."""
        return self._checks.check_graph(output)

    def check_loss(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> bool:
        """Check that ``loss`` (the model's loss on the prepared [train; val] rows, before any multiplier)
        is the cross-entropy of ``logits`` reduced as ``loss_reduction`` says: the mean over every counted
        target of the concatenated batch, or the sum. Any other scale (a divisor counting the training
        rows' targets only, such as Trainer's ``num_items_in_batch``; a per-row mean; extra loss terms)
        would make the dot products and ``.grad`` silently wrong, so it raises a ValueError. Runs by itself on
        the first eager forward of a Hugging Face-style model; returns True if it checked, False if the
        loss or logits are not finite, or the task's loss is not a cross-entropy over class logits."""
        return self._checks.check_loss(loss, logits, labels)

    # ------------------------------------------------------------------ reporting
    def path_report(self) -> list:
        """Per hooked layer: name, type, exact path used in the last step and its extra flops."""
        return path_report(self.layers, {**self._shapes, **self._mb.seen}, self.value)

    def format_path_report(self) -> str:
        return format_path_report(self.path_report())
