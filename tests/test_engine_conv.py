"""Convolutions (ghost_engine/layers/conv.py) against float64 per-sample gradients from torch.func."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _models import ConvClassifier, small_cnn
from _reference import (adamw_sensitivity, reference_adamw_values, reference_cosine_values, reference_dot_products,
                        reference_update_values)
from ghost_engine import GradDotProdEngine
from ghost_engine.layers import conv
from test_engine import TOL, _graph_breaks, check_against_reference, rel_err, run_engine
from test_engine_estimators import check_values
from test_engine_estimators import run_engine as run_engine_with

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the model's own conv

# one model per feature: (body, one row's input shape)
CASES = {
    # padding="same" with dilation 2 (symmetric), then an even kernel (the odd padding position on the right)
    "conv1d-same-dilated": lambda: (nn.Sequential(nn.Conv1d(3, 5, 4, padding="same", dilation=2), nn.Tanh(),
                                                  nn.Conv1d(5, 4, 2, padding="same")), (3, 10)),
    "conv1d-groups-valid-no-bias": lambda: (nn.Conv1d(6, 4, 3, groups=2, padding="valid", bias=False), (6, 9)),
    "conv2d-depthwise": lambda: (nn.Conv2d(4, 4, 3, groups=4, padding=1), (4, 6, 6)),
    "conv2d-reflect-strided": lambda: (nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode="reflect", stride=(2, 1)),
                                       (3, 6, 5)),
    "conv2d-circular-dilated": lambda: (nn.Conv2d(3, 4, (2, 3), padding=1, padding_mode="circular",
                                                  dilation=(1, 2)), (3, 5, 6)),
    "conv2d-replicate-same-no-bias": lambda: (nn.Conv2d(2, 4, (2, 3), padding="same", padding_mode="replicate",
                                                        bias=False), (2, 5, 5)),
    "conv3d": lambda: (nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=(1, 0, 1)), (2, 4, 4, 3)),
    "conv-transpose2d": lambda: (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2,
                                                    dilation=2), (4, 4, 3)),
    # output_padding >= stride (allowed below the dilation): the adjoint must drop the added positions
    "conv-transpose1d-output-padding": lambda: (nn.ConvTranspose1d(3, 2, 3, padding=1, output_padding=2,
                                                                   dilation=3), (3, 5)),
    "conv-transpose3d": lambda: (nn.ConvTranspose3d(2, 3, 2, stride=2, bias=False), (2, 2, 3, 2)),
}


def images(shape, rows, generator, classes=3):
    return torch.randn(rows, *shape, generator=generator), torch.randint(0, classes, (rows,), generator=generator)


def record_paths(monkeypatch, force=None):
    """Record which exact computation each call of the rule ran ("gram" / "projection" dot products, "gram" /
    "explicit" norms); `force` True or False replaces the cost-based choice."""
    ran = []
    for name, label in [("_gram_dots", "gram"), ("_projection_dots", "projection"),
                        ("_gram_sq_norms", "gram norms"), ("_explicit_sq_norms", "explicit norms")]:
        def wrapped(*args, _inner=getattr(conv, name), _label=label):
            ran.append(_label)
            return _inner(*args)

        monkeypatch.setattr(conv, name, wrapped)
    if force is not None:
        monkeypatch.setattr(conv, "_use_gram", lambda *sizes: force)
    return ran


@pytest.mark.parametrize("path", ["gram", "projection"])
@pytest.mark.parametrize("case", list(CASES))
def test_convolution_is_exact(case, path, monkeypatch):
    """Every parameter's dot products and .grad on each path (the other one forced off)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    body, shape = CASES[case]()
    model = ConvClassifier(body, shape)
    X, Y = images(shape, 4, g)
    Xv, Yv = images(shape, 2, g)
    ran = record_paths(monkeypatch, force=path == "gram")
    check_against_reference(model, X, Y, Xv, Yv, task="classification")
    n_convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    assert ran == [path] * n_convs


def test_cnn_picks_the_cheaper_path_per_layer(monkeypatch):
    """With one validation row the first layer's projection and the second's Gram form are the cheaper ones."""
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    model = small_cnn()
    X, Y = images((3, 6, 6), 5, g)
    Xv, Yv = images((3, 6, 6), 1, g)
    ran = record_paths(monkeypatch)
    check_against_reference(model, X, Y, Xv, Yv, task="classification")
    assert ran == ["gram", "projection"]  # backward order: the second layer first
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv), task="classification").attach()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    model(input_ids=Xc, labels=Yc).loss.backward()
    report = {r["layer"]: r for r in engine.path_report()}
    assert report["body.0"]["path"] == "projection" and report["body.2"]["path"] == "gram"
    assert report["body.0"]["flops"] == 2.0 * 5 * 36 * 27 * 8  # N·K·p: 5 rows × 36 positions, K = 3·9, p = 8
    assert report["body.2"]["flops"] == 2.0 * 5 * 4 * 4 * (36 + 8) * 2  # N·Nv·(K+p)·groups


def test_micro_batches_are_exact():
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    model = small_cnn()
    X, Y = images((3, 6, 6), 4, g)
    Xv, Yv = images((3, 6, 6), 2, g)
    check_against_reference(model, X, Y, Xv, Yv, task="classification", micro_batches=2)


class PerChannelConv(nn.Module):
    """One Conv2d applied to every channel alone: the rows reach it flattened with the channels, [R·C, 1, H, W]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        rows, channels = x.shape[:2]
        return self.conv(x.reshape(rows * channels, 1, *x.shape[2:])).reshape(rows, channels * 2, *x.shape[2:])


def test_rows_flattened_with_the_channels_are_exact():
    """The engine views [R·C, ...] as [R, C, ...]: all of a row's channels count as its sample's."""
    torch.manual_seed(4)
    g = torch.Generator().manual_seed(4)
    model = ConvClassifier(PerChannelConv(), (3, 5, 5))
    X, Y = images((3, 5, 5), 4, g)
    Xv, Yv = images((3, 5, 5), 2, g)
    check_against_reference(model, X, Y, Xv, Yv, task="classification")


def test_compiled_cnn_is_exact():
    """torch.compile (aot_eager): one graph, no break per layer, both paths, every parameter and .grad; a second
    micro-batch does not recompile."""
    from torch._dynamo.utils import counters

    torch.manual_seed(5)
    g = torch.Generator().manual_seed(5)
    model = small_cnn()
    X, Y = images((3, 6, 6), 4, g)
    Xv, Yv = images((3, 6, 6), 1, g)
    torch._dynamo.reset()
    counters.clear()
    check_against_reference(model, X, Y, Xv, Yv, task="classification", compile_backend="aot_eager")
    graphs = counters["stats"]["unique_graphs"]
    check_against_reference(model, X, Y, Xv, Yv, task="classification", compile_backend="aot_eager")
    assert counters["stats"]["unique_graphs"] == graphs
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv), task="classification").attach()
    breaks, reasons = _graph_breaks(model, *engine.prepare_forward_input(X, Y))
    engine.detach()
    assert breaks == 0, reasons


def test_bf16_autocast_is_close(monkeypatch):
    """Under CPU bf16 autocast the convolutions run in bf16; the engine keeps their bf16 input and sums in fp32:
    close to the float64 reference, not exact."""
    torch.manual_seed(6)
    g = torch.Generator().manual_seed(6)
    model = small_cnn()
    X, Y = images((3, 6, 6), 4, g)
    Xv, Yv = images((3, 6, 6), 1, g)  # one validation row: both paths
    ref = sum(reference_dot_products(copy.deepcopy(model).double(), X, Y, Xv, Yv, "classification").values())
    dtypes = []
    model.body[0].register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    ran = record_paths(monkeypatch)
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv), task="classification").attach()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=Xc, labels=Yc).loss
    loss.backward()
    got = engine.aggregate_and_log().dot_products
    assert dtypes == [torch.bfloat16] and ran == ["gram", "projection"]
    assert got.dtype == torch.float32
    assert rel_err(got, ref) < 5e-2


@pytest.mark.parametrize("case", ["cnn", "conv-transpose2d"])
def test_cosine_value_is_exact(case, monkeypatch):
    """Per-sample norms: the CNN's first layer forms G_i (36 positions a row), its second the Gram form."""
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(7)
    if case == "cnn":
        model, shape = small_cnn(), (3, 6, 6)
    else:
        body, shape = CASES[case]()
        model = ConvClassifier(body, shape)
    X, Y = images(shape, 4, g)
    Xv, Yv = images(shape, 2, g)
    ref, norms, val_norm = reference_cosine_values(copy.deepcopy(model).double(), X, Y, Xv, Yv, "classification")
    ran = record_paths(monkeypatch)
    result, _ = run_engine(model, X, Y, Xv, Yv, task="classification", value="cosine")
    if case == "cnn":
        assert ran.count("gram norms") == ran.count("explicit norms") == 1
    assert rel_err(result.dot_products, sum(ref.values())) <= TOL
    for name, r in ref.items():
        assert rel_err(result.per_parameter[name], r) <= TOL, name
    assert rel_err(result.grad_norms, norms) <= TOL
    assert abs(float(result.val_grad_norm) - float(val_norm)) <= TOL * float(val_norm)


@pytest.mark.parametrize("value", ["adamw", "midpoint"])
def test_update_aware_values_are_exact(value):
    """Against D ⊙ G_val (adamw: the projection path only) and the optimizer's real step (midpoint), from a
    float64 reference on the real AdamW state."""
    torch.manual_seed(10)
    g = torch.Generator().manual_seed(10)
    model = small_cnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    for _ in range(2):  # a state (step, exp_avg_sq) like a run's
        model.zero_grad()
        model(*images((3, 6, 6), 4, g)).loss.backward()
        optimizer.step()
    X, Y = images((3, 6, 6), 4, g)
    Xv, Yv = images((3, 6, 6), 1, g)
    if value == "adamw":
        sensitivity = adamw_sensitivity(optimizer, dict(model.named_parameters()))
        ref = reference_adamw_values(copy.deepcopy(model).double(), X, Y, Xv, Yv, sensitivity, "classification")
    else:
        ref = reference_update_values(model, optimizer, X, Y, Xv, Yv, value, task="classification")
    result, _ = run_engine_with(model, X, Y, Xv, Yv, optimizer, task="classification", value=value)
    check_values(result, ref)


# ---------------------------------------------------------------- refused


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


class StandardisedConv(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, (weight - weight.mean()) / weight.std(), bias)


@pytest.mark.parametrize("layer, message", [(ScaledConv, "no layer rule.*body.0.*ScaledConv"),
                                            (StandardisedConv, "body.0: StandardisedConv overrides .*_conv_forward")])
def test_a_convolution_computing_something_else_is_refused_by_name(layer, message):
    model = ConvClassifier(nn.Sequential(layer(3, 4, 3)), (3, 5, 5))
    Xv, Yv = images((3, 5, 5), 1, torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match=message):
        GradDotProdEngine(model, val_batch=(Xv, Yv), task="classification")


class UnbatchedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, input_ids, labels=None):
        h = self.conv(input_ids[0])  # one row, unbatched: [C, L]
        logits = self.out(h.mean(1)).expand(input_ids.shape[0], 2)
        return SimpleNamespace(loss=F.cross_entropy(logits, labels), logits=logits)


def test_an_unbatched_input_is_refused():
    model = UnbatchedConv()
    g = torch.Generator().manual_seed(9)
    X, Y = torch.randn(2, 2, 7, generator=g), torch.randint(0, 2, (2,), generator=g)
    engine = GradDotProdEngine(model, val_batch=(X[:1], Y[:1]), task="classification").attach()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    with pytest.raises(ValueError, match=r"Conv1d got an input of shape \(2, 7\).*batched"):
        model(input_ids=Xc, labels=Yc)
