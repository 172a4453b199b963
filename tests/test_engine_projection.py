"""Projected per-sample gradients (ghost_engine/projection.py) against float64 per-sample gradients from torch.func,
projected with dense Kronecker matrices: Π_i = (P_r ⊗ P_c)·vec(∇_W l_i)."""
import copy

import pytest
import torch

from _models import ConvClassifier, MLPClassifier, lm_batch, small_cnn, tiny_gpt2, tiny_llama
from torch import nn
from torch.func import functional_call, grad, vmap

from ghost_engine import GradDotProdEngine
from ghost_engine.projection import KINDS, Projection
from test_engine_conv import CASES, images

EXACT = 1e-10  # float64 model and reference


def dense_projection(projection, grads: dict, rows: bool) -> torch.Tensor:
    """The projection of gradients in each block's layout by the dense (Kronecker) matrices: [B, K] (rows) or [K]."""
    parts = []
    for block in projection.blocks:
        mats = [torch.eye(n, dtype=torch.float64) if m is None else m
                for m, n in zip(projection.matrices(block.name), block.shape)]
        full = mats[0] if len(mats) == 1 else torch.kron(mats[0], mats[1])  # vec row-major: P_r ⊗ P_c
        g = grads[block.name].double()
        parts.append(g.reshape(g.shape[0], -1) @ full.t() if rows else full @ g.reshape(-1))
    return torch.cat(parts, dim=-1)


def loss_of(output, labels, task):
    """The mean cross-entropy in the logits' own dtype (Hugging Face's loss casts float64 logits to float32)."""
    logits = output.logits
    if task == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def reference(model, X, Y, Xv, Yv, task):
    """(per-sample gradients {name: [B, *shape]}, validation gradient {name: shape}), float64, by torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss(p, x, y):
        return loss_of(functional_call(model, (p, buffers), args=(), kwargs={"input_ids": x}), y, task)

    per_sample = vmap(grad(lambda p, x, y: loss(p, x[None], y[None])), in_dims=(None, 0, 0))(params, X, Y)
    return per_sample, grad(loss)(params, Xv, Yv)


def run(model, X, Y, val=None, micro_batches=1, task="causal_lm", step_model=None, autocast=False, **projection):
    """One step of the engine with `projection` on (X, Y) in `micro_batches`; step_model: the model to call
    (a compiled one), autocast: under CPU bf16 autocast."""
    engine = GradDotProdEngine(model, val_batch=val, task=task, projection=projection)
    engine.attach()
    model.zero_grad()
    for Xm, Ym in zip(X.chunk(micro_batches), Y.chunk(micro_batches)):
        Xc, Yc = engine.prepare_forward_input(Xm, Ym, loss_multiplier=1.0 / micro_batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of((model if step_model is None else step_model)(input_ids=Xc), Yc, task)
        (loss / micro_batches).backward()
    engine.prepare_gradients()
    result = engine.aggregate_and_log()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine.detach()
    return engine, result, grads


def rel(got, ref):
    return float((got - ref).norm() / ref.norm())


def check(model, X, Y, Xv, Yv, task="causal_lm", micro_batches=1, **projection):
    model = model.double()
    per_sample, val_grad = reference(copy.deepcopy(model), X, Y, Xv, Yv, task)
    engine, result, _ = run(model, X, Y, (Xv, Yv), micro_batches, task, **projection)
    p = engine.projection
    assert result.projections.shape == (X.shape[0], p.dim)
    assert rel(result.projections, dense_projection(p, per_sample, True)) <= EXACT
    assert rel(result.val_projection, dense_projection(p, val_grad, False)) <= EXACT
    return engine, result, per_sample, val_grad


def lm_rows(seed=0, rows=4, val_rows=2, T=10):
    g = torch.Generator().manual_seed(seed)
    X, Y = lm_batch(rows, T, g, pad_row=1)
    Xv, Yv = lm_batch(val_rows, T, g)
    return X, Y, Xv, Yv


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_gpt2_tied_embedding_and_head_share_one_projected_space(micro_batches):
    torch.manual_seed(0)
    engine, result, per_sample, _ = check(tiny_gpt2(), *lm_rows(), micro_batches=micro_batches, dim=5, seed=3)
    block = engine.projection.block("transformer.wte.weight")
    assert block.shape == (97, 32) and block.dims == (5, 5)  # one block for both uses
    # <Π_i, Π_j> equals the dense projected inner product (the Gram a store's scores are made of)
    dense = dense_projection(engine.projection, per_sample, True)
    assert rel(result.projections @ result.projections.t(), dense @ dense.t()) <= EXACT


def float64_norms(model):
    """The model with its RMSNorm layers as nn.RMSNorm (same weights and epsilon): Llama's own class normalises in
    float32 even in a float64 model, which would put float32 rounding between a row alone and the batch."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RMSNorm"):
            norm = nn.RMSNorm(module.weight.shape, eps=module.variance_epsilon)
            norm.weight.data.copy_(module.weight.data)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], norm)
    return model


def test_llama_rmsnorm_and_untied_head_with_a_total_budget():
    torch.manual_seed(0)
    engine, result, _, _ = check(float64_norms(tiny_llama()), *lm_rows(1), total=600, seed=1, kind="rademacher")
    assert 0 < engine.projection.dim <= 600


@pytest.mark.parametrize("kind", KINDS)
def test_mlp_norms_and_biases_every_kind(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    X, Xv = torch.randn(5, 16, generator=g).double(), torch.randn(3, 16, generator=g).double()
    Y, Yv = torch.randint(0, 5, (5,), generator=g), torch.randint(0, 5, (3,), generator=g)
    # sizes per parameter: a side kept whole (fc1's input, 16 <= 40), a bias projected, a bias kept whole
    engine, _, _, _ = check(MLPClassifier(), X, Y, Xv, Yv, task="classification", dim=4,
                            dims={"fc1.weight": (6, 40), "fc2.bias": 64, "out.bias": 3}, kind=kind)
    assert engine.projection.block("fc1.weight").dims == (6, 16)
    assert engine.projection.block("fc2.bias").dims == (64,)


@pytest.mark.parametrize("case", ["small-cnn", "conv1d-groups-valid-no-bias", "conv2d-depthwise", "conv3d",
                                  "conv-transpose2d", "conv-transpose1d-output-padding"])
def test_convolutions(case):
    torch.manual_seed(0)
    if case == "small-cnn":
        model, shape = small_cnn(), (3, 6, 6)
    else:
        body, shape = CASES[case]()
        model = ConvClassifier(body, shape)
    g = torch.Generator().manual_seed(3)
    X, Y = images(shape, 4, g)
    Xv, Yv = images(shape, 2, g)
    check(model, X.double(), Y, Xv.double(), Yv, task="classification", dim=3)


def test_projections_only_leave_the_regular_gradient():
    """No validation rows: the projections are exact and .grad is what Regular training leaves."""
    torch.manual_seed(0)
    model = tiny_gpt2().double()
    X, Y, Xv, Yv = lm_rows(4)
    per_sample, _ = reference(copy.deepcopy(model), X, Y, Xv, Yv, "causal_lm")
    engine, result, grads = run(model, X, Y, None, 2, dim=4)
    assert result.dot_products is None and result.val_projection is None
    assert rel(result.projections, dense_projection(engine.projection, per_sample, True)) <= EXACT
    regular = copy.deepcopy(model)  # Regular training: the same micro-batches, no engine
    for Xm, Ym in zip(X.chunk(2), Y.chunk(2)):
        (loss_of(regular(input_ids=Xm), Ym, "causal_lm") / 2).backward()
    for name, p in regular.named_parameters():
        assert rel(grads[name], p.grad) <= EXACT, name


def test_a_projection_rebuilt_from_its_description_gives_the_same_rows():
    torch.manual_seed(0)
    model = tiny_gpt2().double()
    X, Y, Xv, Yv = lm_rows(5)
    engine, first, _ = run(model, X, Y, (Xv, Yv), dim=3, seed=7)
    rebuilt = Projection.from_description(engine.projection.describe())
    assert rebuilt == engine.projection
    _, again, _ = run_with(model, X, Y, (Xv, Yv), rebuilt)
    assert torch.equal(first.projections, again.projections)
    other = Projection.for_shapes({"w": (3, 4)}, dim=2)
    with pytest.raises(ValueError, match="other parameters or shapes"):
        GradDotProdEngine(model, (Xv, Yv), projection=other)


def run_with(model, X, Y, val, projection):
    engine = GradDotProdEngine(model, val, projection=projection).attach()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    loss_of(model(input_ids=Xc), Yc, "causal_lm").backward()
    result = engine.aggregate_and_log()
    engine.detach()
    return engine, result, None


def test_the_draws_keep_norms_in_expectation():
    """E‖Px‖² = ‖x‖² for each kind; the orthonormal kind's rows are orthogonal."""
    x = torch.randn(256, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for kind in KINDS:
        ratios = []
        for seed in range(200):
            (P,) = Projection.for_shapes({"v": (256,)}, dims={"v": 16}, seed=seed, kind=kind).matrices("v")
            ratios.append(float((P @ x).square().sum() / x.square().sum()))
        assert abs(sum(ratios) / len(ratios) - 1) < 0.05, kind
    (P,) = Projection.for_shapes({"v": (256,)}, dims={"v": 16}, kind="orthonormal").matrices("v")
    assert torch.allclose(P @ P.t(), torch.eye(16, dtype=torch.float64) * 16, atol=1e-10)


def test_bad_projection_options_are_refused():
    model = tiny_gpt2()
    X, Y, Xv, Yv = lm_rows()
    with pytest.raises(ValueError, match="val_batch=None"):
        GradDotProdEngine(model, None)
    with pytest.raises(ValueError, match="val_batch=None"):
        GradDotProdEngine(model, None, projection=dict(dim=2), value="adamw")
    with pytest.raises(ValueError, match="kind"):
        GradDotProdEngine(model, (Xv, Yv), projection=dict(dim=2, kind="sparse"))
    with pytest.raises(ValueError, match="unknown parameters"):
        GradDotProdEngine(model, (Xv, Yv), projection=dict(dim=2, dims={"nope": 3}))
    with pytest.raises(ValueError, match="below one column"):
        GradDotProdEngine(model, (Xv, Yv), projection=dict(total=3))
    with pytest.raises(ValueError, match="not both"):
        GradDotProdEngine(model, (Xv, Yv), projection=dict(total=3000, dim=2))


@pytest.mark.parametrize("val", [True, False])
def test_compiled_gradient_checkpointed_and_bf16_steps(val):
    """torch.compile (one graph, no break), gradient checkpointing and bf16 autocast give the eager fp32 step's
    projections: equal to float32 rounding, and close under bf16."""
    from test_engine import _graph_breaks

    torch.manual_seed(0)
    model = tiny_gpt2()
    X, Y, Xv, Yv = lm_rows(6)
    val_batch = (Xv, Yv) if val else None
    _, eager, _ = run(model, X, Y, val_batch, dim=4)
    if not val:  # the projections-only taps trace into one graph
        engine = GradDotProdEngine(model, val_batch, projection=dict(dim=4)).attach()
        Xc, Yc = engine.prepare_forward_input(X, Y)
        model.loss_type = "ForCausalLM"
        assert _graph_breaks(model, Xc, Yc)[0] == 0
        engine.detach()
    else:  # and run compiled, micro-batched (the slow part: once)
        torch._dynamo.reset()
        _, compiled, _ = run(model, X, Y, val_batch, micro_batches=2,
                             step_model=torch.compile(model, backend="aot_eager"), dim=4)
        torch._dynamo.reset()
        torch.testing.assert_close(compiled.projections, eager.projections, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(compiled.val_projection, eager.val_projection, rtol=1e-4, atol=1e-6)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.config.use_cache = False
    _, recomputed, _ = run(checkpointed, X, Y, val_batch, dim=4)
    torch.testing.assert_close(recomputed.projections, eager.projections, rtol=1e-5, atol=1e-7)
    _, half, _ = run(model, X, Y, val_batch, autocast=True, dim=4)
    assert half.projections.dtype == torch.float32
    assert rel(half.projections, eager.projections) < 5e-2
    if val:
        assert rel(half.val_projection, eager.val_projection) < 5e-2


def test_a_total_budget_is_shared_by_size_or_equally():
    shapes = {"embedding": (50304, 128), "attention": (128, 384), "bias": (384,), "norm": (128,)}
    by_size = Projection.for_shapes(shapes, total=4096)
    equal = Projection.for_shapes(shapes, total=4096, allocate="equal")
    assert by_size.dim <= 4096 and equal.dim <= 4096
    columns = {b.name: b.stop - b.start for b in by_size.blocks}
    assert columns["embedding"] > columns["attention"] > columns["bias"] > columns["norm"]
    assert len({b.dims[0] for b in equal.blocks if len(b.dims) == 2}) == 1  # one side for every matrix
    with pytest.raises(ValueError, match="allocate"):
        Projection.for_shapes(shapes, total=4096, allocate="greedy")
    with pytest.raises(ValueError, match="below one column"):
        Projection.for_shapes(shapes, total=3)


@pytest.mark.parametrize("name", ["gpt2-tied", "llama"])
def test_under_adamw_the_validation_projection_is_of_what_the_dots_are_taken_against(name):
    """value="adamw": val_projection = Π(D ⊙ grad L_val) with D from the real optimizer state (the dot products'
    vector), so <Π_i, Π_val> estimates the recorded values; with every side kept whole it equals them."""
    from _reference import adamw_sensitivity
    from test_engine_estimators import adamw_with_state

    torch.manual_seed(7)
    g = torch.Generator().manual_seed(7)
    model = (tiny_gpt2(tie=True) if name == "gpt2-tied" else float64_norms(tiny_llama())).double()
    optimizer = adamw_with_state(model, g)
    X, Y, Xv, Yv = lm_rows(2)
    per_sample, val_grad = reference(copy.deepcopy(model), X, Y, Xv, Yv, "causal_lm")
    sensitivity = adamw_sensitivity(optimizer, dict(model.named_parameters()))
    against = {n: sensitivity[n] * v for n, v in val_grad.items()}
    for projection in (dict(dim=4, seed=2), dict(dim=10**6)):  # drawn matrices; every side kept whole
        engine = GradDotProdEngine(model, val_batch=(Xv, Yv), task="causal_lm", value="adamw",
                                   projection=projection).attach(optimizer)
        model.zero_grad()
        Xc, Yc = engine.prepare_forward_input(X, Y)
        loss_of(model(input_ids=Xc), Yc, "causal_lm").backward()
        engine.prepare_gradients()
        result = engine.aggregate_and_log()
        engine.detach()
        p = engine.projection
        assert rel(result.projections, dense_projection(p, per_sample, True)) <= EXACT  # the gradients' own
        assert rel(result.val_projection, dense_projection(p, against, False)) <= EXACT
        assert rel(result.val_projection, dense_projection(p, val_grad, False)) > 1e-2  # D is not a scalar
    # every side whole: Π is a reordering, so the inner products are the recorded adamw values themselves
    assert all(block.dims == block.shape for block in p.blocks)
    assert rel(result.projections @ result.val_projection, result.dot_products.double()) <= 1e-9
