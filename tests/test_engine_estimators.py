"""Value estimators (GradDotProdEngine(value=...)) against float64 references from dense per-sample gradients."""
import copy

import pytest
import torch

from _models import VOCAB, MLPClassifier, lm_batch, tiny_gpt2, tiny_llama
from _reference import (adamw_sensitivity, reference_adamw_values, reference_cosine_values, reference_dot_products,
                        reference_train_grad, reference_update_values)
from ghost_engine import GradDotProdEngine

TOL = 1e-4

MODELS = {"gpt2-tied": lambda: tiny_gpt2(tie=True), "gpt2-untied": lambda: tiny_gpt2(tie=False), "llama": tiny_llama}


def rel_err(got, ref, scale=0.0):
    return float((got.double() - ref).abs().max() / max(float(ref.abs().max()), scale, 1e-30))


def adamw_with_state(model, generator, steps=2, task="causal_lm"):
    """A real torch.optim.AdamW (two parameter groups with their own lr and weight decay) after `steps` Regular
    steps on random batches, so that its state (step, exp_avg_sq) is that of a run."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2]
    no_decay = [p for n, p in named if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "lr": 3e-3, "weight_decay": 0.1},
                                   {"params": no_decay, "lr": 1e-3, "weight_decay": 0.0}], betas=(0.9, 0.95))
    for _ in range(steps):
        if task == "causal_lm":
            X, Y = lm_batch(3, 12, generator)
        else:
            X, Y = torch.randn(4, 16, generator=generator), torch.randint(0, 5, (4,), generator=generator)
        model.zero_grad()
        model(input_ids=X, labels=Y).loss.backward()
        optimizer.step()
    return optimizer


def run_engine(model, X, Y, Xv, Yv, optimizer=None, micro_batches=1, task="causal_lm", model_step=None, **kwargs):
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv), task=task, **kwargs).attach(optimizer)
    model.zero_grad()
    for Xm, Ym in zip(X.chunk(micro_batches), Y.chunk(micro_batches)):
        Xc, Yc = engine.prepare_forward_input(Xm, Ym, loss_multiplier=1.0 / micro_batches)
        ((model if model_step is None else model_step)(input_ids=Xc, labels=Yc).loss / micro_batches).backward()
    engine.prepare_gradients()
    result = engine.aggregate_and_log()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    engine.detach()
    return result, grads


def check_values(result, ref):
    total = sum(ref.values())
    assert result.dot_products.shape == total.shape
    assert rel_err(result.dot_products, total) <= TOL
    assert set(result.per_parameter) == set(ref)
    floor = 1e-6 * float(total.abs().max())
    for name, r in ref.items():
        assert rel_err(result.per_parameter[name], r, floor) <= TOL, name


def check_train_grad(grads, reference_model, X, Y, task="causal_lm"):
    ref = reference_train_grad(reference_model, X, Y, task)
    floor = 1e-6 * max(float(r.abs().max()) for r in ref.values())
    for name, r in ref.items():
        assert rel_err(grads[name], r, floor) <= TOL, name


@pytest.mark.parametrize("name, micro_batches", [("gpt2-tied", 1), ("gpt2-tied", 2), ("gpt2-untied", 2), ("llama", 1)])
def test_adamw_value_is_exact(name, micro_batches):
    """<D ⊙ grad L_val, grad l_i> with D from the real AdamW state after two steps; .grad stays Regular's."""
    torch.manual_seed(30)
    g = torch.Generator().manual_seed(30)
    model = MODELS[name]()
    optimizer = adamw_with_state(model, g)
    X, Y = lm_batch(4, 12, g, pad_row=1)
    Xv, Yv = lm_batch(2, 12, g)
    reference_model = copy.deepcopy(model).double()
    sensitivity = adamw_sensitivity(optimizer, dict(model.named_parameters()))
    ref = reference_adamw_values(reference_model, X, Y, Xv, Yv, sensitivity)
    result, grads = run_engine(model, X, Y, Xv, Yv, optimizer, micro_batches, value="adamw")
    assert result.value == "adamw" and result.micro_batches == micro_batches
    check_values(result, ref)
    # a test that can tell: the values are not the first-order ones rescaled (D varies across elements)
    first_order = sum(reference_dot_products(reference_model, X, Y, Xv, Yv).values())
    adam = result.dot_products.double()
    assert rel_err(adam / adam.abs().max(), first_order / first_order.abs().max()) > 1e-2
    if micro_batches == 1:  # (accumulated token means of two micro-batches are not the whole batch's mean)
        check_train_grad(grads, reference_model, X, Y)


@pytest.mark.parametrize("name, micro_batches", [("gpt2-tied", 1), ("gpt2-tied", 2), ("gpt2-untied", 1), ("llama", 2)])
def test_cosine_value_is_exact(name, micro_batches):
    """Cosine of grad l_i and grad L_val with ghost per-sample norms (tied GPT-2: cross terms of the two uses)."""
    torch.manual_seed(31)
    g = torch.Generator().manual_seed(31)
    model = MODELS[name]()
    X, Y = lm_batch(4, 12, g, pad_row=2)
    X[0, 5:9] = X[0, 1]  # repeated tokens: the embedding norm's co-occurrence terms
    Xv, Yv = lm_batch(2, 12, g)
    reference_model = copy.deepcopy(model).double()
    ref, norms, val_norm = reference_cosine_values(reference_model, X, Y, Xv, Yv)
    result, grads = run_engine(model, X, Y, Xv, Yv, micro_batches=micro_batches, value="cosine")
    assert result.value == "cosine"
    check_values(result, ref)
    assert rel_err(result.grad_norms, norms) <= TOL
    assert abs(float(result.val_grad_norm) - float(val_norm)) <= TOL * float(val_norm)
    assert float(result.dot_products.abs().max()) <= 1.0
    if micro_batches == 1:
        check_train_grad(grads, reference_model, X, Y)


@pytest.mark.parametrize("value", ["adamw", "cosine"])
def test_classifier_without_a_token_dimension(value):
    """Linear layers on [rows, features] inputs, LayerNorm with bias and RMSNorm."""
    torch.manual_seed(32)
    g = torch.Generator().manual_seed(32)
    model = MLPClassifier()
    X, Y = torch.randn(6, 16, generator=g), torch.randint(0, 5, (6,), generator=g)
    Xv, Yv = torch.randn(3, 16, generator=g), torch.randint(0, 5, (3,), generator=g)
    reference_model = copy.deepcopy(model).double()
    if value == "adamw":
        optimizer = adamw_with_state(model, g, task="classification")
        sensitivity = adamw_sensitivity(optimizer, dict(model.named_parameters()))
        ref = reference_adamw_values(copy.deepcopy(model).double(), X, Y, Xv, Yv, sensitivity, "classification")
    else:
        optimizer = None
        ref, _, _ = reference_cosine_values(reference_model, X, Y, Xv, Yv, "classification")
    result, _ = run_engine(model, X, Y, Xv, Yv, optimizer, task="classification", value=value)
    check_values(result, ref)


def test_adamw_follows_the_optimizer_from_step_to_step():
    """D is read again after optimizer.step() and after an lr change (a scheduler)."""
    torch.manual_seed(38)
    g = torch.Generator().manual_seed(38)
    model = tiny_gpt2()
    optimizer = adamw_with_state(model, g, steps=1)
    Xv, Yv = lm_batch(1, 8, g)
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv), value="adamw").attach(optimizer)
    for lr in (3e-3, 3e-3, 1e-3):
        for group in optimizer.param_groups:
            group["lr"] = lr
        X, Y = lm_batch(2, 8, g)
        ref = reference_adamw_values(copy.deepcopy(model).double(), X, Y, Xv, Yv,
                                     adamw_sensitivity(optimizer, dict(model.named_parameters())))
        model.zero_grad()
        Xc, Yc = engine.prepare_forward_input(X, Y)
        model(input_ids=Xc, labels=Yc).loss.backward()
        engine.prepare_gradients()
        optimizer.step()
        check_values(engine.aggregate_and_log(), ref)
    engine.detach()


def test_adamw_before_the_first_step_warns_and_uses_v_zero():
    torch.manual_seed(33)
    g = torch.Generator().manual_seed(33)
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6)
    X, Y = lm_batch(3, 8, g)
    Xv, Yv = lm_batch(1, 8, g)
    sensitivity = adamw_sensitivity(optimizer, dict(model.named_parameters()))
    ref = reference_adamw_values(copy.deepcopy(model).double(), X, Y, Xv, Yv, sensitivity)
    with pytest.warns(UserWarning, match="first step"):
        result, _ = run_engine(model, X, Y, Xv, Yv, optimizer, value="adamw")
    check_values(result, ref)


def test_first_order_is_the_default_and_unchanged():
    torch.manual_seed(34)
    g = torch.Generator().manual_seed(34)
    model = tiny_gpt2()
    X, Y = lm_batch(3, 8, g)
    Xv, Yv = lm_batch(1, 8, g)
    ref = reference_dot_products(copy.deepcopy(model).double(), X, Y, Xv, Yv)
    result, _ = run_engine(model, X, Y, Xv, Yv)
    assert result.value == "first_order" and result.grad_norms is None and result.val_grad_norm is None
    assert result.first_order is None
    check_values(result, ref)


def test_bad_estimator_settings_are_refused():
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(35)
    val = lm_batch(1, 8, g)
    with pytest.raises(ValueError, match="value='bogus'"):
        GradDotProdEngine(model, val_batch=val, value="bogus")
    engine = GradDotProdEngine(model, val_batch=val, value="adamw")
    with pytest.raises(ValueError, match="got no optimizer"):
        engine.attach()
    with pytest.raises(ValueError, match="got SGD"):
        engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="amsgrad"):
        engine.attach(torch.optim.AdamW(model.parameters(), amsgrad=True))
    with pytest.raises(ValueError, match="does not hold"):
        engine.attach(torch.optim.AdamW(list(model.parameters())[1:]))
    assert not engine.attached


@pytest.mark.parametrize("value", ["adamw", "cosine"])
def test_compiled_tied_gpt2_is_exact(value):
    """AOT autograd traces the taps' backward with D or the norm sinks as inputs, in one graph (no graph break);
    exact, micro-batches too."""
    from torch._dynamo.utils import counters

    torch.manual_seed(37)
    g = torch.Generator().manual_seed(37)
    model = tiny_gpt2()
    optimizer = adamw_with_state(model, g)
    X, Y = lm_batch(4, 8, g, pad_row=1)
    Xv, Yv = lm_batch(2, 8, g)
    reference_model = copy.deepcopy(model).double()
    if value == "adamw":
        ref = reference_adamw_values(reference_model, X, Y, Xv, Yv,
                                     adamw_sensitivity(optimizer, dict(model.named_parameters())))
    else:
        ref, _, _ = reference_cosine_values(reference_model, X, Y, Xv, Yv)
    model.loss_type = "ForCausalLM"  # transformers logs a warning (a graph break of its own) otherwise
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    result, _ = run_engine(model, X, Y, Xv, Yv, optimizer, micro_batches=2, model_step=compiled, value=value)
    graph_breaks = dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    check_values(result, ref)
    assert not graph_breaks and graphs == 1, (graph_breaks, graphs)


class Conv1DTiedLM(torch.nn.Module):
    """An embedding whose weight [V, d] a later Conv1D (input V, output d) shares: the tie's rows index the
    linear layer's input features, the other orientation of GPT-2's wte/lm_head."""

    def __init__(self, vocab=VOCAB, width=16):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = torch.nn.Embedding(vocab, width)
        self.up = torch.nn.Linear(width, vocab)
        self.conv = Conv1D(width, vocab)
        self.conv.weight = self.emb.weight
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, labels=None):
        from types import SimpleNamespace

        h = self.emb(input_ids)
        logits = self.head(torch.tanh(self.conv(torch.tanh(self.up(h)))) + h)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(loss=loss, logits=logits)


@pytest.mark.parametrize("value", ["first_order", "adamw", "cosine", "midpoint"])
def test_tie_with_a_conv1d_layer(value):
    torch.manual_seed(39)
    g = torch.Generator().manual_seed(39)
    model = Conv1DTiedLM()
    assert model.conv.weight is model.emb.weight
    optimizer = adamw_with_state(model, g, steps=2) if value in ("adamw", "midpoint") else None
    X = torch.randint(0, VOCAB, (3, 8), generator=g)
    X[0, 4:] = X[0, 0]
    Xv = torch.randint(0, VOCAB, (2, 8), generator=g)
    reference_model = copy.deepcopy(model).double()
    if value == "adamw":
        ref = reference_adamw_values(reference_model, X, X, Xv, Xv,
                                     adamw_sensitivity(optimizer, dict(model.named_parameters())))
    elif value == "cosine":
        ref, _, _ = reference_cosine_values(reference_model, X, X, Xv, Xv)
    elif value == "midpoint":
        ref = reference_update_values(model, optimizer, X, X, Xv, Xv, value)
    else:
        ref = reference_dot_products(reference_model, X, X, Xv, Xv)
    result, grads = run_engine(model, X, X, Xv, Xv, optimizer, value=value,
                               **({"val_forward": lambda m, x: m(x, x).logits} if value == "midpoint" else {}))
    check_values(result, ref)
    check_train_grad(grads, reference_model, X, X)


# ---- the update-aware estimators that need the step's batch gradient (computed in aggregate_and_log)


def sgd_with_state(model, generator, nesterov=True):
    """A real torch.optim.SGD with momentum and weight decay after one step (its momentum buffer exists)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, nesterov=nesterov, weight_decay=0.01,
                                dampening=0.0 if nesterov else 0.1)
    X, Y = lm_batch(3, 12, generator)
    model(input_ids=X, labels=Y).loss.backward()
    optimizer.step()
    model.zero_grad()
    return optimizer


@pytest.mark.parametrize("value, opt, name, micro_batches", [
    ("second_order", "sgd", "gpt2-tied", 1), ("second_order", "sgd-dampened", "llama", 2),
    ("second_order", "sgd", "gpt2-untied", 2),
    ("adamw_vt", "adamw", "gpt2-tied", 1), ("adamw_vt", "adamw", "llama", 2),
    ("midpoint", "adamw", "gpt2-tied", 2), ("midpoint", "sgd", "gpt2-untied", 1), ("midpoint", "sgd-dampened", "llama", 1),
])
def test_update_aware_value_is_exact(value, opt, name, micro_batches):
    """The real optimizer's step (state, per-group lr and weight decay) differentiated by central differences on a
    float64 copy, and the validation Hessian by differences of float64 gradients; .grad stays Regular's."""
    torch.manual_seed(40)
    g = torch.Generator().manual_seed(40)
    model = MODELS[name]()
    optimizer = (adamw_with_state(model, g) if opt == "adamw" else
                 sgd_with_state(model, g, nesterov=opt == "sgd"))
    X, Y = lm_batch(4, 12, g, pad_row=1)
    Xv, Yv = lm_batch(2, 12, g)
    ref = reference_update_values(model, optimizer, X, Y, Xv, Yv, value, micro_batches)
    reference_model = copy.deepcopy(model).double()
    result, grads = run_engine(model, X, Y, Xv, Yv, optimizer, micro_batches, value=value)
    assert result.value == value and result.micro_batches == micro_batches
    check_values(result, ref)
    # a test that can tell: the values are not the first-order ones rescaled (by far more than the tolerance)
    first_order = sum(reference_dot_products(reference_model, X, Y, Xv, Yv).values())
    assert rel_err(result.first_order, first_order) <= TOL  # the taps' first-order values, returned alongside
    got = result.dot_products.double()
    assert rel_err(got / got.abs().max(), first_order / first_order.abs().max()) > 100 * TOL
    if micro_batches == 1:
        check_train_grad(grads, reference_model, X, Y)


@pytest.mark.parametrize("value, excluded", [("second_order", False), ("adamw_vt", False), ("midpoint", False),
                                             ("second_order", True), ("midpoint", True)])
def test_update_aware_values_on_a_classifier(value, excluded):
    """Rows without a token dimension. `excluded`: a module without a rule and unsupported="exclude": its
    parameter is left out of the dot products but still moves in the optimizer's step (midpoint) and in the
    Hessian-vector product's direction (second_order)."""
    from _models import MLPWithScale

    torch.manual_seed(41)
    g = torch.Generator().manual_seed(41)
    model = MLPWithScale() if excluded else MLPClassifier()
    optimizer = adamw_with_state(model, g, task="classification")
    X, Y = torch.randn(6, 16, generator=g), torch.randint(0, 5, (6,), generator=g)
    Xv, Yv = torch.randn(3, 16, generator=g), torch.randint(0, 5, (3,), generator=g)
    ref = reference_update_values(model, optimizer, X, Y, Xv, Yv, value, task="classification")
    options = {}
    if excluded:  # MLPWithScale's forward needs labels: the validation pass gives it placeholders
        del ref["scale.alpha"]
        options = dict(unsupported="exclude", val_forward=lambda m, x: m(x, torch.zeros(len(x), dtype=torch.long)).logits)
    result, _ = run_engine(model, X, Y, Xv, Yv, optimizer, task="classification", value=value, **options)
    assert result.excluded_parameters == (["scale.alpha"] if excluded else [])
    check_values(result, ref)


def test_update_aware_values_with_gradient_checkpointing_and_dropout_mode_kept():
    """Activation recomputation re-runs the taps inside backward; the extra validation pass runs in eval mode
    and leaves every module's mode as it was."""
    torch.manual_seed(42)
    g = torch.Generator().manual_seed(42)
    model = tiny_gpt2()
    optimizer = adamw_with_state(model, g)
    X, Y = lm_batch(3, 12, g)
    Xv, Yv = lm_batch(1, 12, g)
    ref = reference_update_values(model, optimizer, X, Y, Xv, Yv, "midpoint")
    model.gradient_checkpointing_enable()
    model.train()
    model.transformer.h[0].eval()  # a mixed mode, restored as it was
    result, _ = run_engine(model, X, Y, Xv, Yv, optimizer, value="midpoint")
    check_values(result, ref)
    assert model.training and not model.transformer.h[0].training and model.transformer.h[1].training


def test_update_aware_values_refuse_misuse():
    torch.manual_seed(43)
    g = torch.Generator().manual_seed(43)
    model = tiny_gpt2()
    val = lm_batch(1, 8, g)
    with pytest.raises(ValueError, match="got no optimizer"):
        GradDotProdEngine(model, val_batch=val, value="second_order").attach()
    with pytest.raises(ValueError, match="got SGD"):
        GradDotProdEngine(model, val_batch=val, value="adamw_vt").attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="got RMSprop"):
        GradDotProdEngine(model, val_batch=val, value="midpoint").attach(torch.optim.RMSprop(model.parameters()))
    with pytest.raises(ValueError, match="does not hold"):
        GradDotProdEngine(model, val_batch=val, value="midpoint").attach(
            torch.optim.SGD(list(model.parameters())[1:], lr=0.1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = GradDotProdEngine(model, val_batch=val, value="midpoint").attach(optimizer)
    X, Y = lm_batch(2, 8, g)
    for misuse, match in ((lambda: optimizer.step(), "optimizer.step"),
                          (lambda: model.zero_grad(set_to_none=True), "is None")):
        model.zero_grad()
        Xc, Yc = engine.prepare_forward_input(X, Y)
        model(input_ids=Xc, labels=Yc).loss.backward()
        engine.prepare_gradients()
        misuse()
        with pytest.raises(RuntimeError, match=match):
            engine.aggregate_and_log()
    # the next step starts afresh
    model.zero_grad()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    model(input_ids=Xc, labels=Yc).loss.backward()
    assert torch.isfinite(engine.aggregate_and_log().dot_products).all()
    engine.detach()


def test_deferred_validation_pass_runs_under_the_steps_autocast():
    """Under bf16 autocast the midpoint's validation pass runs under the same autocast; the values stay within
    bf16 round-off of the float32 ones."""
    torch.manual_seed(44)
    g = torch.Generator().manual_seed(44)
    model = tiny_gpt2()
    optimizer = adamw_with_state(model, g)
    X, Y = lm_batch(4, 12, g, pad_row=1)
    Xv, Yv = lm_batch(2, 12, g)
    values = {}
    for amp in (False, True):
        m, o = copy.deepcopy((model, optimizer))
        engine = GradDotProdEngine(m, val_batch=(Xv, Yv), value="midpoint").attach(o)
        Xc, Yc = engine.prepare_forward_input(X, Y)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            m(input_ids=Xc, labels=Yc).loss.backward()
        assert engine._mb.autocast == (("cpu", torch.bfloat16) if amp else None)
        values[amp] = engine.aggregate_and_log().dot_products
        engine.detach()
    assert rel_err(values[True], values[False].double()) < 5e-2


def test_a_float64_models_validation_loss_stays_float64():
    """The deferred estimators differentiate the validation loss: float64 logits keep it in float64 (it was cast
    to float32, leaving a float64 model's second-order and midpoint values float32-accurate); half-precision
    logits are summed in float32."""
    from torch.nn import functional as F

    from ghost_engine.losses import per_sample_loss

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 30
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[1, 3:] = -100
    got = per_sample_loss(logits, labels)
    assert got.dtype == torch.float64
    expected = torch.stack([F.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=-100) for i in range(3)])
    assert torch.allclose(got, expected, rtol=1e-14, atol=0)
    assert per_sample_loss(logits.bfloat16(), labels).dtype == torch.float32
