"""train.sh --project_dim (GradDotProd_LM/training.py, docs/ATTRIBUTION.md): the stored projections of step 1 against
float64 per-row gradients projected with the store's own matrices, kill -9 then --resume against an uninterrupted
run, and --method Regular --project_dim (projections only) against plain Regular training."""
import os

import numpy as np
import pytest
import torch

from ghost_engine.projection import Projection
from ghost_results.grad_store import GradStore
from GradDotProd_LM import train
from GradDotProd_LM.model import build_model
from pile_tools.reader import PileReader
from test_faults import kill_inside

B, T, STEPS, SEED, K = 3, 16, 4, 5, 600


def flags(data_dir, results, name, *extra):
    return ["--architecture", "GPT2-Tiny", "--batch_size", str(B), "--seq_len", str(T), "--val_batch_size", "2",
            "--max_steps", str(STEPS), "--warmup_step", "1", "--optimizer", "SGD", "--learning_rate", "0.5",
            "--min_lr", "0.05", "--grad_clip", "0", "--eval_interval", "100", "--eval_iter", "1", "--eval_bs", "2",
            "--dot_prod_save_interval", "1", "--checkpoint_interval", "2", "--keep_checkpoints", "0", "--seed",
            str(SEED), "--project_dim",
            str(K), "--project_dtype", "float32", "--data_dir", data_dir, "--results_dir", results, "--run_name",
            name, *extra]


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory):
    results = str(tmp_path_factory.mktemp("projection"))
    assert train.main(flags(data_dir, results, "base")) == 0
    return results


def stored(run_dir, name="grad_store"):
    store = GradStore(os.path.join(run_dir, name))
    return store, store.rows(np.arange(len(store))), store.provenance()


def project(projection, grads: dict) -> np.ndarray:
    """P_r G P_cᵀ (P · vec G) of each block, with the dense matrices: [K]."""
    parts = []
    for block in projection.blocks:
        mats = [torch.eye(n, dtype=torch.float64) if m is None else m
                for m, n in zip(projection.matrices(block.name), block.shape)]
        g = grads[block.name].reshape(block.shape)
        parts.append((mats[0] @ g @ mats[1].t()).reshape(-1) if len(mats) == 2 else mats[0] @ g)
    return torch.cat(parts).numpy()


def test_step_1_projections_equal_float64_per_row_gradients_projected(data_dir, baseline):
    run_dir = os.path.join(baseline, "base")
    store, rows, prov = stored(run_dir)
    assert list(np.unique(prov["step"])) == list(range(1, STEPS + 1)) and len(store) == STEPS * B
    projection = Projection.from_description(store.meta["projection"])
    assert store.meta["identity"] and projection.dim == store.dim <= K
    torch.manual_seed(SEED)
    model = build_model("GPT2-Tiny").double()  # the run's initial weights
    params = dict(model.named_parameters())
    X = torch.from_numpy(PileReader(data_dir, split="train", seed=SEED).get_batch(1, B, T).tokens[:, :T])
    X_val = torch.from_numpy(PileReader(data_dir, split="validation", seed=SEED).fixed_batch(2, T).tokens[:, :T])

    def grads(x):
        g = torch.autograd.grad(model(input_ids=x, labels=x).loss, list(params.values()))
        return dict(zip(params, g))

    step1 = prov["step"].to_numpy() == 1
    for i, sample in enumerate(prov["row"][step1]):
        expected = project(projection, grads(X[sample:sample + 1]))
        np.testing.assert_allclose(rows[step1][i], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    _, val_rows, val_prov = stored(run_dir, "grad_store_validation")
    assert list(val_prov["step"]) == list(range(1, STEPS + 1))
    expected = project(projection, grads(X_val))
    np.testing.assert_allclose(val_rows[0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(prov["lr"][step1], 0.5)  # the step's learning rate and each row's weight
    np.testing.assert_allclose(prov["weight"][step1], 1 / B)


def test_kill_9_inside_a_checkpoint_write_then_resume_equals_the_uninterrupted_store(data_dir, baseline, tmp_path):
    results = str(tmp_path / "results")
    args = flags(data_dir, results, "killed")
    kill_inside(args, "write:" + r"checkpoints/latest\.pt$", 2, tmp_path)  # the checkpoint of step 4
    assert train.main(args + ["--resume"]) == 0
    _, rows, prov = stored(os.path.join(results, "killed"))
    _, base_rows, base_prov = stored(os.path.join(baseline, "base"))
    assert list(zip(prov["step"], prov["row"])) == list(zip(base_prov["step"], base_prov["row"]))
    # the killed process ran with OMP_NUM_THREADS=1 (tests/test_faults.py), the resume and the baseline with
    # torch's threads: float32 sums in another order, hence float32 round-off, not equality
    np.testing.assert_allclose(rows, base_rows, rtol=1e-4, atol=1e-5 * np.abs(base_rows).max())
    # the store was made durable through step 4 before that checkpoint's write; the resume from step 2 took the
    # rows of steps 3 and 4 out (to superseded/, never deleted) and computed them again
    superseded = os.path.join(results, "killed", "grad_store", "superseded")
    assert any(name.endswith(".prov.npy") for name in os.listdir(superseded))


def test_regular_training_with_projections_only(data_dir, baseline, tmp_path):
    """No validation rows: the weights are plain Regular training's; step 1's projections are the GradDotProd
    run's (the same rows at the same initial weights)."""
    results = str(tmp_path / "results")
    assert train.main(flags(data_dir, results, "proj", "--method", "Regular")) == 0
    plain = flags(data_dir, results, "plain", "--method", "Regular")
    assert train.main(plain[:plain.index("--project_dim")] + plain[plain.index("--project_dim") + 2:]) == 0
    run_dir = os.path.join(results, "proj")
    assert not os.path.exists(os.path.join(run_dir, "grad_dotprods"))
    assert not os.path.exists(os.path.join(run_dir, "grad_store_validation"))
    _, rows, prov = stored(run_dir)
    _, base_rows, base_prov = stored(os.path.join(baseline, "base"))
    step1 = prov["step"].to_numpy() == 1
    np.testing.assert_allclose(rows[step1], base_rows[base_prov["step"].to_numpy() == 1], rtol=1e-4,
                               atol=1e-5 * np.abs(base_rows).max())

    def weights(name):
        return torch.load(os.path.join(results, name, "checkpoints", "latest.pt"), weights_only=True)["model"]

    with_projection, without = weights("proj"), weights("plain")
    for name, value in without.items():
        torch.testing.assert_close(with_projection[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_an_in_run_query_uses_the_weights_each_step_trained_at(baseline, tmp_path, monkeypatch):
    """Checkpoint s holds the weights step s + 1 trained at: the validation rows projected there are the run's own
    projection of step s + 1's validation gradient. The query command scores the in-run store and names its
    fidelity."""
    import json

    from GradDotProd_LM import attribute
    from ghost_results.run_directory import read_valset_tokens

    run_dir = os.path.join(baseline, "base")
    store, _, _ = stored(run_dir)
    projection = Projection.from_description(store.meta["projection"])
    _, val_rows, _ = stored(run_dir, "grad_store_validation")
    tokens = read_valset_tokens(run_dir)[:, :T]
    model, origin = attribute.load_model(run_dir, 2)
    assert origin["step"] == 2
    projected = attribute.project_rows(model, projection, list(tokens)).mean(axis=0)  # equal target counts
    np.testing.assert_allclose(projected, val_rows[2], rtol=1e-4, atol=1e-5 * np.abs(val_rows[2]).max())
    (tmp_path / "q.jsonl").write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n")
    monkeypatch.setenv("GRADDOTPROD_RESULTS_DIR", baseline)  # the run by its name, as the README asks it
    assert attribute.main(["query", "base", "--queries", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "out"),
                           "--top", "3"]) == 0
    report = (tmp_path / "out" / "attribution.md").read_text()
    assert "in-run (trajectory" in report and "Pearson" in report and "score: cosine" in report
    documents = report.split("| rank | document score (all steps) |")[1].split("\n\n")[0].splitlines()[2:]
    assert 1 <= len(documents) <= 3 and documents[0].startswith("| 1 | ")  # --top 3: the best documents
    assert "texts not shown" not in report and "(not shown)" not in report
    # a run that accepted a change of its data mid-run: its windows' texts are not read from today's data
    import shutil

    changed = os.path.join(baseline, "changed")
    shutil.copytree(run_dir, changed, ignore=shutil.ignore_patterns("run.lock"))
    with open(os.path.join(changed, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(changed, "config.json"), "w") as f:
        json.dump(dict(config, data_changes=[{"from_step": 3, "change": "added ['train/x.bin']"}]), f)
    assert attribute.main(["query", "changed", "--queries", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "o2"),
                           "--top", "3"]) == 0
    report = (tmp_path / "o2" / "attribution.md").read_text()
    assert "texts not shown: the run accepted a change of its data from step 3 on" in report
    assert report.count("(not shown)") == 3


def test_an_adamw_run_stores_the_projection_of_the_vector_its_values_are_taken_against(data_dir, tmp_path, capsys):
    """--value auto under AdamW records adamw values, so grad_store_validation holds Π(D ⊙ ∇L_val) (its manifest
    says so) and the query's fidelity line measures the stored projections against those values. A store written
    before (Π(∇L_val), no "vector") is not measured against them, and a resume does not append the other kind to
    it."""
    import json

    from ghost_results.run_directory import read_config
    from GradDotProd_LM import attribute

    results = str(tmp_path / "results")
    adamw = ["--optimizer", "AdamW", "--learning_rate", "1e-3", "--min_lr", "1e-4"]
    assert train.main(flags(data_dir, results, "adam", *adamw)) == 0
    run_dir = os.path.join(results, "adam")
    store, _, _ = stored(run_dir)
    validation = GradStore(os.path.join(run_dir, "grad_store_validation"))
    assert validation.meta["value"] == "adamw" and validation.meta["vector"] == "D ⊙ ∇L_val"
    line = attribute.in_run_fidelity(run_dir, store, read_config(run_dir))
    assert line.startswith("Pearson") and f"over {(STEPS - 2) * B} rows of adamw values, steps 1, 2 left out" in line
    manifest_path = os.path.join(run_dir, "grad_store_validation", "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    for key in ("value", "vector"):  # as a store written before the vector followed --value
        del manifest["meta"][key]
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    line = attribute.in_run_fidelity(run_dir, store, read_config(run_dir))
    assert line.startswith("not measured (the run recorded adamw values")
    capsys.readouterr()
    before = {name: sorted(os.listdir(os.path.join(run_dir, name))) for name in ("grad_store", "grad_store_validation")}
    with open(os.path.join(run_dir, "config.json"), "rb") as f:
        config = f.read()
    assert train.main(flags(data_dir, results, "adam", *adamw, "--resume", "--max_steps", str(STEPS + 2))) == 2
    err = capsys.readouterr().err
    assert "grad_store_validation holds the projections of ∇L_val" in err and "D ⊙ ∇L_val" in err, err
    assert before == {name: sorted(os.listdir(os.path.join(run_dir, name))) for name in before}  # nothing changed
    with open(os.path.join(run_dir, "config.json"), "rb") as f:
        assert f.read() == config


def test_a_run_of_another_tokenizer_is_not_queried_with_gpt2s(baseline, tmp_path, capsys):
    """graddotprod-attribute tokenizes queries with GPT-2's BPE: a run whose data_tokenizer is another's would be
    fed other token ids without an error, so it is refused by name."""
    import json
    import shutil

    from GradDotProd_LM import attribute

    run_dir = str(tmp_path / "neox")
    shutil.copytree(os.path.join(baseline, "base"), run_dir, ignore=shutil.ignore_patterns("run.lock"))
    for name in os.listdir(os.path.join(run_dir, "checkpoints")):
        path = os.path.join(run_dir, "checkpoints", name)
        state = torch.load(path, weights_only=False)
        state["config"]["data_tokenizer"] = {"name": "gpt-neox-20b", "vocab_size": 50277, "eot_id": 0}
        torch.save(state, path)
    (tmp_path / "q.jsonl").write_text(json.dumps({"text": "The quick brown fox."}) + "\n")
    capsys.readouterr()
    assert attribute.main(["query", run_dir, "--queries", str(tmp_path / "q.jsonl"), "--out",
                           str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "gpt-neox-20b" in err and "GPT-2's BPE" in err, err
    assert not (tmp_path / "out").exists()


def test_a_run_is_not_queried_with_another_runs_store(baseline, data_dir, tmp_path, capsys):
    """query RUN --store OTHER_RUN/grad_store would score the other run's rows at this run's checkpoints."""
    import json

    from GradDotProd_LM import attribute

    results = str(tmp_path / "results")
    assert train.main(flags(data_dir, results, "other", "--seed", str(SEED + 1))) == 0
    (tmp_path / "q.jsonl").write_text(json.dumps({"text": "The quick brown fox."}) + "\n")
    capsys.readouterr()
    assert attribute.main(["query", os.path.join(baseline, "base"), "--store", os.path.join(results, "other",
                           "grad_store"), "--queries", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "out")]) == 2
    assert "query a run with its own store" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
