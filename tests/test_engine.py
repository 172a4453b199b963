"""GradDotProdEngine against float64 per-sample gradients from torch.func (tests/_reference.py)."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _models import VOCAB, MLPClassifier, MLPWithScale, lm_batch, tiny_bert_classifier, tiny_gpt2, tiny_llama
from _reference import reference_dot_products, reference_train_grad
from ghost_engine import GradDotProdEngine

TOL = 1e-4  # relative error bound of the issue, for an fp32 model


def rel_err(got, ref, scale=0.0):
    """max |got - ref| / max |ref|; `scale` floors the denominator for parameters whose exact values
    vanish (an attention key bias has zero gradient: softmax ignores a constant shift)."""
    return float((got.double() - ref).abs().max() / max(float(ref.abs().max()), scale, 1e-30))


def run_engine(model, X, Y, Xv, Yv, task="causal_lm", micro_batches=1, compile_backend=None, **engine_kwargs):
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv), task=task, **engine_kwargs)
    engine.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    step_model = model if compile_backend is None else torch.compile(model, backend=compile_backend)
    model.zero_grad()
    for Xm, Ym in zip(X.chunk(micro_batches), Y.chunk(micro_batches)):
        Xc, Yc = engine.prepare_forward_input(Xm, Ym, loss_multiplier=1.0 / micro_batches)
        (step_model(input_ids=Xc, labels=Yc).loss / micro_batches).backward()
    engine.prepare_gradients()
    result = engine.aggregate_and_log()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine.detach()
    return result, grads


def check_against_reference(model, X, Y, Xv, Yv, task="causal_lm", micro_batches=1, compile_backend=None,
                            reference_model=None, **engine_kwargs):
    """reference_model: the float64 model of the reference [a float64 copy of `model`]."""
    reference_model = copy.deepcopy(model).double() if reference_model is None else reference_model
    ref = reference_dot_products(reference_model, X, Y, Xv, Yv, task)
    result, grads = run_engine(model, X, Y, Xv, Yv, task, micro_batches, compile_backend, **engine_kwargs)
    assert result.dot_products.shape == (X.shape[0],)
    assert set(result.per_parameter) == set(ref)
    total = sum(ref.values())
    assert rel_err(result.dot_products, total) <= TOL
    floor = 1e-6 * float(total.abs().max())
    for name, r in ref.items():
        assert rel_err(result.per_parameter[name], r, floor) <= TOL, name
    if micro_batches == 1:  # .grad holds the Regular training gradient of the training rows
        ref_grads = reference_train_grad(reference_model, X, Y, task)
        floor = 1e-6 * max(float(r.abs().max()) for r in ref_grads.values())
        for name, r in ref_grads.items():
            assert rel_err(grads[name], r, floor) <= TOL, name
    return result, grads, reference_model


@pytest.mark.parametrize("trainable", ["bias", "ln"], ids=["biases only (BitFit)", "norms and biases"])
def test_frozen_weights_of_hooked_layers_are_exact(trainable):
    """Bias-only fine-tuning: a linear layer whose weight is frozen and bias trainable (and, second case, the
    norms' weights trainable too, the embeddings and tied head frozen) is valued on its trainable parameters."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = tiny_gpt2(tie=True)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias") or (trainable == "ln" and ".ln_" in name))
    X, Y = lm_batch(3, 16, g, pad_row=1)
    Xv, Yv = lm_batch(2, 16, g)
    result, _, _ = check_against_reference(model, X, Y, Xv, Yv)
    assert all(name.endswith("bias") or ".ln_" in name for name in result.per_parameter)


@pytest.mark.parametrize("val_rows", [1, 2, 4])
def test_gpt2_tied_embeddings(val_rows):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(val_rows)
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    X, Y = lm_batch(3, 16, g, pad_row=1)
    Xv, Yv = lm_batch(val_rows, 16, g)
    check_against_reference(model, X, Y, Xv, Yv)


def test_gpt2_gram_and_projection_paths_and_padding():
    """Short sequences and a wider model make the Gram path the cheaper one for most layers."""
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    model = tiny_gpt2(n_embd=64)
    X, Y = lm_batch(4, 8, g, pad_row=2)
    Y[0, 3] = -100  # an ignored target in the middle of a sample
    Xv, Yv = lm_batch(2, 8, g, pad_row=0)
    check_against_reference(model, X, Y, Xv, Yv)
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv)).attach()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    model(input_ids=Xc, labels=Yc).loss.backward()
    paths = {r["layer"]: r["path"] for r in engine.path_report()}
    assert paths["transformer.h.0.mlp.c_fc"] == "gram" and paths["lm_head"] == "projection"


def test_app_gpt2_with_padded_vocabulary():
    """The app's GPT-2 (fused tanh-GELU, head padded 97 -> 128 rows, ids below 97): exact."""
    from GradDotProd_LM.model import build_model

    torch.manual_seed(18)
    g = torch.Generator().manual_seed(18)
    model = build_model("GPT2-Tiny", n_positions=32, n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB,
                        bos_token_id=0, eos_token_id=0)
    assert model.config.vocab_size == 128
    X, Y = lm_batch(3, 16, g, pad_row=2)
    Xv, Yv = lm_batch(2, 16, g)
    check_against_reference(model, X, Y, Xv, Yv)


def test_llama_rmsnorm_rope_swiglu():
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    model = tiny_llama()
    X, Y = lm_batch(3, 12, g, pad_row=0)
    Xv, Yv = lm_batch(2, 12, g)
    check_against_reference(model, X, Y, Xv, Yv)


def test_bert_classifier():
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    model = tiny_bert_classifier()
    X = torch.randint(1, 97, (4, 10), generator=g)
    Y = torch.tensor([0, 2, 1, 2])
    Xv = torch.randint(1, 97, (3, 10), generator=g)
    Yv = torch.tensor([1, 0, 2])
    check_against_reference(model, X, Y, Xv, Yv, task="classification")


@pytest.mark.parametrize("val_rows", [1, 3])
def test_mlp_classifier(val_rows):
    torch.manual_seed(4)
    model = MLPClassifier()
    X, Y = torch.randn(6, 16), torch.randint(0, 5, (6,))
    Xv, Yv = torch.randn(val_rows, 16), torch.randint(0, 5, (val_rows,))
    check_against_reference(model, X, Y, Xv, Yv, task="classification")


def test_micro_batches_give_the_same_numbers():
    """Splitting the batch into micro-batches changes neither the dot products nor the update."""
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(5)
    model = tiny_gpt2()
    X, Y = lm_batch(4, 16, g, pad_row=3)
    Xv, Yv = lm_batch(2, 16, g)
    result, grads, ref_model = check_against_reference(model, X, Y, Xv, Yv, micro_batches=2)
    assert result.micro_batches == 2
    halves = [reference_train_grad(ref_model, Xm, Ym) for Xm, Ym in zip(X.chunk(2), Y.chunk(2))]
    for name in halves[0]:  # Regular accumulation: mean of the micro-batch losses
        assert rel_err(grads[name], (halves[0][name] + halves[1][name]) / 2) <= TOL, name


def test_weights_and_token_counts():
    g = torch.Generator().manual_seed(6)
    model = tiny_gpt2()
    X, Y = lm_batch(3, 16, g, pad_row=1)
    Xv, Yv = lm_batch(1, 16, g)
    result, _ = run_engine(model, X, Y, Xv, Yv)
    assert result.token_counts.tolist() == [15, 7, 15]
    assert torch.allclose(result.weights, torch.tensor([15, 7, 15]) / 37.0)


def test_sample_without_targets_has_zero_dot_product():
    g = torch.Generator().manual_seed(7)
    model = tiny_gpt2()
    X, Y = lm_batch(3, 16, g)
    Y[1] = -100
    Xv, Yv = lm_batch(1, 16, g)
    result, _ = run_engine(model, X, Y, Xv, Yv)
    assert result.dot_products[1] == 0 and result.token_counts[1] == 0
    keep = torch.tensor([0, 2])
    ref = reference_dot_products(copy.deepcopy(model).double(), X[keep], Y[keep], Xv, Yv)
    assert rel_err(result.dot_products[keep], sum(ref.values())) <= TOL


def test_excluded_module_keeps_exact_training_gradient():
    torch.manual_seed(8)
    model = MLPWithScale()
    X, Y = torch.randn(5, 16), torch.randint(0, 5, (5,))
    Xv, Yv = torch.randn(2, 16), torch.randint(0, 5, (2,))
    with pytest.raises(ValueError, match=r"scale .*Scale.*alpha"):
        GradDotProdEngine(model, val_batch=(Xv, Yv), task="classification")
    ref_model = copy.deepcopy(model).double()
    ref = reference_dot_products(ref_model, X, Y, Xv, Yv, task="classification")
    result, grads = run_engine(model, X, Y, Xv, Yv, task="classification", unsupported="exclude")
    assert result.excluded_parameters == ["scale.alpha"]
    assert "scale.alpha" not in result.per_parameter
    for name, r in ref.items():
        if name != "scale.alpha":
            assert rel_err(result.per_parameter[name], r) <= TOL, name
    ref_grad = reference_train_grad(ref_model, X, Y, task="classification")
    for name, r in ref_grad.items():
        assert rel_err(grads[name], r) <= TOL, name


def test_adamw_training_matches_regular():
    """Five AdamW steps with the engine and without it, from the same state, give the same parameters."""
    torch.manual_seed(9)
    g = torch.Generator().manual_seed(9)
    regular = tiny_gpt2()
    ghost = copy.deepcopy(regular)
    Xv, Yv = lm_batch(2, 16, g)
    batches = [lm_batch(4, 16, g, pad_row=step % 4) for step in range(5)]
    opt_r = torch.optim.AdamW(regular.parameters(), lr=1e-3, weight_decay=0.1)
    opt_g = torch.optim.AdamW(ghost.parameters(), lr=1e-3, weight_decay=0.1)
    engine = GradDotProdEngine(ghost, val_batch=(Xv, Yv)).attach(opt_g)
    for X, Y in batches:
        opt_r.zero_grad()
        regular(input_ids=X, labels=Y).loss.backward()
        torch.nn.utils.clip_grad_norm_(regular.parameters(), 1.0)
        opt_r.step()
        opt_g.zero_grad()
        Xc, Yc = engine.prepare_forward_input(X, Y)
        ghost(input_ids=Xc, labels=Yc).loss.backward()
        engine.prepare_gradients()
        torch.nn.utils.clip_grad_norm_(ghost.parameters(), 1.0)
        opt_g.step()
        assert torch.isfinite(engine.aggregate_and_log().dot_products).all()
    for (name, p_r), p_g in zip(regular.named_parameters(), ghost.parameters()):
        torch.testing.assert_close(p_g, p_r, rtol=1e-4, atol=1e-5, msg=name)


def _no_hooks(model):
    return all(not m._forward_hooks for m in model.modules()) and \
        all(not p._backward_hooks for p in model.parameters())


def test_bad_input_is_rejected_before_state_changes():
    g = torch.Generator().manual_seed(10)
    model = tiny_gpt2()
    X, Y = lm_batch(2, 16, g)
    Xv, Yv = lm_batch(1, 12, g)
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv)).attach()
    with pytest.raises(ValueError, match="sequence length"):
        engine.prepare_forward_input(X, Y)
    with pytest.raises(ValueError, match="no rows"):
        engine.prepare_forward_input(X[:0], Y[:0])
    with pytest.raises(ValueError, match="already attached"):
        engine.attach()
    engine.set_val_batch(*lm_batch(1, 16, g))
    Xc, Yc = engine.prepare_forward_input(X, Y)
    loss = model(input_ids=Xc, labels=Yc).loss
    with pytest.raises(RuntimeError, match="no gradient reached"):
        engine.prepare_gradients()  # called before backward
    with pytest.raises(RuntimeError, match="after its micro-batch was filed"):
        loss.backward()
    model.zero_grad()
    # the engine still works after the errors
    Xc, Yc = engine.prepare_forward_input(X, Y)
    model(input_ids=Xc, labels=Yc).loss.backward()
    assert engine.aggregate_and_log().dot_products.shape == (2,)
    engine.detach()
    assert _no_hooks(model)
    with pytest.raises(ValueError, match="no layer rule.*lstm.*LSTM"):
        GradDotProdEngine(torch.nn.ModuleDict({"lstm": torch.nn.LSTM(4, 4)}), val_batch=(Xv, Yv))
    with pytest.raises(ValueError, match="no targets"):
        GradDotProdEngine(model, val_batch=(Xv, torch.full_like(Yv, -100)))


def test_detach_restores_the_model():
    g = torch.Generator().manual_seed(11)
    model = tiny_gpt2()
    before = copy.deepcopy(model.state_dict())
    X, Y = lm_batch(2, 16, g)
    Xv, Yv = lm_batch(1, 16, g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_state = copy.deepcopy(opt.state_dict())
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv)).attach(opt)
    engine.detach()
    assert _no_hooks(model)
    assert opt.state_dict() == opt_state
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    model(input_ids=X, labels=Y).loss.backward()  # ordinary training works untouched
    ref = reference_train_grad(copy.deepcopy(model).double(), X, Y)
    for name, p in model.named_parameters():
        assert rel_err(p.grad, ref[name]) <= TOL


def test_bf16_autocast_is_close():
    """Under CPU bf16 autocast the numbers are computed in bf16 with fp32 accumulation: close, not exact."""
    torch.manual_seed(12)
    g = torch.Generator().manual_seed(12)
    model = tiny_gpt2()
    X, Y = lm_batch(4, 16, g)
    Xv, Yv = lm_batch(2, 16, g)
    ref = sum(reference_dot_products(copy.deepcopy(model).double(), X, Y, Xv, Yv).values())
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv)).attach()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=Xc, labels=Yc).loss
    loss.backward()
    got = engine.aggregate_and_log().dot_products
    assert got.dtype == torch.float32
    assert rel_err(got, ref) < 5e-2


def test_gradient_checkpointing_gives_the_same_numbers():
    """Recomputed forwards (non-reentrant checkpointing) run inside backward; the engine ignores them."""
    g = torch.Generator().manual_seed(13)
    plain = tiny_gpt2()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed.config.use_cache = False
    X, Y = lm_batch(3, 16, g)
    Xv, Yv = lm_batch(2, 16, g)
    result_plain, grads_plain = run_engine(plain, X, Y, Xv, Yv)
    result_ckpt, grads_ckpt = run_engine(checkpointed, X, Y, Xv, Yv)
    torch.testing.assert_close(result_ckpt.dot_products, result_plain.dot_products)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)


def test_loss_multiplier_scales_the_gradient_not_the_dot_products():
    """A scaled loss (GradScaler, 1/grad_accum) scales .grad as in Regular training; dot products are unchanged."""
    g = torch.Generator().manual_seed(14)
    model = tiny_gpt2()
    X, Y = lm_batch(3, 16, g)
    Xv, Yv = lm_batch(1, 16, g)
    ref_model = copy.deepcopy(model).double()
    ref = sum(reference_dot_products(ref_model, X, Y, Xv, Yv).values())
    ref_grad = reference_train_grad(ref_model, X, Y)
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv)).attach()
    Xc, Yc = engine.prepare_forward_input(X, Y, loss_multiplier=1024.0)
    (model(input_ids=Xc, labels=Yc).loss * 1024.0).backward()
    assert rel_err(engine.aggregate_and_log().dot_products, ref) <= TOL
    for name, p in model.named_parameters():
        assert rel_err(p.grad / 1024.0, ref_grad[name]) <= TOL, name


def test_sum_reduction():
    """A model whose loss is a sum over rows: l_i is still the row's loss, .grad is Regular's sum."""
    torch.manual_seed(15)
    model = MLPClassifier(reduction="sum")
    X, Y = torch.randn(5, 16), torch.randint(0, 5, (5,))
    Xv, Yv = torch.randn(2, 16), torch.randint(0, 5, (2,))
    ref_model = copy.deepcopy(model).double()
    ref_model.reduction = "mean"  # reference_dot_products differentiates each row's own (mean) loss
    ref = reference_dot_products(ref_model, X, Y, Xv, Yv, task="classification")
    result, grads = run_engine(model, X, Y, Xv, Yv, task="classification", loss_reduction="sum")
    assert rel_err(result.dot_products, sum(ref.values())) <= TOL
    ref_model.reduction = "sum"
    for name, r in reference_train_grad(ref_model, X, Y, task="classification").items():
        assert rel_err(grads[name], r) <= TOL, name


def test_a_loss_whose_scale_contradicts_loss_reduction_raises_on_the_first_forward():
    """A mean loss declared as a sum, or a sum divided by the training rows' targets alone (Trainer's
    num_items_in_batch), would scale every dot product and .grad wrongly: the first forward raises."""
    g = torch.Generator().manual_seed(16)
    X, Y = lm_batch(3, 16, g)
    Xv, Yv = lm_batch(1, 16, g)
    model = tiny_gpt2()
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv), loss_reduction="sum").attach()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    with pytest.raises(ValueError, match="loss_reduction='sum'"):
        model(input_ids=Xc, labels=Yc)
    engine.detach()

    engine = GradDotProdEngine(model, val_batch=(Xv, Yv)).attach()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    n_train = int((Y[:, 1:] != -100).sum())
    with pytest.raises(ValueError, match="num_items_in_batch"):
        model(input_ids=Xc, labels=Yc, num_items_in_batch=n_train)
    assert not engine.loss_checked
    Xc, Yc = engine.prepare_forward_input(X, Y)
    out = model(input_ids=Xc, labels=Yc)  # the model's own mean: accepted, and checked once
    assert engine.loss_checked
    out.loss.backward()
    engine.prepare_gradients()
    engine.detach()

    # the other direction: a sum over rows declared as a mean
    summing = MLPClassifier(reduction="sum")
    Xf, Yf = torch.randn(5, 16, generator=g), torch.randint(0, 5, (5,), generator=g)
    engine = GradDotProdEngine(summing, val_batch=(torch.randn(2, 16, generator=g), torch.randint(0, 5, (2,),
                                                                                                generator=g)),
                               task="classification").attach()
    Xc, Yc = engine.prepare_forward_input(Xf, Yf)
    with pytest.raises(ValueError, match="loss_reduction='mean'"):
        summing(input_ids=Xc, labels=Yc)
    engine.detach()


def test_check_loss_is_independent_of_the_hook():
    """check_loss (what a compiled model, whose hook does not check, calls itself) against a hand-made loss."""
    g = torch.Generator().manual_seed(17)
    X, Y = lm_batch(2, 12, g)
    Xv, Yv = lm_batch(1, 12, g)
    model = tiny_gpt2()
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv))
    Xc, Yc = torch.cat([X, Xv]), torch.cat([Y, Yv])
    with torch.no_grad():
        logits = model(input_ids=Xc).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), Yc[:, 1:].reshape(-1),
                                           reduction="none")
    assert engine.check_loss(ce.mean(), logits, Yc)
    with pytest.raises(ValueError, match="the mean"):
        engine.check_loss(ce.sum() / (X.shape[0] * 11), logits, Yc)  # per training-target divisor
    assert not engine.check_loss(torch.tensor(float("nan")), logits, Yc)  # not finite: nothing to check


# ---------------------------------------------------------------- torch.compile


def _graph_breaks(model, X, Y):
    explanation = torch._dynamo.explain(model)(input_ids=X, labels=Y)
    torch._dynamo.reset()
    return explanation.graph_break_count, [str(r.reason).splitlines()[0] for r in explanation.break_reasons]


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_compiled_forward_has_no_graph_break(build):
    """The taps trace into the model's one graph: torch.compile needs no break per hooked layer."""
    torch.manual_seed(15)
    g = torch.Generator().manual_seed(15)
    model = build()
    model.loss_type = "ForCausalLM"  # transformers logs a warning (a graph break of its own) otherwise
    X, Y = lm_batch(2, 12, g)
    Xv, Yv = lm_batch(1, 12, g)
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv)).attach()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    breaks, reasons = _graph_breaks(model, Xc, Yc)
    engine.detach()
    assert breaks == 0, reasons


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_gpt2_is_exact(backend):
    """Forward and backward compiled (AOT autograd traces the taps' backward; inductor generates the kernels):
    tied embeddings, padding, every parameter and .grad against the float64 reference, two steps, one graph."""
    from torch._dynamo.utils import counters

    torch.manual_seed(16)
    g = torch.Generator().manual_seed(16)
    model = tiny_gpt2()
    X, Y = lm_batch(3, 16, g, pad_row=1)
    Xv, Yv = lm_batch(2, 16, g)
    torch._dynamo.reset()
    counters.clear()
    check_against_reference(model, X, Y, Xv, Yv, compile_backend=backend)
    graphs = counters["stats"]["unique_graphs"]
    check_against_reference(model, X, Y, Xv, Yv, compile_backend=backend)  # a new micro-batch: no recompile
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_compiled_micro_batches_llama_and_classifier_are_exact():
    torch.manual_seed(17)
    g = torch.Generator().manual_seed(17)
    X, Y = lm_batch(4, 12, g, pad_row=0)
    Xv, Yv = lm_batch(2, 12, g)
    check_against_reference(tiny_llama(), X, Y, Xv, Yv, compile_backend="aot_eager")
    check_against_reference(tiny_gpt2(), X, Y, Xv, Yv, micro_batches=2, compile_backend="aot_eager")
    model = MLPClassifier()
    Xf, Yf = torch.randn(6, 16, generator=g), torch.randint(0, 5, (6,), generator=g)
    Xvf, Yvf = torch.randn(2, 16, generator=g), torch.randint(0, 5, (2,), generator=g)
    check_against_reference(model, Xf, Yf, Xvf, Yvf, task="classification", compile_backend="aot_eager")
    torch._dynamo.reset()


# ---------------------------------------------------------------- refusing what it cannot do exactly


class ScaledEmbedding(torch.nn.Embedding):
    """Gemma-style: an nn.Embedding subclass whose forward scales the looked-up rows."""

    def forward(self, ids):
        return super().forward(ids) * 4.0


class PlainLinearSubclass(torch.nn.Linear):
    """A subclass that keeps nn.Linear's forward (like torch's NonDynamicallyQuantizableLinear)."""


def test_a_subclass_with_its_own_forward_has_no_rule():
    """Rules match subclasses only when they compute what the base computes: a scaled embedding is refused
    instead of valued 4x off; a subclass that keeps the forward is valued exactly."""
    model = torch.nn.ModuleDict({"emb": ScaledEmbedding(10, 4), "head": PlainLinearSubclass(4, 3)})
    with pytest.raises(ValueError, match=r"no layer rule.*emb.*ScaledEmbedding"):
        GradDotProdEngine(model, val_batch=(torch.randn(1, 4), torch.tensor([0])), task="classification")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = PlainLinearSubclass(16, 5)

        def forward(self, input_ids, labels=None):
            logits = self.fc(input_ids)
            return SimpleNamespace(logits=logits, loss=torch.nn.functional.cross_entropy(logits, labels))

    torch.manual_seed(19)
    X, Y = torch.randn(4, 16), torch.randint(0, 5, (4,))
    check_against_reference(Net(), X, Y, torch.randn(2, 16), torch.randint(0, 5, (2,)), task="classification")


def test_a_second_engine_on_one_model_is_refused():
    g = torch.Generator().manual_seed(20)
    model = tiny_gpt2()
    Xv, Yv = lm_batch(1, 8, g)
    first = GradDotProdEngine(model, val_batch=(Xv, Yv)).attach()
    second = GradDotProdEngine(model, val_batch=(Xv, Yv))
    with pytest.raises(ValueError, match="another GradDotProdEngine is attached"):
        second.attach()
    first.detach()
    second.attach().detach()  # free again once the first is detached


def test_tensor_parallel_parameters_are_refused(tmp_path):
    """A DTensor parameter that FSDP2 does not manage (tensor parallelism) means sharded activations, which the
    layer rules do not cover: refused. Built after fully_shard replaced the parameters: refused at attach."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = torch.nn.Linear(4, 3)
        model.weight = torch.nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match=r"\[.weight.\] are DTensors not sharded by FSDP2"):
            GradDotProdEngine(model, val_batch=(torch.randn(1, 4), torch.tensor([0])), task="classification")
        model = torch.nn.Linear(4, 3)
        engine = GradDotProdEngine(model, val_batch=(torch.randn(1, 4), torch.tensor([0])), task="classification")
        fully_shard(model, mesh=mesh)
        with pytest.raises(ValueError, match="build the engine after fully_shard"):
            engine.attach()
    finally:
        dist.destroy_process_group()


def test_the_fp32_output_matrix_products_are_found_where_torch_has_them():
    """On a GPU the engine multiplies half-precision operands with fp32 output (torch.mm/bmm out_dtype=, torch 2.8+)
    instead of upcasting them: the check must find the ops themselves (some torch versions' docstrings omit
    the argument, which once hid them)."""
    from ghost_engine import layers

    has_them = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)
    assert layers._MM_OUT_DTYPE is has_them and layers._BMM_OUT_DTYPE is has_them


# ---------------------------------------------------------------- parameters used outside their hooked layer


class HeadByFunctional(nn.Module):
    """A small LM whose output layer is computed with a hooked layer's weight outside that layer's forward:
    `tie` the embedding's weight (F.linear(h, wte.weight), as custom GPTs often tie), or a `head` Linear whose
    forward is never called (F.linear(h, head.weight, head.bias))."""

    def __init__(self, use, vocab=VOCAB, width=16):
        super().__init__()
        self.use = use
        self.wte = nn.Embedding(vocab, width)
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, labels=None):
        h = torch.tanh(self.fc(self.wte(input_ids)))
        if self.use == "tie":
            logits = F.linear(h, self.wte.weight)
        elif self.use == "head unrun":
            logits = F.linear(h, self.head.weight, self.head.bias)
        else:  # "module": the head through its own forward (what the engine values)
            logits = self.head(h)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(loss=loss, logits=logits)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16 autocast"])
@pytest.mark.parametrize("use, named", [("tie", "wte.weight"), ("head unrun", "head.weight")])
def test_a_parameter_used_outside_its_hooked_layer_raises_on_the_first_forward(use, named, amp):
    """Without the check these models give dot products and a .grad without the functional use's share (the
    float64 reference disagrees); the first armed forward now raises, naming the parameter, and leaves the
    micro-batch unarmed."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = HeadByFunctional(use)
    X, Y = lm_batch(3, 8, g)
    Xv, Yv = lm_batch(2, 8, g)
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv))
    engine.attach()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        with pytest.raises(ValueError, match=rf"{named} is used by \d operation\(s\) .* outside a hooked layer"):
            model(input_ids=Xc, labels=Yc)
    with pytest.raises(RuntimeError, match="without a prepared and back-propagated batch"):  # the micro-batch is void
        engine.prepare_gradients()


def test_the_same_model_through_its_modules_is_exact():
    """The control: the head called through its module is valued exactly (so the check raises on the use, not on
    the model)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = HeadByFunctional("module").double()
    X, Y = lm_batch(3, 8, g)
    Xv, Yv = lm_batch(2, 8, g)
    check_against_reference(model, X, Y, Xv, Yv)
