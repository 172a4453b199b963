"""Every common model family, tiny and float64, against float64 per-sample gradients from torch.func.

Each family's layers are found by type (nn.Linear, nn.LayerNorm, nn.Embedding, GPT-2's Conv1D) or
recognised by what they compute (every RMSNorm class, Gemma's, XGLM's and BioGPT's scaled embeddings, OPT's
and BioGPT's positional embeddings, Cohere's and Nemotron's LayerNorms); OPT also feeds its feed-forward block
rows flattened with the tokens. Models are built from
configs (nothing is downloaded) and run in eval mode (no dropout).
"""
import contextlib
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

from _models import VOCAB, MLPClassifier, lm_batch, tiny_bert_classifier, tiny_gpt2
from ghost_engine import GradDotProdEngine, disable_dropout
from ghost_engine.layers import rule_for
from test_engine import check_against_reference, run_engine

PAD = 0  # the padding id of the families that have one (its embedding row gets no gradient)
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               bos_token_id=0, eos_token_id=0, pad_token_id=None)


def _decoder(config_name, model_name, **overrides):
    def build(tie):
        config = getattr(transformers, config_name)(**{**DECODER, **overrides, "tie_word_embeddings": tie})
        return getattr(transformers, model_name)(config)
    return build


FAMILIES = {
    "llama": _decoder("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _decoder("MistralConfig", "MistralForCausalLM", head_dim=8),
    "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": _decoder("Qwen3Config", "Qwen3ForCausalLM", head_dim=8),  # q_norm/k_norm over [rows, T, heads, 8]
    "phi3": _decoder("Phi3Config", "Phi3ForCausalLM", pad_token_id=PAD),
    "olmo2": _decoder("Olmo2Config", "Olmo2ForCausalLM", pad_token_id=PAD),
    "gemma": _decoder("GemmaConfig", "GemmaForCausalLM", head_dim=8, pad_token_id=PAD),
    "gemma2": _decoder("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, pad_token_id=PAD),
    "gemma3": _decoder("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8, pad_token_id=PAD),
    "gpt_neox": _decoder("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "opt": lambda tie: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0, pad_token_id=PAD,
        tie_word_embeddings=tie)),
    "gpt2": lambda tie: tiny_gpt2(tie=tie),
}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_causal_lm_family_is_exact(family, tie):
    """Every parameter's per-sample dot product and every .grad, against the float64 reference."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = FAMILIES[family](tie).double().eval()
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    X, Y = lm_batch(3, 8, g, pad_row=1)
    Xv, Yv = lm_batch(2, 8, g)
    X[0, 3], Xv[1, 4] = PAD, PAD
    check_against_reference(model, X, Y, Xv, Yv)


# More decoder families, checked as they come (untied, their configs' defaults otherwise): found by type or
# recognised, with nothing added for them.
MORE_FAMILIES = {
    "phi": _decoder("PhiConfig", "PhiForCausalLM"),
    "stablelm": _decoder("StableLmConfig", "StableLmForCausalLM"),
    "starcoder2": _decoder("Starcoder2Config", "Starcoder2ForCausalLM"),
    "granite": _decoder("GraniteConfig", "GraniteForCausalLM"),
    "smollm3": _decoder("SmolLM3Config", "SmolLM3ForCausalLM"),
    "gptj": lambda tie: transformers.GPTJForCausalLM(transformers.GPTJConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, tie_word_embeddings=tie)),
    "codegen": lambda tie: transformers.CodeGenForCausalLM(transformers.CodeGenConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, n_ctx=64,
        tie_word_embeddings=tie)),
    "gpt_bigcode": lambda tie: transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=tie)),
    "cohere": _decoder("CohereConfig", "CohereForCausalLM", use_qk_norm=True),  # CohereLayerNorm recognised
    # FalconLinear: nn.Linear's computation in its own forward (recognised); the parallel-attention block adds
    # the attention output into the MLP's in place
    "falcon": lambda tie: transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bias=True,
        tie_word_embeddings=tie)),
    # the word embedding scaled by a Python float attribute (embed_scale = √32) recognised; sinusoidal positions
    "xglm": lambda tie: transformers.XGLMForCausalLM(transformers.XGLMConfig(
        vocab_size=VOCAB, d_model=32, ffn_dim=64, num_layers=2, attention_heads=4, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=PAD, tie_word_embeddings=tie)),
    # the same scaled word embedding, and learned positions with an offset of 2 (as OPT's) recognised
    "biogpt": lambda tie: transformers.BioGptForCausalLM(transformers.BioGptConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=PAD, tie_word_embeddings=tie)),
    "nemotron": _decoder("NemotronConfig", "NemotronForCausalLM"),  # NemotronLayerNorm1P: weight + 1, recognised
}
TIED_TOO = ["xglm", "biogpt"]  # also checked tied: the tie runs through a recognised embedding
# XGLM's attention clamps its scores with torch.full((), torch.finfo(dtype).min), made in the default dtype:
# a float64 model needs float64 as the default dtype (float32 cannot hold float64's minimum)
DEFAULT_FLOAT64 = {"xglm"}


@pytest.mark.parametrize("family, tie", [(f, False) for f in MORE_FAMILIES] + [(f, True) for f in TIED_TOO],
                         ids=lambda v: {False: "untied", True: "tied"}.get(v, v) if isinstance(v, bool) else v)
def test_more_families_are_exact(family, tie):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = MORE_FAMILIES[family](tie).double().eval()
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tie
    X, Y = lm_batch(3, 8, g, pad_row=1)
    Xv, Yv = lm_batch(2, 8, g)
    X[0, 3], Xv[1, 4] = PAD, PAD  # the padding id where the family has one (XGLM, BioGPT), a token otherwise
    with default_dtype(torch.float64) if family in DEFAULT_FLOAT64 else contextlib.nullcontext():
        check_against_reference(model, X, Y, Xv, Yv)


@contextlib.contextmanager
def default_dtype(dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@pytest.mark.parametrize("family, router, experts", [
    ("Mixtral", "MixtralTopKRouter", "MixtralExperts"),
    ("Qwen2Moe", "Qwen2MoeTopKRouter", "Qwen2MoeExperts"),
])
def test_a_mixture_of_experts_model_is_refused_by_name(family, router, experts):
    """Routers and experts stored as fused 3-D tensors have no rule: the engine raises at construction, naming
    them, instead of valuing the rest as if they were the whole model."""
    sizes = (dict(num_local_experts=4) if family == "Mixtral"
             else dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32))
    model = _decoder(f"{family}Config", f"{family}ForCausalLM", num_experts_per_tok=2, **sizes)(False)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=rf"no layer rule for module\(s\) with trainable parameters: .*{router}.*"
                                         rf"{experts}"):
        GradDotProdEngine(model, val_batch=lm_batch(2, 8, g))


def test_a_linear_layer_tied_twice_is_refused_naming_its_other_shared_parameter():
    """RoBERTa's causal-LM head registers its output bias twice (lm_head.bias and lm_head.decoder.bias) besides
    the decoder's weight tied to the word embedding: refused, the message naming the bias and what to do; with
    the second registration removed, as it says, the model is exact."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = transformers.RobertaForCausalLM(transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, is_decoder=True, pad_token_id=PAD)).double().eval()
    X, Y = lm_batch(3, 8, g, pad_row=1)
    Xv, Yv = lm_batch(2, 8, g)
    with pytest.raises(ValueError, match=r"the linear layer lm_head\.decoder \(Linear\) shares "
                                         r"roberta\.embeddings\.word_embeddings\.weight with the embedding .*: "
                                         r"lm_head\.decoder\.bias is also registered as lm_head\.bias "
                                         r"\(RobertaLMHead\).*Untie it \(for example `del model\.lm_head\.bias`.*"
                                         r"register a rule for RobertaLMHead"):
        GradDotProdEngine(model, val_batch=(Xv, Yv))
    del model.lm_head.bias
    check_against_reference(model, X, Y, Xv, Yv)


def test_a_weight_shared_by_two_linear_layers_is_refused_naming_both():
    model = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    model["b"].weight = model["a"].weight
    with pytest.raises(ValueError, match=r"parameter a\.weight is registered as a\.weight \(Linear\), b\.weight "
                                         r"\(Linear\); a parameter may be shared by one embedding and one linear"):
        GradDotProdEngine(model, val_batch=(torch.randn(1, 4), torch.tensor([0])), task="classification")


def test_bert_sequence_classifier_is_exact():
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    model = tiny_bert_classifier().double().eval()
    X, Xv = torch.randint(1, VOCAB, (3, 10), generator=g), torch.randint(1, VOCAB, (2, 10), generator=g)
    check_against_reference(model, X, torch.tensor([0, 2, 1]), Xv, torch.tensor([1, 0]), task="classification")


TOKEN_MODELS = {
    "bert-token-classification": lambda: transformers.BertForTokenClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=5, pad_token_id=PAD)),
    "distilbert-masked-lm": lambda: transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64,
        pad_token_id=PAD)),  # its vocabulary projection is tied to the word embeddings
    "bert-masked-lm": lambda: _without_bias_alias(transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=PAD))),
}


def _without_bias_alias(model):
    """BERT's masked-LM head registers the decoder's bias a second time, as cls.predictions.bias (which the
    engine refuses, test_a_linear_layer_tied_twice_is_refused_...); its forward reads only the decoder's."""
    del model.cls.predictions.bias
    return model


@pytest.mark.parametrize("name", list(TOKEN_MODELS))
def test_token_level_labels_are_exact(name):
    """task="token_classification": a label per input token, not shifted, -100 where nothing is predicted
    (the unmasked tokens of masked language modelling; special tokens of NER). Rows differ in their counts."""
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(5)
    model = TOKEN_MODELS[name]().double().eval()
    classes = model.config.num_labels if "classification" in name else VOCAB

    def batch(rows):
        X = torch.randint(1, VOCAB, (rows, 10), generator=g)
        Y = torch.randint(0, classes, (rows, 10), generator=g)
        Y[torch.rand((rows, 10), generator=g) < 0.6] = -100  # not a target
        Y[:, 0] = torch.randint(0, classes, (rows,), generator=g)  # every row has one
        return X, Y

    (X, Y), (Xv, Yv) = batch(3), batch(2)
    check_against_reference(model, X, Y, Xv, Yv, task="token_classification")


def test_token_classification_needs_a_label_per_token():
    model = TOKEN_MODELS["bert-token-classification"]()
    disable_dropout(model)  # BERT's default dropout would be refused first
    X = torch.randint(1, VOCAB, (2, 10))
    with pytest.raises(ValueError, match=r"token classification needs \[rows, T\] labels"):
        GradDotProdEngine(model, val_batch=(X, torch.tensor([1, 0])), task="token_classification")


def test_recognised_forms():
    """The recognised rules carry each family's epsilon attribute, and the rounding of x̂ its source code
    uses in half precision (Llama: x̂ cast to the input dtype before the weight multiply; OLMo2 and Gemma:
    the product in fp32, cast after), and Gemma's and OPT's embeddings their scale and offset."""
    llama, olmo2, gemma, opt = (FAMILIES[name](False) for name in ("llama", "olmo2", "gemma", "opt"))
    for norm, eps_attr, rounded in [(llama.model.norm, "variance_epsilon", True),
                                    (olmo2.model.norm, "variance_epsilon", False), (gemma.model.norm, "eps", False)]:
        rule = rule_for(norm)
        assert (rule.eps_attr, rule.round_x_hat) == (eps_attr, rounded), type(norm).__name__
    assert rule_for(gemma.model.embed_tokens).scale_attr == "embed_scale"
    assert rule_for(opt.model.decoder.embed_positions).offset_attr == "offset"


def test_recognised_forms_of_more_families():
    """XGLM's and BioGPT's word embeddings are scaled by their float attribute embed_scale (left as it was),
    BioGPT's positions are position_ids + offset, Nemotron's LayerNorm1P is a layer norm with weight and bias."""
    xglm, biogpt, nemotron = (MORE_FAMILIES[name](False) for name in ("xglm", "biogpt", "nemotron"))
    for embedding in (xglm.model.embed_tokens, biogpt.biogpt.embed_tokens):
        assert type(embedding.embed_scale) is float
        scale = embedding.embed_scale
        assert (rule_for(embedding).scale_attr, rule_for(embedding).offset_attr) == ("embed_scale", None)
        assert embedding.embed_scale is scale
    positions = rule_for(biogpt.biogpt.embed_positions)
    assert (positions.ids_arg[1], positions.offset_attr, positions.scale_attr) == ("position_ids", "offset", None)
    assert rule_for(nemotron.model.norm).__name__ == "OffsetLayerNormRule[eps]"


# ---------------------------------------------------------------- a family the engine has never seen


class CustomRMSNorm(nn.Module):
    """An RMSNorm class of a new family: ``epsilon`` attribute, (1 + weight), normalised over the last dim."""

    def __init__(self, dim, epsilon=1e-5):
        super().__init__()
        self.epsilon = epsilon
        self.weight = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.epsilon) * (1 + self.weight)


class ImpostorNorm(CustomRMSNorm):
    """Looks like an RMSNorm (one weight, an epsilon attribute) but computes something else."""

    def __init__(self, dim, kind):
        super().__init__(dim, epsilon=1e-6)
        self.kind = kind

    def forward(self, x):
        if self.kind == "eps ignored":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * self.weight
        if self.kind == "eps hard-coded":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight
        if self.kind == "centred, eps hard-coded":  # a LayerNorm without bias, with another epsilon
            return F.layer_norm(x, x.shape[-1:], eps=1e-5) * self.weight
        if self.kind == "centred":  # a LayerNorm without bias: recognised (CenteredNormRule), not an impostor
            return F.layer_norm(x, x.shape[-1:], eps=self.epsilon) * self.weight
        return super().forward(x) * self.weight  # "weight squared"


class NormNet(MLPClassifier):
    def __init__(self, norm):
        super().__init__()
        self.rms = norm


@pytest.mark.parametrize("kind", ["eps ignored", "eps hard-coded", "centred, eps hard-coded", "weight squared"])
def test_an_impostor_norm_is_refused(kind):
    """A module that does not compute a rule's formula is refused by name, never valued with a wrong one."""
    with pytest.raises(ValueError, match=r"no layer rule.*rms \(.*ImpostorNorm: weight\)"):
        GradDotProdEngine(NormNet(ImpostorNorm(64, kind)), val_batch=(torch.randn(1, 16), torch.tensor([0])),
                          task="classification")


class LayerNorm1P(nn.LayerNorm):
    """An nn.LayerNorm subclass with its own forward: (1 + weight) as Nemotron's NemotronLayerNorm1P, or one
    that computes something else."""

    def __init__(self, dim, kind):
        super().__init__(dim, eps=1e-6)
        nn.init.normal_(self.weight, std=0.1)
        nn.init.normal_(self.bias, std=0.1)
        self.kind = kind

    def forward(self, x):
        if self.kind == "eps hard-coded":
            return F.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, 1e-5)
        if self.kind == "weight + 2":
            return F.layer_norm(x, self.normalized_shape, self.weight + 2.0, self.bias, self.eps)
        if self.kind == "bias ignored":
            return F.layer_norm(x, self.normalized_shape, self.weight + 1.0, None, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)  # "1p"


@pytest.mark.parametrize("norm, rule", [
    (lambda: CustomRMSNorm(64), "RMSNormRule[epsilon]"),
    (lambda: ImpostorNorm(64, "centred"), "CenteredNormRule[epsilon]"),  # a LayerNorm without bias (Cohere's)
    (lambda: LayerNorm1P(64, "1p"), "OffsetLayerNormRule[eps]"),  # (1 + weight) and bias (Nemotron's)
], ids=["rms", "centred", "layer_norm_1p"])
def test_an_unseen_norm_class_is_recognised_and_exact(norm, rule):
    """A norm class of a family the engine has never seen is recognised by what it computes."""
    torch.manual_seed(21)
    X, Y = torch.randn(5, 16), torch.randint(0, 5, (5,))
    Xv, Yv = torch.randn(2, 16), torch.randint(0, 5, (2,))
    norm = norm()
    assert rule_for(norm).__name__ == rule
    check_against_reference(NormNet(norm), X, Y, Xv, Yv, task="classification")


@pytest.mark.parametrize("kind", ["eps hard-coded", "weight + 2", "bias ignored"])
def test_an_impostor_layer_norm_is_refused(kind):
    with pytest.raises(ValueError, match=r"no layer rule.*rms \(.*LayerNorm1P: weight, bias\)"):
        GradDotProdEngine(NormNet(LayerNorm1P(64, kind)), val_batch=(torch.randn(1, 16), torch.tensor([0])),
                          task="classification")


class ImpostorLinear(nn.Linear):
    """An nn.Linear subclass whose own forward computes something else than x @ weight.T + bias."""

    def __init__(self, kind):
        super().__init__(16, 16)
        self.kind = kind

    def forward(self, x):
        if self.kind == "scaled":
            return super().forward(x) * 2.0
        if self.kind == "activation":
            return torch.relu(super().forward(x))
        return x @ self.weight  # "transposed": the weight used the other way round


@pytest.mark.parametrize("kind", ["scaled", "activation", "transposed"])
def test_a_linear_subclass_with_another_forward_is_refused(kind):
    with pytest.raises(ValueError, match=r"no layer rule.*fc \(.*ImpostorLinear: weight, bias\)"):
        GradDotProdEngine(nn.ModuleDict({"fc": ImpostorLinear(kind)}),
                          val_batch=(torch.randn(1, 16), torch.tensor([0])), task="classification")


class InPlaceSum(nn.Module):
    """Adds one hooked layer's output into another's in place, as Falcon's parallel-attention block does
    (`mlp_output += attention_output`), and scales a norm's output in place."""

    def __init__(self, width=16, classes=3):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids, labels=None):
        x = self.norm(input_ids)
        x *= 2.0
        h = self.fc1(x)
        h += self.fc2(x)
        logits = self.head(torch.tanh(h))
        return SimpleNamespace(loss=F.cross_entropy(logits, labels), logits=logits)


@pytest.mark.parametrize("backend", [None, "aot_eager"], ids=["eager", "compiled"])
def test_an_in_place_change_of_a_layer_output_is_exact(backend):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(4, 16, generator=g), torch.randn(2, 16, generator=g)
    check_against_reference(InPlaceSum(), X, torch.tensor([0, 2, 1, 1]), Xv, torch.tensor([1, 0]),
                            task="classification", compile_backend=backend)


class InPlaceOnTokenRows(nn.Module):
    """nn.Linear on [rows, T, d] returns a view of its 2-D product; this model changes that view in place."""

    def __init__(self, width=16, classes=3):
        super().__init__()
        self.fc, self.head = nn.Linear(width, width), nn.Linear(width, classes)

    def forward(self, input_ids, labels=None):
        h = self.fc(input_ids)
        h += 1.0
        logits = self.head(h.mean(1))
        return SimpleNamespace(loss=F.cross_entropy(logits, labels), logits=logits)


def test_an_in_place_change_of_a_view_output_raises():
    """A layer output that is a view stays one (marked dirty, its backward would copy its base's gradient):
    changing it in place stops in the forward with autograd's error, never with a wrong value."""
    model = InPlaceOnTokenRows()
    engine = GradDotProdEngine(model, val_batch=(torch.randn(2, 5, 16), torch.tensor([0, 1])),
                               task="classification").attach()
    x, y = engine.prepare_forward_input(torch.randn(3, 5, 16), torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        model(x, y)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_taps_copy_no_gradient(family):
    """No tap turns into autograd's CopySlices (a copy of a whole base-sized gradient per layer)."""
    model = FAMILIES[family](True)
    g = torch.Generator().manual_seed(0)
    engine = GradDotProdEngine(model, val_batch=lm_batch(1, 8, g)).attach()
    x, y = engine.prepare_forward_input(*lm_batch(3, 8, g))
    nodes, stack = set(), [model(input_ids=x, labels=y).loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    names = {type(node).__name__ for node in nodes}
    assert "_TapBackward" in names and "CopySlices" not in names


class ConstantScaledEmbedding(nn.Embedding):
    """Has a scale (a buffer or a float attribute) but does not read it: its scale is a constant."""

    def __init__(self, vocab, dim, where):
        super().__init__(vocab, dim)
        if where == "buffer":
            self.embed_scale = nn.Buffer(torch.tensor(4.0), persistent=False)
        else:
            self.embed_scale = 4.0

    def forward(self, ids):
        return super().forward(ids) * 4.0


class CheckedScaleEmbedding(nn.Embedding):
    """Reads its float attribute, but raises for any value other than the one it was built with."""

    def __init__(self, vocab, dim):
        super().__init__(vocab, dim)
        self.embed_scale = 4.0

    def forward(self, ids):
        if self.embed_scale != 4.0:
            raise ValueError("embed_scale changed")
        return super().forward(ids) * self.embed_scale


@pytest.mark.parametrize("embedding", [lambda: ConstantScaledEmbedding(10, 4, "buffer"),
                                       lambda: ConstantScaledEmbedding(10, 4, "attribute"),
                                       lambda: CheckedScaleEmbedding(10, 4)], ids=["buffer", "attribute", "raises"])
def test_an_embedding_whose_scale_is_not_its_own_is_refused(embedding):
    """The forward must multiply by the module's own buffer or attribute, whatever value is put there: one
    that multiplies by a constant equal to it, or raises for another value, is refused; the attribute is
    restored after the check."""
    model = nn.ModuleDict({"emb": embedding()})
    with pytest.raises(ValueError, match=r"no layer rule.*emb \(.*(ConstantScaled|CheckedScale)Embedding: weight\)"):
        GradDotProdEngine(model, val_batch=(torch.randn(1, 4), torch.tensor([0])), task="classification")
    assert float(model["emb"].embed_scale) == 4.0


# ---------------------------------------------------------------- rows flattened with the tokens


class FlatLM(nn.Module):
    """A recognised scaled embedding, then a block that works on rows flattened with the tokens ([rows·T, d],
    as OPT's feed-forward block does) with a recognised norm, then a head. `layers`: "gemma" (Gemma's embedding,
    scaled by a buffer, and an unseen RMSNorm class) or "xglm" (XGLM's embedding, scaled by a float attribute,
    and a LayerNorm with (1 + weight) as Nemotron's)."""

    def __init__(self, layers="gemma", width=16):
        super().__init__()
        from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding
        from transformers.models.xglm.modeling_xglm import XGLMScaledWordEmbedding

        embedding = GemmaTextScaledWordEmbedding if layers == "gemma" else XGLMScaledWordEmbedding
        self.emb = embedding(VOCAB, width, padding_idx=PAD, embed_scale=width ** 0.5)
        self.norm = CustomRMSNorm(width) if layers == "gemma" else LayerNorm1P(width, "1p")
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids, labels=None):
        h = self.emb(input_ids)
        h = h + torch.tanh(self.fc(self.norm(h.reshape(-1, h.shape[-1])))).view(h.shape)
        logits = self.head(h)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(loss=loss, logits=logits)


@pytest.mark.parametrize("layers", ["gemma", "xglm"])
@pytest.mark.parametrize("backend", [None, "aot_eager"], ids=["eager", "compiled"])
def test_flattened_rows_and_recognised_layers_are_exact(backend, layers):
    """Also under torch.compile: the recognised rules (a scale read from a buffer or a float attribute) and the
    flattened rows trace into the graph."""
    torch.manual_seed(23)
    g = torch.Generator().manual_seed(23)
    X, Y = lm_batch(3, 8, g, pad_row=2)
    Xv, Yv = lm_batch(2, 8, g)
    X[0, 1] = PAD
    check_against_reference(FlatLM(layers), X, Y, Xv, Yv, compile_backend=backend)
    torch._dynamo.reset()


class PairedTokens(nn.Module):
    """Feeds a linear layer [rows·T/2, 2d]: two tokens per row of the flat tensor, neither layout the engine reads."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.fc = nn.Linear(16, VOCAB)

    def forward(self, input_ids, labels=None):
        logits = self.fc(self.emb(input_ids).reshape(-1, 16))
        return SimpleNamespace(loss=F.cross_entropy(logits, labels[:, 1::2].flatten()))


def test_a_flat_layout_other_than_rows_by_tokens_is_refused():
    g = torch.Generator().manual_seed(22)
    X, Y = lm_batch(3, 8, g)
    with pytest.raises(ValueError, match=r"fc \(Linear\) returned \(20, 97\); expected 5 rows .*5·8 = 40"):
        run_engine(PairedTokens(), X, Y, *lm_batch(2, 8, g))


@pytest.mark.parametrize("family", ["gemma", "opt", "qwen3", "gpt_neox"])
def test_midpoint_value_on_other_families(family):
    """The deferred projection through recognised layers (Gemma's scaled embedding, OPT's flattened rows and
    offset positions, Qwen3's head norms), tied: float32 engine against the real AdamW step on a float64 copy."""
    from _reference import reference_update_values
    from test_engine_estimators import adamw_with_state, check_values
    from test_engine_estimators import run_engine as run_estimator

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = FAMILIES[family](True).eval()
    optimizer = adamw_with_state(model, g)
    X, Y = lm_batch(3, 8, g, pad_row=1)
    Xv, Yv = lm_batch(2, 8, g)
    X[0, 3], Xv[1, 4] = PAD, PAD
    ref = reference_update_values(model, optimizer, X, Y, Xv, Yv, "midpoint")
    result, _ = run_estimator(model, X, Y, Xv, Yv, optimizer, value="midpoint")
    check_values(result, ref)
