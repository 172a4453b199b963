"""Layer rules: the per-layer math of the engine, one file per layer family.

A rule is a class of static, pure functions registered for one or more module types.
The engine hands every rule the module's captured forward input (``act``) and the
gradient of the module's output (``grad``), already split into training rows
(``*_tr``) and validation rows (``*_v``). Rules know nothing about hooks, loss scaling,
optimizers or distributed training; they return raw sums in the units of the
backpropagated gradient, and the engine turns those into dot products of the
per-sample losses.

The interface of a rule (see ``linear.py`` for the reference implementation)::

    capture(module, args, kwargs, output, rows) -> (act, replacement_output or None)
    val_grads(module, act_v, grad_v) -> {local_param_name: Tensor (parameter layout, fp32 or fp64)}
    per_sample_dots(module, act_tr, grad_tr, act_v, grad_v, val_totals, own_only)
        -> {local_param_name: Tensor [B_train]}
    path(module, act_tr, act_v, own_only) -> LayerPath      (which exact path runs, and its flops)
    per_sample_sq_norms(module, act_tr, grad_tr) -> {local_param_name: Tensor [B_train]}   (||G_i||², optional:
        needed by the engine's value="cosine")
    per_sample_projection(module, act_tr, grad_tr, mats) -> {local_param_name: Tensor [B_train, k]}   (Π_i of the
        parameters in `mats`, ghost_engine.projection; a rule lists in ``factored`` the parameters whose G_i it
        factors as Σ_t u_t v_tᵀ) or, for small parameters, per_sample_grads(module, act_tr, grad_tr) ->
        {local_param_name: Tensor [B_train, ...]}, the explicit per-sample gradients the engine projects

``per_sample_dots`` receives in ``val_totals`` the validation gradient, or under value="adamw" the preconditioned
D ⊙ G_val with ``own_only`` all False (a rule must then use ``val_totals`` only, not a Gram form of act_v, grad_v).

Rules are found for a module in two ways (``rule_for``):
- by type: ``@register_layer(nn.Linear)`` registers a rule for a module type and its subclasses that keep
  its forward;
- by computation: ``@register_recogniser`` registers a rule class whose ``recognise(module)`` returns a rule
  for a module it has *verified* to compute that rule's formula (its forward run once on a small random
  input with random parameters and compared with the formula), or None. This is how the RMSNorm classes
  of every model family, LayerNorms in their own class or with their own forward (Cohere's without bias,
  Nemotron's with 1 + weight), scaled embeddings (Gemma: a buffer; XGLM, BioGPT: a float attribute),
  offset positional embeddings (OPT, BioGPT) and linear layers with their own forward (Falcon's
  FalconLinear) are valued.
A module matched by neither is refused by the engine, never valued with a guessed formula.

A rule may set ``autocast_input = True`` to have the engine keep its input in the autocast dtype.
A parameter may be shared by one embedding-like rule (``row_sparse = True``: its validation gradient
lives on the looked-up rows) and one later linear-like rule that shares no other parameter and implements
``stash_shapes``, ``make_stash`` and ``stash_dots`` (see ``linear.py`` and ghost_engine.tap); for
value="cosine" the linear-like rule also implements ``row_stash`` and the embedding-like one ``tied_cross``
(the per-sample cross term of the norm).

Rules run inside autograd's backward and may be traced by torch.compile: no host synchronisation and no
data-dependent shapes (no ``torch.unique``, boolean-mask indexing or ``.item()``).
"""
from dataclasses import dataclass

import torch
from torch import nn

LAYER_RULES: dict[type, type] = {}
RECOGNISERS: list = []  # rule classes with a recognise(module) classmethod, tried in registration order


def register_layer(*module_types: type):
    """Class decorator: register a rule for ``module_types`` (and their subclasses that keep their forward)."""

    def wrap(rule):
        for module_type in module_types:
            LAYER_RULES[module_type] = rule
        return rule

    return wrap


def register_recogniser(rule):
    """Class decorator: ``rule.recognise(module)`` returns a rule for modules it verifies numerically."""
    RECOGNISERS.append(rule)
    return rule


def rule_for(module: nn.Module):
    """The rule registered for ``type(module)``, or for its nearest registered base class when the subclass
    computes what the base computes (it does not override ``forward``); otherwise the first rule whose
    ``recognise`` verifies the module's forward against its formula; otherwise None."""
    for klass in type(module).__mro__:
        if klass in LAYER_RULES:
            if type(module).forward is klass.forward:
                return LAYER_RULES[klass]
            break
    for recogniser in RECOGNISERS:
        rule = recogniser.recognise(module)
        if rule is not None:
            return rule
    return None


EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")  # where the norm classes of the model families keep epsilon
NORM_PROBE_ROWS = 8  # rows of a norm's recognition probe
NORM_PROBE_RTOL = 1e-5  # a float64 probe against a norm that may normalise in fp32: rounding is ~1e-7


def probe_generator() -> torch.Generator:
    """A fixed-seed CPU generator for the random inputs and parameters of a recognition check."""
    return torch.Generator().manual_seed(0)


def probe_forward(module: nn.Module, replacements: dict, *args, **kwargs):
    """The module's forward on the CPU, without autograd, with `replacements` (name -> CPU tensor) in place of
    its parameters and CPU copies of its other buffers; None where the forward raises (the module does not
    compute what was tried). On the CPU a probe never waits for a GPU nor trips a device-side assert.

    A module that FSDP2's fully_shard was applied to itself (accelerate shards the embedding, the final norm and
    the output layer so) runs its class's forward without its hooks: FSDP's pre-forward hook would all-gather
    (a collective) and take the module for FSDP's root, which breaks the model's first real forward."""
    try:
        with torch.no_grad():
            tensors = {name: b.detach().cpu() for name, b in module.named_buffers()}
            if _is_fsdp_module(module):
                tensors = {f"module.{name}": t for name, t in {**tensors, **replacements}.items()}
                return torch.func.functional_call(_HooklessForward(module), tensors, args, kwargs)
            return torch.func.functional_call(module, {**tensors, **replacements}, args, kwargs)
    except Exception:  # any failure means "not this formula": the module is then refused, never guessed
        return None


class _HooklessForward(nn.Module):
    """``type(module).forward(module, ...)`` as a module: the forward without the module's own hooks."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return type(self.module).forward(self.module, *args, **kwargs)


def _is_fsdp_module(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(module, FSDPModule)


def same_values(got, expected, rtol: float) -> bool:
    """True when `got` is a tensor of `expected`'s shape within max |got - expected| <= rtol * max |expected|."""
    if not torch.is_tensor(got) or got.shape != expected.shape or not got.dtype.is_floating_point or got.is_meta:
        return False
    err = (got.double() - expected.double()).abs().max()
    return bool(err <= rtol * expected.double().abs().max())


@dataclass
class LayerPath:
    """Which exact computation a layer's per-sample dot products use, and its cost."""

    path: str  # "gram", "projection", "gather" (embeddings) or "explicit" (norm layers)
    flops: float  # extra flops of the per-sample dot products for this layer


def module_input(args, kwargs, name="input") -> torch.Tensor:
    """The tensor a module was called with (first positional argument, or the keyword `name`)."""
    return args[0] if args else kwargs[name]


def accum_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of the engine's sums: fp64 for an fp64 model, fp32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def row_dot(x: torch.Tensor, y: torch.Tensor, rows: int) -> torch.Tensor:
    """Per row, the sum of x ⊙ y over everything after the first `rows` split: [rows] in fp32 (fp64).

    An element-wise product and one row reduction: a memory-bound pass on a GPU. (The same sum
    written as a batched matrix-vector product [rows, 1, K] x [rows, K, 1] runs on a GPU about 30x
    slower than memory bandwidth allows.) Half-precision products are summed in fp32.
    """
    return (x.reshape(rows, -1) * y.reshape(rows, -1)).sum(dim=1, dtype=accum_dtype(x))


def matmul_accum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b ([n, k] x [k, m]) with an fp32 result (fp64 for fp64 inputs).

    On a GPU, half-precision operands are multiplied as they are, on the tensor cores with fp32
    accumulation and output (``torch.mm(..., out_dtype=)``); elsewhere they are upcast first.
    """
    dtype = accum_dtype(a)
    if a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16) and a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=dtype)
    return to_dtype(a, dtype) @ to_dtype(b, dtype)


def bmm_accum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.bmm(a, b) ([g, n, k] x [g, k, m]) with an fp32 result (fp64 for fp64 inputs), as matmul_accum."""
    dtype = accum_dtype(a)
    if a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16) and a.is_cuda and _BMM_OUT_DTYPE:
        return torch.bmm(a, b, out_dtype=dtype)
    return torch.bmm(to_dtype(a, dtype), to_dtype(b, dtype))


def to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call when `t` already has it (each call costs host time in the backward)."""
    return t if t.dtype == dtype else t.to(dtype)


# torch.mm / torch.bmm(..., out_dtype=) (CUDA, half-precision inputs, fp32 output) exist from torch 2.8 on: their
# "dtype" overloads (the docstrings of some versions do not mention the argument)
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()
_BMM_OUT_DTYPE = "dtype" in torch.ops.aten.bmm.overloads()


def row_sum(per_token: torch.Tensor, rows: int) -> torch.Tensor:
    """Sum a per-token vector [rows * tokens] to per-row totals: [rows]."""
    return per_token.reshape(rows, -1).sum(dim=1)


# Import the layer families so that their rules register themselves.
from ghost_engine.layers import channel_norm, conv, embedding, layer_norm, linear, rms_norm  # noqa: E402,F401
