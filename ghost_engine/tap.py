"""The taps: what happens to one micro-batch in the forward and the backward, in execution order.

How it works (docs/METHOD.md sections 1-2). The caller stacks the validation rows under the training rows. A
forward hook on each hooked layer (Taps.on_forward) wraps the layer's output in a *tap*: a custom autograd
Function (_Tap) that is the identity in the forward and saves the layer's input. Its backward receives the layer's
output gradient and hands (input, output gradient) to the layer's rule, which returns the validation gradient
G_val and the per-sample dot products without forming per-sample gradients. The tap returns both *as gradients*:
- the raw dot products as the gradient of the parameter's row of the "sink", a [parameters, B] leaf made
  per micro-batch;
- -G_val as a gradient of the layer's parameters, so that autograd's own sum leaves only the training
  rows' share in ``.grad`` (before DDP's reducer sees it); a hook on each parameter (Taps.grad_rescale)
  rescales it to what Regular training would produce.
The backward touches no Python state, so torch.compile traces the taps into the model's one
forward/backward graph (no graph break per layer), and the same code runs eagerly.

A parameter shared by an embedding and a later linear layer (GPT-2's wte/lm_head) has cross terms
<G_i(one use), G_val(other use)>. The embedding's tap outputs "channel" tensors that the linear's tap
takes as inputs; the linear's backward, which runs first, returns through them its G_val and its
training input and output gradient restricted to the weight rows of the validation tokens; the
embedding's backward then adds the cross terms.

Every hooked output gradient carries the factor c of the loss's reduction and multiplier; the sinks' rows are
scaled once per micro-batch (ghost_engine.micro_batch states the scales).

Owns: the layers' forward hooks and the _Tap they apply, the excluded modules' forward hooks and the parameters'
gradient hooks; they fill the engine's MicroBatch (ghost_engine.micro_batch), which arms and files it. Must not
touch: the optimizer, the layer maths (the rules in ghost_engine.layers), the checks of the model and its loss
(ghost_engine.checks). Keep this path flat: every indirection added here is paid per layer and step
(benchmarks.host_overhead).
"""
import weakref
from functools import partial

import torch

from ghost_engine.layers import accum_dtype, to_dtype
from ghost_engine.model_map import is_dtensor
from ghost_engine.projection import project_rows
from ghost_engine.values import ADAMW, COSINE, DEFERRED

FIRST, SECOND = "first", "second"  # roles of the two uses of a tied parameter, in forward order


def autocast_dtype(device_type: str):
    """The autocast dtype if autocast is on for `device_type`, else None."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. recomputing a checkpointed forward). A forward that
    torch.compile traces is never a recomputation (compiled graphs recompute inside their own backward)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _support(ids: torch.Tensor):
    """The validation tokens' rows of a tied weight, sorted with repeats, and a mask of each row's first
    occurrence. Static shapes (no torch.unique): nothing waits for the device, torch.compile traces it."""
    support, _ = torch.sort(ids.reshape(-1))
    first = torch.ones_like(support, dtype=torch.bool)
    first[1:] = support[1:] != support[:-1]
    return support, first


class Taps:
    """The hooks that put a _Tap on every hooked layer's output, and what their backward reads. One object for the
    engine's lifetime, as its MicroBatch: torch.compile guards on the identity of both."""

    def __init__(self, model_map, mb, value: str, loss_reduction: str):
        self.map, self.value, self.loss_reduction, self.mb = model_map, value, loss_reduction, mb
        self.params, self.sharded = model_map.params, model_map.sharded  # read per layer: kept flat
        self.tie_partner = model_map.tie_partner  # tied parameter name -> its later (linear) use's Layer
        self.handles = []  # FSDP2: the gradient hooks registered at forwards
        self._grad_hooked = {}  # FSDP2: id(unsharded parameter) -> weakref, once its gradient hook is registered
        self._replaying = False

    def attach(self, model) -> list:
        """Register the forward hooks of the hooked layers and of the excluded modules, and the parameters'
        gradient hooks; returns their handles."""
        handles = []
        for layer in self.map.layers:
            if getattr(layer.rule, "autocast_input", False):
                handles.append(layer.module.register_forward_pre_hook(self.on_forward_pre))
            # under FSDP2, run before FSDP's post-forward hook reshards: the module still holds the
            # unsharded parameters its forward used
            handles.append(layer.module.register_forward_hook(partial(self.on_forward, layer), with_kwargs=True,
                                                              prepend=self.sharded))
        for _, module in self.map.excluded_modules:
            handles.append(module.register_forward_hook(self.on_excluded_forward, with_kwargs=True))
        if not self.sharded and self.loss_reduction == "mean":  # FSDP2: the unsharded parameters, at their forward
            for p in self.params.values():
                handles.append(p.register_hook(self.grad_rescale))
        if self.value in DEFERRED:  # the validation passes of aggregate_and_log() run under the same autocast
            handles.append(model.register_forward_hook(self.keep_autocast))
        return handles

    # ------------------------------------------------------------------ forward hooks (per layer, per step)
    @staticmethod
    def on_forward_pre(module, args):
        """Under autocast, hand the layer its input already in the autocast dtype. The layer would cast
        it anyway; casting once here means autograd saves the very tensor the engine keeps (one
        half-precision copy instead of two, and no fp32 input held for the backward)."""
        if not args or not torch.is_tensor(args[0]) or not args[0].is_floating_point():
            return None
        dtype = autocast_dtype(args[0].device.type)
        if dtype is None or args[0].dtype == dtype:
            return None
        return (args[0].to(dtype),) + tuple(args[1:])

    def on_forward(self, layer, module, args, kwargs, output):
        mb = self.mb
        if not mb.armed or not torch.is_grad_enabled():
            return None
        if self.value in DEFERRED and torch.compiler.is_compiling():
            # the taps keep each layer's rows in Python for aggregate_and_log(): Dynamo cannot trace that, and
            # this raise makes it run the hook eagerly instead (a graph break per layer; fullgraph=True fails)
            raise RuntimeError(f"value={self.value!r} runs its hooks eagerly, not under torch.compile")
        recompute = in_backward()  # a checkpointed forward run again: same taps, no bookkeeping
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
        dtype = autocast_dtype(out.device.type) if layer.autocast_input else None
        if dtype is not None:
            act = act.to(dtype)  # a no-op after on_forward_pre; kept for inputs passed by keyword
        if layer.roles is None:
            roles, support, first, channels_in, train_ids = self._tie_roles(layer, act, recompute)
        else:
            roles, support, first, channels_in, train_ids = layer.roles, None, None, (), None
        meta = (mb.n_train, dtype, -1 if torch.compiler.is_compiling() else mb.generation, roles, self.value,
                bool(mb.proj_sinks))
        sinks = [mb.sinks[pname] for pname in layer.params.values()]
        extras = ([mb.precond[pname] for pname in layer.params.values()] if self.value == ADAMW else
                  [mb.norm_sinks[pname] for pname in layer.params.values()] if self.value == COSINE else [])
        tensors = self._unsharded_tensors(layer, module) if self.sharded else layer.tensors
        projs = ()
        if mb.proj_sinks:  # the parameters' columns of the projection sink, then their matrices (two per parameter)
            projs = [mb.proj_sinks[p] for p in layer.params.values()]
            projs += [m for p in layer.params.values() for m in mb.proj_mats[p]]
        result = _Tap.apply(self, layer, meta, out, act, support, first, train_ids, *tensors, *sinks, *extras,
                            *projs, *channels_in)
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
        mb = self.mb
        roles, support, first, channels_in, train_ids = [], None, None, (), None
        for local, pname in layer.params.items():
            role = None
            if layer.tied[local] and not recompute:
                if pname not in mb.channels:
                    partner = self.tie_partner[pname]
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
                    n_tokens = act[:mb.n_train].numel() // act.shape[-1]
                    if channels_in[1].shape[0] != n_tokens:
                        raise ValueError(f"{layer.name} sees {n_tokens} training tokens but the embedding sharing "
                                         f"{pname} saw {channels_in[1].shape[0]}; tied layers must see the same "
                                         "tokens")
            roles.append(role)
        return tuple(roles), support, first, channels_in, train_ids

    def remove_hooks(self):
        """Remove the gradient hooks registered at forwards, and forget which parameters had one: FSDP2 keeps
        the same unsharded parameter objects from step to step, so an engine attached again must hook them
        again (else their .grad would not be rescaled)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._grad_hooked.clear()

    def _unsharded_tensors(self, layer, module):
        """FSDP2: the parameters the module's forward just used (unsharded), each with the gradient hook."""
        tensors = tuple(module._parameters[local] for local in layer.params)
        for (local, pname), t in zip(layer.params.items(), tensors):
            if is_dtensor(t):
                raise RuntimeError(f"{layer.name}: FSDP2 resharded {local} before the engine saw its forward")
            ref = self._grad_hooked.get(id(t))
            if (ref is None or ref() is not t) and self.loss_reduction == "mean":
                self.handles.append(t.register_hook(self.grad_rescale))
                self._grad_hooked[id(t)] = weakref.ref(t)
        return tensors

    def _flattened(self, layer, out, act) -> bool:
        """False when dim 0 of the layer's output holds the rows (training + validation); True when the model
        flattened them with the tokens, [rows·T, ...] (OPT's feed-forward block: ``reshape(-1, d)`` of a
        [rows, T, d] tensor), input and output alike; otherwise a ValueError. A flattened tensor is read
        batch-major, as ``reshape`` lays out a batch-first tensor; the engine assumes batch-first models."""
        mb = self.mb
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

    @property
    def grad_rescale(self):
        """The parameters' gradient hook: grad ↦ grad · s_train / s (loss_reduction="mean"), which turns the sum of
        the layer's own gradient and the tap's -G_val into the training rows' mean gradient; · 1 when not armed."""
        return partial(torch.mul, other=self.mb.grad_scale)

    def on_excluded_forward(self, module, args, kwargs, output):
        """Recompute the validation rows with detached parameters, so the module's own parameters get
        gradient from the training rows only while gradient still flows to its inputs."""
        mb = self.mb
        if not mb.armed or self._replaying or not torch.is_grad_enabled() or in_backward():
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

    def keep_autocast(self, module, args, output):
        """DEFERRED: keep the autocast the forward ran under, for the validation passes of aggregate_and_log()."""
        if torch.compiler.is_compiling() or not self.mb.armed or not torch.is_grad_enabled():
            return None
        device = self.mb.sink.device.type
        self.mb.autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        return None

    # ------------------------------------------------------------------ called from _Tap
    def channel_shapes(self, layer, meta, act, support):
        """(shape, dtype) of the channels the FIRST (embedding) use of a tied parameter opens: the later
        linear use's G_val (parameter shape) and its stash restricted to `support`."""
        pname = layer.params[list(layer.params)[meta[3].index(FIRST)]]
        second = self.tie_partner[pname]
        param = self.params[pname]
        n_tokens = act[:meta[0]].numel()
        compute = autocast_dtype(act.device.type) or param.dtype
        stash = second.rule.stash_shapes(second.module, n_tokens, support.shape[0])
        if meta[4] == COSINE:  # the linear's row_stash: [B, U, T]
            per_row = n_tokens // max(1, meta[0])
            stash = stash + [(meta[0], per_row, per_row)]
        return [(tuple(param.shape), accum_dtype(param))] + [(shape, compute) for shape in stash]

    def check_generation(self, generation):
        mb = self.mb
        if not mb.armed or generation != mb.generation:
            raise RuntimeError("backward ran after its micro-batch was filed: call backward() before "
                               "prepare_gradients(), aggregate_and_log() or the next prepare_forward_input()")

    def defer(self, layer, roles, act_tr=None, grad_tr=None, act_v=None, grad_v=None, val_grads=None):
        """A deferred estimator's tap backward (eager only): keep the layer's rows for aggregate_and_log() and
        grad L_val of its parameters (a tied parameter's from its first use, which holds both uses' G_val)."""
        mb = self.mb
        mb.deferred.append((layer, act_tr, grad_tr, act_v, grad_v))
        if val_grads is not None:
            for local, role in zip(layer.params, roles):
                if role != SECOND:
                    mb.val_grads[layer.params[local]] = val_grads[local] * mb.val_norm_scale


class _Tap(torch.autograd.Function):
    """apply(taps, layer, meta, out, act, support, first, train_ids, *params, *sinks, *extras, *channels_in)
    -> out[, *channels_out]

    meta = (n_train, compute dtype or None, generation or -1, roles: one of None/FIRST/SECOND per parameter,
    value estimator). extras: one per parameter, none for "first_order"; "adamw": the preconditioner D;
    "cosine": the parameter's row of the norm sink. train_ids: the embedding's training ids, given to the later
    (linear) use of a tied parameter under "cosine" (else None).
    """

    @staticmethod
    def forward(ctx, taps, layer, meta, out, act, support, first, train_ids, *rest):
        ctx.taps, ctx.layer, ctx.meta = taps, layer, meta
        n_params = len(layer.params)
        n_extra = n_params if meta[4] in (ADAMW, COSINE) else 0
        precond = rest[2 * n_params:2 * n_params + n_extra] if meta[4] == ADAMW else ()
        n_proj = 3 * n_params if meta[5] else 0  # a sink's columns and two matrices per parameter
        mats = rest[2 * n_params + n_extra + n_params:2 * n_params + n_extra + n_proj]
        ctx.save_for_backward(act, support, first, train_ids, *mats, *precond)
        ctx.set_materialize_grads(False)
        ctx.n_extra, ctx.n_proj = n_extra, n_proj
        channels_in = rest[2 * n_params + n_extra + n_proj:]
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
        shapes = taps.channel_shapes(layer, meta, act, support)
        return (out,) + tuple(out.new_zeros((), dtype=dtype).expand(shape) for shape, dtype in shapes)

    @staticmethod
    def backward(ctx, grad, *channel_grads):
        taps, layer = ctx.taps, ctx.layer
        n_train, dtype, generation, roles, value, projecting = ctx.meta
        n_params = len(layer.params)
        act, support, first, train_ids, *rest = ctx.saved_tensors
        mats, precond = rest[:2 * n_params] if projecting else (), rest[2 * n_params:] if projecting else rest
        if not torch.compiler.is_compiling():
            taps.check_generation(generation)
        if grad is None:
            if value in DEFERRED:
                taps.defer(layer, roles)
            return (None,) * (8 + 2 * n_params + ctx.n_extra + ctx.n_proj + len(ctx.channel_dtypes))
        dtype = dtype or grad.dtype
        grad_out = grad
        if act.is_floating_point():
            act = to_dtype(act, dtype)
        grad = to_dtype(grad, dtype)
        module, rule = layer.module, layer.rule
        sizes = (n_train, act.shape[0] - n_train)  # one call per tensor for its two views (host time per layer)
        act_tr, act_v = act.split_with_sizes(sizes)
        grad_tr, grad_v = grad.split_with_sizes(sizes)
        if not sizes[1]:  # no validation rows: projections only, .grad untouched
            projected = project_rows(layer, act_tr, grad_tr, mats, {}, [False] * n_params)
            return (None, None, None, grad_out, None, None, None, None, *(None,) * (2 * n_params + ctx.n_extra),
                    *projected, *(None,) * (2 * n_params), *(None,) * len(ctx.channel_dtypes))
        val_grads = rule.val_grads(module, act_v, grad_v)  # fresh tensors, owned here
        # adamw: the dot products are taken with D ⊙ G_val; .grad still gets the unpreconditioned -G_val
        # FSDP2: D is sharded like its parameter; its layer's whole D is gathered here, one layer at a time (every
        # process runs the layers' backward in the same order)
        precond = dict(zip(layer.params, (d.full_tensor() if is_dtensor(d) else d for d in precond)))

        def against(local, val_grad):
            return val_grad * precond[local] if precond else val_grad

        later = channel_grads[0] if channel_grads else None  # G_val of the later (linear) use, if it ran
        cross = norm_cross = None
        for local, role in zip(layer.params, roles):
            if role == FIRST and later is not None:
                # <G_i(linear use), G_val(this use)> from the linear's stash, then G_val of both uses
                second_rule = taps.tie_partner[layer.params[local]].rule
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
            taps.defer(layer, roles, act_tr, grad_tr, act_v, grad_v, val_grads)
        extra_grads = [None] * ctx.n_extra
        if value == COSINE:  # per parameter: raw ||G_i||² of this use (+ cross terms), then ||G_val||²
            sq = rule.per_sample_sq_norms(module, act_tr, grad_tr)
            extra_grads = []
            for local, role in zip(layer.params, roles):
                sq_i = sq[local] if norm_cross is None or role != FIRST else sq[local] + 2 * norm_cross
                sq_val = (val_grads[local].square().sum() if role != SECOND  # the embedding counts both uses
                          else sq_i.new_zeros(()))
                extra_grads.append(torch.cat([sq_i, sq_val.to(sq_i.dtype).reshape(1)]))
        # Π_val of the vector the dot products are taken against: G_val, or D ⊙ G_val under adamw
        projected = (project_rows(layer, act_tr, grad_tr, mats, totals, [role != SECOND for role in roles])
                     if projecting else ())
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
                *projected, *(None,) * len(mats), *channels_in)
