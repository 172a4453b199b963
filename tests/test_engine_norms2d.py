"""Channel norms of CNNs (ghost_engine/layers/channel_norm.py) against float64 per-sample gradients from torch.func:
GroupNorm, InstanceNorm with affine=True, BatchNorm in eval mode; BatchNorm on batch statistics refused."""
import copy

import pytest
import torch
from torch import nn

from _models import ClassifierOutput, ConvClassifier
from _reference import reference_cosine_values, reference_dot_products
from ghost_engine import GradDotProdEngine
from test_engine import TOL, _graph_breaks, check_against_reference, rel_err, run_engine
from test_engine_conv import images

NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def norm_cnn(norm: nn.Module, shape=(3, 6, 6)):
    """Conv2d(3 -> 8) -> `norm` -> ReLU -> strided grouped Conv2d -> Tanh, on [R, 3, 6, 6] images. The first
    convolution has no bias: a per-channel norm removes it (its gradient would be zero, rounding aside)."""
    body = nn.Sequential(nn.Conv2d(shape[0], 8, 3, padding=1, bias=False), norm, nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, groups=2), nn.Tanh())
    return ConvClassifier(body, shape)


class FramesNorm(nn.Module):
    """A Conv2d and a norm applied to every input channel alone: the rows reach the norm flattened with the
    channels, [R·C, 2, H, W] (the engine's [rows·T, ...] form)."""

    def __init__(self, norm):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, 2, 3, padding=1, bias=False), norm

    def forward(self, x):
        rows, channels = x.shape[:2]
        h = self.norm(self.conv(x.reshape(rows * channels, 1, *x.shape[2:])))
        return h.reshape(rows, channels * 2, *x.shape[2:])


def frozen_weight(norm):
    norm.weight.requires_grad_(False)
    return norm


# one model per feature: (model, one row's input shape); running statistics are filled by warm_up
CASES = {
    "group-norm-2-groups": lambda: (norm_cnn(nn.GroupNorm(2, 8)), (3, 6, 6)),
    "group-norm-1-group": lambda: (norm_cnn(nn.GroupNorm(1, 8)), (3, 6, 6)),  # as a LayerNorm over [C, H, W]
    "group-norm-per-channel": lambda: (norm_cnn(nn.GroupNorm(8, 8)), (3, 6, 6)),  # as an InstanceNorm
    "group-norm-frozen-weight": lambda: (norm_cnn(frozen_weight(nn.GroupNorm(4, 8, eps=0.1))), (3, 6, 6)),
    "instance-norm2d": lambda: (norm_cnn(nn.InstanceNorm2d(8, affine=True)), (3, 6, 6)),
    "instance-norm2d-running-stats": lambda: (norm_cnn(nn.InstanceNorm2d(8, affine=True, track_running_stats=True)),
                                              (3, 6, 6)),
    "batch-norm2d-eval": lambda: (norm_cnn(nn.BatchNorm2d(8, eps=1e-3)), (3, 6, 6)),
    # eval() while ConvClassifier sizes its head on one row: one value per channel is no batch to normalise
    "batch-norm1d-mlp": lambda: (ConvClassifier(nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU()).eval(),
                                                (10,)), (10,)),
    "batch-norm1d-conv1d": lambda: (ConvClassifier(nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.Tanh()),
                                                   (3, 9)), (3, 9)),
    "instance-norm3d-batch-norm3d": lambda: (ConvClassifier(nn.Sequential(
        nn.Conv3d(2, 4, 2, bias=False), nn.InstanceNorm3d(4, affine=True), nn.BatchNorm3d(4), nn.Tanh()), (2, 3, 4, 3)),
        (2, 3, 4, 3)),
    # no parameters, no rule: they only change the conv's input and output gradient
    "non-affine-norms": lambda: (norm_cnn(nn.Sequential(nn.BatchNorm2d(8, affine=False),
                                                        nn.GroupNorm(2, 8, affine=False), nn.InstanceNorm2d(8))),
                                 (3, 6, 6)),
    "rows-flattened-group-norm": lambda: (ConvClassifier(FramesNorm(nn.GroupNorm(1, 2)), (3, 5, 5)), (3, 5, 5)),
    "rows-flattened-batch-norm": lambda: (ConvClassifier(FramesNorm(nn.BatchNorm2d(2)), (3, 5, 5)), (3, 5, 5)),
}


def build(case):
    """The case's model with random affine parameters and, for the norms that keep them, running statistics from
    three training-mode forwards of shifted, scaled inputs; then the norms are put in eval mode."""
    model, shape = CASES[case]()
    g = torch.Generator().manual_seed(11)
    norms = [m for m in model.modules() if isinstance(m, (*NORMS, nn.GroupNorm))]
    model.train()
    with torch.no_grad():
        for m in norms:
            if m.weight is not None:
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
        for _ in range(3):
            model(torch.randn(4, *shape, generator=g) * 2 + 3)
    for m in norms:
        if isinstance(m, NORMS):
            if m.track_running_stats:
                assert (m.running_mean.abs() > 0.01).any() and ((m.running_var - 1).abs() > 0.01).any()
            m.eval()
    return model, shape


def batches(case, seed, val_rows=2):
    """(model, shape, X, Y, Xv, Yv): the case's model (built) with 4 training and `val_rows` validation rows."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, shape = build(case)
    return (model, shape, *images(shape, 4, g), *images(shape, val_rows, g))


@pytest.mark.parametrize("case", list(CASES))
def test_channel_norm_is_exact(case):
    """The total, every parameter's dot products and .grad against float64 torch.func."""
    model, _, X, Y, Xv, Yv = batches(case, 1)
    result, _, _ = check_against_reference(model, X, Y, Xv, Yv, task="classification")
    named = dict(model.named_modules())
    valued = {name.rsplit(".", 1)[0] for name in result.per_parameter}
    norms = {name for name, m in named.items() if isinstance(m, (*NORMS, nn.GroupNorm)) and m.weight is not None}
    assert norms <= valued  # every affine norm is valued, not excluded


@pytest.mark.parametrize("case", ["group-norm-2-groups", "batch-norm2d-eval"])
def test_cosine_value_is_exact(case):
    """Per-sample gradient norms ||G_i||² of the norms' weights and biases, with the convolutions'."""
    model, _, X, Y, Xv, Yv = batches(case, 2)
    ref, norms, _ = reference_cosine_values(copy.deepcopy(model).double(), X, Y, Xv, Yv, "classification")
    result, _ = run_engine(model, X, Y, Xv, Yv, task="classification", value="cosine")
    for name, r in ref.items():
        assert rel_err(result.per_parameter[name], r) <= TOL, name
    assert rel_err(result.grad_norms, norms) <= TOL


def test_compiled_norm_cnn_is_exact():
    """torch.compile (aot_eager) with an InstanceNorm3d and a BatchNorm3d in eval mode: exact, and no graph break
    (the BatchNorm's mode check traces into the graph)."""
    model, _, X, Y, Xv, Yv = batches("instance-norm3d-batch-norm3d", 3, val_rows=1)
    torch._dynamo.reset()
    check_against_reference(model, X, Y, Xv, Yv, task="classification", compile_backend="aot_eager")
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv), task="classification").attach()
    breaks, reasons = _graph_breaks(model, *engine.prepare_forward_input(X, Y))
    engine.detach()
    assert breaks == 0, reasons


def bf16_autograd_dot_products(model, X, Y, Xv, Yv) -> dict:
    """{param name: [B] <grad l_i, grad L_val>} by plain autograd under CPU bf16 autocast, one training row at a
    time: the rounding noise of bf16 itself, to judge the engine's against."""
    params = dict(model.named_parameters())

    def grads(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.autograd.grad(model(input_ids=x, labels=y).loss, list(params.values()))

    val = grads(Xv, Yv)
    rows = [grads(X[i:i + 1], Y[i:i + 1]) for i in range(X.shape[0])]
    return {name: torch.stack([(row[k].double() * val[k].double()).sum() for row in rows])
            for k, name in enumerate(params)}


@pytest.mark.parametrize("case", ["group-norm-2-groups", "batch-norm2d-eval"])
def test_bf16_autocast_is_close(case):
    """Under CPU bf16 autocast the norms get the convolution's bf16 output and normalise it in fp32: each parameter
    as close to the float64 reference as plain bf16 autograd is (a sum over positions, like a GroupNorm bias's,
    cancels and loses more than bf16's 3 digits), not exact."""
    model, _, X, Y, Xv, Yv = batches(case, 4)
    ref = reference_dot_products(copy.deepcopy(model).double(), X, Y, Xv, Yv, "classification")
    plain = bf16_autograd_dot_products(model, X, Y, Xv, Yv)
    dtypes = []
    model.body[1].register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype))
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv), task="classification").attach()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=Xc, labels=Yc).loss
    loss.backward()
    result = engine.aggregate_and_log()
    assert dtypes == [torch.bfloat16]
    assert rel_err(result.dot_products, sum(ref.values())) < 5e-2
    for name, r in ref.items():
        assert rel_err(result.per_parameter[name], r) < 2 * rel_err(plain[name], r) + 1e-2, name


# ---------------------------------------------------------------- refused


@pytest.mark.parametrize("norm, message", [
    (nn.BatchNorm2d(8), r"body.1 \(BatchNorm2d\) is in training mode.*\.eval\(\)"),
    (nn.BatchNorm2d(8, affine=False), r"body.1 \(BatchNorm2d\) is in training mode"),  # no parameters, still mixed
    (nn.BatchNorm2d(8, track_running_stats=False).eval(), r"body.1 \(BatchNorm2d\) has track_running_stats=False"),
], ids=["affine", "not-affine", "no-running-stats"])
def test_batch_statistics_are_refused_at_construction(norm, message):
    model = norm_cnn(norm)
    Xv, Yv = images((3, 6, 6), 1, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=message):
        GradDotProdEngine(model, val_batch=(Xv, Yv), task="classification")


def test_model_train_after_construction_is_refused_at_the_forward():
    """model.train() (the usual call before a training step) switches the BatchNorms back to batch statistics: the
    next armed forward is refused before the BatchNorm mixes the rows."""
    model, _, X, Y, Xv, Yv = batches("batch-norm2d-eval", 6, val_rows=1)
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv), task="classification").attach()
    model.train()
    running = model.body[1].running_mean.clone()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    with pytest.raises(ValueError, match=r"body.1 \(BatchNorm2d\) is in training mode.*after every model.train"):
        model(input_ids=Xc, labels=Yc)
    assert torch.equal(model.body[1].running_mean, running)  # refused before it ran


def test_an_unbatched_instance_norm_input_is_refused():
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.InstanceNorm1d(2, affine=True)

        def forward(self, input_ids, labels=None):
            logits = self.norm(input_ids[0]).mean(1).expand(input_ids.shape[0], 2)  # one row, unbatched: [C, L]
            return ClassifierOutput(nn.functional.cross_entropy(logits, labels), logits)

    g = torch.Generator().manual_seed(7)
    X, Y = torch.randn(2, 2, 7, generator=g), torch.randint(0, 2, (2,), generator=g)
    model = Unbatched()
    engine = GradDotProdEngine(model, val_batch=(X[:1], Y[:1]), task="classification").attach()
    with pytest.raises(ValueError, match=r"InstanceNorm1d got an input of shape \(2, 7\).*batched"):
        model(*engine.prepare_forward_input(X, Y))
