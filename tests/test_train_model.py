"""GPT-2 models of the training app: sizes of docs/METHOD.md section 5, dropout 0, tied head, SDPA, local init."""
import pytest
import torch
from transformers import GPT2LMHeadModel

from GradDotProd_LM.model import ARCHITECTURES, build_config, build_model, count_parameters


@pytest.mark.parametrize("name, millions", [("GPT2-Small", 124), ("GPT2-Medium", 355), ("GPT2-Large", 774)])
def test_sizes_match_gpt2(name, millions):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = GPT2LMHeadModel(build_config(name))
    assert round(count_parameters(model) / 1e6) == millions
    assert model.config.vocab_size == 50304 and model.config.n_positions == 1024  # 50257 padded to 64


def test_tiny_model_is_deterministic_tied_dropout_free_sdpa():
    torch.manual_seed(0)
    model = build_model("GPT2-Tiny")
    torch.manual_seed(0)
    again = build_model("GPT2-Tiny")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    model.train()
    x = torch.randint(0, 50257, (2, 16))
    assert torch.equal(model(input_ids=x).logits, model(input_ids=x).logits)  # no randomness in train mode


def test_init_from_a_local_checkpoint(tmp_path):
    model = build_model("GPT2-Tiny")
    model.save_pretrained(tmp_path)
    loaded = build_model("GPT2-Tiny", init_from=str(tmp_path))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_bad_names_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="GPT2-XL.*GPT2-Tiny"):
        build_model("GPT2-XL")
    with pytest.raises(ValueError, match="not a local directory"):
        build_model("GPT2-Tiny", init_from="gpt2")  # a hub name: refused, nothing is downloaded
    assert set(ARCHITECTURES) == {"GPT2-Tiny", "GPT2-Small", "GPT2-Medium", "GPT2-Large"}


def test_vocabulary_padding_keeps_token_ids_and_the_tie(tmp_path):
    """GPT-2's 50257 rows padded to 50304 (a multiple of 64); 1 turns it off; an unpadded checkpoint is padded
    on load with its own rows unchanged."""
    from GradDotProd_LM.model import padded_vocab_size

    assert padded_vocab_size(50257) == 50304 and padded_vocab_size(50257, 1) == 50257
    assert padded_vocab_size(128, 64) == 128
    with pytest.raises(ValueError, match="vocab_pad_multiple=0"):
        padded_vocab_size(50257, 0)
    assert build_config("GPT2-Small").activation_function == "gelu_pytorch_tanh"
    unpadded = build_model("GPT2-Tiny", vocab_pad_multiple=1)
    assert unpadded.config.vocab_size == 50257
    unpadded.save_pretrained(tmp_path)
    padded = build_model("GPT2-Tiny", init_from=str(tmp_path))
    assert padded.config.vocab_size == 50304 and padded.lm_head.weight is padded.transformer.wte.weight
    assert torch.equal(padded.transformer.wte.weight[:50257], unpadded.transformer.wte.weight)
    x = torch.randint(0, 50257, (2, 8))
    with torch.no_grad():  # the real rows give the same logits; the padded rows only add columns
        torch.testing.assert_close(padded(input_ids=x).logits[..., :50257], unpadded(input_ids=x).logits)
