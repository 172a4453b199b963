"""GradDotProdEngine: per-sample <grad l_i, grad L_val> and the Regular training gradient from one backward.

How it works (docs/METHOD.md sections 1-2). The caller stacks the validation rows under the training rows.
A forward hook on each supported layer wraps the layer's output in a *tap*: a custom autograd Function
that is the identity in the forward and saves the layer's input. Its backward receives the layer's
output gradient and hands (input, output gradient) to the layer's rule, which returns the validation
gradient G_val and the per-sample dot products without forming per-sample gradients. The tap returns
both *as gradients*:
- the raw dot products as the gradient of the parameter's row of the "sink", a [parameters, B] leaf made
  per micro-batch;
- -G_val as a gradient of the layer's parameters, so that autograd's own sum leaves only the training
  rows' share in ``.grad`` (before DDP's reducer sees it); a hook on each parameter rescales it to
  what Regular training would produce.
The backward touches no Python state, so torch.compile traces the taps into the model's one
forward/backward graph (no graph break per layer), and the same code runs eagerly.

A parameter shared by an embedding and a later linear layer (GPT-2's wte/lm_head) has cross terms
<G_i(one use), G_val(other use)>. The embedding's tap outputs "channel" tensors that the linear's tap
takes as inputs; the linear's backward, which runs first, returns through them its G_val and its
training input and output gradient restricted to the weight rows of the validation tokens; the
embedding's backward then adds the cross terms.

Scaling. With the model's loss L = s·Σ_all ce_t (s = 1/N_all for a mean, 1 for a sum) multiplied by
``loss_multiplier`` m before backward, every hooked output gradient carries the factor c = m·s, so
    grad l_i     = G_i / (c·n_i)          (l_i: mean over sample i's n_i targets)
    grad L_val   = G_val / (c·N_val)
    dot_i        = <G_i, G_val> / (c²·n_i·N_val)
    Regular grad = m·s_train·Σ_train ∇ce = (full − G_val)·(s_train / s).
"""
import contextlib
import math
import warnings
import weakref
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ghost_engine import updates
from ghost_engine.dropout import RandomDrawProbe, active_dropout_error, dropout_sites, random_draw_error
from ghost_engine.layers import accum_dtype, rule_for, to_dtype
from ghost_engine.layers.channel_norm import batch_statistics_error
from ghost_engine.losses import IGNORE_INDEX, TASKS, per_sample_loss, target_counts
from ghost_engine.values import ADAMW, ADAMW_VT, COSINE, DEFERRED, FIRST_ORDER, LR_INSIDE, SECOND_ORDER, VALUES

LOSS_REDUCTIONS = ("mean", "sum")
FIRST, SECOND = "first", "second"  # roles of the two uses of a tied parameter, in forward order


@dataclass
class DotProductResult:
    """Per-sample values of one optimizer step (all micro-batches since the last aggregate, in order).

    ``value`` names the estimator the numbers are (docs/METHOD.md section 2.1):
    - "first_order": dot_products[i] = <grad l_i, grad L_val>;
    - "second_order": <grad l_i, lr ⊙ (grad L_val - 1/2 H_val (lr ⊙ g_B))>, the Shapley value of the plain
      gradient step's game expanded to second order (g_B the step's batch gradient, H_val the validation
      Hessian);
    - "adamw": <D ⊙ grad L_val, grad l_i>, D the derivative of AdamW's update with respect to the gradient
      with the second moment held at v_{t-1};
    - "adamw_vt": <S(g_B) ⊙ grad L_val, grad l_i>, S = -dθ_{t+1}/dg the derivative of AdamW's actual update
      at g_B (through v_t as well);
    - "midpoint": <S(g_B/2) ⊙ grad L_val(θ_{t+1}(g_B/2)), grad l_i>, the optimizer's (SGD or Adam/AdamW)
      game differentiated at half the batch gradient (exact for a quadratic game);
    for all four the learning rate is inside: phi_i = w_i · dot_products[i];
    - "cosine": <grad l_i, grad L_val> / (||grad l_i|| · ||grad L_val||); ``grad_norms`` and
      ``val_grad_norm`` hold the two norms.
    ``per_parameter`` splits the same number over the parameters (it sums to ``dot_products``; for
    "cosine" each parameter's dot product is divided by the two total norms).
    """

    dot_products: torch.Tensor  # [B_train] total over all hooked parameters
    per_parameter: dict  # {parameter name: Tensor [B_train]}
    token_counts: torch.Tensor  # [B_train] targets n_i of each sample
    weights: torch.Tensor  # [B_train] n_i / N_train of the sample's micro-batch (its weight in that batch loss)
    excluded_parameters: list = field(default_factory=list)
    micro_batches: int = 1
    value: str = FIRST_ORDER
    grad_norms: torch.Tensor = None  # cosine: [B_train] ||grad l_i|| over the hooked parameters
    val_grad_norm: torch.Tensor = None  # cosine: 0-dim, ||grad L_val|| over the hooked parameters
    first_order: torch.Tensor = None  # second_order, adamw_vt, midpoint: [B_train] <grad l_i, grad L_val> of the
    #   same rows, which their taps compute anyway (phi_i = lr·w_i·first_order[i])


@dataclass(eq=False)
class _Layer:
    name: str
    module: nn.Module
    rule: type
    params: dict  # local name -> global parameter name
    tied: dict  # local name -> whether the parameter is shared with another module
    tensors: tuple = ()  # the parameters, in the order of `params`
    # fixed at set-up, so that the forward hook does not work them out at every step:
    roles: tuple = None  # (None, ...) when no parameter is tied; None when the roles depend on the step
    autocast_input: bool = False  # the rule's autocast_input


@dataclass(eq=False)
class _MicroBatch:
    """The armed micro-batch. One object for the engine's lifetime, refilled by prepare_forward_input:
    torch.compile guards on the identity of the objects its traced hooks read."""

    armed: bool = False
    generation: int = 0  # counts prepared micro-batches: a tap of an earlier one must not run its backward
    n_train: int = 0
    rows: int = 0
    row_len: int = 0  # dim 1 of the inputs (T for token ids), 0 for inputs with one dim
    counts: torch.Tensor = None  # [B] n_i
    n_train_targets: int = 0
    dot_scale: torch.Tensor = None  # [B] 1 / (c²·n_i·N_val), 0 where n_i = 0
    # s_train / s while armed, else 1: a CPU scalar tensor the parameters' gradient hooks multiply by (a C function,
    # no Python frame per parameter; on a GPU a CPU scalar is a kernel argument, nothing waits)
    grad_scale: torch.Tensor = field(default_factory=lambda: torch.ones((), dtype=torch.float64))
    sink: torch.Tensor = None  # [P, B] leaf, one row per hooked parameter; .grad collects raw <G_i, G_val>
    sinks: dict = field(default_factory=dict)  # parameter name -> its row of `sink` (a view)
    seen: dict = field(default_factory=dict)  # layer name -> (training, validation) input shapes
    channels: dict = field(default_factory=dict)  # tied parameter -> (support, first, channels, training ids)
    precond: dict = field(default_factory=dict)  # adamw: parameter name -> D (parameter layout)
    deferred: list = field(default_factory=list)  # DEFERRED: (layer, act_tr, grad_tr, act_v, grad_v) per tap
    val_grads: dict = field(default_factory=dict)  # DEFERRED: parameter name -> grad L_val (from the taps)
    autocast: tuple = None  # DEFERRED: (device type, dtype) of the autocast the forward ran under, or None
    norm_sink: torch.Tensor = None  # cosine: [P, B + 1] leaf; .grad: raw ||G_i||², last column ||G_val||²
    norm_sinks: dict = field(default_factory=dict)  # cosine: parameter name -> its row of `norm_sink`
    norm_scale: torch.Tensor = None  # cosine, DEFERRED: [B] 1 / (c·n_i), 0 where n_i = 0
    val_norm_scale: float = 0.0  # cosine, DEFERRED: 1 / (c·N_val)


_ATTACHED = weakref.WeakKeyDictionary()  # model -> its attached engine (one at a time)


def _default_val_forward(model, X_val):
    """The logits of ``model(input_ids=X_val)`` (a tensor, or an output with ``logits``)."""
    output = model(input_ids=X_val)
    return output if torch.is_tensor(output) else _field(output, "logits")


class _ValCall(nn.Module):
    """``val_forward(model, X)`` as a module, so that torch.func.functional_call can swap the model's
    parameters (its names prefixed with "model.") for one call."""

    def __init__(self, model, val_forward):
        super().__init__()
        self.model, self.val_forward = model, val_forward

    def forward(self, X):
        return self.val_forward(self.model, X)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no DTensor
        return False
    return isinstance(t, DTensor)


def _fsdp_sharding(model: nn.Module) -> bool:
    """True if the model's parameters are sharded by FSDP2 (``fully_shard``: DTensors placed Shard(0) and/or
    Replicate, owned by FSDP modules), False if none is a DTensor. Any other DTensor (tensor parallelism)
    is a ValueError: its layers see sharded activations, which the layer rules do not cover."""
    dtensors = {name: p for name, p in model.named_parameters() if _is_dtensor(p)}
    if not dtensors:
        return False
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import Replicate, Shard

    managed = {id(p) for module in model.modules() if isinstance(module, FSDPModule) for p in module.parameters()}
    other = [name for name, p in dtensors.items()
             if id(p) not in managed or not all(pl == Replicate() or pl == Shard(0) for pl in p.placements)]
    if other:
        raise ValueError(f"parameters {other[:3]}{'...' if len(other) > 3 else ''} are DTensors not sharded by "
                         "FSDP2 (fully_shard: Shard(0), HSDP: Replicate + Shard(0)); tensor parallelism is not "
                         "supported")
    return True


def _autocast_dtype(device_type: str):
    """The autocast dtype if autocast is on for `device_type`, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. recomputing a checkpointed forward). A forward that
    torch.compile traces is never a recomputation (compiled graphs recompute inside their own backward)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _field(output, name):
    """``output.name`` or ``output[name]`` of a model output (ModelOutput, dict, object), else None."""
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None)


def _support(ids: torch.Tensor):
    """The validation tokens' rows of a tied weight, sorted with repeats, and a mask of each row's first
    occurrence. Static shapes (no torch.unique): nothing waits for the device, torch.compile traces it."""
    support, _ = torch.sort(ids.reshape(-1))
    first = torch.ones_like(support, dtype=torch.bool)
    first[1:] = support[1:] != support[:-1]
    return support, first


def _output_tensors(output) -> list:
    """The tensors a model output holds at its top level (a tensor; a dict or ModelOutput; a tuple; an object)."""
    if torch.is_tensor(output):
        return [output]
    if isinstance(output, dict):
        values = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    else:
        values = vars(output).values() if hasattr(output, "__dict__") else ()
    return [v for v in values if torch.is_tensor(v)]


def _reverse_graph(roots):
    """({autograd node: [the nodes consuming its output, one per edge]}, {id(leaf): its AccumulateGrad node})
    of the graph behind `roots`."""
    parents, accumulate, seen, stack = {}, {}, set(), list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            accumulate[id(variable)] = node
        for child, _ in node.next_functions:
            if child is not None:
                parents.setdefault(child, []).append(node)
                stack.append(child)
    return parents, accumulate


# nodes that only cast, view or re-lay-out their one input (autocast's cached weight casts, .t(), views): the
# operations that consume a parameter are found through them
_PASS_THROUGH = frozenset({"ToCopyBackward0", "TBackward0", "TransposeBackward0", "TransposeBackward1",
                           "PermuteBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
                           "ExpandBackward0", "AliasBackward0", "UnsqueezeBackward0", "SqueezeBackward0",
                           "SqueezeBackward1", "SqueezeBackward2", "CloneBackward0", "AsStridedBackward0"})


def _consumers(node, parents) -> list:
    """Names of the operations that consume a leaf's AccumulateGrad `node` (one entry per use), looking through
    casts and views, leaving out the engine's taps (which take the parameters to hand back -G_val)."""
    uses = []
    for parent in parents.get(node, ()):
        name = type(parent).__name__
        if name == "_TapBackward":
            continue
        if name in _PASS_THROUGH:
            uses += _consumers(parent, parents)
        else:
            uses.append(name)
    return uses


class _Tap(torch.autograd.Function):
    """apply(engine, layer, meta, out, act, support, first, train_ids, *params, *sinks, *extras, *channels_in)
    -> out[, *channels_out]

    meta = (n_train, compute dtype or None, generation or -1, roles: one of None/FIRST/SECOND per parameter,
    value estimator). extras: one per parameter, none for "first_order"; "adamw": the preconditioner D;
    "cosine": the parameter's row of the norm sink. train_ids: the embedding's training ids, given to the later
    (linear) use of a tied parameter under "cosine" (else None).
    """

    @staticmethod
    def forward(ctx, engine, layer, meta, out, act, support, first, train_ids, *rest):
        ctx.engine, ctx.layer, ctx.meta = engine, layer, meta
        n_params = len(layer.params)
        n_extra = n_params if meta[4] in (ADAMW, COSINE) else 0
        precond = rest[2 * n_params:2 * n_params + n_extra] if meta[4] == ADAMW else ()
        ctx.save_for_backward(act, support, first, train_ids, *precond)
        ctx.set_materialize_grads(False)
        ctx.n_extra = n_extra
        channels_in = rest[2 * n_params + n_extra:]
        ctx.channel_dtypes = tuple(c.dtype for c in channels_in)
        # An output that is not a view is handed on itself, marked as changed in place (no copy): the model may
        # then change it in place (Falcon's `mlp_output += attention_output`), which autograd forbids on a custom
        # Function's view. A view (nn.Linear's output for [rows, T, d] inputs; a positional embedding expanded
        # over the rows) stays a view: marked dirty, its backward would copy its base's whole gradient.
        if out._base is None:
            ctx.mark_dirty(out)
        else:
            out = out.view_as(out)
        if FIRST not in meta[3]:
            return out
        # placeholders the later linear use fills with its gradients: zero-stride, no memory
        shapes = engine._channel_shapes(layer, meta, act, support)
        return (out,) + tuple(out.new_zeros((), dtype=dtype).expand(shape) for shape, dtype in shapes)

    @staticmethod
    def backward(ctx, grad, *channel_grads):
        engine, layer = ctx.engine, ctx.layer
        n_train, dtype, generation, roles, value = ctx.meta
        act, support, first, train_ids, *precond = ctx.saved_tensors
        n_params = len(layer.params)
        if not torch.compiler.is_compiling():
            engine._check_generation(generation)
        if grad is None:
            if value in DEFERRED:
                engine._defer(layer, roles)
            return (None,) * (8 + 2 * n_params + ctx.n_extra + len(ctx.channel_dtypes))
        dtype = dtype or grad.dtype
        grad_out = grad
        if act.is_floating_point():
            act = to_dtype(act, dtype)
        grad = to_dtype(grad, dtype)
        module, rule = layer.module, layer.rule
        sizes = (n_train, act.shape[0] - n_train)  # one call per tensor for its two views (host time per layer)
        act_tr, act_v = act.split_with_sizes(sizes)
        grad_tr, grad_v = grad.split_with_sizes(sizes)
        val_grads = rule.val_grads(module, act_v, grad_v)  # fresh tensors, owned here
        # adamw: the dot products are taken with D ⊙ G_val; .grad still gets the unpreconditioned -G_val
        precond = dict(zip(layer.params, precond))

        def against(local, val_grad):
            return val_grad * precond[local] if precond else val_grad

        later = channel_grads[0] if channel_grads else None  # G_val of the later (linear) use, if it ran
        cross = norm_cross = None
        for local, role in zip(layer.params, roles):
            if role == FIRST and later is not None:
                # <G_i(linear use), G_val(this use)> from the linear's stash, then G_val of both uses
                second_rule = engine._tie_partner[layer.params[local]].rule
                cross = second_rule.stash_dots(channel_grads[1:3], against(local, val_grads[local]), support, first,
                                               n_train)
                val_grads[local].add_(later)
                if value == COSINE:  # <G_i(this use), G_i(linear use)>, the cross term of ||G_i||²
                    norm_cross = rule.tied_cross(module, act_tr, grad_tr, channel_grads[1], channel_grads[3])
        if precond:  # D ⊙ G_val is not low-rank: the Gram path does not apply
            totals = {local: against(local, v) for local, v in val_grads.items()}
            own_only = dict.fromkeys(layer.params, False)
        else:
            totals = val_grads
            own_only = {local: role is None for local, role in zip(layer.params, roles)}
        dots = rule.per_sample_dots(module, act_tr, grad_tr, act_v, grad_v, totals, own_only)
        if value in DEFERRED:
            engine._defer(layer, roles, act_tr, grad_tr, act_v, grad_v, val_grads)
        extra_grads = [None] * ctx.n_extra
        if value == COSINE:  # per parameter: raw ||G_i||² of this use (+ cross terms), then ||G_val||²
            sq = rule.per_sample_sq_norms(module, act_tr, grad_tr)
            extra_grads = []
            for local, role in zip(layer.params, roles):
                sq_i = sq[local] if norm_cross is None or role != FIRST else sq[local] + 2 * norm_cross
                sq_val = (val_grads[local].square().sum() if role != SECOND  # the embedding counts both uses
                          else sq_i.new_zeros(()))
                extra_grads.append(torch.cat([sq_i, sq_val.to(sq_i.dtype).reshape(1)]))
        # -G_val of the layer's own parameters: one in-place call for all of them (one multi-tensor kernel on a GPU)
        own = [val_grads[local] for local, role in zip(layer.params, roles) if role != SECOND]
        if own:
            torch._foreach_neg_(own)
        param_grads, sink_grads, channels_in = [], [], [None] * len(ctx.channel_dtypes)
        for local, role, p in zip(layer.params, roles, layer.tensors):
            sink_grads.append(dots[local] if cross is None or role != FIRST else dots[local] + cross)
            if role == SECOND:  # G_val travels to the embedding, which removes both uses' share from .grad
                stash = rule.make_stash(module, local, act_tr, grad_tr, support)
                if value == COSINE:
                    stash = (*stash, rule.row_stash(module, act_tr, grad_tr, train_ids))
                channels_in = [c.to(d) for c, d in zip((val_grads[local], *stash), ctx.channel_dtypes)]
                param_grads.append(None)
            else:
                param_grads.append(to_dtype(val_grads[local], p.dtype))
        return (None, None, None, grad_out, None, None, None, None, *param_grads, *sink_grads, *extra_grads,
                *channels_in)


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
        val_forward: for "second_order" and "midpoint", which evaluate the validation loss again (at θ_t for
            a Hessian-vector product, at the midpoint parameters): a function (model, X_val) -> logits.
            Default: ``model(input_ids=X_val)`` and its ``logits``.

    Dropout is refused, never valued: the validation rows share the training forward, so it would make grad L_val
    a random draw (ghost_engine/dropout.py; the way out: dropout 0, ``ghost_engine.disable_dropout(model)``, or
    eval mode). Checked at construction, at every armed forward and by the first armed eager forward in each mode.
    """

    def __init__(self, model: nn.Module, val_batch, *, task: str = "causal_lm", loss_reduction: str = "mean",
                 unsupported: str = "error", ignore_index: int = IGNORE_INDEX, value: str = FIRST_ORDER,
                 val_forward=None):
        if value not in VALUES:
            raise ValueError(f"value={value!r}; expected one of {VALUES}")
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
        self.param_names = {}  # id(parameter) -> name, first name under model.named_parameters()
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.param_names.setdefault(id(p), name)
        if not self.param_names:
            raise ValueError("the model has no trainable parameters")
        # dropout would drop units of the validation rows too (ghost_engine/dropout.py): refused now, at every armed
        # forward (model.train() after construction) and, for what no module attribute shows, by the first eager
        # forward's RandomDrawProbe in each mode
        self._dropout_sites = dropout_sites(model)
        error = active_dropout_error(model, self._dropout_sites)
        if error is not None:
            raise ValueError(error)
        self._probe, self._probed = None, set()  # the probe of the running forward; the modes probed (model.training)
        # FSDP2: the engine is built after fully_shard; each forward uses the unsharded parameters, which
        # the taps and gradient hooks then use too (FSDP reduce-scatters their .grad)
        self._sharded = _fsdp_sharding(model)
        if self._sharded and unsupported == "exclude":
            raise ValueError("unsupported='exclude' is not supported with FSDP2 (the excluded modules' validation "
                             "rows are recomputed with their parameters, which FSDP holds sharded)")
        if self._sharded and value != FIRST_ORDER:
            raise ValueError(f"value={value!r} is not supported with FSDP2 (the optimizer state and the per-sample "
                             "norms would be sharded); use value='first_order'")
        self._grad_hooked = {}  # FSDP2: id(unsharded parameter) -> weakref, once its gradient hook is registered
        self._tie_partner = {}  # tied parameter name -> its later (linear) use's _Layer
        self.layers, self.excluded_modules = self._inspect(model, unsupported)
        self.excluded_parameters = sorted(
            {self.param_names[id(p)] for _, m in self.excluded_modules for p in m.parameters() if p.requires_grad})
        trainable = set(self.param_names.values())
        self._params = {name: p for name, p in model.named_parameters() if name in trainable}
        hooked = {pname for layer in self.layers for pname in layer.params.values()}
        self._hooked_params = [name for name in self._params if name in hooked]  # model order
        if value == COSINE:
            missing = [f"{layer.name} ({layer.rule.__name__})" for layer in self.layers
                       if not hasattr(layer.rule, "per_sample_sq_norms")]
            if missing:
                raise ValueError(f"value='cosine' needs per-sample gradient norms, which the rules of {missing} "
                                 "do not provide")
        self._optimizer, self._precond = None, None  # value="adamw": the optimizer; (hyper-parameters, D)
        self._val_forward = val_forward or _default_val_forward
        self._val_grads = {}  # DEFERRED: grad L_val of the step's micro-batches (the same for each)
        self._val_autocast = None  # DEFERRED: the autocast (device type, dtype) of the step's forward
        self._stepped = False  # DEFERRED: optimizer.step() ran between the step's backward and aggregate_and_log()
        self._handles = []
        self._mb = _MicroBatch()
        self._finished = []  # finalised micro-batches of the current step
        self._shapes = {}  # layer name -> (training, validation) input shapes of its last forward
        self._replaying = False
        self._loss_checked = False  # the model's loss has been checked against loss_reduction
        self._graph_checked = False  # the hooked parameters' uses have been checked (check_graph)
        self.set_val_batch(*val_batch)

    # ------------------------------------------------------------------ set-up
    def _inspect(self, model, unsupported):
        layers, excluded, problems = [], [], []
        owners = {}  # id(parameter) -> [(the name a module registers it under, that module), ...]
        for mod_name, module in model.named_modules():
            error = batch_statistics_error(mod_name, module)  # rows mixed in the forward, parameters or not
            if error is not None:
                raise ValueError(error)
            own = {local: p for local, p in module.named_parameters(recurse=False) if p.requires_grad}
            if not own:
                continue
            for local, p in own.items():
                owners.setdefault(id(p), []).append((f"{mod_name}.{local}" if mod_name else local, module))
            rule = rule_for(module)
            if rule is None:
                problems.append((mod_name, module))
                continue
            if hasattr(rule, "check_supported"):
                try:
                    rule.check_supported(module)
                except ValueError as error:
                    raise ValueError(f"{mod_name or '<model>'}: {error}") from None
            params = {local: self.param_names[id(p)] for local, p in own.items()}
            layers.append(_Layer(mod_name or "<model>", module, rule, params, {}, tuple(own.values())))
        for layer in layers:
            for local, p in layer.module.named_parameters(recurse=False):
                if p.requires_grad:
                    layer.tied[local] = len(owners[id(p)]) > 1
            layer.roles = None if any(layer.tied.values()) else (None,) * len(layer.params)
            layer.autocast_input = getattr(layer.rule, "autocast_input", False)
        self._check_ties(layers, owners)
        if problems and unsupported == "error":
            listing = "; ".join(f"{name or '<model>'} ({type(m).__module__}.{type(m).__name__}: "
                                f"{', '.join(n for n, p in m.named_parameters(recurse=False) if p.requires_grad)})"
                                for name, m in problems)
            raise ValueError(f"no layer rule for module(s) with trainable parameters: {listing}. Register a rule "
                             "with ghost_engine.layers.register_layer, freeze them, or pass unsupported='exclude' "
                             "to leave them out of the dot products")
        hooked = {id(layer.module) for layer in layers}
        for name, module in problems:
            inner = [n for n, sub in module.named_modules() if id(sub) in hooked and sub is not module]
            if inner:
                raise ValueError(f"cannot exclude {name} ({type(module).__name__}): it contains supported layers "
                                 f"{inner}; register a rule for {type(module).__name__} instead")
            excluded.append((name, module))
        return layers, excluded

    def _check_ties(self, layers, owners):
        """A shared parameter must be one embedding's weight and one linear layer's (looked up in that order),
        and that linear layer may share no other parameter."""
        by_module = {id(layer.module): layer for layer in layers}
        for pid, uses in owners.items():
            if len(uses) < 2:
                continue
            rules = [by_module.get(id(m)) for _, m in uses]
            sparse = [u for u in rules if u is not None and getattr(u.rule, "row_sparse", False)]
            dense = [u for u in rules if u is not None and hasattr(u.rule, "make_stash")]
            if len(uses) != 2 or len(sparse) != 1 or len(dense) != 1:
                listing = ", ".join(f"{name} ({type(m).__name__}{'' if u else ', no layer rule'})"
                                    for (name, m), u in zip(uses, rules))
                raise ValueError(f"parameter {self.param_names.get(pid, '?')} is registered as {listing}; a parameter "
                                 "may be shared by one embedding and one linear layer only")
            linear = dense[0]
            for local, p in zip(linear.params, linear.tensors):
                if id(p) != pid and linear.tied[local]:
                    raise ValueError(self._second_tie_message(linear, sparse[0], pid, owners[id(p)], by_module))
            self._tie_partner[self.param_names[pid]] = linear

    def _second_tie_message(self, linear, embedding, pid, uses, hooked) -> str:
        """Why a linear layer tied to an embedding that also shares another parameter is refused."""
        own = next(name for name, m in uses if m is linear.module)
        others = [(name, m) for name, m in uses if m is not linear.module]
        also = " and ".join(f"{name} ({type(m).__name__})" for name, m in others)
        name, owner = others[0][0], type(others[0][1]).__name__
        unhooked = id(others[0][1]) not in hooked
        return (f"the linear layer {linear.name} ({type(linear.module).__name__}) shares "
                f"{self.param_names[pid]} with the embedding {embedding.name}, and also another parameter: "
                f"{own} is also registered as {also}. A linear layer tied to an embedding may share nothing else: "
                f"the engine cannot verify that {owner} does not use it in its own forward. Untie it (for example "
                f"`del model.{name}`, when {owner}'s forward does not read it)"
                + (f" or register a rule for {owner}" if unhooked else ""))

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
        if self.value in LR_INSIDE:
            self._check_optimizer(optimizer)
        current = {name: p for name, p in self.model.named_parameters() if name in self._params}
        moved = [name for name, p in self._params.items() if current.get(name) is not p]
        if moved:
            raise ValueError(f"parameters {moved[:3]} were replaced since the engine was built (fully_shard does "
                             "this): build the engine after fully_shard, and before DDP / torch.compile")
        for layer in self.layers:
            if getattr(layer.rule, "autocast_input", False):
                self._handles.append(layer.module.register_forward_pre_hook(self._on_forward_pre))
            # under FSDP2, run before FSDP's post-forward hook reshards: the module still holds the
            # unsharded parameters its forward used
            self._handles.append(layer.module.register_forward_hook(
                partial(self._on_forward, layer), with_kwargs=True, prepend=self._sharded))
        for _, module in self.excluded_modules:
            self._handles.append(module.register_forward_hook(self._on_excluded_forward, with_kwargs=True))
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):  # model.train() after the engine was built
                self._handles.append(module.register_forward_pre_hook(partial(self._on_batch_norm_pre, name)))
        if not self._sharded and self.loss_reduction == "mean":  # FSDP2: the unsharded parameters, at their forward
            for p in self._params.values():
                self._handles.append(p.register_hook(self._grad_rescale))
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_forward_pre))
        self._handles.append(self.model.register_forward_hook(self._end_probe, prepend=True, always_call=True))
        self._handles.append(self.model.register_forward_hook(self._on_model_forward, with_kwargs=True))
        self._optimizer, self._precond = optimizer, None
        if self.value == ADAMW:  # D is recomputed after each optimizer step or state load (and lr change)
            self._handles.append(optimizer.register_step_post_hook(self._on_optimizer_change))
            self._handles.append(optimizer.register_load_state_dict_post_hook(self._on_optimizer_change))
        elif self.value in DEFERRED:
            self._handles.append(optimizer.register_step_post_hook(self._on_deferred_step))
        _ATTACHED[self.model] = self
        return self

    def _check_optimizer(self, optimizer):
        """The update-aware estimators read the coming step from the optimizer, which must hold every hooked
        parameter: "adamw" and "adamw_vt" an Adam/AdamW, "midpoint" an SGD or Adam/AdamW, "second_order" any
        (its learning rates)."""
        what = f"value={self.value!r}"
        if optimizer is None or (self.value in (ADAMW, ADAMW_VT) and not isinstance(optimizer, torch.optim.Adam)):
            got = "no optimizer" if optimizer is None else type(optimizer).__name__
            needs = "torch.optim.AdamW (or Adam)" if self.value in (ADAMW, ADAMW_VT) else "optimizer"
            raise ValueError(f"{what} needs the {needs} that steps the model, passed to attach(optimizer); got {got}")
        if self.value != SECOND_ORDER:
            updates.check_supported(optimizer, what)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name in self._hooked_params if id(self._params[name]) not in held]
        if missing:
            raise ValueError(f"{what}: the optimizer does not hold parameters {missing[:3]}"
                             f"{'...' if len(missing) > 3 else ''}, so their update is unknown")

    def _on_optimizer_change(self, *args):
        self._precond = None

    def _on_deferred_step(self, *args):
        if self._finished or self._mb.armed:
            self._stepped = True

    def _adam_hyperparameters(self):
        """The groups' (lr, betas, eps), or None where one is a tensor (then D is recomputed every micro-batch:
        comparing device tensors would synchronise)."""
        key = tuple((group["lr"], *group["betas"], group["eps"]) for group in self._optimizer.param_groups)
        return None if any(torch.is_tensor(x) for group in key for x in group) else key

    def _adam_preconditioner(self) -> dict:
        """{parameter name: D} for the optimizer's coming step, in the accumulation dtype: AdamW's update
        sensitivity with the second moment held at v_{t-1} (updates.fixed_state_sensitivity). Before the first
        step v_{t-1} = 0."""
        optimizer, wanted = self._optimizer, {id(self._params[name]): name for name in self._hooked_params}
        out, fresh = {}, []
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = wanted.get(id(p))
                if name is None:
                    continue
                if "exp_avg_sq" not in optimizer.state.get(p, {}):
                    fresh.append(name)
                out[name] = updates.fixed_state_sensitivity(optimizer, group, p, accum_dtype(p))
        if fresh:
            warnings.warn(f"value='adamw' before the optimizer's first step: v_0 = 0 for {len(fresh)} parameter(s), "
                          "so D = lr/eps there and the values are about 1/eps times the first-order ones (exactly "
                          "what the fixed-state formula says; see docs/METHOD.md section 2.1)", stacklevel=3)
        return out

    def detach(self):
        """Remove every hook and drop all per-step state; the model and optimizer are as before attach()."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]
        self._disarm()
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
        self._check_labels(Y_val, X_val, "validation")
        n_val = int(target_counts(Y_val, self.task, self.ignore_index).sum())
        if n_val == 0:
            raise ValueError(f"the validation batch has no targets (every label is {self.ignore_index})")
        self.X_val, self.Y_val, self.n_val_targets = X_val, Y_val, n_val

    def _check_labels(self, Y, X, which):
        if self.task in ("causal_lm", "token_classification") and (Y.dim() != 2 or Y.shape != X.shape[:2]):
            kind = "a causal LM" if self.task == "causal_lm" else "token classification"
            raise ValueError(f"{which} labels have shape {tuple(Y.shape)}; {kind} needs [rows, T] labels "
                             f"matching inputs {tuple(X.shape)}")
        if self.task == "classification" and Y.dim() != 1:
            raise ValueError(f"{which} labels have shape {tuple(Y.shape)}; classification needs [rows]")

    @property
    def loss_checked(self) -> bool:
        """Whether the model's loss has been checked against ``loss_reduction`` (see check_loss)."""
        return self._loss_checked

    @property
    def val_batch_size(self) -> int:
        return self.X_val.shape[0]

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
        if X_train.shape[1:] != self.X_val.shape[1:]:
            raise ValueError(f"training inputs have shape {tuple(X_train.shape)} but the validation batch "
                             f"{tuple(self.X_val.shape)}: the sequence length (all dims after the first) must match")
        self._check_labels(Y_train, X_train, "training")
        if not loss_multiplier > 0:
            raise ValueError(f"loss_multiplier={loss_multiplier} must be positive")
        counts = target_counts(Y_train, self.task, self.ignore_index)
        n_train = int(counts.sum())
        if n_train == 0:
            raise ValueError(f"the training batch has no targets (every label is {self.ignore_index})")
        if self._mb.armed:
            self._finish_micro_batch()
        if not self._finished:  # the first micro-batch of an optimizer step
            self._stepped = False
        n_all = n_train + self.n_val_targets
        s, s_train = (1.0 / n_all, 1.0 / n_train) if self.loss_reduction == "mean" else (1.0, 1.0)
        c = loss_multiplier * s
        dtype = accum_dtype(self._params[next(iter(self._params))])
        counts_f = counts.to(dtype)
        dot_scale = torch.where(counts > 0, 1.0 / (c * c * self.n_val_targets * counts_f.clamp(min=1)),
                                torch.zeros_like(counts_f))
        if self.X_val.device != X_train.device:  # move the fixed validation batch once, not every step
            self.X_val, self.Y_val = self.X_val.to(X_train.device), self.Y_val.to(Y_train.device)
        mb = self._mb
        mb.generation += 1
        mb.n_train, mb.rows = X_train.shape[0], X_train.shape[0] + self.X_val.shape[0]
        mb.row_len = X_train.shape[1] if X_train.dim() > 1 else 0
        mb.counts, mb.n_train_targets, mb.dot_scale = counts, n_train, dot_scale
        mb.grad_scale.fill_(s_train / s)
        # one leaf for every parameter's dot products: one allocation and one accumulation per micro-batch
        mb.sink = torch.zeros(len(self._hooked_params), mb.n_train, dtype=dtype, device=X_train.device,
                              requires_grad=True)
        mb.sinks = dict(zip(self._hooked_params, mb.sink.unbind(0)))
        if self.value == ADAMW:
            key = self._adam_hyperparameters()  # once per optimizer step (and lr), shared by its micro-batches
            if self._precond is None or key is None or self._precond[0] != key:
                self._precond = (key, self._adam_preconditioner())
            mb.precond = self._precond[1]
        elif self.value == COSINE:
            mb.norm_sink = torch.zeros(len(self._hooked_params), mb.n_train + 1, dtype=dtype, device=X_train.device,
                                       requires_grad=True)
            mb.norm_sinks = dict(zip(self._hooked_params, mb.norm_sink.unbind(0)))
        if self.value in (COSINE, *DEFERRED):  # grad l_i = G_i / (c·n_i), grad L_val = G_val / (c·N_val)
            mb.norm_scale = torch.where(counts > 0, 1.0 / (c * counts_f.clamp(min=1)), torch.zeros_like(counts_f))
            mb.val_norm_scale = 1.0 / (c * self.n_val_targets)
        mb.seen.clear()
        mb.channels.clear()
        mb.armed = True
        return torch.cat([X_train, self.X_val]), torch.cat([Y_train, self.Y_val])

    @staticmethod
    def _on_forward_pre(module, args):
        """Under autocast, hand the layer its input already in the autocast dtype. The layer would cast
        it anyway; casting once here means autograd saves the very tensor the engine keeps (one
        half-precision copy instead of two, and no fp32 input held for the backward)."""
        if not args or not torch.is_tensor(args[0]) or not args[0].is_floating_point():
            return None
        dtype = _autocast_dtype(args[0].device.type)
        if dtype is None or args[0].dtype == dtype:
            return None
        return (args[0].to(dtype),) + tuple(args[1:])

    def _on_batch_norm_pre(self, name, module, args):
        """Refuse a BatchNorm that is about to normalise the [training; validation] rows with their joint
        statistics (switched back to training mode since the engine was built)."""
        if self._mb.armed and torch.is_grad_enabled():
            error = batch_statistics_error(name, module)
            if error is not None:
                raise ValueError(error)

    def _on_forward(self, layer, module, args, kwargs, output):
        mb = self._mb
        if not mb.armed or not torch.is_grad_enabled():
            return None
        if self.value in DEFERRED and torch.compiler.is_compiling():
            # the taps keep each layer's rows in Python for aggregate_and_log(): Dynamo cannot trace that, and
            # this raise makes it run the hook eagerly instead (a graph break per layer; fullgraph=True fails)
            raise RuntimeError(f"value={self.value!r} runs its hooks eagerly, not under torch.compile")
        recompute = _in_backward()  # a checkpointed forward run again: same taps, no bookkeeping
        if not recompute and layer.name in mb.seen:
            raise RuntimeError(f"{layer.name} ({type(module).__name__}) ran twice in one forward pass; a layer "
                               "may be called once per forward (share parameters between modules instead)")
        act, replacement = layer.rule.capture(module, args, kwargs, output, mb.rows)
        out = output if replacement is None else replacement
        flat = self._flattened(layer, out, act)
        if flat:  # [rows·T, ...] -> [rows, T, ...] for the rule; the tap's output is flattened back
            out, act = out.unflatten(0, (mb.rows, mb.row_len)), act.unflatten(0, (mb.rows, mb.row_len))
        if not out.requires_grad:
            return replacement
        dtype = _autocast_dtype(out.device.type) if layer.autocast_input else None
        if dtype is not None:
            act = act.to(dtype)  # a no-op after _on_forward_pre; kept for inputs passed by keyword
        if layer.roles is None:
            roles, support, first, channels_in, train_ids = self._tie_roles(layer, act, recompute)
        else:
            roles, support, first, channels_in, train_ids = layer.roles, None, None, (), None
        meta = (mb.n_train, dtype, -1 if torch.compiler.is_compiling() else mb.generation, roles, self.value)
        sinks = [mb.sinks[pname] for pname in layer.params.values()]
        extras = ([mb.precond[pname] for pname in layer.params.values()] if self.value == ADAMW else
                  [mb.norm_sinks[pname] for pname in layer.params.values()] if self.value == COSINE else [])
        tensors = self._unsharded_tensors(layer, module) if self._sharded else layer.tensors
        result = _Tap.apply(self, layer, meta, out, act, support, first, train_ids, *tensors, *sinks, *extras,
                            *channels_in)
        if FIRST in roles:
            result, *channels = result
            mb.channels[layer.params[list(layer.params)[roles.index(FIRST)]]] = (support, first, tuple(channels),
                                                                                 act[:mb.n_train])
        if flat:
            result = result.flatten(0, 1)
        if not recompute:
            rest = tuple(act.shape[1:])
            mb.seen[layer.name] = ((mb.n_train,) + rest, (act.shape[0] - mb.n_train,) + rest)
        return result

    def _tie_roles(self, layer, act, recompute):
        """(roles, support, first, channels_in, train_ids) of a layer with a tied parameter in this forward."""
        mb = self._mb
        roles, support, first, channels_in, train_ids = [], None, None, (), None
        for local, pname in layer.params.items():
            role = None
            if layer.tied[local] and not recompute:
                if pname not in mb.channels:
                    partner = self._tie_partner[pname]
                    if partner is layer:  # the embedding did not run (e.g. inputs_embeds): the only use
                        roles.append(None)
                        continue
                    if partner.name in mb.seen:
                        raise ValueError(f"{partner.name} used the shared parameter {pname} before {layer.name} "
                                         "did; ties are supported when the embedding runs first")
                    role = FIRST
                    support, first = _support(act[mb.n_train:])
                else:
                    role = SECOND
                    support, first, channels_in, ids = mb.channels[pname]
                    train_ids = ids if self.value == COSINE else None
                    self._check_channels(layer, pname, act, channels_in)
            roles.append(role)
        return tuple(roles), support, first, channels_in, train_ids

    def _unsharded_tensors(self, layer, module):
        """FSDP2: the parameters the module's forward just used (unsharded), each with the gradient hook."""
        tensors = tuple(module._parameters[local] for local in layer.params)
        for (local, pname), t in zip(layer.params.items(), tensors):
            if _is_dtensor(t):
                raise RuntimeError(f"{layer.name}: FSDP2 resharded {local} before the engine saw its forward")
            ref = self._grad_hooked.get(id(t))
            if (ref is None or ref() is not t) and self.loss_reduction == "mean":
                self._handles.append(t.register_hook(self._grad_rescale))
                self._grad_hooked[id(t)] = weakref.ref(t)
        return tensors

    def _flattened(self, layer, out, act) -> bool:
        """False when dim 0 of the layer's output holds the rows (training + validation); True when the model
        flattened them with the tokens, [rows·T, ...] (OPT's feed-forward block: ``reshape(-1, d)`` of a
        [rows, T, d] tensor), input and output alike; otherwise a ValueError. A flattened tensor is read
        batch-major, as ``reshape`` lays out a batch-first tensor; the engine assumes batch-first models."""
        mb = self._mb
        if torch.is_tensor(out) and out.dim() > 0 and out.shape[0] == mb.rows:
            return False
        flat_rows = mb.rows * mb.row_len
        if (mb.row_len > 1 and torch.is_tensor(out) and out.dim() > 0 and out.shape[0] == flat_rows
                and torch.is_tensor(act) and act.dim() > 0 and act.shape[0] == flat_rows):
            return True
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        flat = f" or {mb.rows}·{mb.row_len} = {flat_rows} (rows × T, flattened)" if mb.row_len > 1 else ""
        raise ValueError(f"{layer.name} ({type(layer.module).__name__}) returned {shape}; expected "
                         f"{mb.rows} rows (training + validation){flat} in dim 0 of its input and output")

    def _channel_shapes(self, layer, meta, act, support):
        """(shape, dtype) of the channels the FIRST (embedding) use of a tied parameter opens: the later
        linear use's G_val (parameter shape) and its stash restricted to `support`."""
        pname = layer.params[list(layer.params)[meta[3].index(FIRST)]]
        second = self._tie_partner[pname]
        param = self._params[pname]
        n_tokens = act[:meta[0]].numel()
        compute = _autocast_dtype(act.device.type) or param.dtype
        stash = second.rule.stash_shapes(second.module, n_tokens, support.shape[0])
        if meta[4] == COSINE:  # the linear's row_stash: [B, U, T]
            per_row = n_tokens // max(1, meta[0])
            stash = stash + [(meta[0], per_row, per_row)]
        return [(tuple(param.shape), accum_dtype(param))] + [(shape, compute) for shape in stash]

    def _check_channels(self, layer, pname, act, channels):
        n_tokens = act[:self._mb.n_train].numel() // act.shape[-1]
        if channels[1].shape[0] != n_tokens:
            raise ValueError(f"{layer.name} sees {n_tokens} training tokens but the embedding sharing {pname} "
                             f"saw {channels[1].shape[0]}; tied layers must see the same tokens")

    def _check_generation(self, generation):
        mb = self._mb
        if not mb.armed or generation != mb.generation:
            raise RuntimeError("backward ran after its micro-batch was filed: call backward() before "
                               "prepare_gradients(), aggregate_and_log() or the next prepare_forward_input()")

    @property
    def _grad_rescale(self):
        """The parameters' gradient hook: grad ↦ grad · s_train / s (loss_reduction="mean"), which turns the sum of
        the layer's own gradient and the tap's -G_val into the training rows' mean gradient; · 1 when not armed."""
        return partial(torch.mul, other=self._mb.grad_scale)

    def _on_excluded_forward(self, module, args, kwargs, output):
        """Recompute the validation rows with detached parameters, so the module's own parameters get
        gradient from the training rows only while gradient still flows to its inputs."""
        mb = self._mb
        if not mb.armed or self._replaying or not torch.is_grad_enabled() or _in_backward():
            return None
        if not torch.is_tensor(output) or output.shape[0] != mb.rows:
            raise ValueError(f"excluded module {type(module).__name__} must return one tensor with "
                             f"{mb.rows} rows in dim 0")
        B = mb.n_train

        def val_rows(x):
            return x[B:] if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == mb.rows else x

        detached = {n: p.detach() for n, p in module.named_parameters()}
        self._replaying = True
        try:
            val_out = torch.func.functional_call(module, detached, tuple(val_rows(a) for a in args),
                                                 {k: val_rows(v) for k, v in kwargs.items()})
        finally:
            self._replaying = False
        return torch.cat([output[:B], val_out])

    def _on_model_forward_pre(self, module, args):
        """Refuse dropout that is active now (a few attribute reads: compiled forwards run them too); on the first
        armed eager forward in each mode (model.training), start a RandomDrawProbe for the calls no attribute shows
        (F.dropout with a literal p, SDPA's dropout_p, random draws), which _end_probe reads."""
        if not self._mb.armed or not torch.is_grad_enabled():
            return None
        error = active_dropout_error(self.model, self._dropout_sites)
        if error is not None:
            self._disarm()
            raise ValueError(error)
        if (not torch.compiler.is_compiling() and self._probe is None and self.model.training not in self._probed
                and not _in_backward()):
            self._probe = RandomDrawProbe(self.model)
            self._probe.__enter__()
        return None

    def _end_probe(self, module, args, output):
        """End the forward's RandomDrawProbe (also when the forward raised) and refuse what it found."""
        probe, self._probe = self._probe, None
        if probe is None:
            return None
        probe.__exit__(None, None, None)
        if output is None:  # the forward raised: its own error goes on, the next forward is probed again
            return None
        if probe.found:
            self._disarm()
            raise ValueError(random_draw_error(self.model, probe.found))
        self._probed.add(self.model.training)
        return None

    def _on_model_forward(self, module, args, kwargs, output):
        """On the first armed eager forward whose output carries ``loss`` and ``logits`` and whose call got
        ``labels``, check the loss against ``loss_reduction`` (check_loss). Under torch.compile the hook does
        nothing, so the compiled graph has no break: call check_loss yourself there."""
        if torch.compiler.is_compiling() or not self._mb.armed or not torch.is_grad_enabled():
            return None
        if self.value in DEFERRED:  # the validation passes of aggregate_and_log() run under the same autocast
            device = self.X_val.device.type
            self._mb.autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        try:
            if not self._graph_checked and not self._sharded:
                self.check_graph(output)
            if self._loss_checked:
                return None
            loss, logits, labels = _field(output, "loss"), _field(output, "logits"), kwargs.get("labels")
            if torch.is_tensor(loss) and torch.is_tensor(logits) and torch.is_tensor(labels):
                self.check_loss(loss, logits, labels)
        except ValueError:
            self._disarm()  # the micro-batch is void: prepare it again after fixing the model or the loss
            raise
        return None

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
        mb = self._mb
        roots = [t.grad_fn for t in _output_tensors(output) if t.grad_fn is not None]
        if not mb.armed or not roots:
            return False
        parents, accumulate = _reverse_graph(roots)
        for pname, p in self._params.items():
            node = accumulate.get(id(p))
            if node is None or pname not in self._hooked_params:
                continue
            uses = _consumers(node, parents)
            ran = [layer.name for layer in self.layers if layer.name in mb.seen and pname in layer.params.values()]
            if len(uses) > len(ran):
                raise ValueError(
                    f"{pname} is used by {len(uses)} operation(s) in this forward ({', '.join(sorted(uses))}), but "
                    f"only {len(ran)} of them can be the forward of the layer(s) the engine hooks for it "
                    f"({', '.join(ran) or 'none ran'}): the parameter is also used outside a hooked layer (for "
                    "example a head computed as F.linear(h, embedding.weight) instead of through a module tied to "
                    "the embedding), and that use's share would be missing from the dot products and .grad. Use "
                    "it through its module, or freeze it")
        self._graph_checked = True
        return True

    @torch.no_grad()
    def check_loss(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> bool:
        """Check that ``loss`` (the model's loss on the prepared [train; val] rows, before any multiplier)
        is the cross-entropy of ``logits`` reduced as ``loss_reduction`` says: the mean over every counted
        target of the concatenated batch, or the sum. Any other scale (a divisor counting the training
        rows' targets only, such as Trainer's ``num_items_in_batch``; a per-row mean; extra loss terms)
        would make the dot products and ``.grad`` silently wrong, so it raises a ValueError. Runs by itself on
        the first eager forward of a Hugging Face-style model; returns True if it checked, False if the
        loss or logits are not finite, or the task's loss is not a cross-entropy over class logits."""
        if logits.shape[-1] < 2 or labels.is_floating_point() or labels.shape[0] != logits.shape[0]:
            return False  # regression or multi-label heads: not a cross-entropy over classes
        loss = loss.detach().double()
        ce = per_sample_loss(logits.detach(), labels, self.task, self.ignore_index).double()
        counts = target_counts(labels, self.task, self.ignore_index)
        total, n_all = float((ce * counts).sum()), int(counts.sum())
        if not (math.isfinite(float(loss)) and math.isfinite(total)) or n_all == 0:
            return False
        expected = total / n_all if self.loss_reduction == "mean" else total
        # Hugging Face computes the loss in fp32 whatever the logits' dtype: allow fp32 round-off
        tol = 2e-3 if logits.element_size() < 4 else 1e-5
        if abs(float(loss) - expected) > tol * max(abs(expected), 1e-12):
            raise ValueError(
                f"the model's loss is {float(loss):.6g}, but loss_reduction={self.loss_reduction!r} means "
                f"{expected:.6g} ({'mean' if self.loss_reduction == 'mean' else 'sum'} of the cross-entropy over "
                f"all {n_all} targets of the [train; val] batch; the sum is {total:.6g}, the mean "
                f"{total / n_all:.6g}). The dot products and .grad would be scaled wrongly. Pass the "
                "loss_reduction the model uses, and do not divide the loss by a count of the training rows' "
                "targets alone (Trainer's num_items_in_batch) or add other terms to it")
        self._loss_checked = True
        return True

    def _defer(self, layer, roles, act_tr=None, grad_tr=None, act_v=None, grad_v=None, val_grads=None):
        """A deferred estimator's tap backward (eager only): keep the layer's rows for aggregate_and_log() and
        grad L_val of its parameters (a tied parameter's from its first use, which holds both uses' G_val)."""
        mb = self._mb
        mb.deferred.append((layer, act_tr, grad_tr, act_v, grad_v))
        if val_grads is not None:
            for local, role in zip(layer.params, roles):
                if role != SECOND:
                    mb.val_grads[layer.params[local]] = val_grads[local] * mb.val_norm_scale

    def _disarm(self):
        mb = self._mb
        mb.armed = False
        mb.grad_scale.fill_(1.0)
        mb.sink, mb.sinks, mb.counts, mb.dot_scale = None, {}, None, None
        mb.precond, mb.norm_sink, mb.norm_sinks, mb.norm_scale = {}, None, {}, None
        mb.deferred, mb.val_grads, mb.autocast = [], {}, None
        mb.seen.clear()
        mb.channels.clear()

    def _finish_micro_batch(self):
        mb = self._mb
        raw = mb.sink.grad  # [P, B]
        counts, n_train_targets, dot_scale, seen = mb.counts, mb.n_train_targets, mb.dot_scale, dict(mb.seen)
        raw_norms = None if mb.norm_sink is None else mb.norm_sink.grad  # cosine: [P, B + 1]
        norm_scale, val_norm_scale = mb.norm_scale, mb.val_norm_scale
        deferred, val_grads, autocast = mb.deferred, mb.val_grads, mb.autocast
        self._disarm()
        if raw is None:
            raise RuntimeError("no gradient reached the engine since prepare_forward_input(): run the forward "
                               "on its output and call backward() before preparing the next batch or the gradients")
        if self.value in DEFERRED:
            missing = set(seen) - {entry[0].name for entry in deferred}
            if missing:  # a compiled backward ran the taps where Python state cannot be kept
                raise RuntimeError(f"value={self.value!r}: the backward of {sorted(missing)[:3]} kept no rows for "
                                   "aggregate_and_log(); this estimator runs eagerly only, not under torch.compile")
            self._val_grads, self._val_autocast = val_grads, autocast
        self._shapes.update(seen)
        dtype = dot_scale.dtype
        weights = counts.to(dtype) / n_train_targets
        per_param = raw.to(dtype) * dot_scale  # [P, B] per-parameter dots
        norms = None
        if self.value == COSINE:
            grad_norms = raw_norms[:, :-1].sum(0).clamp(min=0).sqrt() * norm_scale  # ||grad l_i||
            val_norm = raw_norms[:, -1].sum().clamp(min=0).sqrt() * val_norm_scale  # ||grad L_val||
            denom = grad_norms * val_norm
            per_param = torch.where(denom > 0, per_param / torch.where(denom > 0, denom, 1.0), 0.0)
            norms = (grad_norms, val_norm)
        self._finished.append((per_param, counts, weights, norms, (deferred, norm_scale)))

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
        per_param = torch.cat([f[0] for f in finished], dim=1)  # [P, B_step]
        extra = {}
        if self.value in DEFERRED:  # the taps' first-order dot products come for free
            extra["first_order"] = per_param.sum(0)
            per_param = self._deferred_dots(finished)
        if self.value == COSINE:  # ||grad L_val|| is the same for every micro-batch: the first one's
            extra = dict(grad_norms=torch.cat([f[3][0] for f in finished]), val_grad_norm=finished[0][3][1])
        return DotProductResult(dot_products=per_param.sum(0),
                                per_parameter=dict(zip(self._hooked_params, per_param.unbind(0))),
                                token_counts=torch.cat([f[1] for f in finished]),
                                weights=torch.cat([f[2] for f in finished]),
                                excluded_parameters=list(self.excluded_parameters), micro_batches=len(finished),
                                value=self.value, **extra)

    # ------------------------------------------------------------------ deferred estimators
    @torch.no_grad()
    def _deferred_dots(self, finished) -> torch.Tensor:
        """[P, B_step] <grad l_i, u> per hooked parameter, u the estimator's vector (_deferred_vectors): every
        kept layer use projected on u (the projection path of the layer rules; a tied parameter's two uses
        add up to its per-sample gradient)."""
        if self._stepped:
            raise RuntimeError(f"value={self.value!r}: optimizer.step() ran before aggregate_and_log(); the "
                               "estimator needs the step's gradient and the optimizer state before the update")
        vectors = self._deferred_vectors()
        row = {name: k for k, name in enumerate(self._hooked_params)}
        out = []
        for per_param, *_, (deferred, row_scale) in finished:
            raw = torch.zeros_like(per_param)
            for layer, act_tr, grad_tr, act_v, grad_v in deferred:
                if act_tr is None:  # the layer's output got no gradient
                    continue
                totals = {local: vectors[pname] for local, pname in layer.params.items()}
                dots = layer.rule.per_sample_dots(layer.module, act_tr, grad_tr, act_v, grad_v, totals,
                                                  dict.fromkeys(layer.params, False))
                for local, pname in layer.params.items():
                    raw[row[pname]] += dots[local].to(raw.dtype)
            out.append(raw * row_scale)
        return torch.cat(out, dim=1)

    def _deferred_vectors(self) -> dict:
        """{hooked parameter: u} with phi_i = w_i·<grad l_i, u> (docs/METHOD.md section 2.1), from g_B = .grad
        (the gradient the coming optimizer step uses) and grad L_val from the taps:
            second_order  u = lr ⊙ (grad L_val - 1/2 H_val (lr ⊙ g_B))
            adamw_vt      u = S(g_B) ⊙ grad L_val
            midpoint      u = S(g_B / 2) ⊙ grad L_val(θ_{t+1}(g_B / 2))
        with S = -dθ_{t+1}/dg the optimizer's update sensitivity (ghost_engine.updates)."""
        optimizer = self._optimizer
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        val_grads = self._val_grads
        batch = {}
        for name, p in self._params.items():
            if p.grad is None and name in self._hooked_params:
                raise RuntimeError(f"value={self.value!r} reads the step's batch gradient from .grad, but {name}.grad "
                                   "is None: call aggregate_and_log() after the step's last backward and before "
                                   "optimizer.zero_grad()")
            dtype = val_grads[name].dtype if name in val_grads else accum_dtype(p)
            batch[name] = torch.zeros(p.shape, dtype=dtype, device=p.device) if p.grad is None else p.grad.to(dtype)
        if self.value == SECOND_ORDER:
            lr = {name: group_of[id(p)]["lr"] if id(p) in group_of else 0.0 for name, p in self._params.items()}
            hvp = self._val_hvp({name: lr[name] * g for name, g in batch.items()})
            return {name: lr[name] * (val_grads[name] - 0.5 * hvp[name]) for name in val_grads}
        if self.value == ADAMW_VT:
            return {name: updates.step(optimizer, group_of[id(p)], p, batch[name], update=False)[1].mul_(
                val_grads[name]) for name, p in self._params.items() if name in val_grads}
        moved, sensitivity = {}, {}  # midpoint: the step with g_B / 2, and its sensitivity there
        for name, p in self._params.items():
            if id(p) in group_of:
                new, sensitivity[name] = updates.step(optimizer, group_of[id(p)], p, batch[name] / 2)
                moved[name] = new.to(p.dtype)
        val_at_midpoint = self._val_grad_at(moved)
        return {name: sensitivity[name].mul_(val_at_midpoint[name]) for name in self._hooked_params}

    def _val_loss(self, params=None) -> torch.Tensor:
        """L_val (the mean cross-entropy over the validation targets) from ``val_forward``, with the engine's
        taps disarmed, the model in eval mode (no dropout, no activation recomputation; modes restored after)
        and under the autocast of the step's forward; ``params``: {name: tensor} in place of the parameters."""
        model, modes, autocast = self.model, {m: m.training for m in self.model.modules()}, self._val_autocast
        model.eval()
        try:
            with torch.autocast(*autocast) if autocast else contextlib.nullcontext():
                if params is None:
                    logits = self._val_forward(model, self.X_val)
                else:
                    logits = torch.func.functional_call(_ValCall(model, self._val_forward),
                                                        {f"model.{n}": t for n, t in params.items()}, (self.X_val,))
        finally:
            for module, training in modes.items():
                module.training = training
        ce = per_sample_loss(logits, self.Y_val, self.task, self.ignore_index)
        counts = target_counts(self.Y_val, self.task, self.ignore_index).to(ce.dtype)
        return (ce * counts).sum() / self.n_val_targets

    def _val_grad_at(self, moved: dict) -> dict:
        """grad L_val at the parameters ``moved`` ({name: tensor}; the others as they are), for the hooked ones."""
        params = {name: moved.get(name, p.detach()).requires_grad_() for name, p in self._params.items()}
        with torch.enable_grad():
            loss = self._val_loss(params)
            grads = torch.autograd.grad(loss, [params[name] for name in self._hooked_params], allow_unused=True)
        return {name: torch.zeros_like(params[name]) if g is None else g
                for name, g in zip(self._hooked_params, grads)}

    def _val_hvp(self, direction: dict) -> dict:
        """H_val·direction for the hooked parameters: the gradient of <grad L_val, direction> (double backward;
        attention through PyTorch's math kernel, whose backward is differentiable)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = list(self._params)
        params = [self._params[name] for name in names]
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            grads = torch.autograd.grad(self._val_loss(), params, create_graph=True, allow_unused=True)
            inner = sum((g * direction[name].to(g.dtype)).sum() for name, g in zip(names, grads) if g is not None)
            hooked = [self._params[name] for name in self._hooked_params]
            hvp = torch.autograd.grad(inner, hooked, allow_unused=True)
        return {name: torch.zeros_like(self._params[name]) if h is None else h
                for name, h in zip(self._hooked_params, hvp)}

    # ------------------------------------------------------------------ reporting
    def path_report(self) -> list:
        """Per hooked layer: name, type, exact path used in the last step and its extra flops."""
        rows = []
        shapes = {**self._shapes, **self._mb.seen}
        for layer in self.layers:
            path = None
            if layer.name in shapes:
                act_tr, act_v = (torch.empty(shape, device="meta") for shape in shapes[layer.name])
                own_only = not any(layer.tied.values()) and self.value != ADAMW  # D ⊙ G_val: no Gram path
                path = layer.rule.path(layer.module, act_tr, act_v, own_only)
            rows.append({"layer": layer.name, "type": type(layer.module).__name__,
                         "parameters": sorted(layer.params.values()),
                         "tied": any(layer.tied.values()),
                         "path": path.path if path else "not run",
                         "flops": path.flops if path else 0.0})
        return rows

    def format_path_report(self) -> str:
        rows = self.path_report()
        width = max(len(r["layer"]) for r in rows)
        kind = max([4] + [len(r["type"]) for r in rows])
        lines = [f"{'layer':<{width}}  {'type':<{kind}} {'path':<10} {'GFLOP':>9}  tied"]
        for r in rows:
            lines.append(f"{r['layer']:<{width}}  {r['type']:<{kind}} {r['path']:<10} {r['flops'] / 1e9:>9.3f}  "
                         f"{'yes' if r['tied'] else ''}")
        return "\n".join(lines)

