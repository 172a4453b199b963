"""Short GPT2-Tiny runs of the training app on the bundled sample, checked against independent references:
plain autograd per-sample gradients, a Regular run, micro-batching, a crash + resume, eval-only, and the
faults of a run directory: an exception in the loop, divergence, a missing checkpoint, a second launch."""
import json
import os

import numpy as np
import pytest
import torch

from _reference import app_first_step_reference, as_recorded_at_step_1
from ghost_results.results_io import read_run, safe_load_pickle
from GradDotProd_LM import train, training
from GradDotProd_LM.model import build_model
from ghost_results.run_directory import read_json
from pile_tools.reader import PileReader

SEED, B, T, BV, STEPS = 42, 4, 32, 2, 6


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("results"))


def tiny_flags(data_dir, results_dir, run_name, *extra):
    return ["--architecture", "GPT2-Tiny", "--batch_size", str(B), "--seq_len", str(T),
            "--val_batch_size", str(BV), "--max_steps", str(STEPS), "--warmup_step", "2",
            "--learning_rate", "1e-3", "--min_lr", "1e-4", "--eval_interval", "3", "--eval_iter", "1",
            "--eval_bs", "2", "--dot_prod_save_interval", "2", "--seed", str(SEED),
            "--data_dir", data_dir, "--results_dir", results_dir, "--run_name", run_name, *extra]


def step_losses(run_dir):
    with open(os.path.join(run_dir, "training_log.json")) as f:
        return np.array([r["loss"] for r in json.load(f)["steps"]])


@pytest.fixture(scope="module")
def baseline(data_dir, results_dir):
    assert train.main(tiny_flags(data_dir, results_dir, "baseline")) == 0
    return os.path.join(results_dir, "baseline")


def test_run_directory_is_complete_and_loadable(baseline, data_dir):
    assert sorted(os.listdir(os.path.join(baseline, "grad_dotprods"))) == [  # --results_format parquet
        f"iter_{step:06d}.parquet" for step in (2, 4, 6)]
    run = read_run(baseline, strict=True)
    cols = run.columns
    assert run.missing_steps == [] and run.duplicate_steps == [] and run.skipped == []
    np.testing.assert_array_equal(cols["step"], np.repeat(np.arange(1, STEPS + 1), B))
    np.testing.assert_array_equal(cols["sample_index"], np.tile(np.arange(B), STEPS))
    np.testing.assert_array_equal(cols["token_count"], T - 1)  # labels = inputs, one shift inside the model
    np.testing.assert_allclose(cols["batch_weight"], 1.0 / B)
    reader = PileReader(data_dir, split="train", seed=SEED)
    for step in (1, STEPS):  # provenance names the exact window that was trained on
        batch = reader.get_batch(step, B, T)
        rows = cols["step"] == step
        assert list(cols["domain"][rows]) == batch.domain
        np.testing.assert_array_equal(cols["token_offset"][rows], batch.token_offset)
        np.testing.assert_array_equal(cols["doc_id"][rows], batch.doc_id)

    valset = safe_load_pickle(os.path.join(baseline, "valset.pkl"))
    expected_val = PileReader(data_dir, split="validation", seed=SEED).fixed_batch(BV, T)
    np.testing.assert_array_equal(valset["tokens"], expected_val.tokens)
    assert valset["domain"] == expected_val.domain

    with open(os.path.join(baseline, "config.json")) as f:
        config = json.load(f)
    assert config["batch_size"] == B and config["data_dir"] == data_dir and config["world_size"] == 1
    with open(os.path.join(baseline, "training_log.json")) as f:
        log = json.load(f)
    assert [r["step"] for r in log["steps"]] == list(range(1, STEPS + 1))
    assert all(r["tokens_per_s"] > 0 for r in log["steps"])
    assert [e["step"] for e in log["evals"]] == [3, 6]
    assert set(log["evals"][0]) == {"step", "train", "validation", "test"}
    assert set(log["evals"][0]["validation"]["domains"]) == set(reader.domains)
    state = torch.load(os.path.join(baseline, "checkpoints", "latest.pt"), weights_only=True)
    assert state["step"] == STEPS


def test_first_step_matches_plain_autograd(baseline, data_dir):
    """Step 1 runs at the initial weights: rebuild them and take every gradient separately in float64."""
    torch.manual_seed(SEED)
    model = build_model("GPT2-Tiny").double()
    expected, train_losses, val_loss = app_first_step_reference(model, data_dir, SEED, B, T, BV)
    run = read_run(baseline)
    cols = run.columns
    first = cols["step"] == 1
    assert run.value == "adamw"  # the default under AdamW; at step 1 (v_0 = 0) its D is lr/eps for every weight
    expected = as_recorded_at_step_1(expected, run)
    np.testing.assert_allclose(cols["dot_products"][first], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(cols["train_loss"][first], np.mean(train_losses), rtol=1e-5)
    np.testing.assert_allclose(cols["val_loss"][first], val_loss, rtol=1e-5)
    np.testing.assert_allclose(cols["lr"][first], 1e-3 / 2)  # step 1 of a 2-step linear warmup


def test_regular_run_has_the_same_losses(baseline, data_dir, results_dir):
    assert train.main(tiny_flags(data_dir, results_dir, "regular", "--method", "Regular")) == 0
    regular = os.path.join(results_dir, "regular")
    assert not os.path.exists(os.path.join(regular, "grad_dotprods"))
    np.testing.assert_allclose(step_losses(regular), step_losses(baseline), rtol=1e-5)


def test_micro_batches_give_the_same_run(baseline, data_dir, results_dir):
    assert train.main(tiny_flags(data_dir, results_dir, "accum", "--grad_accum", "2")) == 0
    accum, ref = read_run(os.path.join(results_dir, "accum")).columns, read_run(baseline).columns
    np.testing.assert_allclose(accum["dot_products"], ref["dot_products"], rtol=1e-4,
                               atol=1e-5 * np.abs(ref["dot_products"]).max())
    np.testing.assert_allclose(accum["batch_weight"], ref["batch_weight"])
    np.testing.assert_allclose(step_losses(os.path.join(results_dir, "accum")), step_losses(baseline), rtol=1e-5)


class HardCrash(BaseException):
    """Like kill -9: no exception handler of the app runs (it catches Exception only)."""


def test_crash_then_resume_equals_uninterrupted_run(baseline, data_dir, results_dir, monkeypatch):
    """Checkpoint at step 3, a dot-product file for step 4 written after it, crash in step 5 with no
    clean-up: --resume must restart at 4, drop the stale file and end with exactly the baseline's rows."""
    real_report = training.report_progress

    def crash_in_step_5(step, *args):
        if step == 5:
            raise HardCrash
        real_report(step, *args)

    flags = tiny_flags(data_dir, results_dir, "crashed", "--checkpoint_interval", "3")
    monkeypatch.setattr(training, "report_progress", crash_in_step_5)
    with pytest.raises(HardCrash):
        train.main(flags)
    run_dir = os.path.join(results_dir, "crashed")
    assert torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=True)["step"] == 3
    assert "iter_000004.parquet" in os.listdir(os.path.join(run_dir, "grad_dotprods"))

    monkeypatch.setattr(training, "report_progress", real_report)
    stray = os.path.join(run_dir, "checkpoints", "latest.pt.tmp-99999")  # a kill during a checkpoint write
    with open(stray, "wb") as f:
        f.write(b"partial checkpoint")
    assert train.main(flags + ["--resume"]) == 0
    assert not os.path.exists(stray)
    set_aside = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(run_dir, "superseded"))
                 for name in names]
    assert sorted(os.path.basename(p) for p in set_aside) == [  # moved aside, not deleted
        "iter_000004.parquet", "training_log.jsonl"]
    resumed, ref = read_run(run_dir, strict=True), read_run(baseline, strict=True)
    assert resumed.duplicate_steps == [] and resumed.missing_steps == []
    for key in ("step", "sample_index", "dot_products", "lr", "train_loss", "val_loss", "doc_id"):
        np.testing.assert_allclose(resumed.columns[key], ref.columns[key], rtol=1e-6, atol=0, err_msg=key)
    np.testing.assert_allclose(step_losses(run_dir), step_losses(baseline), rtol=1e-6)
    end = torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=True)["model"]
    ref_end = torch.load(os.path.join(baseline, "checkpoints", "latest.pt"), weights_only=True)["model"]
    for name, value in ref_end.items():
        torch.testing.assert_close(end[name], value, rtol=1e-6, atol=1e-7)


def test_eval_only_resume_reproduces_the_final_eval(baseline, data_dir, results_dir, capsys):
    flags = tiny_flags(data_dir, results_dir, "baseline", "--resume", "--eval_only")
    assert train.main(flags) == 0
    assert f"eval @ step {STEPS}" in capsys.readouterr().out
    with open(os.path.join(baseline, f"eval_only_step_{STEPS:06d}.json")) as f:
        evaluated = json.load(f)["eval"]
    with open(os.path.join(baseline, "training_log.json")) as f:
        logged = json.load(f)["evals"][-1]
    for split in ("train", "validation", "test"):
        assert evaluated[split]["loss"] == pytest.approx(logged[split]["loss"], rel=1e-6)


def test_eval_only_on_a_fresh_model_prints_losses_near_log_vocab(data_dir, results_dir, capsys):
    flags = tiny_flags(data_dir, results_dir, "fresh-eval", "--eval_only")
    assert train.main(flags) == 0
    out = capsys.readouterr().out
    assert "eval @ step 0" in out
    assert not os.path.exists(os.path.join(results_dir, "fresh-eval"))  # nothing to record for a fresh model
    first = float(out.split("eval @ step 0: train ")[1].split()[0])
    assert abs(first - np.log(50257)) < 0.5  # an untrained GPT-2 predicts about uniformly


def assert_same_as_baseline(run_dir, baseline):
    resumed, ref = read_run(run_dir, strict=True), read_run(baseline, strict=True)
    assert resumed.duplicate_steps == [] and resumed.missing_steps == []
    for key in ("step", "sample_index", "dot_products", "train_loss"):
        np.testing.assert_allclose(resumed.columns[key], ref.columns[key], rtol=1e-6, atol=0, err_msg=key)
    np.testing.assert_allclose(step_losses(run_dir), step_losses(baseline), rtol=1e-6)
    evals, ref_evals = (read_json(os.path.join(d, "training_log.json"))["evals"] for d in (run_dir, baseline))
    assert [e["step"] for e in evals] == [e["step"] for e in ref_evals]
    for got, want in zip(evals, ref_evals):
        for split in want:
            if split != "step":
                assert got[split]["loss"] == pytest.approx(want[split]["loss"], rel=1e-6)


@pytest.mark.parametrize("where, failing_step", [("progress", 5), ("evaluation", 3)])
def test_an_exception_in_the_loop_saves_the_completed_steps(baseline, data_dir, results_dir, monkeypatch, capsys,
                                                            where, failing_step):
    """An error after step 5 (in the progress report), or inside the evaluation of step 3, saves the steps
    completed so far like a SIGTERM would: dot products, log and a checkpoint at that step; --resume then
    evaluates what the failure interrupted and ends equal to the uninterrupted run, evaluations included."""
    from GradDotProd_LM.evaluate import Evaluator

    real_report, real_evaluate = training.report_progress, Evaluator.evaluate

    def fail_in_step_5(step, *args):
        if step == 5:
            raise OSError("simulated I/O error")
        real_report(step, *args)

    def fail_in_the_first_evaluation(self, *args):
        raise OSError("simulated I/O error")

    run_name = f"excepted-in-{where}"
    flags = tiny_flags(data_dir, results_dir, run_name, "--checkpoint_interval", "100")
    if where == "progress":
        monkeypatch.setattr(training, "report_progress", fail_in_step_5)
    else:
        monkeypatch.setattr(Evaluator, "evaluate", fail_in_the_first_evaluation)
    with pytest.raises(OSError, match="simulated"):
        train.main(flags)
    run_dir = os.path.join(results_dir, run_name)
    assert f"steps 1..{failing_step} are saved" in capsys.readouterr().err
    assert torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=True)["step"] == failing_step
    assert sorted(set(read_run(run_dir, strict=True).columns["step"])) == list(range(1, failing_step + 1))
    monkeypatch.setattr(training, "report_progress", real_report)
    monkeypatch.setattr(Evaluator, "evaluate", real_evaluate)
    assert train.main(flags + ["--resume"]) == 0
    assert_same_as_baseline(run_dir, baseline)


def assert_finite_checkpoint(run_dir, step):
    state = torch.load(os.path.join(run_dir, "checkpoints", "latest.pt"), weights_only=True)
    assert state["step"] == step
    tensors = list(state["model"].values()) + [v for s in state["optimizer"]["state"].values() for v in s.values()
                                               if torch.is_tensor(v)]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_divergence_stops_before_the_bad_update(data_dir, results_dir, capsys):
    """An infinite learning rate makes step 2 non-finite (its update of step 1 left every weight infinite):
    exit 1 naming the step, step 1's dot products and log kept, no NaN saved anywhere, and no checkpoint of the
    infinite weights: config.json records that a resume restarts from the initial weights. The documented
    recovery, --resume with a finite --learning_rate, then gives exactly a run trained at that rate."""
    flags = tiny_flags(data_dir, results_dir, "diverged", "--learning_rate", "inf", "--optimizer", "SGD",
                       "--min_lr", "0", "--grad_clip", "0")
    assert train.main(flags) == 1
    err = capsys.readouterr().err
    assert "step 2:" in err and "not finite" in err and "after step 1" in err
    assert "the last finite one is step 0" in err and "--resume --learning_rate" in err
    run_dir = os.path.join(results_dir, "diverged")
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "latest.pt"))
    assert read_json(os.path.join(run_dir, "config.json"))["divergences"][-1]["last_finite_checkpoint"] == 0
    run = read_run(run_dir, strict=True)
    assert sorted(set(run.columns["step"])) == [1] and np.isfinite(run.columns["dot_products"]).all()
    with open(os.path.join(run_dir, "training_log.json")) as f:
        assert [r["step"] for r in json.load(f)["steps"]] == [1]

    recovered = tiny_flags(data_dir, results_dir, "diverged", "--optimizer", "SGD", "--grad_clip", "0")
    assert train.main(recovered + ["--resume"]) == 0
    assert train.main(tiny_flags(data_dir, results_dir, "sgd-reference", "--optimizer", "SGD", "--grad_clip",
                                 "0")) == 0
    assert_same_as_baseline(run_dir, os.path.join(results_dir, "sgd-reference"))
    assert_finite_checkpoint(run_dir, STEPS)
    # the divergence record excused the missing checkpoint only until the restart wrote past it: now latest.pt
    # gone while the dot products are there refuses, as for any run
    latest = os.path.join(run_dir, "checkpoints", "latest.pt")
    os.rename(latest, latest + ".away")
    set_aside = sorted(os.listdir(os.path.join(run_dir, "superseded")))  # the restart's set-aside step 1
    capsys.readouterr()
    assert train.main(recovered + ["--resume"]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(run_dir, "superseded"))) == set_aside  # nothing moved
    os.rename(latest + ".away", latest)


def test_weights_made_non_finite_by_an_update_are_never_checkpointed(baseline, data_dir, results_dir, monkeypatch,
                                                                      capsys):
    """Step 4's update (an infinite rate from step 4 on) makes the weights infinite while its loss was finite;
    step 4 is a checkpoint step: its checkpoint is not written, step 2's stays, and --resume at the run's own
    rate ends equal to the uninterrupted run."""
    # first_order: the rate is not inside its values (under adamw, the default, an infinite rate makes step 4's
    # values non-finite, and the step is refused before its update)
    first_order = ("--checkpoint_interval", "2", "--value", "first_order")
    assert train.main(tiny_flags(data_dir, results_dir, "baseline-first-order", *first_order)) == 0
    baseline = os.path.join(results_dir, "baseline-first-order")
    real_lr_at = training.lr_at
    monkeypatch.setattr(training, "lr_at", lambda step, cfg: float("inf") if step >= 4 else real_lr_at(step, cfg))
    flags = tiny_flags(data_dir, results_dir, "diverged-later", *first_order)
    assert train.main(flags) == 1
    err = capsys.readouterr().err
    assert "after step 4" in err and "the last finite one is step 2" in err
    run_dir = os.path.join(results_dir, "diverged-later")
    assert_finite_checkpoint(run_dir, 2)
    monkeypatch.setattr(training, "lr_at", real_lr_at)
    assert train.main(flags + ["--resume"]) == 0
    assert_same_as_baseline(run_dir, baseline)


def test_resume_of_a_finished_run_changes_nothing(baseline, data_dir, results_dir, capsys):
    before = {name: open(os.path.join(baseline, name), "rb").read() for name in ("config.json", "training_log.json")}
    assert train.main(tiny_flags(data_dir, results_dir, "baseline", "--resume", "--eval_interval", "2")) == 0
    out = capsys.readouterr().out
    assert f"Nothing to train: {baseline} is at step {STEPS}" in out and f"steps {STEPS + 1}.." not in out
    assert not os.path.exists(os.path.join(baseline, "superseded"))
    for name, data in before.items():
        assert open(os.path.join(baseline, name), "rb").read() == data, name


def test_resume_without_a_checkpoint_refuses_and_deletes_nothing(baseline, data_dir, results_dir, capsys):
    """The checkpoint is gone but the run's dot products are there: --resume exits 2 and touches nothing."""
    import shutil

    run_dir = os.path.join(results_dir, "no-checkpoint")
    shutil.copytree(baseline, run_dir)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    config["run_name"] = "no-checkpoint"
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    os.remove(os.path.join(run_dir, "checkpoints", "latest.pt"))
    before = sorted(os.listdir(os.path.join(run_dir, "grad_dotprods")))
    assert train.main(tiny_flags(data_dir, results_dir, "no-checkpoint", "--resume", "--max_steps", "2")) == 2
    err = capsys.readouterr().err
    assert "has no checkpoint" in err and "3 dot-product file(s) up to step 6" in err
    assert "start a new --run_name (or move the directory away to start this name afresh)" in err
    assert sorted(os.listdir(os.path.join(run_dir, "grad_dotprods"))) == before


def test_a_second_launch_of_a_held_run_exits_2(baseline, data_dir, results_dir, capsys):
    """While one process trains a run (holds run.lock), another launch of it exits 2 naming the holder."""
    from ghost_results.run_directory import RunLock

    holder = RunLock(baseline).acquire()
    try:
        assert train.main(tiny_flags(data_dir, results_dir, "baseline", "--resume", "--max_steps", "8")) == 2
        assert f"is in use by pid {os.getpid()}" in capsys.readouterr().err
    finally:
        holder.release()
    assert sorted(set(read_run(baseline, strict=True).columns["step"])) == list(range(1, STEPS + 1))


def test_resume_refuses_changed_data_unless_told(data_dir, results_dir, tmp_path, capsys):
    """A domain added under --data_dir mid-run: --resume exits 2 naming the change; --accept_data_change
    continues, records the change in config.json and keeps valset.pkl as it was."""
    import shutil

    import zstandard

    from pile_tools.jsonl_io import ShardSource
    from pile_tools.tokenize_corpus import tokenize_sources

    data = str(tmp_path / "data")
    shutil.copytree(data_dir, data)
    flags = tiny_flags(data, results_dir, "data-change", "--max_steps", "2")
    assert train.main(flags) == 0
    run_dir = os.path.join(results_dir, "data-change")
    valset = open(os.path.join(run_dir, "valset.pkl"), "rb").read()
    lines = "".join(json.dumps({"text": f"Subject: note {i}\n\nMeet at {i} pm. " * 20,
                                "meta": {"pile_set_name": "Enron Emails"}}) + "\n" for i in range(20))
    (tmp_path / "more.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    tokenize_sources([ShardSource(str(tmp_path / "more.jsonl.zst"))], data, progress=False)

    assert train.main(flags + ["--resume", "--max_steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "changed since" in err and "added" in err and "enron_emails" in err
    assert train.main(flags + ["--resume", "--max_steps", "4", "--accept_data_change"]) == 0
    with open(os.path.join(run_dir, "config.json")) as f:
        changes = json.load(f)["data_changes"]
    assert len(changes) == 1 and changes[0]["from_step"] == 3 and "enron_emails" in changes[0]["change"]
    assert open(os.path.join(run_dir, "valset.pkl"), "rb").read() == valset
    assert sorted(set(read_run(run_dir, strict=True).columns["step"])) == [1, 2, 3, 4]


def test_corrupt_inputs_stop_with_the_file_named(baseline, data_dir, results_dir, tmp_path, capsys):
    """A truncated checkpoint: --resume exits 2 naming it. Token files with ids beyond the vocabulary:
    exit 1 naming the domain, not an IndexError inside the embedding. A changed optimizer: exit 2."""
    import shutil

    run_dir = os.path.join(results_dir, "truncated")
    shutil.copytree(baseline, run_dir)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dict(config, run_name="truncated"), f)
    checkpoint = os.path.join(run_dir, "checkpoints", "latest.pt")
    with open(checkpoint, "r+b") as f:
        f.truncate(os.path.getsize(checkpoint) // 2)
    assert train.main(tiny_flags(data_dir, results_dir, "truncated", "--resume", "--max_steps", "8")) == 2
    assert f"cannot read the checkpoint {checkpoint}" in capsys.readouterr().err
    assert train.main(tiny_flags(data_dir, results_dir, "truncated", "--resume", "--optimizer", "SGD")) == 2
    assert "--optimizer differ from the saved run" in capsys.readouterr().err

    data = str(tmp_path / "data")
    shutil.copytree(data_dir, data)
    token_file = os.path.join(data, "train", "github.bin")
    ids = np.memmap(token_file, dtype=np.uint16, mode="r+")
    ids[:] = 65000  # beyond GPT-2's 50257 tokens
    ids.flush()
    del ids
    assert train.main(tiny_flags(data, results_dir, "bad-tokens", "--train_domains", "Github")) == 1
    err = capsys.readouterr().err
    assert "step 1: token id 65000 outside [0, 50257) in domain 'Github'" in err

    # a split tokenized with a larger vocabulary says so in its manifests: refused before any step
    manifest_path = os.path.join(data, "train", "github.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    with open(manifest_path, "w") as f:
        json.dump(dict(manifest, max_token_id=65000), f)
    assert train.main(tiny_flags(data, results_dir, "foreign-vocab")) == 2
    err = capsys.readouterr().err
    assert "split 'train': token ids up to {'Github': 65000}" in err and "re-tokenize" in err
    assert not os.path.exists(os.path.join(results_dir, "foreign-vocab"))


@pytest.mark.parametrize("damaged", ["config.json", "valset.pkl", "training_log.json"])
def test_a_damaged_run_file_stops_resume_with_the_file_named(baseline, data_dir, results_dir, capsys, damaged):
    """config.json, valset.pkl or training_log.json replaced by random bytes: --resume exits 2 naming the file
    and what to do, and changes nothing in the run directory."""
    import shutil

    run_name = f"damaged-{damaged}"
    run_dir = os.path.join(results_dir, run_name)
    shutil.copytree(baseline, run_dir)
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dict(config, run_name=run_name), f)
    with open(os.path.join(run_dir, damaged), "wb") as f:
        f.write(np.random.default_rng(0).bytes(300))
    before = run_files(run_dir)
    assert train.main(tiny_flags(data_dir, results_dir, run_name, "--resume", "--max_steps", "8")) == 2
    err = capsys.readouterr().err
    assert f"cannot read {os.path.join(run_dir, damaged)}" in err and "start a new --run_name" in err
    assert run_files(run_dir) == before


def run_files(run_dir):
    """{path: bytes} of every file of a run but its lock."""
    files = {}
    for root, _, names in os.walk(run_dir):
        for name in names:
            if name != "run.lock":
                with open(os.path.join(root, name), "rb") as f:
                    files[os.path.join(root, name)] = f.read()
    return files


def test_too_little_space_for_a_checkpoint_is_a_start_up_error(data_dir, results_dir, monkeypatch, capsys):
    """The results file system cannot hold a checkpoint: exit 2 before the first step, nothing written."""
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert train.main(tiny_flags(data_dir, results_dir, "no-space")) == 2
    assert "MiB free but a checkpoint of this run needs about" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(results_dir, "no-space"))


def test_going_back_before_a_recorded_data_change_is_a_data_change(data_dir, results_dir, tmp_path, capsys):
    """A change accepted from step 5, then a resume from the kept checkpoint of step 2: steps 3 and 4 trained on
    the data before that change, which the directory no longer holds. The resume refuses (nothing changed) unless
    --accept_data_change, which records the change from step 3 in place of the one from step 5."""
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(data_dir, data)
    flags = tiny_flags(data, results_dir, "back", "--checkpoint_interval", "2", "--keep_checkpoints", "0")
    assert train.main(flags + ["--max_steps", "4"]) == 0
    path = os.path.join(data, "train", "github.bin")
    np.fromfile(path, np.uint16)[::-1].tofile(path)  # the same size, other tokens
    assert train.main(flags + ["--resume", "--max_steps", "6", "--accept_data_change"]) == 0
    run_dir = os.path.join(results_dir, "back")
    config_path = os.path.join(run_dir, "config.json")
    assert [c["from_step"] for c in read_json(config_path)["data_changes"]] == [5]
    latest = os.path.join(run_dir, "checkpoints", "latest.pt")
    os.remove(latest)  # back to step 2, as docs/training.md says
    shutil.copyfile(os.path.join(run_dir, "checkpoints", "step_000002.pt"), latest)
    before = open(config_path, "rb").read()
    capsys.readouterr()
    assert train.main(flags + ["--resume", "--max_steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "from step 2: the data changed from step 5 on" in err and "steps 3..4 trained on" in err, err
    assert open(config_path, "rb").read() == before
    assert sorted(set(read_run(run_dir, strict=True).columns["step"])) == [1, 2, 3, 4, 5, 6]  # nothing set aside
    assert train.main(flags + ["--resume", "--max_steps", "6", "--accept_data_change"]) == 0
    changes = read_json(config_path)["data_changes"]
    assert [c["from_step"] for c in changes] == [3] and "back before the change from step 5" in changes[0]["change"]


def test_config_json_keeps_every_launchs_settings(data_dir, results_dir):
    """config.json's flags are the latest launch's; `launches` keeps what each launch trained from and changed,
    so the rate steps 1..2 trained at is still recorded after a resume at another rate."""
    flags = tiny_flags(data_dir, results_dir, "launches", "--max_steps", "2")
    assert train.main(flags) == 0
    assert train.main(flags + ["--resume", "--max_steps", "3", "--learning_rate", "5e-4"]) == 0
    config = read_json(os.path.join(results_dir, "launches", "config.json"))
    first, second = config["launches"]
    assert first["from_step"] == 1 and first["changed"] == {} and "--resume" not in first["argv"]
    assert second["from_step"] == 3 and second["argv"][-4:] == ["--max_steps", "3", "--learning_rate", "5e-4"]
    assert second["changed"] == {"max_steps": [2, 3], "learning_rate": [1e-3, 5e-4]}
    assert config["learning_rate"] == 5e-4
