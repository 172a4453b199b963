"""`python -m GradDotProd_LM.export`: a trained run's checkpoint loads offline with transformers' Auto classes
and gives the app model's logits on GPT-2's real vocabulary; the tokenizer written beside it encodes and
decodes exactly as pile_tools' tokenizer."""
import json
import os
import shutil

import pytest
import torch
from test_train_runs import tiny_flags
from transformers import AutoModelForCausalLM, AutoTokenizer

from GradDotProd_LM import export, train
from GradDotProd_LM.checkpoint import load_checkpoint
from GradDotProd_LM.model import GPT2_VOCAB_SIZE, build_model
from pile_tools import ensure_sample_dataset
from pile_tools.tokenizer import load_gpt2_tokenizer

STEPS = 2
TEXT = ("Hello world! It's 2024: naïve café, 日本語 and emoji 🙂.\n\n\tdef f(x):\n        return x ** 2  \n"
        "  they'll've   spaces\r\nDM Mathematics: Let q = -3 + 5. Solve 2*a = q for a.")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    data_dir = ensure_sample_dataset(str(tmp_path_factory.mktemp("sample")))
    results_dir = str(tmp_path_factory.mktemp("results"))
    assert train.main(tiny_flags(data_dir, results_dir, "tiny", "--max_steps", str(STEPS))) == 0
    return os.path.join(results_dir, "tiny")


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "hf-tiny")
    assert export.main([run_dir, "--out", out, "--step", str(STEPS)]) == 0
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_exported_model_gives_the_app_models_logits(run_dir, exported):
    state = load_checkpoint(run_dir)
    app = build_model("GPT2-Tiny", vocab_pad_multiple=state["config"]["vocab_pad_multiple"])
    app.load_state_dict(state["model"])
    app.eval()
    assert app.config.vocab_size > GPT2_VOCAB_SIZE  # the run trained a padded head

    hf = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True)
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.vocab_size == GPT2_VOCAB_SIZE
    assert hf.dtype == torch.float32
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, GPT2_VOCAB_SIZE, (3, 24), generator=generator)
    ids[0, :3] = torch.tensor([0, GPT2_VOCAB_SIZE - 2, GPT2_VOCAB_SIZE - 1])  # both ends of the vocabulary
    with torch.no_grad():
        expected = app(input_ids=ids).logits[..., :GPT2_VOCAB_SIZE]
        got = hf(input_ids=ids).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    with open(os.path.join(exported, "graddotprod_export.json")) as f:
        info = json.load(f)
    assert info["step"] == STEPS and info["padded_vocab_rows"] == app.config.vocab_size


def test_exported_tokenizer_matches_pile_tools(exported):
    reference = load_gpt2_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    expected = reference.encode(TEXT)
    assert tokenizer(TEXT)["input_ids"] == expected
    assert tokenizer.decode(expected) == TEXT == reference.decode(expected)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token_id == reference.eot_id == GPT2_VOCAB_SIZE - 1
    assert len(tokenizer) == GPT2_VOCAB_SIZE


def test_unkept_step_and_unknown_run_exit_2(run_dir, exported, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main([run_dir, "--out", str(tmp_path / "a"), "--step", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--step 1" in err and f"step {STEPS} (checkpoints/latest.pt)" in err
    assert not (tmp_path / "a").exists()

    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path / "no-such-run"), "--out", str(tmp_path / "b")])
    assert exit_info.value.code == 2 and "no-such-run" in capsys.readouterr().err


def test_existing_output_needs_overwrite(run_dir, exported, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        export.main([run_dir, "--out", str(out)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]

    # --overwrite replaces an earlier export only: a directory of the user's own files is kept
    with pytest.raises(SystemExit) as exit_info:
        export.main([run_dir, "--out", str(out), "--overwrite"])
    assert exit_info.value.code == 2 and "not an earlier export" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]

    earlier = tmp_path / "earlier"
    shutil.copytree(exported, earlier)
    assert export.main([run_dir, "--out", str(earlier), "--overwrite"]) == 0
    assert sorted(os.listdir(earlier)) == sorted(os.listdir(exported))
    assert sorted(os.listdir(tmp_path)) == ["earlier", "model"]  # no temporary directory left beside them


def test_run_name_resolves_under_the_results_directory(run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADDOTPROD_RESULTS_DIR", os.path.dirname(run_dir))
    monkeypatch.chdir(tmp_path)
    assert export.resolve_run_dir(os.path.basename(run_dir)) == run_dir
    assert export.resolve_run_dir("no-such-run") is None


def test_unreadable_checkpoint_exits_2_naming_it(tmp_path, capsys):
    checkpoint = tmp_path / "run" / "checkpoints" / "latest.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and str(checkpoint) in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["run"]


@pytest.mark.parametrize("architecture", ["Llama-Tiny", "Pythia-14M"])
def test_llama_and_pythia_runs_export_with_their_logits(architecture, tmp_path):
    """Tied (Llama sizes) and untied (Pythia) heads: the exported model is the family's own class and gives
    the app model's logits on the real vocabulary."""
    data_dir = ensure_sample_dataset(str(tmp_path / "sample"))
    results = str(tmp_path / "results")
    assert train.main(tiny_flags(data_dir, results, "fam", "--max_steps", "1", "--checkpoint_interval", "1",
                                 "--architecture", architecture)) == 0
    out = str(tmp_path / "hf")
    assert export.main([os.path.join(results, "fam"), "--out", out]) == 0
    state = load_checkpoint(os.path.join(results, "fam"))
    app = build_model(architecture)
    app.load_state_dict(state["model"])
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(hf) is type(app) and hf.config.vocab_size == GPT2_VOCAB_SIZE
    ids = torch.randint(0, GPT2_VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(input_ids=ids).logits,
                                   app.eval()(input_ids=ids).logits[..., :GPT2_VOCAB_SIZE], rtol=0, atol=1e-5)


def test_every_exported_file_has_the_mode_open_gives(run_dir, tmp_path):
    """Under umask 0o027 every file of the model directory has the mode plain open() gives (0o640; safetensors
    writes model.safetensors 0o600 by itself) and the directory os.mkdir's (0o750)."""
    old = os.umask(0o027)
    try:
        with open(tmp_path / "plain", "wb"):
            pass
        os.mkdir(tmp_path / "plain_dir")
        out = tmp_path / "model"
        assert export.main([run_dir, "--out", str(out)]) == 0
    finally:
        os.umask(old)
    file_mode = os.stat(tmp_path / "plain").st_mode & 0o7777
    modes = {name: os.stat(out / name).st_mode & 0o7777 for name in os.listdir(out)}
    assert "model.safetensors" in modes and set(modes.values()) == {file_mode} == {0o640}, modes
    assert os.stat(out).st_mode & 0o7777 == os.stat(tmp_path / "plain_dir").st_mode & 0o7777 == 0o750
