"""benchmarks.host_overhead on a tiny GPT-2: the table's structure and numbers, the op counter, bad flags."""
import re

import pytest
import torch

from benchmarks import host_overhead

TINY_FLAGS = ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--vocab_size", "64", "--seq_len", "4",
              "--batch_size", "2", "--reps", "1", "--steps", "2", "--warmup", "1"]


def test_table_rows_and_numbers(capsys):
    threads = torch.get_num_threads()
    assert host_overhead.main(TINY_FLAGS) == 0
    assert torch.get_num_threads() == threads  # --threads applies while measuring only
    out = capsys.readouterr().out
    # GPT-2 with one block: wte, wpe, ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj, ln_f, lm_head
    assert "; 10 hooked layers" in out
    lines = out.strip().splitlines()
    header = [cell.strip() for cell in lines[-4].split("|")]
    assert header == ["method", "ms/step", "aten ops/step", "overhead µs/hooked layer"]
    assert set(lines[-3]) <= {"-", "+"}
    regular, engine = ([cell.strip() for cell in line.split("|")] for line in lines[-2:])
    assert regular[0] == "Regular" and engine[0] == "GradDotProd" and regular[3] == "-"
    reg_ms, reg_ops, gdp_ms, gdp_ops = float(regular[1]), int(regular[2]), float(engine[1]), int(engine[2])
    assert reg_ms > 0 and gdp_ms > 0 and reg_ops > 0
    assert gdp_ops > reg_ops  # the taps' ops come on top of the model's
    # the overhead column is (GradDotProd - Regular) / hooked layers, from the rounded ms up to rounding
    assert float(engine[3]) == pytest.approx((gdp_ms - reg_ms) * 1e3 / 10, abs=0.011 * 1e3 / 10 + 0.06)


def test_op_counter_counts_top_level_aten_ops():
    # torch.ones dispatches aten::ones, which calls aten::empty and aten::fill_ (not counted); then aten::add
    assert host_overhead.count_top_level_ops(lambda: torch.ones(3) + torch.ones(3)) == 3


@pytest.mark.parametrize("flags, named", [(["--steps", "0"], "--steps"), (["--reps", "x"], "--reps")])
def test_bad_flags_exit_2_naming_the_flag(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        host_overhead.main(flags)
    assert exit_info.value.code == 2 and re.search(f"argument {named}", capsys.readouterr().err)
