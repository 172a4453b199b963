"""PNG plots from the CSVs of profile_sweep and compare.

    python -m benchmarks.plots --logs Results/logs --out Results/plots

Plots made when their CSV exists (rows with status "ok" only):
    memory_vs_seq_len.png           profile_seq_len.csv
    memory_vs_batch_size.png        profile_batch_size.csv (one line per method and AMP setting)
    throughput_vs_batch_size.png    profile_batch_size.csv
    time_ratio_vs_val_batch_size.png  profile_val_batch_size.csv, GradDotProd/Regular with the analytic floor
    options_<amp|grad_ckpt|attn_impl>.png  tokens/s and peak memory per setting
    compare_time.png                compare.csv, step time relative to Regular per method
Needs matplotlib (`pip install -e ".[plot]"`); without it, prints a notice and exits 0.
"""
from __future__ import annotations

import csv
import os
import sys

from ghost_common.flags import FlagParser

GRADDOTPROD = "GradDotProd"
REGULAR = "Regular"
OPTION_SWEEPS = ("amp", "grad_ckpt", "attn_impl")


def read_ok_rows(path: str) -> list:
    """Rows of a benchmark CSV whose status is ok, numbers converted; [] if the file is absent."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("status") == "ok"]
    for row in rows:
        for key, value in row.items():
            row[key] = _number(value)
    return rows


def _number(text):
    for convert in (int, float):
        try:
            return convert(text)
        except (TypeError, ValueError):
            pass
    return text


def _series(rows: list, x_key: str, y_key: str, by: tuple) -> dict:
    """{label: ([x], [y])} sorted by x, one series per distinct value of the `by` columns."""
    groups = {}
    for row in rows:
        label = ", ".join(_label(key, row[key]) for key in by)
        groups.setdefault(label, []).append((row[x_key], row[y_key]))
    return {label: tuple(zip(*sorted(points))) for label, points in groups.items()}


def _label(key: str, value) -> str:
    if key == "amp":
        return "AMP bf16" if value else "fp32"
    if key == "grad_ckpt":
        return "grad ckpt" if value else "no ckpt"
    if key == "attn_impl":
        return f"{value} attention"
    return str(value)


def _config_title(rows: list, varied: str) -> str:
    row = rows[0]
    parts = [f"{row['architecture']} L={row['n_layer']} d={row['n_embd']} V={row['vocab_size']}"]
    for key, name in (("seq_len", "T"), ("batch_size", "B"), ("val_batch_size", "Bv")):
        if key != varied:
            parts.append(f"{name}={row[key]}")
    parts.append(str(row["device"]))
    return " ".join(parts)


def _line_plot(plt, path, rows, x_key, y_key, by, xlabel, ylabel, title, floor=None):
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in _series(rows, x_key, y_key, by).items():
        axes.plot(xs, ys, marker="o", label=label)
    if floor is not None:
        xs, ys = floor
        axes.plot(xs, ys, linestyle="--", color="black", label="analytic floor (docs/METHOD.md s.3)")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _options_plot(plt, path, rows, option):
    """Grouped bars: per method, tokens/s and peak memory for each value of `option`."""
    settings = sorted({row[option] for row in rows}, key=str)
    methods = [name for name in (REGULAR, GRADDOTPROD) if any(row["method"] == name for row in rows)]
    figure, axes_pair = plt.subplots(1, 2, figsize=(9, 4))
    width = 0.8 / max(1, len(settings))
    for axes, key, ylabel in zip(axes_pair, ("tokens_per_s", "peak_mem_mb"), ("tokens/s", "peak memory (MB)")):
        for offset, setting in enumerate(settings):
            heights = [next((row[key] for row in rows if row["method"] == method and row[option] == setting), 0.0)
                       for method in methods]
            positions = [index + offset * width for index in range(len(methods))]
            axes.bar(positions, heights, width=width, label=_label(option, setting))
        axes.set_xticks([index + width * (len(settings) - 1) / 2 for index in range(len(methods))])
        axes.set_xticklabels(methods)
        axes.set_ylabel(ylabel)
        axes.legend(fontsize=8)
    figure.suptitle(_config_title(rows, option), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _compare_plot(plt, path, rows):
    figure, axes = plt.subplots(figsize=(6, 4))
    names = [row["method"] for row in rows]
    axes.bar(names, [row["time_vs_regular"] for row in rows], color="tab:blue")
    floors = [row["floor_ratio"] for row in rows if isinstance(row["floor_ratio"], float)]
    if floors:
        axes.axhline(floors[0], linestyle="--", color="black", label=f"analytic floor {floors[0]:.2f}x")
        axes.legend(fontsize=8)
    axes.set_yscale("log")
    axes.set_ylabel("step time / Regular")
    axes.set_title(_config_title(rows, ""), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def make_plots(logs: str, out: str) -> list:
    """Write every plot whose CSV is present; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    written = []

    def target(name):
        written.append(os.path.join(out, name))
        return written[-1]

    rows = read_ok_rows(os.path.join(logs, "profile_seq_len.csv"))
    if rows:
        _line_plot(plt, target("memory_vs_seq_len.png"), rows, "seq_len", "peak_mem_mb", ("method", "amp"),
                   "sequence length T", f"peak memory (MB, {rows[0]['mem_metric']})",
                   _config_title(rows, "seq_len"))
    rows = read_ok_rows(os.path.join(logs, "profile_batch_size.csv"))
    if rows:
        _line_plot(plt, target("memory_vs_batch_size.png"), rows, "batch_size", "peak_mem_mb", ("method", "amp"),
                   "training batch size B", f"peak memory (MB, {rows[0]['mem_metric']})",
                   _config_title(rows, "batch_size"))
        _line_plot(plt, target("throughput_vs_batch_size.png"), rows, "batch_size", "tokens_per_s",
                   ("method", "amp"), "training batch size B", "training tokens/s", _config_title(rows, "batch_size"))
    rows = [row for row in read_ok_rows(os.path.join(logs, "profile_val_batch_size.csv"))
            if row["method"] == GRADDOTPROD]
    if rows:
        # the floor depends on the sizes only: one curve whatever the AMP setting
        floor_rows = [row for row in rows if isinstance(row["floor_ratio"], float)]
        floor_points = next(iter(_series(floor_rows, "val_batch_size", "floor_ratio", ()).values()), None)
        _line_plot(plt, target("time_ratio_vs_val_batch_size.png"), rows, "val_batch_size", "time_vs_regular",
                   ("method", "amp"), "validation batch size Bv", "GradDotProd step time / Regular",
                   _config_title(rows, "val_batch_size"), floor=floor_points)
    for option in OPTION_SWEEPS:
        rows = read_ok_rows(os.path.join(logs, f"profile_{option}.csv"))
        if rows:
            _options_plot(plt, target(f"options_{option}.png"), rows, option)
    rows = read_ok_rows(os.path.join(logs, "compare.csv"))
    if rows:
        _compare_plot(plt, target("compare_time.png"), rows)
    return written


def build_parser() -> FlagParser:
    parser = FlagParser(prog="python -m benchmarks.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", default="Results/logs", help="folder with the benchmark CSVs")
    parser.add_argument("--out", default="Results/plots", help="folder for the PNGs")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.path.isdir(args.logs):
        parser.error(f"--logs {args.logs!r} is not a folder: run `make profile-len` (or benchmarks.profile_sweep) first")
    try:
        import matplotlib  # noqa: F401  (only checks that plotting is possible)
    except ImportError:
        print("notice: matplotlib is not installed, no plots made (pip install -e \".[plot]\")")
        return 0
    written = make_plots(args.logs, args.out)
    if not written:
        print(f"notice: no benchmark CSV with status-ok rows in {args.logs}; nothing to plot")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
