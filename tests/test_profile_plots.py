"""benchmarks.plots: PNGs from real sweep CSVs of a tiny CPU model; notice without matplotlib."""
import os
import sys

import pytest

from benchmarks import plots, profile_sweep

TINY_FLAGS = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--vocab_size", "97", "--seq_len", "8",
              "--batch_size", "2", "--reps", "1", "--warmup", "0", "--threads", "1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("logs")
    for sweep, extra in (("seq_len", ["--values", "4,8"]), ("batch_size", ["--values", "1,2", "--amp_settings", "both"]),
                         ("val_batch_size", ["--values", "1,2"]), ("grad_ckpt", [])):
        assert profile_sweep.main(["--sweep", sweep] + extra + TINY_FLAGS +
                                  ["--out", str(folder / f"profile_{sweep}.csv")]) == 0
    return folder


def test_plot_command_writes_pngs(logs, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib absent: plots are optional (pip install -e '.[plot]')")
    out = tmp_path / "plots"
    assert plots.main(["--logs", str(logs), "--out", str(out)]) == 0

    expected = {"memory_vs_seq_len.png", "memory_vs_batch_size.png", "throughput_vs_batch_size.png",
                "time_ratio_vs_val_batch_size.png", "options_grad_ckpt.png"}
    assert set(os.listdir(out)) == expected  # no compare.csv, no amp/attention sweep: no such plots
    for name in expected:
        with open(out / name, "rb") as png:
            assert png.read(8) == PNG_SIGNATURE
    assert str(out / "memory_vs_seq_len.png") in capsys.readouterr().out


def test_without_matplotlib_prints_notice_and_exits_0(logs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "plots"
    assert plots.main(["--logs", str(logs), "--out", str(out)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not out.exists()


def test_only_ok_rows_are_plotted(tmp_path):
    path = tmp_path / "profile_seq_len.csv"
    path.write_text("method,seq_len,peak_mem_mb,status\nRegular,8,12.5,ok\nRegular,16,,skipped (out of memory)\n")
    assert plots.read_ok_rows(str(path)) == [{"method": "Regular", "seq_len": 8, "peak_mem_mb": 12.5, "status": "ok"}]
    assert plots.read_ok_rows(str(tmp_path / "absent.csv")) == []


def test_missing_logs_folder_is_exit_code_2(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        plots.main(["--logs", str(tmp_path / "nowhere"), "--out", str(tmp_path / "plots")])
    assert exit_info.value.code == 2
