"""Flags of the training app: bad input exits with code 2 and a message naming it, before anything runs."""
import json
import math
import os
import subprocess

import pytest

from GradDotProd_LM.args import parse_config
from GradDotProd_LM.train import main
from GradDotProd_LM.training import lr_at

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def dirs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    return ["--data_dir", str(data), "--results_dir", str(tmp_path / "results")]


@pytest.mark.parametrize("flags, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--method", "Shapley"], "--method: invalid choice: 'Shapley'"),
    (["--architecture", "GPT2-XL"], "--architecture: invalid choice"),
    (["--batch_size", "0"], "--batch_size: must be a positive integer"),
    (["--batch_size", "six"], "--batch_size: invalid"),
    (["--batch_size", "6", "--grad_accum", "4"], "--batch_size 6 must be divisible"),
    (["--learning_rate", "1e-4", "--min_lr", "1e-3"], "--min_lr 0.001 must not exceed"),
    (["--seq_len", "4096"], "--seq_len 4096: must be between 2 and 1024"),
    (["--train_domains", "Github:x"], "Domain:weight"),
    (["--method", "GradDotProd", "--val_batch_size", "0"], "--val_batch_size must be >= 1"),
    (["--data_dir", "/nonexistent/pile"], "--data_dir /nonexistent/pile: no such directory"),
    (["--resume", "--run_name", "never-ran"], "--resume: no run at"),
    (["--vocab_pad_multiple", "0"], "--vocab_pad_multiple: must be a positive integer"),
    (["--max_step", "5"], "unrecognized arguments: --max_step 5"),  # no prefix matching
    (["--run_name", "r" * 300], "--run_name is 300 bytes long"),
    (["--report_to", "csv,mlflow"], "--report_to: mlflow: choose from none or a comma-separated list of csv"),
    (["--report_to", "none,csv"], "none cannot be combined"),
    (["--results_format", "hdf5"], "--results_format: invalid choice: 'hdf5'"),
])
def test_bad_flags_exit_2_naming_the_flag(flags, message, dirs, capsys, tmp_path):
    results_before = os.path.exists(tmp_path / "results")
    assert main(dirs + flags) == 2
    assert message in capsys.readouterr().err
    assert os.path.exists(tmp_path / "results") == results_before  # nothing was started or written


def test_help_exits_0(capsys):
    assert main(["-h"]) == 0
    out = capsys.readouterr().out
    for flag in ("--method", "--dot_prod_save_interval", "--val_domain", "--config", "--grad_ckpt"):
        assert flag in out


def test_yaml_values_are_overridden_by_flags(tmp_path, dirs):
    config = tmp_path / "run.yaml"
    config.write_text("architecture: GPT2-Tiny\nbatch_size: 8\nmax_steps: 20\ntrain_domains: [Github, ArXiv]\n"
                      "compile: false\n")
    cfg = parse_config(["--config", str(config), "--max_steps", "5"] + dirs)
    assert (cfg["architecture"], cfg["batch_size"], cfg["max_steps"]) == ("GPT2-Tiny", 8, 5)
    assert cfg["train_domains"] == ["Github", "ArXiv"] and cfg["compile"] is False
    assert cfg["lr_decay_steps"] == 5 and cfg["run_name"] == "GradDotProd-GPT2-Tiny-bs8-seq1024-seed42"


@pytest.mark.parametrize("yaml_text, message", [
    ("batch_sise: 8\n", "unknown key 'batch_sise'"),
    ("batch_size: -3\n", "--batch_size: must be a positive integer"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_bad_yaml_exits_2(yaml_text, message, tmp_path, dirs, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    assert main(["--config", str(config)] + dirs) == 2
    assert message in capsys.readouterr().err


def test_existing_run_needs_resume_and_keeps_its_identity(tmp_path, dirs, capsys):
    run_dir = tmp_path / "results" / "r1"
    run_dir.mkdir(parents=True)
    saved = parse_config(dirs + ["--run_name", "r1", "--batch_size", "8"])
    (run_dir / "config.json").write_text(json.dumps(saved))
    assert main(dirs + ["--run_name", "r1", "--batch_size", "8"]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert main(dirs + ["--run_name", "r1", "--resume", "--batch_size", "16"]) == 2
    assert "--batch_size differ from the saved run" in capsys.readouterr().err
    resumed = parse_config(dirs + ["--run_name", "r1", "--resume", "--max_steps", "20000"])
    assert resumed["batch_size"] == 8 and resumed["max_steps"] == 20000
    assert resumed["lr_decay_steps"] == saved["lr_decay_steps"]  # extending a run keeps its schedule


def test_vocabulary_padding_is_part_of_a_runs_identity(tmp_path, dirs, capsys):
    """New runs pad to 64 unless told; a run saved before the flag existed resumes unpadded."""
    assert parse_config(dirs + ["--run_name", "new"])["vocab_pad_multiple"] == 64
    run_dir = tmp_path / "results" / "old"
    run_dir.mkdir(parents=True)
    saved = parse_config(dirs + ["--run_name", "old"])
    del saved["vocab_pad_multiple"]
    (run_dir / "config.json").write_text(json.dumps(saved))
    assert parse_config(dirs + ["--run_name", "old", "--resume"])["vocab_pad_multiple"] == 1
    assert main(dirs + ["--run_name", "old", "--resume", "--vocab_pad_multiple", "64"]) == 2
    assert "--vocab_pad_multiple differ from the saved run" in capsys.readouterr().err


def test_unknown_domain_is_a_usage_error(data_dir, tmp_path, capsys):
    flags = ["--architecture", "GPT2-Tiny", "--data_dir", data_dir, "--results_dir", str(tmp_path / "r"),
             "--val_domain", "Nonexistent Domain"]
    assert main(flags) == 2
    assert "Nonexistent Domain" in capsys.readouterr().err


def test_learning_rate_schedule():
    cfg = {"learning_rate": 1.0, "min_lr": 0.1, "warmup_step": 10, "lr_decay_steps": 110}
    assert lr_at(1, cfg) == pytest.approx(0.1) and lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    assert lr_at(1, dict(cfg, warmup_step=0)) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 110)))


def test_train_sh_rejects_bad_flags_with_exit_2():
    for flags in (["--nproc_per_node", "two"], ["--nproc_per_node", "2", "--batch_size", "3"]):
        result = subprocess.run([os.path.join(REPO, "train.sh"), *flags], capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert "error" in result.stderr


@pytest.mark.parametrize("short_split", ["train", "validation", "test"])
def test_a_too_short_domain_is_a_start_up_error(tmp_path, capsys, short_split):
    """A domain shorter than seq_len + 1 tokens in the train, validation or test split: exit 2 naming the split
    and the domain before any step, and nothing left behind (the same command works once the data is fixed)."""
    import zstandard

    from pile_tools.jsonl_io import ShardSource
    from pile_tools.tokenize_corpus import tokenize_sources

    def shard(path, docs):
        lines = "".join(json.dumps({"text": t, "meta": {"pile_set_name": d}}) + "\n" for d, t in docs)
        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
        return ShardSource(str(path))

    long_docs = [("Alpha", f"def f{i}():\n    return {i}\n" * 8) for i in range(30)]
    data = str(tmp_path / "tok")
    for split in ("train", "validation", "test"):
        docs = long_docs + [("Beta", "too short")] if split == short_split else long_docs
        tokenize_sources([shard(tmp_path / f"{split}.jsonl.zst", docs)], data, split=split, progress=False)
    results = tmp_path / "r"
    flags = ["--architecture", "GPT2-Tiny", "--data_dir", data, "--results_dir", str(results), "--seq_len", "32",
             "--batch_size", "2", "--max_steps", "2", "--run_name", "short"]
    if short_split == "validation":
        flags += ["--val_domain", "Beta"]  # the validation rows come from one domain
    assert main(flags) == 2
    err = capsys.readouterr().err
    too_short = "windows of 33 tokens" if short_split == "validation" else "seq_len+1=33"
    assert f"split '{short_split}'" in err and "Beta" in err and too_short in err, err
    assert not os.path.exists(results / "short")


def test_an_unusable_results_dir_is_a_usage_error(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_request:
        parse_config(["--data_dir", str(data), "--results_dir", str(a_file)])
    assert exit_request.value.code == 2 and "exists and is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_request:  # a directory that cannot be created, whoever runs this
        parse_config(["--data_dir", str(data), "--results_dir", str(a_file / "results")])
    assert exit_request.value.code == 2
    assert f"--results_dir {a_file / 'results'}: {a_file} is a file, not a directory" in capsys.readouterr().err


def test_a_read_only_results_dir_is_a_usage_error(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): no read-only directory to test")
        with pytest.raises(SystemExit):
            parse_config(["--data_dir", str(data), "--results_dir", str(read_only / "results")])
        assert "is not writable" in capsys.readouterr().err
    finally:
        read_only.chmod(0o755)
