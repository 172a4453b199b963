"""benchmarks.profile_sweep on tiny CPU configurations: rows per value and method, CSV columns, bad flags."""
import csv

import pytest

from benchmarks import profile_sweep
from benchmarks._common import CSV_COLUMNS, STATUS_OK, BenchConfig

TINY_FLAGS = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--vocab_size", "97", "--seq_len", "8",
              "--batch_size", "2", "--reps", "1", "--warmup", "0", "--threads", "1"]


def read_rows(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CSV_COLUMNS
        return list(reader)


def test_seq_len_sweep_rows(tmp_path, capsys):
    out = tmp_path / "profile_seq_len.csv"
    assert profile_sweep.main(["--sweep", "seq_len", "--values", "4,8"] + TINY_FLAGS + ["--out", str(out)]) == 0

    rows = read_rows(out)
    assert [(row["seq_len"], row["method"]) for row in rows] == [
        ("4", "Regular"), ("4", "GradDotProd"), ("8", "Regular"), ("8", "GradDotProd")]
    for row in rows:
        assert row["status"] == STATUS_OK
        assert (row["batch_size"], row["val_batch_size"], row["amp"], row["attn_impl"]) == ("2", "1", "0", "sdpa")
        assert float(row["tokens_per_s"]) == pytest.approx(2 * int(row["seq_len"]) / float(row["step_time_s"]),
                                                           rel=1e-4)
        assert float(row["peak_mem_mb"]) >= float(row["base_mem_mb"]) > 0
        assert float(row["floor_ratio"]) > 1.0
        assert row["rel_err"] == ""  # the agreement check belongs to compare
    assert [float(row["time_vs_regular"]) for row in rows if row["method"] == "Regular"] == [1.0, 1.0]
    assert "GradDotProd" in capsys.readouterr().out


def test_batch_sweep_crossed_with_amp(tmp_path):
    out = tmp_path / "profile_batch_size.csv"
    args = ["--sweep", "batch_size", "--values", "1,2", "--amp_settings", "both"] + TINY_FLAGS + ["--out", str(out)]
    assert profile_sweep.main(args) == 0

    rows = read_rows(out)
    assert sorted((row["batch_size"], row["amp"], row["method"]) for row in rows) == sorted(
        (b, amp, method) for b in ("1", "2") for amp in ("0", "1") for method in ("Regular", "GradDotProd"))
    assert all(row["status"] == STATUS_OK for row in rows)


def test_sweep_configs_vary_one_setting():
    base = BenchConfig(seq_len=8, amp=True)
    assert [(c.grad_ckpt, c.amp) for c in profile_sweep.sweep_configs(base, "grad_ckpt", [False, True], (True,))] \
        == [(False, True), (True, True)]
    assert [c.amp for c in profile_sweep.sweep_configs(base, "amp", [False, True], (True,))] == [False, True]
    crossed = profile_sweep.sweep_configs(base, "attn_impl", ["sdpa", "eager"], (False, True))
    assert [(c.attn_impl, c.amp) for c in crossed] == [("sdpa", False), ("sdpa", True), ("eager", False),
                                                        ("eager", True)]


@pytest.mark.parametrize("bad_flags", [
    ["--sweep", "attn_impl", "--values", "flash"],
    ["--sweep", "seq_len", "--values", "1"],
    ["--sweep", "batch_size", "--values", "two"],
    ["--sweep", "amp", "--amp_settings", "both"],
    ["--sweep", "amp", "--values", "maybe"],
    ["--sweep", "learning_rate"],
])
def test_sweep_cli_rejects_bad_input_with_exit_code_2(bad_flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile_sweep.main(bad_flags + ["--out", "unused.csv"])
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err
