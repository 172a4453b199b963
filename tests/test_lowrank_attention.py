"""Low-rank attention (GradDotProd_LM/lowrank_attention.py): equal to a plainly written per-query reference,
to transformers' causal attention when nothing is compressed, causal for every position, exact under the
engine, and usable in the app (step 1 = float64 autograd, resume continues exactly, bad flags exit 2)."""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch
from _models import VOCAB, lm_batch
from _reference import app_first_step_reference, as_recorded_at_step_1
from test_engine import check_against_reference
from test_train_families import B, BV, SEED, T, check_eval_only_and_report, flags

from ghost_results.results_io import read_run
from GradDotProd_LM import export, lowrank_attention, train
from GradDotProd_LM.lowrank_attention import LowRankCompression, lowrank_causal_attention
from GradDotProd_LM.model import build_model
from pile_tools import ensure_sample_dataset

TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=0, eos_token_id=0)


def naive_lowrank_attention(query, key, value, E, F, scaling):
    """One query at a time, written from the definition: the query at position t of block n = t // c sees
    the keys of block n up to t and the summaries E·K_m, F·V_m of every earlier block m, whose scores are
    raised by log(c/r); one softmax over both. query [H, T, D], key/value [Hkv, T, D] -> [H, T, D]."""
    H, T_, _ = query.shape
    r, c = E.shape
    out = torch.zeros_like(query)
    for h in range(H):
        kv = h // (H // key.shape[0])  # grouped-query attention
        for t in range(T_):
            n = t // c
            keys, values = [key[kv, n * c:t + 1]], [value[kv, n * c:t + 1]]
            bias = [torch.zeros(t + 1 - n * c, dtype=query.dtype)]
            for m in range(n):
                keys.append(E @ key[kv, m * c:(m + 1) * c])
                values.append(F @ value[kv, m * c:(m + 1) * c])
                bias.append(torch.full((r,), math.log(c / r), dtype=query.dtype))
            scores = torch.cat(keys) @ query[h, t] * scaling + torch.cat(bias)
            out[h, t] = torch.softmax(scores, dim=0) @ torch.cat(values)
    return out


def tiny_lowrank_llama(rank, block, random_maps=True, **overrides):
    model = build_model("Llama-Tiny", attention="lowrank", attention_rank=rank, attention_block=block,
                        **dict(TINY, **overrides))
    if random_maps:  # away from the segment-average start, so every summary weight matters
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LowRankCompression):
                    for linear in (module.key, module.value):
                        linear.weight.add_(0.3 * torch.randn_like(linear.weight))
    return model


@pytest.mark.parametrize("recompute", [True, False])
def test_equals_the_per_query_reference_with_gradients(recompute, monkeypatch):
    """T = 13 is not a multiple of c = 4 (padded), and 2 blocks a chunk make 2 chunks."""
    monkeypatch.setattr(lowrank_attention, "QUERIES_PER_CHUNK", 8)
    torch.manual_seed(0)
    H, KV, T_, D, r, c = 4, 2, 13, 3, 2, 4
    q = torch.randn(1, H, T_, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, KV, T_, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, KV, T_, D, dtype=torch.float64, requires_grad=True)
    compression = LowRankCompression(r, c, dtype=torch.float64)
    compression.recompute = recompute
    with torch.no_grad():
        compression.key.weight.copy_(torch.randn(r, c))
        compression.value.weight.copy_(torch.randn(r, c))
    got = lowrank_causal_attention(q, k, v, compression, 0.7)
    want = naive_lowrank_attention(q[0], k[0], v[0], compression.key.weight, compression.value.weight, 0.7)
    torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-12)

    cotangent = torch.randn_like(want)
    inputs = (q, k, v, compression.key.weight, compression.value.weight)
    got_grads = torch.autograd.grad((got[0] * cotangent).sum(), inputs)
    want_grads = torch.autograd.grad((want * cotangent).sum(), inputs)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_without_compression_it_is_transformers_causal_attention():
    """r = c: the default maps are the identity, the summaries are the keys themselves and log(c/r) = 0."""
    torch.manual_seed(1)
    standard = build_model("Llama-Tiny", **TINY).double()
    lowrank = copy.deepcopy(standard)
    lowrank_attention.add_lowrank_attention(lowrank, 5, 5)
    x = torch.randint(0, VOCAB, (2, 23))
    torch.testing.assert_close(lowrank(input_ids=x).logits, standard(input_ids=x).logits, rtol=1e-10, atol=1e-10)
    lowrank_attention.add_lowrank_attention(lowrank, 2, 5)  # compressed: no longer the same model
    assert not torch.allclose(lowrank(input_ids=x).logits, standard(input_ids=x).logits, atol=1e-3)


def test_no_position_sees_a_later_one():
    """Change every token after t: the logits up to t stay the same, those after t change. c = 5, T = 17:
    t on both sides of the block boundaries 5 and 10, and in the padded last block."""
    torch.manual_seed(2)
    model = tiny_lowrank_llama(rank=2, block=5).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, VOCAB, (2, 17), generator=g)
    logits = model(input_ids=x).logits
    for t in (0, 3, 4, 5, 9, 10, 11, 14, 15):
        changed = x.clone()
        changed[:, t + 1:] = (x[:, t + 1:] + 1 + torch.randint(0, VOCAB - 1, x[:, t + 1:].shape, generator=g)) % VOCAB
        other = model(input_ids=changed).logits
        torch.testing.assert_close(other[:, :t + 1], logits[:, :t + 1], rtol=0, atol=1e-12, msg=f"t={t}")
        assert (other[:, t + 1:] - logits[:, t + 1:]).abs().amax() > 1e-3, t


@pytest.mark.parametrize("layer_checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_engine_is_exact_on_a_lowrank_llama(layer_checkpointing, monkeypatch):
    """The engine (E, F included) against float64 torch.func per-sample gradients; T = 14 with c = 4 pads
    the last block, and 2 blocks a chunk make 2 chunks. grad-ckpt: the app's --grad_ckpt around it."""
    monkeypatch.setattr(lowrank_attention, "QUERIES_PER_CHUNK", 8)
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    model = tiny_lowrank_llama(rank=2, block=4)
    X, Y = lm_batch(3, 14, g, pad_row=0)
    Xv, Yv = lm_batch(2, 14, g)
    reference_model = copy.deepcopy(model).double()
    if layer_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in reference_model.modules():
        if isinstance(module, LowRankCompression):
            module.recompute = False  # torch.func does not support checkpointing; the engine run keeps it
    result, _, _ = check_against_reference(model, X, Y, Xv, Yv, reference_model=reference_model)
    assert any(".lowrank.key." in name for name in result.per_parameter)


def test_masks_it_cannot_honour_raise():
    torch.manual_seed(4)
    model = tiny_lowrank_llama(rank=2, block=4)
    x = torch.randint(0, VOCAB, (2, 10))
    plain = model(input_ids=x).logits
    torch.testing.assert_close(model(input_ids=x, attention_mask=torch.ones_like(x)).logits, plain)
    padded = torch.ones_like(x)
    padded[0, 7:] = 0
    with pytest.raises(ValueError, match="padding mask"):
        model(input_ids=x, attention_mask=padded)
    with pytest.raises(ValueError, match="attention mask"):
        model(input_ids=x, attention_mask=torch.ones(2, 1, 10, 10, dtype=torch.bool))
    first = model(input_ids=x, use_cache=True)
    with pytest.raises(ValueError, match="KV cache"):  # incremental generation
        model(input_ids=x[:, :1], past_key_values=first.past_key_values, use_cache=True)
    packed = torch.cat([torch.arange(6), torch.arange(4)])[None]  # two sequences in one row
    with pytest.raises(ValueError, match="packed sequences"):
        model(input_ids=x, position_ids=packed)
    compiled = torch.compile(model, backend="eager")  # transformers cannot detect packing while tracing
    torch.testing.assert_close(compiled(input_ids=x).logits, plain)
    with pytest.raises(RuntimeError, match="packed"):
        compiled(input_ids=x, position_ids=packed)
    with pytest.raises(ValueError, match="Llama family"):
        build_model("GPT2-Tiny", attention="lowrank")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return ensure_sample_dataset(str(tmp_path_factory.mktemp("sample")))


LOWRANK_FLAGS = ("--architecture", "Llama-Tiny", "--attention", "lowrank", "--attention_rank", "2",
                 "--attention_block", "8")


def test_app_run_is_exact_resumes_evaluates_and_refuses_export(data_dir, tmp_path, capsys):
    results = str(tmp_path / "results")
    assert train.main(flags(data_dir, results, "full", *LOWRANK_FLAGS)) == 0
    torch.manual_seed(SEED)
    model = build_model("Llama-Tiny", attention="lowrank", attention_rank=2, attention_block=8).double()
    expected, _, val_loss = app_first_step_reference(model, data_dir, SEED, B, T, BV)
    run = read_run(os.path.join(results, "full"), strict=True)
    cols, first = run.columns, run.columns["step"] == 1
    expected = as_recorded_at_step_1(expected, run)  # the default under AdamW, adamw
    np.testing.assert_allclose(cols["dot_products"][first], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(cols["val_loss"][first], val_loss, rtol=1e-5)
    with open(os.path.join(results, "full", "config.json")) as f:
        saved = json.load(f)
    assert (saved["attention"], saved["attention_rank"], saved["attention_block"]) == ("lowrank", 2, 8)

    assert train.main(flags(data_dir, results, "split", *LOWRANK_FLAGS, "--max_steps", "2")) == 0
    assert train.main(flags(data_dir, results, "split", "--resume", "--attention_rank", "4")) == 2
    assert "--attention_rank differ from the saved run" in capsys.readouterr().err
    assert train.main(flags(data_dir, results, "split", "--resume", "--max_steps", "3")) == 0
    split = read_run(os.path.join(results, "split"), strict=True)
    assert split.missing_steps == [] and split.duplicate_steps == []
    np.testing.assert_allclose(split.columns["dot_products"], cols["dot_products"], rtol=1e-5,
                               atol=1e-6 * np.abs(cols["dot_products"]).max())
    check_eval_only_and_report(data_dir, os.path.join(results, "split"), str(tmp_path / "report"))

    with pytest.raises(SystemExit) as exit_info:
        export.main([os.path.join(results, "split"), "--out", str(tmp_path / "hf")])
    assert exit_info.value.code == 2 and "--attention lowrank" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf")
    # graddotprod-attribute rebuilds the run's model as it trained: low-rank attention, the checkpoint's weights
    from GradDotProd_LM import attribute
    from GradDotProd_LM.lowrank_attention import LowRankCompression

    model, origin = attribute.load_model(os.path.join(results, "split"))
    assert origin["step"] == 3 and any(isinstance(m, LowRankCompression) for m in model.modules())
    saved = torch.load(os.path.join(results, "split", "checkpoints", "latest.pt"), weights_only=True)["model"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("extra, message", [
    (("--architecture", "GPT2-Tiny", "--attention", "lowrank"), "--attention lowrank: available for the Llama"),
    (("--architecture", "Pythia-14M", "--attention", "lowrank"), "--attention lowrank: available for the Llama"),
    (("--architecture", "Llama-Tiny", "--attention_rank", "4"), "--attention_rank applies to --attention lowrank"),
    (("--architecture", "Llama-Tiny", "--attention", "lowrank", "--attention_rank", "9", "--attention_block", "8"),
     "--attention_rank 9 must not exceed --attention_block 8"),
], ids=["gpt2", "pythia", "rank-without-lowrank", "rank-above-block"])
def test_bad_attention_flags_exit_2(extra, message, data_dir, tmp_path, capsys):
    assert train.main(flags(data_dir, str(tmp_path / "results"), "bad", *extra)) == 2
    assert message in capsys.readouterr().err
