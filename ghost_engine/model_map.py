"""What the engine values in a model, worked out once at construction: a ModelMap.

Owns: the trainable parameters and their names, the hooked layers (each with its layer rule, fixed before the
first step), the parameters shared by an embedding and a linear layer (ties, and which layer is the later use),
the excluded modules (unsupported="exclude"), and whether FSDP2 shards the parameters. A module with batch
statistics (BatchNorm in training mode), an unsupported tie or an unsupported module is refused here, naming it.

Must not touch: the model itself (no hooks, no attributes, no forward), the per-step state, the optimizer.
The ModelMap is read-only once built; the taps (ghost_engine.tap) and the checks read it.
"""
from dataclasses import dataclass

from torch import nn

from ghost_engine.layers import rule_for
from ghost_engine.layers.channel_norm import batch_statistics_error


@dataclass(eq=False)
class Layer:
    """A hooked module and its layer rule."""

    name: str
    module: nn.Module
    rule: type
    params: dict  # local name -> global parameter name
    tied: dict  # local name -> whether the parameter is shared with another module
    tensors: tuple = ()  # the parameters, in the order of `params`
    # fixed at set-up, so that the forward hook does not work them out at every step:
    roles: tuple = None  # (None, ...) when no parameter is tied; None when the roles depend on the step
    autocast_input: bool = False  # the rule's autocast_input


def trainable_names(model: nn.Module) -> dict:
    """{id(parameter): name} of the parameters that require grad, first name under model.named_parameters()."""
    names = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            names.setdefault(id(p), name)
    if not names:
        raise ValueError("the model has no trainable parameters")
    return names


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no DTensor
        return False
    return isinstance(t, DTensor)


def fsdp_sharding(model: nn.Module) -> bool:
    """True if the model's parameters are sharded by FSDP2 (``fully_shard``: DTensors placed Shard(0) and/or
    Replicate, owned by FSDP modules), False if none is a DTensor. Any other DTensor (tensor parallelism)
    is a ValueError: its layers see sharded activations, which the layer rules do not cover."""
    dtensors = {name: p for name, p in model.named_parameters() if is_dtensor(p)}
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


class ModelMap:
    """The hooked layers, parameters, ties and exclusions of a model.

    Attributes: ``param_names`` {id(parameter): name}; ``params`` {name: parameter} (trainable, model order);
    ``layers`` [Layer]; ``hooked_params`` [names of the parameters some layer rule values] (model order);
    ``tie_partner`` {tied parameter name: its later (linear) use's Layer}; ``excluded_modules`` [(name,
    module)]; ``excluded_parameters`` [sorted names]; ``sharded`` (FSDP2).
    """

    def __init__(self, model: nn.Module, param_names: dict, unsupported: str, sharded: bool):
        self.param_names, self.sharded = param_names, sharded
        self.tie_partner = {}
        self.layers, self.excluded_modules = self._inspect(model, unsupported)
        self.excluded_parameters = sorted(
            {param_names[id(p)] for _, m in self.excluded_modules for p in m.parameters() if p.requires_grad})
        trainable = set(param_names.values())
        self.params = {name: p for name, p in model.named_parameters() if name in trainable}
        hooked = {pname for layer in self.layers for pname in layer.params.values()}
        self.hooked_params = [name for name in self.params if name in hooked]  # model order

    def _inspect(self, model, unsupported):
        layers, problems = [], []
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
            layers.append(Layer(mod_name or "<model>", module, rule, params, {}, tuple(own.values())))
        for layer in layers:
            for local, p in layer.module.named_parameters(recurse=False):
                if p.requires_grad:
                    layer.tied[local] = len(owners[id(p)]) > 1
            layer.roles = None if any(layer.tied.values()) else (None,) * len(layer.params)
            layer.autocast_input = getattr(layer.rule, "autocast_input", False)
        self._check_ties(layers, owners)
        return layers, self._excluded(layers, problems, unsupported)

    @staticmethod
    def _excluded(layers, problems, unsupported) -> list:
        """The modules without a layer rule, left out (unsupported="exclude"); else a ValueError naming them."""
        if problems and unsupported == "error":
            listing = "; ".join(f"{name or '<model>'} ({type(m).__module__}.{type(m).__name__}: "
                                f"{', '.join(n for n, p in m.named_parameters(recurse=False) if p.requires_grad)})"
                                for name, m in problems)
            raise ValueError(f"no layer rule for module(s) with trainable parameters: {listing}. Register a rule "
                             "with ghost_engine.layers.register_layer, freeze them, or pass unsupported='exclude' "
                             "to leave them out of the dot products")
        hooked = {id(layer.module) for layer in layers}
        excluded = []
        for name, module in problems:
            inner = [n for n, sub in module.named_modules() if id(sub) in hooked and sub is not module]
            if inner:
                raise ValueError(f"cannot exclude {name} ({type(module).__name__}): it contains supported layers "
                                 f"{inner}; register a rule for {type(module).__name__} instead")
            excluded.append((name, module))
        return excluded

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
            self.tie_partner[self.param_names[pid]] = linear

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
