"""Dropout and other random draws in the forward: found, and refused with the way out.

Why. The validation rows ride in the training forward ([train; val] stacked), so whatever drops units of the
training rows drops units of the validation rows too: grad L_val becomes a random draw at every step (its mean
is not the dropout-free gradient either), and the dot products with it are silently wrong. Reported for a GPT-2
with Hugging Face's default dropout 0.1 through GradDotProdTrainer: 29-46% away from the dropout-free values,
one row in eight with the other sign, 18% apart between two seeds. Probability 0, or eval mode, is exact.

What this module owns (the engine and the integrations call it; it knows nothing of hooks or layer rules):
- `dropout_sites(model)`: where a module keeps a dropout probability: the ``p`` of the nn.Dropout family
  (Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout and their subclasses) and every numeric
  attribute whose name contains "drop" (Hugging Face attention modules keep ``attention_dropout``, OPT's
  layers ``dropout``, ``activation_dropout`` and ``layerdrop``, as floats they pass to functional dropout or
  to an attention function). Collected once; `active_dropout_error` reads them (mode and value) at every
  armed forward, compiled or not: a few attribute reads.
- `RandomDrawProbe`: a TorchFunctionMode that, around one eager forward, records every call that draws
  random numbers: ``F.dropout``-family calls with ``training=True`` and ``p > 0``, ``torch.dropout`` and its
  variants, ``scaled_dot_product_attention(dropout_p > 0)``, ``F.rrelu`` in training and the plain random
  generators (``torch.rand``, ``bernoulli``, ``Tensor.uniform_``, ...), each with the line that called it and
  the module it ran in. On the CPU dropout leaves only a ``MulBackward0`` in the autograd graph (and SDPA
  with dropout falls back to the math kernel's ``BmmBackward0``), so the graph cannot tell; the calls can.
- `disable_dropout(model)`: every site and Hugging Face config field set to 0, the one-line way out.
"""
import inspect
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

DROPOUT_MODULES = nn.modules.dropout._DropoutNd  # Dropout, Dropout1d/2d/3d, AlphaDropout, FeatureAlphaDropout
_LISTED = 4  # sites named in a message; the rest are counted

# functional dropouts: (input, p, training, ...), their defaults read from their signatures
_DROPOUT_FUNCTIONS = {f: inspect.signature(f) for f in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                                                         F.alpha_dropout, F.feature_alpha_dropout)}
# torch's own: (input, p, train), positional
_TORCH_DROPOUTS = {getattr(torch, name) for name in ("dropout", "dropout_", "feature_dropout", "feature_dropout_",
                                                     "alpha_dropout", "alpha_dropout_", "feature_alpha_dropout",
                                                     "feature_alpha_dropout_", "native_dropout")
                   if hasattr(torch, name)}
_RRELU = inspect.signature(F.rrelu)
_SDPA = F.scaled_dot_product_attention  # a builtin: (query, key, value, attn_mask, dropout_p, ...)
# anything else that draws random numbers: {function: the name a message gives it}
_RANDOM_DRAWS = {
    **{getattr(torch, name): f"torch.{name}" for name in ("rand", "rand_like", "randn", "randn_like", "randint",
                                                         "randint_like", "randperm", "bernoulli", "multinomial",
                                                         "normal", "poisson")},
    **{getattr(torch.Tensor, name): f"Tensor.{name}" for name in ("bernoulli", "bernoulli_", "uniform_", "normal_",
                                                                  "exponential_", "geometric_", "cauchy_",
                                                                  "log_normal_", "random_", "multinomial")},
    F.gumbel_softmax: "F.gumbel_softmax",
}
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _is_probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


def dropout_sites(model: nn.Module) -> list:
    """[(module name, module, attribute)]: the ``p`` of every nn.Dropout-family module, and every numeric
    attribute of another module whose name contains "drop" (whatever its value now: it is read at each check)."""
    sites = []
    for name, module in model.named_modules():
        if isinstance(module, DROPOUT_MODULES):
            sites.append((name, module, "p"))
            continue
        for attr, value in vars(module).items():
            if (not attr.startswith("_") and "drop" in attr.lower() and isinstance(value, (int, float))
                    and not isinstance(value, bool)):
                sites.append((name, module, attr))
    return sites


def active_sites(sites, assume_training=False) -> list:
    """The sites whose module is in training mode (or all, with `assume_training`) with a probability in (0, 1]."""
    return [(name, module, attr) for name, module, attr in sites
            if (assume_training or module.training) and _is_probability(getattr(module, attr))]


def config_fields(model: nn.Module) -> dict:
    """{"model.config.<field>" (or "model.<module>.config.<field>"): value} of the Hugging Face configs held by the
    model's modules, for every field whose name contains "drop" and whose value is in (0, 1]."""
    fields, seen = {}, set()
    for name, module in model.named_modules():
        config = vars(module).get("config")
        if config is None or id(config) in seen or not callable(getattr(config, "to_dict", None)):
            continue
        seen.add(id(config))
        try:
            items = config.to_dict().items()
        except Exception:  # a config-like object of another library: no hint from it
            continue
        prefix = f"model.{name}.config" if name else "model.config"
        for key, value in items:
            if "drop" in key.lower() and _is_probability(value):
                fields[f"{prefix}.{key}"] = value
    return fields


def _site_text(name, module, attr) -> str:
    where = name or "<model>"
    if isinstance(module, DROPOUT_MODULES) and attr == "p":
        return f"{where} ({type(module).__name__}, p={module.p:g})"
    return f"{where}.{attr} = {getattr(module, attr):g} ({type(module).__name__})"


def _listing(items) -> str:
    items = list(items)
    more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return ", ".join(items[:_LISTED]) + more


def _way_out(model, eval_mode: bool, fields: dict) -> str:
    """How to get out: dropout 0 when building (naming the config fields), disable_dropout on the built model,
    or eval mode where the caller controls the mode."""
    if fields:
        keys = sorted({key.rsplit(".", 1)[1] for key in fields})
        configs = sorted({type(config).__name__ for config in (getattr(m, "config", None) for m in model.modules())
                          if callable(getattr(config, "to_dict", None))})
        build = (f"build the model with {' = '.join(keys)} = 0 (`from_pretrained(name, "
                 f"{', '.join(f'{k}=0.0' for k in keys)})` or `{configs[0] if configs else 'Config'}(..., "
                 f"{', '.join(f'{k}=0.0' for k in keys)})`; setting model.config after the model is built changes "
                 "nothing, its modules copied the values)")
    else:
        build = "build the model with dropout probability 0"
    text = f"{build}, or call `ghost_engine.disable_dropout(model)` on the built model"
    if eval_mode:
        text += ", or train in eval mode (`model.eval()` before building the engine and after every model.train())"
    return text


def active_dropout_error(model: nn.Module, sites, framework=None):
    """The refusal message if a site is active, else None. Without `framework` a site is active when its module
    is in training mode; with it (the name of an integration whose framework calls model.train() before every
    step) whatever the mode now, and eval mode is no way out."""
    active = active_sites(sites, assume_training=framework is not None)
    if not active:
        return None
    mode = "in training mode" if framework is None else "(in training mode, where training puts them)"
    who = ("the engine refuses" if framework is None else
           f"{framework} refuses (training calls model.train() before every step, so model.eval() is no way out)")
    return (f"dropout is active: {len(active)} module(s) {mode} drop units with probability > 0: "
            f"{_listing(_site_text(*site) for site in active)}. The validation rows go through the same "
            "forward as the training rows, so dropout drops their units too: grad L_val would be a different "
            f"random draw at every step and the dot products silently wrong; {who}. Set dropout to 0: "
            + _way_out(model, framework is None, config_fields(model)))


def check_no_dropout(model: nn.Module, framework: str):
    """For an integration (named `framework`) before training starts: a ValueError naming every dropout
    probability > 0 of `model` in any mode (the framework will call model.train()) and the way out."""
    error = active_dropout_error(model, dropout_sites(model), framework)
    if error is not None:
        raise ValueError(error)


def random_draw_error(model: nn.Module, found) -> str:
    """The refusal message for the random draws a RandomDrawProbe found."""
    return (f"the forward draws random numbers: {_listing(found)}. The validation rows go through the same "
            "forward as the training rows, so the draw changes them too: grad L_val would be a different random "
            "draw at every step and the dot products silently wrong; the engine refuses. Make these calls "
            "deterministic: give them dropout probability 0 (the p or dropout_p they are passed, e.g. the module's p "
            f"in `F.dropout(x, self.p, self.training)`): {_way_out(model, True, config_fields(model))}")


class RandomDrawProbe(TorchFunctionMode):
    """Around one eager forward (``with RandomDrawProbe(model) as probe: ...``): ``probe.found`` lists the calls
    that drew random numbers (dropout with p > 0 in training, SDPA with dropout_p > 0, random generators), each
    as "what at file:line (function) in module (type)". Every call goes through Python while it is active:
    for one forward only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.found = []
        self._names = {id(m): (n or "<model>", type(m).__name__) for n, m in model.named_modules()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _random_call(func, args, kwargs)
        if what is not None and len(self.found) < 4 * _LISTED:
            self.found.append(f"{what} at {self._where()}")
        return func(*args, **kwargs)

    def _where(self) -> str:
        """The first caller outside torch (file:line, function) and the innermost model module on the stack."""
        frame, site = sys._getframe(2), None
        while frame is not None:
            code = frame.f_code
            if site is None and not code.co_filename.startswith(_TORCH_DIR) and code.co_filename != __file__:
                site = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} ({code.co_name})"
            if site is not None:
                for key in ("self", "module"):
                    owner = frame.f_locals.get(key)
                    if isinstance(owner, nn.Module) and id(owner) in self._names:
                        return "{} in {} ({})".format(site, *self._names[id(owner)])
            frame = frame.f_back
        return site or "?"


def _random_call(func, args, kwargs):
    """A short description of the call if it draws random numbers, else None."""
    if func in _DROPOUT_FUNCTIONS:
        bound = _DROPOUT_FUNCTIONS[func].bind(*args, **kwargs)
        bound.apply_defaults()
        p, training = bound.arguments["p"], bound.arguments["training"]
        return f"F.{func.__name__}(p={p:g}, training=True)" if training and p > 0 else None
    if func in _TORCH_DROPOUTS:
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.0)
        train = args[2] if len(args) > 2 else kwargs.get("train", kwargs.get("training", True))
        return f"torch.{func.__name__}(p={p:g}, train=True)" if train and p > 0 else None
    if func is _SDPA:
        p = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
        return f"scaled_dot_product_attention(dropout_p={p:g})" if p > 0 else None
    if func is F.rrelu:
        bound = _RRELU.bind(*args, **kwargs)
        bound.apply_defaults()
        return "F.rrelu(training=True)" if bound.arguments["training"] else None
    name = _RANDOM_DRAWS.get(func)
    return None if name is None else f"{name}()"


def disable_dropout(model: nn.Module) -> list:
    """Set every dropout probability of `model` to 0: the ``p`` of its nn.Dropout-family modules, its modules'
    numeric attributes named "*drop*" in (0, 1] (Hugging Face's ``attention_dropout``, OPT's ``layerdrop``, ...)
    and the same fields of the Hugging Face configs it holds (so a saved config says what was trained). Returns
    what it changed ("name.attribute: old -> 0"). A probability written into a forward (``F.dropout(x, 0.1,
    self.training)``) is out of its reach: the engine's first forward finds and names it."""
    changed = []
    for name, module, attr in dropout_sites(model):
        value = getattr(module, attr)
        if _is_probability(value):
            setattr(module, attr, 0.0)
            changed.append(f"{name or '<model>'}.{attr}: {value:g} -> 0")
    seen = set()
    for name, module in model.named_modules():
        config = vars(module).get("config")
        if config is None or id(config) in seen or not callable(getattr(config, "to_dict", None)):
            continue
        seen.add(id(config))
        for key, value in config.to_dict().items():
            if "drop" in key.lower() and _is_probability(value) and hasattr(config, key):
                setattr(config, key, 0.0)
                changed.append(f"{f'{name}.config' if name else 'config'}.{key}: {value:g} -> 0")
    return changed
