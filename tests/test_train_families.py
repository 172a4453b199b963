"""The app trains the Llama-style and Pythia sizes and any causal-LM config.json like GPT-2: step 1's dot
products equal float64 plain autograd on the rebuilt initial weights, resume continues exactly, eval-only
and the report work; bad --model_config files are usage errors."""
import json
import os

import numpy as np
import pytest
import torch

from _reference import app_first_step_reference
from ghost_results import report
from ghost_results.results_io import load_run
from GradDotProd_LM import train
from GradDotProd_LM.model import (LLAMA_ARCHITECTURES, MODEL_ARCHITECTURES, PYTHIA_ARCHITECTURES, build_model,
                                  count_parameters)
from pile_tools import ensure_sample_dataset

SEED, B, T, BV = 5, 4, 24, 2
LLAMA_JSON = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False, rms_norm_eps=1e-5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return ensure_sample_dataset(str(tmp_path_factory.mktemp("sample")))


def flags(data_dir, results_dir, run_name, *extra):
    return ["--batch_size", str(B), "--seq_len", str(T), "--val_batch_size", str(BV), "--max_steps", "3",
            "--warmup_step", "1", "--lr_decay_steps", "3", "--learning_rate", "1e-3", "--min_lr", "1e-4", "--eval_interval", "3",
            "--eval_iter", "1", "--eval_bs", "2", "--dot_prod_save_interval", "1", "--checkpoint_interval", "2",
            "--seed", str(SEED), "--data_dir", data_dir, "--results_dir", results_dir, "--run_name", run_name,
            *extra]


def test_sizes_are_what_their_names_say():
    for name in MODEL_ARCHITECTURES:
        with torch.device("meta"):
            model = build_model(name)
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert tied == (name not in PYTHIA_ARCHITECTURES), name
        assert model.config.vocab_size == 50304
        size = name.split("-")[1]
        if size[-1] in "MB":
            stated = float(size[:-1]) * (1e6 if size[-1] == "M" else 1e9)
            assert 0.85 * stated <= count_parameters(model) <= 1.1 * stated, (name, count_parameters(model))
    llama = build_model("Llama-Tiny")
    assert type(llama).__name__ == "LlamaForCausalLM" and llama.config.num_key_value_heads == 2
    assert set(LLAMA_ARCHITECTURES) & set(PYTHIA_ARCHITECTURES) == set()


@pytest.mark.parametrize("model_flags", [("--architecture", "Llama-Tiny"), ("--architecture", "Pythia-14M"),
                                         ("--model_config", "LLAMA_JSON")], ids=["llama", "pythia", "config-json"])
def test_first_step_is_exact_and_resume_continues(model_flags, data_dir, tmp_path):
    results = str(tmp_path / "results")
    if model_flags[1] == "LLAMA_JSON":
        path = tmp_path / "config.json"
        path.write_text(json.dumps(LLAMA_JSON))
        model_flags = ("--model_config", str(path))
    assert train.main(flags(data_dir, results, "full", *model_flags)) == 0
    torch.manual_seed(SEED)
    model = (build_model(model_flags[1]) if model_flags[0] == "--architecture"
             else build_model(None, model_config=LLAMA_JSON)).double()
    expected, train_losses, val_loss = app_first_step_reference(model, data_dir, SEED, B, T, BV)
    cols = load_run(os.path.join(results, "full"), strict=True).columns
    first = cols["step"] == 1
    np.testing.assert_allclose(cols["dot_products"][first], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(cols["val_loss"][first], val_loss, rtol=1e-5)

    # 2 steps, checkpoint at 2, then --resume to 3: the same numbers as the uninterrupted run
    assert train.main(flags(data_dir, results, "split", *model_flags, "--max_steps", "2")) == 0
    assert train.main(flags(data_dir, results, "split", "--resume", "--max_steps", "3")) == 0
    split = load_run(os.path.join(results, "split"), strict=True)
    assert split.missing_steps == [] and split.duplicate_steps == []
    np.testing.assert_allclose(split.columns["dot_products"], cols["dot_products"], rtol=1e-5,
                               atol=1e-6 * np.abs(cols["dot_products"]).max())
    assert train.main(flags(data_dir, results, "split", "--resume", "--eval_only")) == 0
    with open(os.path.join(results, "split", "config.json")) as f:
        saved = json.load(f)
    assert saved["model_config"] == (LLAMA_JSON if model_flags[0] == "--model_config" else None)
    out = str(tmp_path / "report")
    assert report.main([os.path.join(results, "split"), "--out", out]) == 0
    with open(os.path.join(out, "report.md")) as f:
        assert "Complete: steps 1..3" in f.read()


def test_bad_model_configs_are_usage_errors(data_dir, tmp_path, capsys):
    results = str(tmp_path / "results")
    cases = {"not json": "{", "no model_type": json.dumps({"hidden_size": 8}),
             "unknown model_type": json.dumps({"model_type": "no-such-model"})}
    for i, (case, text) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.json"
        path.write_text(text)
        assert train.main(flags(data_dir, results, f"bad{i}", "--model_config", str(path))) == 2, case
        assert str(path) in capsys.readouterr().err, case
    path = tmp_path / "small-vocab.json"
    path.write_text(json.dumps(dict(LLAMA_JSON, vocab_size=1000)))
    assert train.main(flags(data_dir, results, "small", "--model_config", str(path))) == 2
    assert "--model_config has vocab_size 1000, fewer than the data's 50257 token ids" in capsys.readouterr().err
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(LLAMA_JSON))
    assert train.main(flags(data_dir, results, "both", "--model_config", str(path), "--architecture",
                            "Llama-Tiny")) == 2
    assert "give one" in capsys.readouterr().err
    # GPT-2's learned positions stop at 1024; the RoPE sizes take 2048
    assert train.main(flags(data_dir, results, "long", "--architecture", "GPT2-Tiny", "--seq_len", "2048")) == 2
    assert "--seq_len 2048: must be between 2 and 1024 (GPT2-Tiny)" in capsys.readouterr().err
