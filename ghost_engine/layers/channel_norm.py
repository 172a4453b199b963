"""Channel norms of CNNs: nn.GroupNorm, nn.InstanceNorm1d/2d/3d and nn.BatchNorm1d/2d/3d (and nn.SyncBatchNorm)
in eval mode.

y = x̂ ⊙ weight + bias with weight and bias acting per channel (dim 1 of the input [N, C, *spatial]) and x̂ the
normalised input without the affine part:
- GroupNorm: F.group_norm(x, num_groups, eps=eps), statistics over each sample's own group of channels;
- InstanceNorm: statistics per sample and channel; in eval mode with track_running_stats=True the running ones;
- BatchNorm in eval mode: (x - running_mean) / sqrt(running_var + eps) per channel, a fixed affine map.
A row's x̂ depends on that row alone, so the per-sample gradients are G_i(weight) = Σ_positions b_i ⊙ x̂_i and
G_i(bias) = Σ_positions b_i per channel, formed explicitly by the affine helpers with the channels moved last, in
fp32 (fp64 for an fp64 model).

A BatchNorm that normalises with the batch's statistics (training mode, or track_running_stats=False in any mode)
mixes the training and validation rows in the forward: no per-sample loss, hence no per-sample gradient, exists.
``batch_statistics_error`` says so; the engine refuses such a module, with or without parameters, when it is built
and at every armed forward (``model.train()`` switches BatchNorms back to batch statistics).

Precision: the statistics are computed in fp32 from the input the layer received (a half-precision input under
autocast is upcast), as the layers do: CUDA autocast runs group_norm in fp32, and batch_norm and instance_norm
(and, on the CPU, all three) normalise a half-precision input in fp32 and round only their output.

Inputs: batched, [rows, C, *spatial] ([rows, C] for BatchNorm1d); rows flattened with leading dims by the model
([rows·T, C, ...]) count as sample i's positions too. The captured input is kept as [N, C, positions] (a view).
"""
import torch
from torch import nn
from torch.nn import functional as F

from ghost_engine.layers import module_input, register_layer, to_dtype
from ghost_engine.layers._affine import (accum, affine_path, affine_per_sample_dots, affine_per_sample_grads,
                                         affine_per_sample_sq_norms, affine_val_grads)

INSTANCE_NORM_DIMS = {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}  # a batched input's dims


def batch_statistics_error(name: str, module: nn.Module):
    """Why `module` (called `name`) cannot be valued per sample: the message of a BatchNorm that normalises with
    the batch's statistics, or None for any other module."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return None
    what = f"{name or '<model>'} ({type(module).__name__})"
    if module.running_mean is None and module.running_var is None:
        return (f"{what} has track_running_stats=False: it normalises with the statistics of the whole batch in "
                "every mode, which mix the training and validation rows, so no per-sample gradient exists. Build "
                "it with track_running_stats=True and call .eval() on it, or use GroupNorm or LayerNorm")
    if module.training:
        return (f"{what} is in training mode: it normalises with the statistics of the whole batch, which mix the "
                "training and validation rows, so no per-sample gradient exists. Call .eval() on the BatchNorm "
                "modules (they then normalise with their running statistics, which stay fixed), after every "
                "model.train(): `for m in model.modules(): m.eval() if isinstance(m, "
                "nn.modules.batchnorm._BatchNorm) else None`")
    return None


def _running(module, x: torch.Tensor) -> torch.Tensor:
    """(x - running_mean) / sqrt(running_var + eps) per channel of x [N, C, S]."""
    mean, var = (to_dtype(b, x.dtype)[:, None] for b in (module.running_mean, module.running_var))
    return (x - mean) * torch.rsqrt(var + module.eps)


def _normalised(module, x: torch.Tensor) -> torch.Tensor:
    """x̂ of x [N, C, S] (accumulation dtype)."""
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, eps=module.eps)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # eval mode with running statistics (verified)
        return _running(module, x)
    if module.track_running_stats and not module.training:  # InstanceNorm as BatchNorm
        return _running(module, x)
    return F.instance_norm(x, eps=module.eps)


def _channels_last(module, act, grad):
    """(x̂, b), each [rows, (T,) positions, C] in the accumulation dtype, from act [rows, (T,) C, positions]."""
    x = accum(act)
    x_hat = _normalised(module, x.reshape(-1, *x.shape[-2:])).reshape(x.shape)
    return x_hat.transpose(-1, -2), accum(grad).reshape(x.shape).transpose(-1, -2)


def _trainable(module) -> tuple:
    """(weight trainable, bias trainable)"""
    return tuple(p is not None and p.requires_grad for p in (module.weight, module.bias))


@register_layer(nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.BatchNorm1d,
                nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
class ChannelNormRule:
    @staticmethod
    def capture(module, args, kwargs, output, rows):
        x = module_input(args, kwargs)
        dims = next((d for klass, d in INSTANCE_NORM_DIMS.items() if isinstance(module, klass)), None)
        if dims is not None and x.dim() != dims:
            raise ValueError(f"{type(module).__name__} got an input of shape {tuple(x.shape)}: the engine needs "
                             f"batched inputs [rows, C, *spatial] ({dims} dims)")
        return x.reshape(*x.shape[:2], -1), None

    @staticmethod
    def val_grads(module, act_v, grad_v):
        x_hat, g = _channels_last(module, act_v, grad_v)
        return affine_val_grads(x_hat, g, 1, *_trainable(module), module.weight.shape)

    @staticmethod
    def per_sample_dots(module, act_tr, grad_tr, act_v, grad_v, val_totals, own_only):
        return affine_per_sample_dots(*_channels_last(module, act_tr, grad_tr), 1, val_totals)

    @staticmethod
    def per_sample_sq_norms(module, act_tr, grad_tr):
        return affine_per_sample_sq_norms(*_channels_last(module, act_tr, grad_tr), 1, *_trainable(module))

    @staticmethod
    def per_sample_grads(module, act_tr, grad_tr):
        return affine_per_sample_grads(*_channels_last(module, act_tr, grad_tr), 1, *_trainable(module))

    @staticmethod
    def path(module, act_tr, act_v, own_only):
        return affine_path(act_tr, 1)
