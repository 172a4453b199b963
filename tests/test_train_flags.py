"""Flags of the training app: bad input exits with code 2 and a message naming it, before anything runs."""
import json
import math
import os
import subprocess
import sys

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
    (["--batch_size", "six"], "--batch_size: must be a positive integer, got 'six'"),
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
    (["--replicate_degree", "2"], "--replicate_degree 2 needs --fsdp"),
    (["--fsdp", "--replicate_degree", "2"], "--replicate_degree 2 must divide the 1 processes"),
    (["--fsdp", "--value", "midpoint"], "--fsdp values first_order and adamw"),
    (["--fsdp", "--value", "first_order", "--compile"], "--fsdp with --compile is not supported"),
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


def error_line(err):
    """The one line of a usage error (after argparse's usage lines)."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.sh: error: "), err
    return last


@pytest.mark.parametrize("yaml_text, message", [
    ("grad_clip: false\n", ", key grad_clip: must be a number >= 0, got 'false' (false is a YAML boolean"),
    ("warmup_step: off\n", ", key warmup_step: must be an integer >= 0, got 'off' (off is a YAML boolean"),
    ("max_steps: yes\n", ", key max_steps: must be a positive integer, got 'yes'"),
    ("learning_rate: no\n", ", key learning_rate: must be a number >= 0, got 'no'"),
    ("batch_size: -3\n", ", key batch_size: must be a positive integer, got '-3'"),
    ("batch_size: 8.5\n", ", key batch_size: must be a positive integer, got '8.5'"),
    ("batch_size:\n", ", key batch_size: no value (null)"),
    ("seed: ~\n", ", key seed: no value (null)"),
    ("compile: maybe\n", ", key compile: a switch: write true or false, got 'maybe'"),
    ("seq_len: [32, 64]\n", ", key seq_len: takes one value, got a list"),
    ("train_domains: [Github, [ArXiv]]\n", ", key train_domains: takes a list of plain values"),
    ("optimizer: Adam\n", ", key optimizer: invalid choice: 'Adam'"),
    ("train_domains: {Github: 0}\n", ", key train_domains: 'Github:0': write every entry as Domain:weight"),
    ("batch_sise: 8\n", ": unknown key 'batch_sise'"),
    ("config: other.yaml\n", ": unknown key 'config'"),
    ("seq_len: 32\nseq-len: 48\n", ": key 'seq-len' is given twice"),
    ("- just\n- a list\n", ": expected a mapping"),
    ("seq_len: [\n", ": cannot read YAML"),
])
def test_bad_yaml_exits_2_naming_the_file_and_key(yaml_text, message, tmp_path, dirs, capsys):
    """A YAML value is read as its text after the flag (YAML 1.1's booleans false/off/yes/no included): a
    bad one exits 2 with one line naming the file and the key, before anything is written."""
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    assert main(["--config", str(config)] + dirs) == 2
    assert f"--config {config}{message}" in error_line(capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "results")


def test_a_yaml_value_that_breaks_a_rule_between_flags_names_the_file(tmp_path, dirs, capsys):
    config = tmp_path / "long.yaml"
    config.write_text("seq_len: 4096\n")
    assert main(["--config", str(config)] + dirs) == 2
    line = error_line(capsys.readouterr().err)
    assert "--seq_len 4096: must be between 2 and 1024" in line and f"seq_len from --config {config}" in line
    assert parse_config(["--config", str(config), "--seq_len", "64"] + dirs)["seq_len"] == 64  # the flag wins


def test_yaml_values_mean_what_the_same_text_means_after_the_flag(tmp_path, dirs):
    """Each YAML scalar gives the value its text gives on the command line (YAML 1.1 alone would read 010 as
    8 and off as false); a switch takes true/false, yes/no, on/off; null where the default is none is the
    default."""
    config = tmp_path / "run.yaml"
    config.write_text("architecture: GPT2-Tiny\nseed: 010\nlearning_rate: 6e-4\nmin_lr: 1.0e-5\ngrad_clip: 0\n"
                      "warmup_step: 0\nval_domain: 'off'\nrun_name: '-r'\ntrain_domains: {Github: 2, ArXiv: 1}\n"
                      "compile: off\ngrad_ckpt: yes\neval_only: True\nlr_decay_steps: null\n")
    flags = ["--architecture", "GPT2-Tiny", "--seed", "010", "--learning_rate", "6e-4", "--min_lr", "1.0e-5",
             "--grad_clip", "0", "--warmup_step", "0", "--val_domain", "off", "--run_name=-r",
             "--train_domains", "Github:2,ArXiv:1", "--grad_ckpt", "--eval_only"]
    from_yaml = parse_config(["--config", str(config)] + dirs)
    assert from_yaml == parse_config(flags + dirs)
    assert (from_yaml["seed"], from_yaml["grad_clip"], from_yaml["compile"]) == (10, 0.0, False)


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


def saved_run(tmp_path, dirs, run_name="r1", **flags):
    """A run directory holding the config.json the app saves for these flags (no training)."""
    extra = [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    saved = parse_config(dirs + ["--run_name", run_name, "--architecture", "GPT2-Tiny"] + extra)
    run_dir = tmp_path / "results" / run_name
    run_dir.mkdir(parents=True)
    return saved, run_dir / "config.json"


@pytest.mark.parametrize("change, message", [
    (dict(seq_len="32"), '{path}, key seq_len: "32" is a string, but seq_len must be an integer'),
    (dict(seq_len=None), "{path}, key seq_len: null, but seq_len must be an integer"),
    (dict(grad_clip=False), "{path}, key grad_clip: false is a boolean, but grad_clip must be a number"),
    (dict(batch_size=8.0), "{path}, key batch_size: 8.0 is a number, but batch_size must be an integer"),
    (dict(learning_rate=-1), "{path}, key learning_rate: must be a number >= 0, got '-1'"),
    (dict(warmup_step=float("nan")), "{path}, key warmup_step: NaN is a number, but warmup_step must be an "),
    (dict(architecture="GPT9"), "{path}, key architecture: invalid choice: 'GPT9'"),
    (dict(compile="false"), '{path}, key compile: "false" is a string, but compile must be true or false'),
    (dict(train_domains={"Github": 0}), "{path}, key train_domains: 'Github:0': write every entry as Domain:weight"),
    (dict(train_domains=["Github", 3]), "{path}, key train_domains: [\"Github\", 3] is a list, but train_domains must"),
    (dict(report_to="csv"), '{path}, key report_to: "csv" is a string, but report_to must be a list of sink names'),
    (dict(model_config={"n_layer": 2}), "{path}, key model_config: {\"n_layer\": 2} is an object, but model_config"),
    (dict(data_changes={}), "{path}, key data_changes: {} is not a list"),
    (dict(divergences=[3]), "{path}, key divergences: [3] is not a list of objects"),
    (dict(run_id=7), "{path}, key run_id: 7 is not a string"),
    # a rule between settings: the flag's message, and where the values came from
    (dict(seq_len=4096), "--seq_len 4096: must be between 2 and 1024 (GPT2-Tiny) (seq_len, architecture from {path}"),
])
def test_a_bad_value_in_config_json_stops_resume_naming_the_file_and_key(change, message, tmp_path, dirs, capsys):
    """A hand-edited or damaged config.json: --resume exits 2 with one line naming the file and the key
    (it crashed with a TypeError, or went on with the value), and the file is left as it was."""
    saved, path = saved_run(tmp_path, dirs, seq_len=64)
    path.write_text(json.dumps(dict(saved, **change)))
    before = path.read_bytes()
    assert main(dirs + ["--run_name", "r1", "--resume"]) == 2
    line = error_line(capsys.readouterr().err)
    assert message.replace("{path}", str(path)) in line, line
    assert path.read_bytes() == before and os.listdir(path.parent) == ["config.json"]


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "cannot read {path} (ValueError: not a JSON object but a list)"),
    ("{\"seq_len\": 64", "cannot read {path} (JSONDecodeError: "),
    ("{}", "{path} lacks the key(s) method, architecture, batch_size"),
    ("without seq_len", "{path} lacks the key(s) seq_len that the app always writes"),
])
def test_config_json_of_another_shape_stops_resume_naming_the_file(content, message, tmp_path, dirs, capsys):
    saved, path = saved_run(tmp_path, dirs)
    if content == "without seq_len":
        content = json.dumps({k: v for k, v in saved.items() if k != "seq_len"})
    path.write_text(content)
    assert main(dirs + ["--run_name", "r1", "--resume"]) == 2
    assert message.replace("{path}", str(path)) in error_line(capsys.readouterr().err)


def test_config_json_of_an_older_app_resumes_with_what_it_meant(tmp_path, dirs):
    """Keys the app wrote from its first version on must be there; a later one may be missing (the run
    predates it) and takes what such runs used."""
    saved, path = saved_run(tmp_path, dirs, seq_len=64)
    older = {k: v for k, v in saved.items() if k not in ("vocab_pad_multiple", "value", "attention", "report_to")}
    path.write_text(json.dumps(older))
    resumed = parse_config(dirs + ["--run_name", "r1", "--resume"])
    assert (resumed["vocab_pad_multiple"], resumed["value"], resumed["attention"]) == (1, "first_order", "standard")
    assert resumed["seq_len"] == 64 and resumed["report_to"] == []


def test_resume_continues_where_the_run_was_found(tmp_path, dirs, monkeypatch):
    """A run directory moved or renamed (config.json names the old place) is continued where it lies, found
    through --results_dir or the settings; before, a null results_dir crashed and another one was used."""
    saved, path = saved_run(tmp_path, dirs)
    path.write_text(json.dumps(dict(saved, results_dir=str(tmp_path / "moved-away"), run_name="old-name")))
    resumed = parse_config(dirs + ["--run_name", "r1", "--resume"])
    assert (resumed["results_dir"], resumed["run_name"]) == (str(tmp_path / "results"), "r1")
    path.write_text(json.dumps(dict(saved, results_dir=None)))
    monkeypatch.setenv("GRADDOTPROD_RESULTS_DIR", str(tmp_path / "results"))
    assert parse_config(dirs[:2] + ["--run_name", "r1", "--resume"])["results_dir"] == str(tmp_path / "results")


def test_a_real_run_with_a_bad_config_json_resumes_with_exit_2(data_dir, tmp_path):
    """A run of the app, its config.json edited to "seq_len": "32": `python -m GradDotProd_LM.train --resume`
    exits 2 naming the file and the key (it crashed with TypeError: '<' not supported ...) and leaves the
    run as it was."""
    flags = ["--architecture", "GPT2-Tiny", "--batch_size", "2", "--seq_len", "32", "--max_steps", "1",
             "--warmup_step", "0", "--eval_interval", "100", "--eval_iter", "1", "--eval_bs", "2",
             "--data_dir", data_dir, "--results_dir", str(tmp_path / "results"), "--run_name", "edited"]
    assert main(flags) == 0
    run_dir = tmp_path / "results" / "edited"
    config = run_dir / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), seq_len="32")))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"}
    resumed = subprocess.run([sys.executable, "-m", "GradDotProd_LM.train", *flags, "--resume", "--max_steps", "2"],
                             capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                             timeout=300)
    assert resumed.returncode == 2, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert f'{config}, key seq_len: "32" is a string, but seq_len must be an integer' in error_line(resumed.stderr)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != "run.lock"} == before


def test_the_flags_are_parsed_without_torch():
    """`-h`, a bad flag and a good one: GradDotProd_LM.args imports none of torch, transformers, numpy,
    pyarrow, pandas (so train.sh can answer before they load)."""
    script = """
import contextlib, io, sys
from GradDotProd_LM.args import parse_config
for argv in (["-h"], ["--batch_size", "0"], ["--architecture", "GPT2-Tiny", "--results_dir", "r"]):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            parse_config(argv)
    except SystemExit:
        pass
heavy = ("torch", "transformers", "numpy", "pyarrow", "pandas")
print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported {done.stdout}"


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
