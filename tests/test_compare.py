"""benchmarks.compare: the per-sample baselines against a float64 reference written out by hand,
the agreement check, out-of-memory handling and the CSV of a tiny CPU run."""
import csv
import math

import pytest
import torch

from benchmarks import _common, compare
from benchmarks._common import CSV_COLUMNS, STATUS_OK, STATUS_OOM, BenchConfig, Method, MethodResult
from GradDotProd_LM.model import build_model

TINY_FLAGS = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--vocab_size", "97", "--seq_len", "12",
              "--batch_size", "4", "--val_batch_size", "2", "--threads", "1"]


def tiny_float64_setup():
    """1-layer tied GPT-2 in float64; rows with ignored (-100) labels so per-sample weights differ."""
    torch.manual_seed(0)
    model = build_model("GPT2-Tiny", n_positions=16, n_layer=1, n_embd=16, n_head=2, vocab_size=61,
                        bos_token_id=60, eos_token_id=60).double().train()
    assert model.lm_head.weight is model.transformer.wte.weight
    x_train = torch.randint(0, 61, (3, 8))
    x_val = torch.randint(0, 61, (2, 8))
    y_train, y_val = x_train.clone(), x_val.clone()
    y_train[0, 5:] = -100
    y_train[2, :3] = -100
    y_val[1, 6:] = -100
    return model, (x_train, y_train, x_val, y_val)


def token_mean_loss(model, x, y):
    """Mean next-token NLL over the rows' target tokens, written out with log_softmax (float64)."""
    log_probs = torch.log_softmax(model(input_ids=x).logits[:, :-1], dim=-1)
    targets = y[:, 1:]
    keep = targets != -100
    return -log_probs[keep].gather(-1, targets[keep].unsqueeze(-1)).mean()


def float64_reference(model, batch):
    """Dot products of torch.cat-flattened gradients, and Regular training's gradient."""
    x_train, y_train, x_val, y_val = batch
    params = list(model.parameters())  # the tied wte/lm_head once
    flat = lambda grads: torch.cat([g.reshape(-1) for g in grads])  # noqa: E731
    val_grad = flat(torch.autograd.grad(token_mean_loss(model, x_val, y_val), params))
    dots = torch.stack([flat(torch.autograd.grad(token_mean_loss(model, x_train[i:i + 1], y_train[i:i + 1]),
                                                 params)) @ val_grad for i in range(x_train.shape[0])])
    regular_grad = torch.autograd.grad(token_mean_loss(model, x_train, y_train), params)
    return dots, regular_grad


@pytest.mark.parametrize("factory", [compare.naive_method, lambda *a: compare.vmap_method(*a, chunk_size=2)],
                         ids=["naive", "vmap"])
def test_baseline_matches_float64_reference(factory):
    model, batch = tiny_float64_setup()
    reference_dots, regular_grad = float64_reference(model, batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    method = factory(model, optimizer, batch, BenchConfig())

    method.setup()
    dots = method.step()

    assert dots.dtype == torch.float32 and dots.shape == (3,)
    torch.testing.assert_close(dots.double(), reference_dots, rtol=1e-6, atol=1e-9)
    # the method leaves Regular training's gradient in p.grad (tied wte/lm_head included)
    for param, expected in zip(model.parameters(), regular_grad):
        torch.testing.assert_close(param.grad, expected, rtol=1e-9, atol=1e-12)
    # lr=0: parameters untouched, so every repetition values the same point
    torch.testing.assert_close(float64_reference(model, batch)[0], reference_dots, rtol=0, atol=0)


def test_causal_lm_loss_is_hf_token_mean_with_ignored_labels():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, 3, 4], [0, -100, -100, 6, 5]])
    shifted, targets = logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1)
    keep = targets != -100
    expected = -torch.log_softmax(shifted[keep], dim=-1)[torch.arange(int(keep.sum())), targets[keep]].mean()
    torch.testing.assert_close(compare.causal_lm_loss(logits, labels), expected)
    model, (x_train, y_train, _, _) = tiny_float64_setup()
    # HF's own loss (softmax in float32) is the same quantity
    torch.testing.assert_close(compare.causal_lm_loss(model(input_ids=x_train).logits, y_train),
                               model(input_ids=x_train, labels=y_train).loss.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(compare.sample_weights(labels), torch.tensor([3 / 5, 2 / 5], dtype=torch.float64))


def test_relative_error_and_agreement_reference():
    reference = torch.tensor([1.0, -2.0, 4.0])
    assert compare.relative_error(torch.tensor([1.0, -2.0, 4.4]), reference) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="all zero"):
        compare.relative_error(reference, torch.zeros(3))

    results = {name: MethodResult(name) for name in compare.METHOD_NAMES}
    results[compare.NAIVE].dot_products = reference
    results[compare.VMAP].dot_products = reference + torch.tensor([0.0, 0.2, 0.0])
    results[_common.GRADDOTPROD].dot_products = reference * 1.5
    rows = [{"method": name, "rel_err": math.nan} for name in compare.METHOD_NAMES]
    assert compare.add_agreement(rows, results) == compare.NAIVE
    errors = {row["method"]: row["rel_err"] for row in rows}
    assert errors[compare.VMAP] == pytest.approx(0.05)
    assert errors[_common.GRADDOTPROD] == pytest.approx(0.5)
    assert math.isnan(errors[_common.REGULAR]) and math.isnan(errors[compare.NAIVE])

    # naive skipped (out of memory): vmap becomes the reference
    results[compare.NAIVE] = MethodResult(compare.NAIVE, status=STATUS_OOM)
    rows = [{"method": name, "rel_err": math.nan} for name in compare.METHOD_NAMES]
    assert compare.add_agreement(rows, results) == compare.VMAP
    errors = {row["method"]: row["rel_err"] for row in rows}
    assert errors[_common.GRADDOTPROD] == pytest.approx(2.0 / 4.0)  # max |[1.5,-3,6] - [1,-1.8,4]| / 4


def test_out_of_memory_marks_method_skipped_and_others_continue():
    calls = {"ok": 0, "teardown": 0}

    def ok_step():
        calls["ok"] += 1
        return torch.ones(2)

    def cuda_oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def cpu_oom():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes")

    def count_teardown():
        calls["teardown"] += 1

    methods = [Method("ok", ok_step), Method("cuda_oom", cuda_oom, teardown=count_teardown),
               Method("cpu_oom", cpu_oom)]
    results = _common.run_interleaved(methods, reps=3, device="cpu", warmup=1)

    assert results["ok"].status == STATUS_OK and len(results["ok"].times_s) == 3 and calls["ok"] == 4
    assert results["ok"].peak_mem_mb >= results["ok"].base_mem_mb > 0
    for name in ("cuda_oom", "cpu_oom"):
        assert results[name].status == STATUS_OOM and results[name].times_s == []
    assert calls["teardown"] == 1  # hooks are removed even when the step fails

    def bug():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        _common.run_interleaved([Method("bug", bug)], reps=1, device="cpu")


def test_model_that_does_not_fit_gives_skipped_rows(monkeypatch, tmp_path):
    def no_memory(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(_common, "build_bench_model", no_memory)
    rows, _ = _common.measure_config(BenchConfig(seq_len=8, batch_size=2), _common.CORE_METHODS, reps=1)
    assert [row["status"] for row in rows] == [STATUS_OOM, STATUS_OOM]
    path = tmp_path / "skipped.csv"
    _common.write_csv(str(path), rows)
    written = list(csv.DictReader(open(path)))
    assert [row["method"] for row in written] == ["Regular", "GradDotProd"]
    assert all(row["step_time_s"] == "" and row["status"] == STATUS_OOM for row in written)


def test_compare_cli_tiny_cpu_run(tmp_path, capsys):
    out = tmp_path / "compare.csv"
    assert compare.main(TINY_FLAGS + ["--reps", "2", "--vmap_chunk", "3", "--out", str(out)]) == 0

    with open(out, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CSV_COLUMNS
        rows = {row["method"]: row for row in reader}
    assert list(rows) == list(compare.METHOD_NAMES)
    for name, row in rows.items():
        assert row["status"] == STATUS_OK, name
        assert (row["seq_len"], row["batch_size"], row["val_batch_size"], row["n_embd"], row["vocab_size"]) == \
            ("12", "4", "2", "32", "128")  # the model's vocabulary: 97 padded to a multiple of 64
        step_time = float(row["step_time_s"])
        assert float(row["tokens_per_s"]) == pytest.approx(4 * 12 / step_time, rel=1e-4)
        assert float(row["peak_mem_mb"]) >= float(row["base_mem_mb"]) > 0
        assert float(row["time_vs_floor"]) == pytest.approx(float(row["time_vs_regular"]) / float(row["floor_ratio"]),
                                                            rel=1e-4)
        assert row["mem_metric"] in ("cpu_peak_rss", "cpu_peak_rss_since_start")
    assert float(rows["Regular"]["time_vs_regular"]) == 1.0
    assert float(rows["Regular"]["floor_ratio"]) > 1.0
    assert rows["Regular"]["rel_err"] == "" and rows[compare.NAIVE]["rel_err"] == ""
    assert float(rows["GradDotProd"]["rel_err"]) < 1e-4
    assert float(rows[compare.VMAP]["rel_err"]) < 1e-4

    printed = capsys.readouterr().out
    assert "AGREE" in printed and "DISAGREE" not in printed
    assert all(name in printed for name in compare.METHOD_NAMES)


def test_gradient_checkpointing_skips_vmap_and_still_checks_the_engine(tmp_path):
    out = tmp_path / "compare.csv"
    flags = TINY_FLAGS + ["--grad_ckpt", "on", "--reps", "1", "--methods", "GradDotProd,NaivePerSample,VmapPerSample"]
    assert compare.main(flags + ["--out", str(out)]) == 0
    rows = {row["method"]: row for row in csv.DictReader(open(out, newline=""))}
    assert rows[compare.VMAP]["status"].startswith("skipped") and rows[compare.VMAP]["step_time_s"] == ""
    assert rows["GradDotProd"]["grad_ckpt"] == "1" and float(rows["GradDotProd"]["rel_err"]) < 1e-4
    assert rows["GradDotProd"]["time_vs_regular"] == ""  # Regular was not run


@pytest.mark.parametrize("bad_flags", [
    ["--methods", "Regular,Magic"],
    ["--seq_len", "1"],
    ["--batch_size", "0"],
    ["--n_embd", "30", "--n_head", "4"],
    ["--attn_impl", "flash"],
    ["--device", "tpu"],
])
def test_compare_cli_rejects_bad_input_with_exit_code_2(bad_flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(bad_flags + ["--out", "unused.csv"])
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err
