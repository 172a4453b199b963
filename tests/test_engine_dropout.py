"""Dropout is never silent (ghost_engine/dropout.py): every form of it is refused with a message naming the module,
attribute, config field or call and the way out; dropout probability 0 and eval mode are exact against the float64
reference; ghost_engine.disable_dropout is a way out."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _models import VOCAB, lm_batch, tiny_llama
from ghost_engine import GradDotProdEngine, disable_dropout
from test_engine import check_against_reference

WAY_OUT = r"Set dropout to 0: .*ghost_engine.disable_dropout\(model\).*model.eval\(\)"


def batches(seed):
    g = torch.Generator().manual_seed(seed)
    X, Y = lm_batch(3, 8, g, pad_row=1)
    Xv, Yv = lm_batch(2, 8, g)
    return X, Y, Xv, Yv


class MyDropout(nn.Dropout):
    """A subclass: still nn.Dropout's forward."""


DROPOUT_MODULES = [nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
                   MyDropout]
EXTRA_DIMS = {nn.Dropout2d: 1, nn.Dropout3d: 2}  # Dropout1d and the feature dropouts take [rows, T, d] as (N, C, L)


def _lm_output(head, h, labels):
    logits = head(h)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return SimpleNamespace(loss=loss, logits=logits)


class ModuleDropoutLM(nn.Module):
    """A tiny causal LM with a dropout module between its hidden layer and its head."""

    def __init__(self, dropout):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, 16), nn.Linear(16, VOCAB)
        self.drop = dropout

    def forward(self, input_ids, labels=None):
        h = torch.tanh(self.fc(self.emb(input_ids)))
        x = h.reshape(*h.shape, *(1,) * EXTRA_DIMS.get(type(self.drop), 0))
        return _lm_output(self.head, self.drop(x).reshape(h.shape), labels)


class FunctionalDropoutLM(nn.Module):
    """A tiny causal LM whose forward draws as `draw(self, h)` says, with the probability self.p."""

    def __init__(self, draw, p):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, 16), nn.Linear(16, VOCAB)
        self.draw, self.p = draw, p

    def forward(self, input_ids, labels=None):
        h = torch.tanh(self.fc(self.emb(input_ids)))
        return _lm_output(self.head, self.draw(self, h), labels)


def _sdpa(m, h):
    q = h[:, None]  # one head
    return h + F.scaled_dot_product_attention(q, q, q, dropout_p=m.p if m.training else 0.0, is_causal=True)[:, 0]


# (draw, what the message names); the probability is the module's p, so p = 0 makes each one deterministic
FUNCTIONAL = {
    "F.dropout": (lambda m, h: F.dropout(h, m.p, m.training), r"F.dropout\(p=0.1, training=True\)"),
    "F.dropout1d": (lambda m, h: F.dropout1d(h, m.p, m.training), r"F.dropout1d\(p=0.1, training=True\)"),
    "F.dropout2d": (lambda m, h: F.dropout2d(h[..., None], m.p, m.training)[..., 0],
                    r"F.dropout2d\(p=0.1, training=True\)"),
    "F.dropout3d": (lambda m, h: F.dropout3d(h[..., None, None], m.p, m.training)[..., 0, 0],
                    r"F.dropout3d\(p=0.1, training=True\)"),
    "F.alpha_dropout": (lambda m, h: F.alpha_dropout(h, m.p, m.training), r"F.alpha_dropout\(p=0.1, training=True\)"),
    "F.feature_alpha_dropout": (lambda m, h: F.feature_alpha_dropout(h, p=m.p, training=m.training),
                                r"F.feature_alpha_dropout\(p=0.1, training=True\)"),
    "torch.dropout": (lambda m, h: torch.dropout(h, m.p, m.training), r"torch.dropout\(p=0.1, train=True\)"),
    "sdpa": (_sdpa, r"scaled_dot_product_attention\(dropout_p=0.1\)"),
}


# ---------------------------------------------------------------- dropout modules


@pytest.mark.parametrize("kind", DROPOUT_MODULES, ids=lambda k: k.__name__)
def test_a_dropout_module_in_training_mode_is_refused_at_construction(kind):
    X, Y, Xv, Yv = batches(0)
    with pytest.raises(ValueError, match=rf"drop \({kind.__name__}, p=0.1\)\. The validation rows .*" + WAY_OUT):
        GradDotProdEngine(ModuleDropoutLM(kind(0.1)), val_batch=(Xv, Yv))


@pytest.mark.parametrize("mode", ["p=0 in training mode", "p=0.1 in eval mode"])
@pytest.mark.parametrize("kind", DROPOUT_MODULES, ids=lambda k: k.__name__)
def test_a_dropout_module_with_p0_or_in_eval_mode_is_exact(kind, mode):
    torch.manual_seed(1)
    model = ModuleDropoutLM(kind(0.0)) if mode.startswith("p=0 ") else ModuleDropoutLM(kind(0.1)).eval()
    check_against_reference(model, *batches(1))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_model_train_after_construction_is_refused_at_the_forward(compiled):
    """Built in eval mode, switched to training mode later (as a Trainer does): the next armed forward is refused,
    compiled or not, before the model runs; the micro-batch is void, and eval mode then works again."""
    torch.manual_seed(2)
    X, Y, Xv, Yv = batches(2)
    model = ModuleDropoutLM(nn.Dropout(0.1)).eval()
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv)).attach()
    step = torch.compile(model, backend="aot_eager") if compiled else model
    torch._dynamo.reset()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    step(input_ids=Xc, labels=Yc).loss.backward()  # eval mode: accepted
    engine.aggregate_and_log()
    model.train()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    with pytest.raises(ValueError, match=r"dropout is active: 1 module\(s\) in training mode .*drop \(Dropout, "
                                         r"p=0.1\)"):
        step(input_ids=Xc, labels=Yc)
    with pytest.raises(RuntimeError, match="without a prepared"):  # refused: the micro-batch is void
        engine.prepare_gradients()
    model.eval()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    step(input_ids=Xc, labels=Yc).loss.backward()
    assert torch.isfinite(engine.aggregate_and_log().dot_products).all()
    engine.detach()
    torch._dynamo.reset()


# ---------------------------------------------------------------- functional dropout and random draws


@pytest.mark.parametrize("form", list(FUNCTIONAL) + ["torch.rand_like"])
def test_functional_dropout_is_refused_at_the_first_forward(form):
    """No module attribute shows these: the first armed eager forward finds the call, names it, where it is and the
    module it runs in, and leaves no torch function mode behind."""
    torch.manual_seed(3)
    X, Y, Xv, Yv = batches(3)
    if form == "torch.rand_like":  # noise that no dropout probability turns off
        draw, what = (lambda m, h: h * (1 + 0.01 * torch.rand_like(h)) if m.training else h), r"torch.rand_like\(\)"
    else:
        draw, what = FUNCTIONAL[form]
    model = FunctionalDropoutLM(draw, 0.1)
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv)).attach()  # nothing to see at construction
    Xc, Yc = engine.prepare_forward_input(X, Y)
    with pytest.raises(ValueError, match=rf"the forward draws random numbers: {what} at test_engine_dropout.py:\d+ "
                                         r"\((<lambda>|_sdpa)\) in <model> \(FunctionalDropoutLM\)\. .*"
                                         r"Make these calls deterministic: .*disable_dropout.*model.eval\(\)"):
        model(input_ids=Xc, labels=Yc)
    assert torch._C._len_torch_function_stack() == 0
    with pytest.raises(RuntimeError, match="without a prepared"):
        engine.prepare_gradients()
    engine.detach()


@pytest.mark.parametrize("mode", ["p=0 in training mode", "p=0.1 in eval mode"])
@pytest.mark.parametrize("form", list(FUNCTIONAL))
def test_functional_dropout_with_p0_or_in_eval_mode_is_exact(form, mode):
    torch.manual_seed(4)
    model = FunctionalDropoutLM(FUNCTIONAL[form][0], 0.0 if mode.startswith("p=0 ") else 0.1)
    if mode.endswith("eval mode"):
        model.eval()
    check_against_reference(model, *batches(4))


def test_a_model_probed_in_eval_mode_is_probed_again_in_training_mode():
    """The probe runs on the first armed forward in each mode: a model first stepped in eval mode and switched to
    training mode later is refused at its first training-mode forward."""
    torch.manual_seed(5)
    X, Y, Xv, Yv = batches(5)
    model = FunctionalDropoutLM(FUNCTIONAL["F.dropout"][0], 0.1).eval()
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv)).attach()
    for _ in range(2):
        Xc, Yc = engine.prepare_forward_input(X, Y)
        model(input_ids=Xc, labels=Yc).loss.backward()
        engine.aggregate_and_log()
    model.train()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    with pytest.raises(ValueError, match=r"F.dropout\(p=0.1, training=True\)"):
        model(input_ids=Xc, labels=Yc)
    engine.detach()


def test_a_forward_that_raises_under_the_probe_leaves_no_mode_and_is_probed_again():
    torch.manual_seed(6)
    X, Y, Xv, Yv = batches(6)

    def broken(m, h):
        raise RuntimeError("the model's own error")

    model = FunctionalDropoutLM(broken, 0.1)
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv)).attach()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    with pytest.raises(RuntimeError, match="the model's own error"):
        model(input_ids=Xc, labels=Yc)
    assert torch._C._len_torch_function_stack() == 0
    engine.detach()  # a forward that raised leaves its micro-batch armed: start afresh
    engine.attach()
    model.draw = FUNCTIONAL["F.dropout"][0]
    Xc, Yc = engine.prepare_forward_input(X, Y)
    with pytest.raises(ValueError, match=r"F.dropout\(p=0.1, training=True\)"):  # the next forward is probed
        model(input_ids=Xc, labels=Yc)
    engine.detach()


# ---------------------------------------------------------------- Hugging Face models


def _gpt2(attn, **dropout):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0, **dropout}
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0, attn_implementation=attn, **config))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hugging_face_attention_dropout_is_refused_naming_the_config_field(attn):
    """Attention dropout goes to an attention function as a float (SDPA's dropout_p, or F.dropout in the eager
    attention), used only in training mode: the module attribute or dropout module holding it is named, with the
    config field to set to 0 when building."""
    _, _, Xv, Yv = batches(7)
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.attn_dropout \(Dropout, p=0.1\), "
                                         r"transformer.h.1.attn.attn_dropout \(Dropout, p=0.1\)\. .*"
                                         r"from_pretrained\(name, attn_pdrop=0.0\)` or `GPT2Config\(\.\.\., "
                                         r"attn_pdrop=0.0\)`; setting model.config after"):
        GradDotProdEngine(_gpt2(attn, attn_pdrop=0.1), val_batch=(Xv, Yv))
    llama = tiny_llama(attention_dropout=0.1, attn_implementation=attn)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.attention_dropout = 0.1 \(LlamaAttention\).*"
                                         r"from_pretrained\(name, attention_dropout=0.0\)"):
        GradDotProdEngine(llama, val_batch=(Xv, Yv))


def test_compiled_llama_switched_to_training_mode_is_refused():
    """A compiled forward hides its operations (no probe): the module attributes are read at every armed forward,
    in the compiled graph too."""
    X, Y, Xv, Yv = batches(8)
    model = tiny_llama(attention_dropout=0.1).eval()
    engine = GradDotProdEngine(model, val_batch=(Xv, Yv)).attach()
    model.train()
    torch._dynamo.reset()
    Xc, Yc = engine.prepare_forward_input(X, Y)
    with pytest.raises(ValueError, match=r"self_attn.attention_dropout = 0.1 \(LlamaAttention\)"):
        torch.compile(model, backend="aot_eager")(input_ids=Xc, labels=Yc)
    engine.detach()
    torch._dynamo.reset()


def test_disable_dropout_makes_a_default_gpt2_exact_in_training_mode():
    """GPT-2 with Hugging Face's default dropout 0.1 (what the bug report ran): refused; disable_dropout sets every
    probability to 0 (modules and config) and the model, still in training mode, is exact."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(9)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0))
    X, Y, Xv, Yv = batches(9)
    with pytest.raises(ValueError, match=r"dropout is active: 7 module\(s\) in training mode .*transformer.drop "
                                         r"\(Dropout, p=0.1\).* and 3 more\. .*build the model with attn_pdrop = "
                                         r"embd_pdrop = resid_pdrop = summary_first_dropout = 0"):
        GradDotProdEngine(model, val_batch=(Xv, Yv))
    changed = disable_dropout(model)
    assert "transformer.drop.p: 0.1 -> 0" in changed and "config.attn_pdrop: 0.1 -> 0" in changed
    assert len(changed) == 7 + 4
    assert model.training and model.config.resid_pdrop == 0
    check_against_reference(model, X, Y, Xv, Yv)


def test_llama_attention_dropout_disabled_is_exact_and_a_probability_0_model_is_untouched():
    torch.manual_seed(10)
    model = tiny_llama(attention_dropout=0.1)
    assert disable_dropout(model) == ["model.layers.0.self_attn.attention_dropout: 0.1 -> 0",
                                      "model.layers.1.self_attn.attention_dropout: 0.1 -> 0",
                                      "config.attention_dropout: 0.1 -> 0"]
    check_against_reference(model, *batches(10))
    assert disable_dropout(tiny_llama()) == []
    reference = copy.deepcopy(model)
    assert disable_dropout(model) == [] and all(torch.equal(p, q) for p, q in zip(model.parameters(),
                                                                                reference.parameters()))
