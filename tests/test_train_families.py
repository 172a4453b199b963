"""The app trains the Llama-style and Pythia sizes and any causal-LM config.json like GPT-2: step 1's dot
products equal float64 plain autograd on the rebuilt initial weights, resume continues exactly, eval-only
and the report work; bad --model_config files are usage errors."""
import json
import os

import numpy as np
import pytest
import torch

from _reference import app_first_step_reference, as_recorded_at_step_1
from ghost_results import report
from ghost_results.results_io import read_run
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


def check_first_step(data_dir, run_dir, architecture, model_config=None):
    """Step 1's dot products and validation loss against float64 autograd on the rebuilt initial weights (the
    run records the default estimator under AdamW, adamw: at step 1 lr/eps times first order)."""
    torch.manual_seed(SEED)
    model = build_model(architecture, model_config=model_config).double()
    expected, _, val_loss = app_first_step_reference(model, data_dir, SEED, B, T, BV)
    run = read_run(run_dir, strict=True)
    cols = run.columns
    first = cols["step"] == 1
    assert run.value == "adamw"
    expected = as_recorded_at_step_1(expected, run)
    np.testing.assert_allclose(cols["dot_products"][first], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(cols["val_loss"][first], val_loss, rtol=1e-5)
    return cols


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
    cols = check_first_step(data_dir, os.path.join(results, "full"), model_flags[1] if model_flags[0] == "--architecture"
                            else None, LLAMA_JSON if model_flags[0] == "--model_config" else None)

    # 2 steps, checkpoint at 2, then --resume to 3: the same numbers as the uninterrupted run
    assert train.main(flags(data_dir, results, "split", *model_flags, "--max_steps", "2")) == 0
    assert train.main(flags(data_dir, results, "split", "--resume", "--max_steps", "3")) == 0
    split = read_run(os.path.join(results, "split"), strict=True)
    assert split.missing_steps == [] and split.duplicate_steps == []
    np.testing.assert_allclose(split.columns["dot_products"], cols["dot_products"], rtol=1e-5,
                               atol=1e-6 * np.abs(cols["dot_products"]).max())
    with open(os.path.join(results, "split", "config.json")) as f:
        saved = json.load(f)
    assert saved["model_config"] == (LLAMA_JSON if model_flags[0] == "--model_config" else None)
    check_eval_only_and_report(data_dir, os.path.join(results, "split"), str(tmp_path / "report"))


def check_eval_only_and_report(data_dir, run_dir, report_dir):
    """A finished 3-step run (evaluated at step 3): --resume --eval_only rebuilds the model from the saved
    run and reproduces that evaluation; the report reads the run as complete."""
    results, run_name = os.path.split(run_dir)
    assert train.main(flags(data_dir, results, run_name, "--resume", "--eval_only")) == 0
    with open(os.path.join(run_dir, "eval_only_step_000003.json")) as f:
        evaluated = json.load(f)["eval"]
    with open(os.path.join(run_dir, "training_log.json")) as f:
        logged = json.load(f)["evals"][-1]
    for split in ("train", "validation", "test"):
        assert evaluated[split]["loss"] == pytest.approx(logged[split]["loss"], rel=1e-5), split
    assert report.main([run_dir, "--out", report_dir]) == 0
    with open(os.path.join(report_dir, "report.md")) as f:
        assert "Complete: steps 1..3" in f.read()


# one tiny config.json per family the engine has rules for (docs/MODELS.md); no vocab_size: GPT-2's, padded
DECODER_JSON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64)
FAMILY_JSONS = {
    "mistral": dict(DECODER_JSON, model_type="mistral", head_dim=8, tie_word_embeddings=False),
    "qwen2": dict(DECODER_JSON, model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(DECODER_JSON, model_type="qwen3", head_dim=8, tie_word_embeddings=False),
    "phi3": dict(DECODER_JSON, model_type="phi3", tie_word_embeddings=False),
    "olmo2": dict(DECODER_JSON, model_type="olmo2", tie_word_embeddings=False),
    "gemma": dict(DECODER_JSON, model_type="gemma", head_dim=8),  # tied, its default
    "gemma2": dict(DECODER_JSON, model_type="gemma2", head_dim=8),  # no SDPA in transformers: eager attention
    "gemma3_text": dict(DECODER_JSON, model_type="gemma3_text", head_dim=8),
    "gpt_neox": dict(DECODER_JSON, model_type="gpt_neox"),  # untied, its default
    # dropout 0.1 by default in OPT's and GPT-2's configs: the app sets it to 0
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32, max_position_embeddings=64),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=False),
}


@pytest.mark.parametrize("family", list(FAMILY_JSONS))
def test_model_config_of_each_family_trains_exactly(family, data_dir, tmp_path):
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps(FAMILY_JSONS[family]))
    results = str(tmp_path / "results")
    assert train.main(flags(data_dir, results, family, "--model_config", str(path), "--max_steps", "1")) == 0
    check_first_step(data_dir, os.path.join(results, family), None, FAMILY_JSONS[family])


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
