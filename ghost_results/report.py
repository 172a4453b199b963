"""In-Run Data Shapley report of a training run.

    python -m ghost_results.report Results/<run> [--top 20] [--out DIR]

Writes DIR/report.md, the values as CSV tables (samples.csv, documents.csv,
domains.csv, cumulative_by_domain.csv) and, when matplotlib is installed, PNG
plots. The computations live in `ghost_results.analysis`; this module loads,
decodes text snippets and writes files.
"""
from __future__ import annotations

import csv
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ghost_common.flags import FlagParser
from ghost_results import analysis
from ghost_results.results_io import FIRST_ORDER_COLUMN, read_run, safe_load_pickle

SNIPPET_CHARS = 160
DEFAULT_RECALL_KS = (1, 10, 100, 1000)


# ---------------------------------------------------------------------------
# Text snippets


class TextSource:
    """Decodes training windows from the tokenized corpus named in config.json.

    `available` is False (and `reason` says why) when pile_tools or the data
    directory is missing, or the data is no longer the run's (config.json's
    data_identity against the data now, or a change the run accepted mid-run:
    its windows would show another data's text); the report then runs without
    snippets."""

    def __init__(self, config: dict):
        self.available, self.reason = False, ""
        self._reader = self._tokenizer = None
        # the model sees seq_len tokens from token_offset; token_count counts the targets (seq_len - 1)
        self._window = config.get("seq_len")
        data_dir = config.get("data_dir")
        if not data_dir:
            self.reason = "config.json names no data_dir"
            return
        if not os.path.exists(data_dir):  # a directory, or a data spec file (pile_tools.data_spec)
            self.reason = f"data directory {data_dir!r} not found"
            return
        try:
            from pile_tools.identity import changed_since
            from pile_tools.reader import PileReader
            from pile_tools.tokenizer import load_gpt2_tokenizer

            from pile_tools.tokenizer import not_gpt2

            self.reason = (changed_since(config.get("data_identity"), data_dir, config.get("data_changes"))
                           or not_gpt2(config.get("data_tokenizer")))
            if self.reason:
                return
            self._reader = PileReader(data_dir, split="train")
            self._tokenizer = load_gpt2_tokenizer()
        except Exception as err:  # report without snippets rather than fail on a reader problem
            self.reason = f"cannot open {data_dir!r} ({type(err).__name__}: {err})"
            return
        self.available = True

    def snippet(self, domain: str, token_offset: int, token_count: int) -> str:
        if not self.available:
            return ""
        length = int(self._window) if self._window else int(token_count) + 1
        try:
            ids = self._reader.read_tokens(str(domain), int(token_offset), length)
            text = self._tokenizer.decode([int(t) for t in ids])
        except Exception as err:
            return f"(cannot decode: {type(err).__name__}: {err})"
        return shorten(text)


def validation_rows(run_dir: str, limit: int = 5, tokenizer: dict | None = None):
    """Rows of the run's valset.pkl as (domain, doc_id, token_offset, text), at most `limit`,
    plus a note (why text or rows are missing, or how many rows were left out)."""
    path = os.path.join(run_dir, "valset.pkl")
    if not os.path.exists(path):
        return [], "the run has no valset.pkl"
    try:
        valset = safe_load_pickle(path)
        tokens = np.asarray(valset["tokens"])  # [Bv, seq_len + 1]
        seq_len = int(valset.get("seq_len", tokens.shape[1] - 1))
        domains, doc_ids, offsets = valset["domain"], valset["doc_id"], valset["token_offset"]
    except (ValueError, KeyError, TypeError, OSError, EOFError, pickle.UnpicklingError) as err:
        return [], f"cannot read valset.pkl ({type(err).__name__}: {err})"
    try:
        from pile_tools.tokenizer import load_gpt2_tokenizer, not_gpt2

        decode, note = load_gpt2_tokenizer().decode, not_gpt2(tokenizer)  # tokenizer: config.json's data_tokenizer
        decode = None if note else decode
    except Exception as err:  # the table is still useful without the text
        decode, note = None, f"text not decoded ({type(err).__name__}: {err})"
    rows = [(domains[i], int(doc_ids[i]), int(offsets[i]), shorten(decode(tokens[i, :seq_len])) if decode else "")
            for i in range(min(limit, len(domains)))]
    if len(domains) > limit:
        note = (note + "; " if note else "") + f"{len(domains) - limit} more rows not shown"
    return rows, note


def shorten(text: str, limit: int = SNIPPET_CHARS) -> str:
    """One line, at most `limit` characters, safe inside a markdown table cell;
    GPT-2's end-of-text token (a document boundary) shows as [EOT]."""
    text = re.sub(r"\s+", " ", text.replace("<|endoftext|>", " [EOT] ")).strip()
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("`", "'")


def code_cell(snippet: str) -> str:
    """A snippet as a code span, so corpus text (`**`, `_`, `<tag>`) is shown, not rendered."""
    return f"`{snippet}`" if snippet else ""


# ---------------------------------------------------------------------------
# Report data


@dataclass
class Report:
    run: object
    convention: str
    values: np.ndarray  # per row
    samples: dict
    documents: dict
    domains: dict
    steps: np.ndarray
    cumulative: dict
    val_domain: str | None
    recall: list = field(default_factory=list)  # [(k, recall)]
    first_order: dict | None = None  # a deferred estimator's run: its values against the first-order ones
    columns: dict | None = None  # the rows valued: the run's, less those of the steps left out
    left_out: list = field(default_factory=list)  # steps whose values no estimator makes faithful, not valued
    unreliable: list = field(default_factory=list)  # those steps among the run's, left out or not


def build_report(run, convention: str = "first_order", val_domain: str | None = None,
                 recall_ks=DEFAULT_RECALL_KS, all_steps: bool = False) -> Report:
    """The report's numbers. The steps `analysis.unreliable_steps` names (an Adam/AdamW run's first two) are
    left out of every value, sum and ranking unless `all_steps`."""
    value = getattr(run, "value", "first_order")
    if value == "cosine" and convention == "first_order":
        convention = "raw"  # a cosine run's values are its cosines; there is no learning-rate-weighted form
    recorded = np.unique(np.asarray(run.columns["step"]))
    unreliable = [s for s in analysis.unreliable_steps(run.config) if s in recorded]
    left_out = [] if all_steps else analysis.steps_left_out(run.columns, run.config)
    columns = analysis.without_steps(run.columns, left_out) if left_out else run.columns
    values = analysis.compute_values(columns, convention, value)
    samples = analysis.aggregate(columns, values, by="sample")
    documents = analysis.aggregate(columns, values, by="document")
    steps, cumulative = analysis.cumulative_by_domain(columns, values)
    val_domain = val_domain if val_domain is not None else run.config.get("val_domain")
    recall = []
    n_samples = len(samples["value"])
    if val_domain and n_samples:
        for k in sorted({min(k, n_samples) for k in recall_ks}):
            recall.append((k, analysis.normalised_recall_at_k(samples, val_domain, k)))
    return Report(run=run, convention=convention, values=values, samples=samples, documents=documents,
                  domains=analysis.domain_summary(samples), steps=steps, cumulative=cumulative,
                  val_domain=val_domain, recall=recall,
                  first_order=compare_first_order(columns, value, convention, values), columns=columns,
                  left_out=left_out, unreliable=unreliable)


def _ranks(values) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (Spearman's convention)."""
    return pd.Series(values).rank().to_numpy()


def compare_first_order(columns, value: str, convention: str, values, k: int = 10) -> dict | None:
    """For the rows of a run that recorded first-order dot products beside its estimator's (second_order,
    adamw_vt, midpoint): per sample, Spearman's rank correlation of the two values, the share of samples where
    their signs agree, and how many of the top k they share; over the rows that have both. None otherwise."""
    if FIRST_ORDER_COLUMN not in columns or value == "first_order":
        return None
    has_both = ~np.isnan(columns[FIRST_ORDER_COLUMN])
    if not has_both.any():
        return None
    rows = {name: np.asarray(column)[has_both] for name, column in columns.items()}
    first = analysis.aggregate(rows, analysis.compute_values(rows, convention, dots=FIRST_ORDER_COLUMN))["value"]
    own = analysis.aggregate(rows, np.asarray(values)[has_both])["value"]
    k = min(k, len(own))
    rho = float(np.corrcoef(_ranks(own), _ranks(first))[0, 1]) if len(own) > 1 else float("nan")
    common = len(set(np.argsort(-own, kind="stable")[:k]) & set(np.argsort(-first, kind="stable")[:k]))
    return {"samples": len(own), "rows": int(has_both.sum()), "spearman": rho,
            "same_sign": float(np.mean(np.sign(own) == np.sign(first))), "k": k, "top_k_common": common}


# ---------------------------------------------------------------------------
# Writing


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, (float, np.floating)) else str(x)


def write_csv(path: str, table: dict, names: list, ranked=None) -> None:
    """Columns `names` of table, full float precision; rows in `ranked` order."""
    order = np.arange(len(table[names[0]])) if ranked is None else ranked
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow((["rank"] if ranked is not None else []) + names)
        for position, i in enumerate(order, start=1):
            row = [repr(float(table[n][i])) if np.asarray(table[n]).dtype.kind == "f" else str(table[n][i])
                   for n in names]
            writer.writerow(([position] if ranked is not None else []) + row)


SAMPLE_CSV_COLUMNS = ["value", "domain", "token_offset", "token_count", "doc_id", "occurrences",
                      "first_step", "last_step", "best_step"]
DOCUMENT_CSV_COLUMNS = ["value", "domain", "doc_id", "occurrences", "first_step", "last_step", "best_step"]
DOMAIN_CSV_COLUMNS = ["domain", "samples", "total", "mean", "share_positive"]


def write_tables(report: Report, out_dir: str) -> list:
    write_csv(os.path.join(out_dir, "samples.csv"), report.samples, SAMPLE_CSV_COLUMNS,
              ranked=analysis.rank(report.samples))
    write_csv(os.path.join(out_dir, "documents.csv"), report.documents, DOCUMENT_CSV_COLUMNS,
              ranked=analysis.rank(report.documents))
    write_csv(os.path.join(out_dir, "domains.csv"), report.domains, DOMAIN_CSV_COLUMNS)
    cumulative = {"step": report.steps, **report.cumulative}
    write_csv(os.path.join(out_dir, "cumulative_by_domain.csv"), cumulative, list(cumulative))
    return ["samples.csv", "documents.csv", "domains.csv", "cumulative_by_domain.csv"]


NO_MATPLOTLIB = ("matplotlib is not installed: install it with `pip install -e \".[plot]\"` in the repository, or "
                 "`pip install matplotlib`, and run the report again")


def write_plots(report: Report, out_dir: str):
    """PNG plots; returns (file names, None) or ([], reason they were skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], NO_MATPLOTLIB
    if len(report.samples["value"]) == 0:
        return [], "the run has no recorded steps"
    value_label = f"value per sample ({report.convention})"

    # one colour per domain (by name) in both plots
    colour = {d: f"C{i % 10}" for i, d in enumerate(sorted(report.cumulative))}
    domains = [str(d) for d in report.domains["domain"]]  # highest total first, drawn at the top
    per_domain = [report.samples["value"][report.samples["domain"] == d] for d in domains]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.45 * len(domains)))
    jitter = np.random.default_rng(0)  # fixed: the same run gives the same picture
    for row, (domain, values) in enumerate(zip(domains, per_domain)):
        ax.scatter(values, row + jitter.uniform(-0.25, 0.25, len(values)), s=6, alpha=0.4, color=colour[domain])
        ax.plot([np.median(values)] * 2, [row - 0.35, row + 0.35], color="black", linewidth=1.5)
    ax.set_yticks(range(len(domains)), domains)
    ax.invert_yaxis()
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_xscale("symlog", linthresh=_linthresh(report.samples["value"]), linscale=2)
    ax.set_xlabel(value_label + ", symlog; bar = median; > 0 lowers validation loss")
    ax.set_title("Value distribution per domain")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "value_distribution.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for domain, curve in report.cumulative.items():
        is_val = domain == report.val_domain
        ax.plot(report.steps, curve, label=domain + (" (validation domain)" if is_val else ""),
                linewidth=2.5 if is_val else 1.2, color=colour[domain])
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("training step")
    what = report.run.value if report.convention == "first_order" else report.convention  # φ of the estimator
    ax.set_ylabel(f"cumulative value ({what})")
    ax.set_title("Cumulative value per domain")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "cumulative_value.png"), dpi=110)
    plt.close(fig)
    return ["value_distribution.png", "cumulative_value.png"], None


def _linthresh(values) -> float:
    """Linear range of the symlog axis: the 10th percentile of |value| (> 0)."""
    nonzero = np.abs(values[values != 0])
    return float(np.percentile(nonzero, 10)) if len(nonzero) else 1.0


def dominant_steps(steps, values, share: float = 0.5, limit: int = 5) -> list:
    """[(step, its share of the summed |value|)] for the fewest steps (at most `limit`, largest first) that
    together hold more than `share` of it, when they are under a tenth of the steps; else []."""
    steps, magnitude = np.asarray(steps), np.abs(np.asarray(values, dtype=np.float64))
    unique, index = np.unique(steps, return_inverse=True)
    per_step = np.bincount(index.reshape(-1), weights=magnitude, minlength=len(unique))
    total = per_step.sum()
    if total <= 0 or len(unique) < 10:
        return []
    order = np.argsort(per_step)[::-1]
    shares = per_step[order] / total
    count = int(np.searchsorted(np.cumsum(shares), share, side="right")) + 1
    if count > min(limit, len(unique) // 10):
        return []
    return [(int(unique[i]), float(per_step[i] / total)) for i in order[:count]]


VALUE_TEXT = {  # (estimator, convention) -> what the value is, where the estimator changes it
    ("adamw", "first_order"): "AdamW-aware first-order value, φ = w_i · ⟨D ⊙ ∇L_val, ∇ℓ_i⟩ per occurrence "
                              "(D: AdamW's update sensitivity with v held at v_{t−1}, learning rate included)",
    ("adamw", "raw"): "AdamW-preconditioned dot products ⟨D ⊙ ∇L_val, ∇ℓ_i⟩",
    ("adamw_vt", "first_order"): "AdamW-aware value through v_t, φ = w_i · ⟨S(g_B) ⊙ ∇L_val, ∇ℓ_i⟩ per occurrence "
                                 "(S: the derivative of AdamW's actual update at the batch gradient, learning rate "
                                 "included)",
    ("adamw_vt", "raw"): "dot products ⟨S(g_B) ⊙ ∇L_val, ∇ℓ_i⟩ (AdamW's update sensitivity through v_t)",
    ("midpoint", "first_order"): "midpoint value, φ = w_i · ⟨S(g_B/2) ⊙ ∇L_val(θ_{t+1}(g_B/2)), ∇ℓ_i⟩ per "
                                 "occurrence (the optimizer's step differentiated at half the batch gradient; "
                                 "exact for a quadratic step game)",
    ("midpoint", "raw"): "dot products ⟨S(g_B/2) ⊙ ∇L_val(θ_{t+1}(g_B/2)), ∇ℓ_i⟩ (midpoint estimator)",
    ("second_order", "first_order"): "second-order In-Run Data Shapley of the gradient step, "
                                     "φ = w_i · ⟨η ⊙ (∇L_val − ½ H_val (η ⊙ g_B)), ∇ℓ_i⟩ per occurrence",
    ("second_order", "raw"): "dot products ⟨η ⊙ (∇L_val − ½ H_val (η ⊙ g_B)), ∇ℓ_i⟩ (second order)",
    ("cosine", "raw"): "cosine similarity cos(∇ℓ_i, ∇L_val) per occurrence",
}
CONVENTION_TEXT = {
    "first_order": "first-order In-Run Data Shapley, φ = η_t · w_i · dot_i per occurrence",
    "raw": "raw dot products dot_i = ⟨∇ℓ_i, ∇L_val⟩",
    "step_normalised": "dot_i / Σ_j |dot_j| within each step",
}


def _sample_rows(report: Report, indices, text: TextSource) -> list:
    s = report.samples
    rows = []
    for position, i in enumerate(indices, start=1):
        steps = {1: f"{s['first_step'][i]}", 2: f"{s['first_step'][i]}, {s['last_step'][i]}"}.get(
            int(s["occurrences"][i]), f"{s['first_step'][i]}–{s['last_step'][i]} (×{s['occurrences'][i]})")
        cells = [position, _fmt(s["value"][i]), s["domain"][i], s["doc_id"][i], s["token_offset"][i], steps]
        if text.available:
            cells.append(code_cell(text.snippet(s["domain"][i], s["token_offset"][i], s["token_count"][i])))
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return rows


def render_markdown(report: Report, top: int, text: TextSource, tables: list, plots: list,
                    plots_skipped: str | None) -> str:
    """report.md: the run's summary, validation batch, completeness, domains, the first-order comparison,
    the rankings and the files, in that order."""
    lines = [f"# In-Run Data Shapley report: `{os.path.basename(os.path.normpath(report.run.run_dir))}`", ""]
    for section in (_summary(report), _validation_batch(report.run), _completeness(report.run), _domains(report),
                     _against_first_order(report), _rankings(report, top, text), _files(tables, plots, plots_skipped)):
        lines += section
    return "\n".join(lines)


def _summary(report: Report) -> list:
    run, s, columns = report.run, report.samples, report.columns
    meaning = VALUE_TEXT.get((run.value, report.convention), CONVENTION_TEXT[report.convention])
    lines = [f"- Estimator: `{run.value}` (the engine's `value`, docs/METHOD.md section 2.1).",
             f"- Value: {meaning}, summed over the steps where a sample "
             "appeared. Positive = the sample lowered the validation loss.",
             "- Sample = one training window (domain, token offset); the same window seen twice sums. "
             "Document = (domain, doc_id).",
             f"- Rows: {len(columns['step'])} occurrences, {len(s['value'])} samples, "
             f"{len(report.documents['value'])} documents, {len(report.steps)} steps"
             + (f" ({report.steps[0]}–{report.steps[-1]})" if len(report.steps) else "") + "."]
    if report.val_domain:
        lines.append(f"- Validation domain: {report.val_domain}.")
    if report.unreliable:
        why = (f"the first two updates of {run.config.get('optimizer')}, where docs/FIDELITY.md finds no per-step "
               "estimator that tracks the step's exact Shapley value (best Pearson 0.77 at step 1, 0.95 at step 2)")
        lines.append(f"- Steps {_ranges(report.left_out)} left out: {why}; `--all_steps` values them too."
                     if report.left_out else
                     f"- Caution: steps {_ranges(report.unreliable)} are valued, and they are {why}.")
    dominant = dominant_steps(columns["step"], report.values)
    if dominant:
        early = (" For an `adamw` run this is the fixed-state sensitivity before AdamW's second moments exist "
                 "(D ≈ lr/eps at step 1); docs/FIDELITY.md finds no per-step estimator reliable over AdamW's "
                 "first steps." if run.value == "adamw" and not report.left_out else "")
        named = (f"step {dominant[0][0]} holds" if len(dominant) == 1
                 else f"steps {', '.join(str(step) for step, _ in dominant)} hold")
        lines.append(f"- Caution: {named} "
                     f"{100 * sum(share for _, share in dominant):.1f}% of the summed |value| of "
                     f"{len(report.steps)} steps, so sums and rankings mostly reflect them.{early}")
    return lines + [""]


def _validation_batch(run) -> list:
    val_rows, val_note = validation_rows(run.run_dir, tokenizer=(run.config or {}).get("data_tokenizer"))
    lines = ["## Validation batch", ""]
    if val_rows:
        lines += ["| domain | doc | token offset | text |", "|---|---:|---:|---|"]
        lines += [f"| {d} | {doc} | {off} | {code_cell(t)} |" for d, doc, off, t in val_rows]
        lines.append("")
    if val_note:
        lines += [f"Note: {val_note}.", ""]
    return lines


def _completeness(run) -> list:
    lines = ["## Completeness", ""]
    steps_found = sorted({int(s) for s in run.columns["step"]}) if len(run.columns["step"]) else []
    if not run.config:
        lines.append(f"- No config.json: the run's length is unknown; steps after the last one found "
                     f"({steps_found[-1] if steps_found else 'none'}) cannot be checked.")
    elif not run.skipped and not run.missing_steps and not run.duplicate_steps:
        lines.append(f"Complete: steps 1..{steps_found[-1] if steps_found else 0} in {len(run.files)} dot-product "
                     "files, no gaps.")
    for path, reason in run.skipped:
        lines.append(f"- Skipped unreadable file `{os.path.basename(path)}`: {shorten(reason, 300)}")
    if run.missing_steps:
        lines.append(f"- Partial run: {len(run.missing_steps)} expected steps have no data "
                     f"({_ranges(run.missing_steps)}).")
    if run.duplicate_steps:
        lines.append(f"- Steps recorded twice (resumed run), kept once: {_ranges(run.duplicate_steps)}.")
    return lines + [""]


def _domains(report: Report) -> list:
    lines = ["## Domains", "", "| domain | samples | total value | mean per sample | share positive |",
             "|---|---:|---:|---:|---:|"]
    d = report.domains
    for i in range(len(d["domain"])):
        lines.append(f"| {d['domain'][i]} | {d['samples'][i]} | {_fmt(d['total'][i])} | {_fmt(d['mean'][i])} | "
                     f"{d['share_positive'][i]:.1%} |")
    lines.append("")
    if report.recall:
        lines += [f"Normalised recall@k of the validation domain ({report.val_domain}): share of its samples "
                  "among the top k by value, divided by its share of all samples seen (1 = chance).", "",
                  "| k | normalised recall@k |", "|---:|---:|"]
        lines += [f"| {k} | {r:.3g} |" for k, r in report.recall]
        lines.append("")
    return lines


def _against_first_order(report: Report) -> list:
    if report.first_order is None:
        return []
    c = report.first_order
    return ["## Against first-order values", "",
            f"The run also recorded the first-order dot products ⟨∇ℓ_i, ∇L_val⟩ of its rows "
            f"({c['rows']} rows, {c['samples']} samples), valued with the same convention. Per sample, "
            f"Spearman's rank correlation between `{report.run.value}` and first-order values: {c['spearman']:.3f}; "
            f"signs agree for {c['same_sign']:.1%} of the samples; {c['top_k_common']} of the top {c['k']} "
            "are the same. (`analysis.compute_values(..., dots=\"first_order_dot_products\")` gives the "
            "first-order values.)", ""]


def _rankings(report: Report, top: int, text: TextSource) -> list:
    lines = []
    text_header = (" text |", "---|") if text.available else ("", "")
    for title, lowest in ((f"Top {top} samples", False), (f"Bottom {top} samples", True)):
        lines += [f"## {title}", ""]
        if not text.available:
            lines += [f"Text snippets skipped: {text.reason}.", ""]
        lines += ["| # | value | domain | doc | token offset | step(s) |" + text_header[0],
                  "|---:|---:|---|---:|---:|---|" + text_header[1]]
        lines += _sample_rows(report, analysis.rank(report.samples, top, lowest=lowest), text)
        lines.append("")

    lines += [f"## Top {top} documents", "",
              "| # | value | domain | doc | occurrences | best step |" + (" text of best window |" if text.available else ""),
              "|---:|---:|---|---:|---:|---:|" + text_header[1]]
    doc = report.documents
    for position, i in enumerate(analysis.rank(doc, top), start=1):
        cells = [position, _fmt(doc["value"][i]), doc["domain"][i], doc["doc_id"][i], doc["occurrences"][i],
                 doc["best_step"][i]]
        if text.available:
            cells.append(code_cell(text.snippet(doc["domain"][i], doc["best_token_offset"][i],
                                                doc["best_token_count"][i])))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines + [""]


def _files(tables: list, plots: list, plots_skipped: str | None) -> list:
    lines = ["## Files", ""] + [f"- [`{name}`]({name})" for name in tables]
    if plots:
        lines += [""] + [f"![{name}]({name})" for name in plots]
    else:
        lines += ["", f"Plots skipped: {plots_skipped}."]
    return lines + [""]


def _ranges(steps) -> str:
    """[1,2,3,7] -> '1–3, 7'."""
    parts, start = [], None
    for i, step in enumerate(steps):
        if start is None:
            start = step
        if i + 1 == len(steps) or steps[i + 1] != step + 1:
            parts.append(str(start) if start == step else f"{start}–{step}")
            start = None
    return ", ".join(parts)


def write_report(run_dir, out_dir=None, top: int = 20, convention: str = "first_order",
                 val_domain: str | None = None, strict: bool = False, all_steps: bool = False) -> str:
    """Load a run, write the report into out_dir (default <run_dir>/report); returns report.md's path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped files and duplicates are listed in the report itself
        run = read_run(run_dir, strict=strict)
    out_dir = out_dir if out_dir is not None else os.path.join(os.fspath(run_dir), "report")
    os.makedirs(out_dir, exist_ok=True)
    report = build_report(run, convention=convention, val_domain=val_domain, all_steps=all_steps)
    tables = write_tables(report, out_dir)
    plots, plots_skipped = write_plots(report, out_dir)
    if plots_skipped == NO_MATPLOTLIB:  # report.md says so on its last line, which nobody may read
        print(f"note: no PNG plots: {NO_MATPLOTLIB}", file=sys.stderr, flush=True)
    markdown = render_markdown(report, top, TextSource(run.config), tables, plots, plots_skipped)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(markdown)
    return path


def build_parser() -> FlagParser:
    parser = FlagParser(prog="python -m ghost_results.report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run directory, e.g. Results/<run>")
    parser.add_argument("--top", type=int, default=20, help="how many top/bottom samples to list (default 20)")
    parser.add_argument("--out", default=None, help="output directory (default <run_dir>/report)")
    parser.add_argument("--convention", choices=analysis.CONVENTIONS, default="first_order",
                        help="value convention (default first_order: lr * batch weight * dot product; "
                             "batch weight * dot product for the estimators with the learning rate inside: "
                             "second_order, adamw, adamw_vt, midpoint; a cosine run reports its cosines)")
    parser.add_argument("--val_domain", default=None,
                        help="domain for normalised recall@k (default: val_domain in config.json)")
    parser.add_argument("--strict", action="store_true", help="fail on an unreadable results file instead of skipping it")
    parser.add_argument("--all_steps", action="store_true",
                        help="value every step, AdamW's first two too (left out by default: docs/FIDELITY.md finds "
                             "no per-step estimator faithful there)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top must be >= 1, got {args.top}")
    if not os.path.isdir(args.run_dir):
        parser.error(f"run directory {args.run_dir!r} does not exist")
    if not os.path.isdir(os.path.join(args.run_dir, "grad_dotprods")):
        parser.error(f"{args.run_dir!r} has no grad_dotprods/ directory; was the run trained with --method GradDotProd?")
    path = write_report(args.run_dir, args.out, top=args.top, convention=args.convention,
                        val_domain=args.val_domain, strict=args.strict, all_steps=args.all_steps)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
