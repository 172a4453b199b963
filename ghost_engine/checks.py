"""The engine's checks that the model, its loss and its inputs are what the values assume: Checks.

Owns: the label shapes of a batch (check_labels); the forward hooks that refuse, before any backward, what
would make the values silently wrong: dropout (found by ghost_engine.dropout), a BatchNorm normalising the
[training; validation] rows together, a hooked parameter also used outside its layer (a walk of the autograd
graph, check_graph), a loss whose scale contradicts ``loss_reduction`` (check_loss). A refused micro-batch is
disarmed (void). Must not touch: the taps and their backward, the optimizer, the parameters' gradients.
"""
import math
from functools import partial

import torch
from torch import nn

from ghost_engine.dropout import RandomDrawProbe, active_dropout_error, random_draw_error
from ghost_engine.layers.channel_norm import batch_statistics_error
from ghost_engine.losses import output_field, per_sample_loss, target_counts
from ghost_engine.tap import in_backward

# nodes that only cast, view or re-lay-out their one input (autocast's cached weight casts, .t(), views): the
# operations that consume a parameter are found through them
_PASS_THROUGH = frozenset({"ToCopyBackward0", "TBackward0", "TransposeBackward0", "TransposeBackward1",
                           "PermuteBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
                           "ExpandBackward0", "AliasBackward0", "UnsqueezeBackward0", "SqueezeBackward0",
                           "SqueezeBackward1", "SqueezeBackward2", "CloneBackward0", "AsStridedBackward0"})


def check_labels(Y, X, which: str, task: str):
    """Refuse labels whose shape does not fit the task and the inputs X (``which``: "training" or "validation")."""
    if task in ("causal_lm", "token_classification") and (Y.dim() != 2 or Y.shape != X.shape[:2]):
        kind = "a causal LM" if task == "causal_lm" else "token classification"
        raise ValueError(f"{which} labels have shape {tuple(Y.shape)}; {kind} needs [rows, T] labels "
                         f"matching inputs {tuple(X.shape)}")
    if task == "classification" and Y.dim() != 1:
        raise ValueError(f"{which} labels have shape {tuple(Y.shape)}; classification needs [rows]")


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


class Checks:
    """The checks of one engine: their hooks on the model, and whether the graph and the loss were checked."""

    def __init__(self, model, model_map, mb, dropout_sites, task: str, loss_reduction: str, ignore_index: int):
        self.model, self.map, self.mb, self.dropout_sites = model, model_map, mb, dropout_sites
        self.task, self.loss_reduction, self.ignore_index = task, loss_reduction, ignore_index
        self.loss_checked = False  # the model's loss has been checked against loss_reduction
        self.graph_checked = False  # the hooked parameters' uses have been checked (check_graph)
        self._probe, self._probed = None, set()  # the probe of the running forward; the modes probed (model.training)

    def attach(self) -> list:
        """Register the checks' hooks on the model; returns their handles."""
        handles = []
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):  # model.train() after the engine was built
                handles.append(module.register_forward_pre_hook(partial(self.on_batch_norm_pre, name)))
        handles.append(self.model.register_forward_pre_hook(self.on_model_forward_pre))
        handles.append(self.model.register_forward_hook(self.end_probe, prepend=True, always_call=True))
        handles.append(self.model.register_forward_hook(self.on_model_forward, with_kwargs=True))
        return handles

    def on_batch_norm_pre(self, name, module, args):
        """Refuse a BatchNorm that is about to normalise the [training; validation] rows with their joint
        statistics (switched back to training mode since the engine was built)."""
        if self.mb.armed and torch.is_grad_enabled():
            error = batch_statistics_error(name, module)
            if error is not None:
                raise ValueError(error)

    def on_model_forward_pre(self, module, args):
        """Refuse dropout that is active now (a few attribute reads: compiled forwards run them too); on the first
        armed eager forward in each mode (model.training), start a RandomDrawProbe for the calls no attribute shows
        (F.dropout with a literal p, SDPA's dropout_p, random draws), which end_probe reads."""
        if not self.mb.armed or not torch.is_grad_enabled():
            return None
        error = active_dropout_error(self.model, self.dropout_sites)
        if error is not None:
            self.mb.disarm()
            raise ValueError(error)
        if (not torch.compiler.is_compiling() and self._probe is None and self.model.training not in self._probed
                and not in_backward()):
            self._probe = RandomDrawProbe(self.model)
            self._probe.__enter__()
        return None

    def end_probe(self, module, args, output):
        """End the forward's RandomDrawProbe (also when the forward raised) and refuse what it found."""
        probe, self._probe = self._probe, None
        if probe is None:
            return None
        probe.__exit__(None, None, None)
        if output is None:  # the forward raised: its own error goes on, the next forward is probed again
            return None
        if probe.found:
            self.mb.disarm()
            raise ValueError(random_draw_error(self.model, probe.found))
        self._probed.add(self.model.training)
        return None

    def on_model_forward(self, module, args, kwargs, output):
        """On the first armed eager forward whose output carries ``loss`` and ``logits`` and whose call got
        ``labels``, check the loss against ``loss_reduction`` (check_loss). Under torch.compile the hook does
        nothing, so the compiled graph has no break: call check_loss yourself there."""
        if torch.compiler.is_compiling() or not self.mb.armed or not torch.is_grad_enabled():
            return None
        try:
            if not self.graph_checked and not self.map.sharded:
                self.check_graph(output)
            if self.loss_checked:
                return None
            loss, logits, labels = output_field(output, "loss"), output_field(output, "logits"), kwargs.get("labels")
            if torch.is_tensor(loss) and torch.is_tensor(logits) and torch.is_tensor(labels):
                self.check_loss(loss, logits, labels)
        except ValueError:
            self.mb.disarm()  # the micro-batch is void: prepare it again after fixing the model or the loss
            raise
        return None

    def check_graph(self, output) -> bool:
        """GradDotProdEngine.check_graph."""
        mb = self.mb
        roots = [t.grad_fn for t in _output_tensors(output) if t.grad_fn is not None]
        if not mb.armed or not roots:
            return False
        parents, accumulate = _reverse_graph(roots)
        for pname, p in self.map.params.items():
            node = accumulate.get(id(p))
            if node is None or pname not in self.map.hooked_params:
                continue
            uses = _consumers(node, parents)
            ran = [layer.name for layer in self.map.layers
                   if layer.name in mb.seen and pname in layer.params.values()]
            if len(uses) > len(ran):
                raise ValueError(
                    f"{pname} is used by {len(uses)} operation(s) in this forward ({', '.join(sorted(uses))}), but "
                    f"only {len(ran)} of them can be the forward of the layer(s) the engine hooks for it "
                    f"({', '.join(ran) or 'none ran'}): the parameter is also used outside a hooked layer (for "
                    "example a head computed as F.linear(h, embedding.weight) instead of through a module tied to "
                    "the embedding), and that use's share would be missing from the dot products and .grad. Use "
                    "it through its module, or freeze it")
        self.graph_checked = True
        return True

    @torch.no_grad()
    def check_loss(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> bool:
        """GradDotProdEngine.check_loss."""
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
        self.loss_checked = True
        return True
