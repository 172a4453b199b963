"""The report and its analysis API on a synthetic run with hand-computed values.

Run (all numbers dyadic, so float arithmetic is exact):

step 1, lr 0.5
  row 0: Github off 0   doc 10  w 0.25 dot  4  -> phi = 0.5*0.25*4  =  0.5
  row 1: ArXiv  off 100 doc 20  w 0.25 dot -2  -> phi = 0.5*0.25*-2 = -0.25
  row 2: Github off 50  doc 10  w 0.5  dot  1  -> phi = 0.5*0.5*1   =  0.25
step 2, lr 0.25
  row 0: Github off 0   doc 10  w 0.5  dot  2  -> phi = 0.25*0.5*2 =  0.25  (same window as step 1 row 0)
  row 1: ArXiv  off 200 doc 21  w 0.5  dot  7  -> phi = 0.25*0.5*7 =  0.875

samples:   ArXiv@200 0.875 > Github@0 0.75 > Github@50 0.25 > ArXiv@100 -0.25
documents: Github/10 1.0 > ArXiv/21 0.875 > ArXiv/20 -0.25
domains:   Github total 1.0 (2 samples, mean 0.5, 100% positive)
           ArXiv  total 0.625 (2 samples, mean 0.3125, 50% positive)
cumulative after step 1: Github 0.75, ArXiv -0.25; after step 2: Github 1.0, ArXiv 0.625
recall@k for ArXiv (2 of 4 samples = share 0.5): top-1 {ArXiv} -> 1/0.5 = 2; top-2 -> 0.5/0.5 = 1
"""
import csv
import json
import os
import sys

import numpy as np
import pytest

from ghost_results import analysis, report
from ghost_results.results_io import SCHEMA_VERSION, load_dotprods, read_run, save_dotprod_pickle

STEPS = [
    {"step": 1, "lr": 0.5, "domain": ["Github", "ArXiv", "Github"], "token_offset": [0, 100, 50],
     "doc_id": [10, 20, 10], "batch_weights": [0.25, 0.25, 0.5], "dot_products": [4.0, -2.0, 1.0]},
    {"step": 2, "lr": 0.25, "domain": ["Github", "ArXiv"], "token_offset": [0, 200],
     "doc_id": [10, 21], "batch_weights": [0.5, 0.5], "dot_products": [2.0, 7.0]},
]


def record(spec):
    n = len(spec["domain"])
    return {"step": spec["step"], "lr": spec["lr"], "train_loss": 4.0, "val_loss": 4.5,
            "dot_products": np.array(spec["dot_products"], dtype=np.float32),
            "batch_weights": np.array(spec["batch_weights"], dtype=np.float32),
            "token_counts": np.full(n, 16, dtype=np.int64), "domain": spec["domain"],
            "token_offset": np.array(spec["token_offset"], dtype=np.int64),
            "doc_id": np.array(spec["doc_id"], dtype=np.int64), "sample_index": np.arange(n, dtype=np.int64)}


def make_run(run_dir, specs_per_file, config=None):
    os.makedirs(run_dir / "grad_dotprods", exist_ok=True)
    for iteration, specs in specs_per_file.items():
        save_dotprod_pickle(run_dir / "grad_dotprods" / f"iter_{iteration:06d}.pkl",
                            {"schema": "graddotprod.dotprods", "schema_version": SCHEMA_VERSION,
                             "run_name": "synthetic", "world_size": 1, "steps": [record(s) for s in specs]})
    (run_dir / "config.json").write_text(json.dumps(config or {"val_domain": "ArXiv", "max_steps": 2}))
    return run_dir


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path / "synthetic", {1: [STEPS[0]], 2: [STEPS[1]]})


def test_first_order_values_per_sample_document_domain(run_dir):
    cols = load_dotprods(run_dir)
    values = analysis.compute_values(cols)
    assert values.tolist() == [0.5, -0.25, 0.25, 0.25, 0.875]

    samples = analysis.aggregate(cols, values, by="sample")
    top = analysis.take(samples, analysis.rank(samples))
    assert list(zip(top["domain"].tolist(), top["token_offset"].tolist(), top["value"].tolist())) == [
        ("ArXiv", 200, 0.875), ("Github", 0, 0.75), ("Github", 50, 0.25), ("ArXiv", 100, -0.25)]
    assert top["occurrences"].tolist() == [1, 2, 1, 1]
    assert (top["first_step"].tolist(), top["last_step"].tolist()) == ([2, 1, 1, 1], [2, 2, 1, 1])
    bottom = analysis.take(samples, analysis.rank(samples, 1, lowest=True))
    assert bottom["token_offset"].tolist() == [100]

    docs = analysis.aggregate(cols, values, by="document")
    top_docs = analysis.take(docs, analysis.rank(docs))
    assert list(zip(top_docs["domain"].tolist(), top_docs["doc_id"].tolist(), top_docs["value"].tolist())) == [
        ("Github", 10, 1.0), ("ArXiv", 21, 0.875), ("ArXiv", 20, -0.25)]
    # the best window of Github/10 is offset 0 at step 1 (0.5 beats 0.25 and 0.25)
    assert (top_docs["best_token_offset"][0], top_docs["best_step"][0]) == (0, 1)

    domains = analysis.domain_summary(samples)
    assert domains["domain"].tolist() == ["Github", "ArXiv"]
    assert domains["samples"].tolist() == [2, 2]
    assert domains["total"].tolist() == [1.0, 0.625]
    assert domains["mean"].tolist() == [0.5, 0.3125]
    assert domains["share_positive"].tolist() == [1.0, 0.5]

    steps, curves = analysis.cumulative_by_domain(cols, values)
    assert steps.tolist() == [1, 2]
    assert curves["Github"].tolist() == [0.75, 1.0] and curves["ArXiv"].tolist() == [-0.25, 0.625]

    assert analysis.normalised_recall_at_k(samples, "ArXiv", 1) == 2.0
    assert analysis.normalised_recall_at_k(samples, "ArXiv", 2) == 1.0
    assert analysis.normalised_recall_at_k(samples, "Github", 1) == 0.0
    assert np.isnan(analysis.normalised_recall_at_k(samples, "Pile-CC", 1))


def test_other_conventions(run_dir):
    cols = load_dotprods(run_dir)
    assert analysis.compute_values(cols, "raw").tolist() == [4.0, -2.0, 1.0, 2.0, 7.0]
    # step 1: sum |dot| = 7; step 2: sum |dot| = 9
    np.testing.assert_allclose(analysis.compute_values(cols, "step_normalised"),
                               [4 / 7, -2 / 7, 1 / 7, 2 / 9, 7 / 9], rtol=1e-15)
    with pytest.raises(ValueError, match="unknown value convention 'banana'"):
        analysis.compute_values(cols, "banana")


def test_rows_in_steps_restricts_ranking(run_dir):
    cols = load_dotprods(run_dir)
    mask = analysis.rows_in_steps(cols, [1])
    step1 = {name: col[mask] for name, col in cols.items()}
    samples = analysis.aggregate(step1, analysis.compute_values(step1), by="sample")
    assert samples["token_offset"][analysis.rank(samples, 1)].tolist() == [0]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_report_command_writes_tables_plots_and_markdown(run_dir, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(run_dir), "--top", "2", "--out", str(out)]) == 0
    samples = read_csv(out / "samples.csv")
    assert [(r["rank"], r["domain"], r["token_offset"], float(r["value"])) for r in samples] == [
        ("1", "ArXiv", "200", 0.875), ("2", "Github", "0", 0.75), ("3", "Github", "50", 0.25),
        ("4", "ArXiv", "100", -0.25)]
    domains = read_csv(out / "domains.csv")
    assert [(r["domain"], float(r["total"]), float(r["share_positive"])) for r in domains] == [
        ("Github", 1.0, 1.0), ("ArXiv", 0.625, 0.5)]
    documents = read_csv(out / "documents.csv")
    assert [(r["domain"], r["doc_id"], float(r["value"])) for r in documents][0] == ("Github", "10", 1.0)
    cumulative = read_csv(out / "cumulative_by_domain.csv")
    assert [float(r["ArXiv"]) for r in cumulative] == [-0.25, 0.625]
    for png in ("value_distribution.png", "cumulative_value.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "Complete: steps 1..2 in 2 dot-product files, no gaps." in text
    recall_table = text.split("| k | normalised recall@k |")[1].split("\n\n")[0]
    # recall@1 = 2; k = 10, 100, 1000 clamp to the 4 samples: recall@4 = 1
    assert recall_table.strip().splitlines()[1:] == ["| 1 | 2 |", "| 4 | 1 |"]
    assert "Text snippets skipped: config.json names no data_dir" in text
    assert "![cumulative_value.png](cumulative_value.png)" in text
    top_section = text.split("## Top 2 samples")[1].split("## Bottom")[0]
    assert "| 1 | 0.875 | ArXiv | 21 | 200 | 2 |\n| 2 | 0.75 | Github | 10 | 0 | 1, 2 |" in top_section


def test_shorten_makes_one_table_cell():
    assert report.shorten("a|b\n\n c<|endoftext|>d `x`") == "a\\|b c [EOT] d 'x'"
    assert report.shorten("x" * 500, limit=10) == "x" * 9 + "…"


def test_partial_run_and_corrupt_file_are_reported(tmp_path):
    # max_steps 4 but only steps 1-2 written, plus a truncated file for steps 3
    run_dir = make_run(tmp_path / "partial", {1: [STEPS[0]], 2: [STEPS[1]]},
                       config={"val_domain": "ArXiv", "max_steps": 4, "data_dir": str(tmp_path / "deleted")})
    bad = run_dir / "grad_dotprods" / "iter_000003.pkl"
    bad.write_bytes((run_dir / "grad_dotprods" / "iter_000002.pkl").read_bytes()[:-30])
    out = tmp_path / "out"
    assert report.main([str(run_dir), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "Skipped unreadable file `iter_000003.pkl`" in text
    assert "Partial run: 2 expected steps have no data (3–4)" in text
    assert f"Text snippets skipped: data directory '{tmp_path / 'deleted'}' not found" in text
    assert len(read_csv(out / "samples.csv")) == 4
    with pytest.raises(ValueError, match="iter_000003.pkl"):
        report.main([str(run_dir), "--out", str(out), "--strict"])


def test_completeness_without_config_json_is_not_claimed(tmp_path):
    """No config.json and steps 1 missing: the gap is found (steps count from 1) and the report says the
    run's end cannot be checked instead of calling it complete."""
    run_dir = make_run(tmp_path / "noconfig", {2: [STEPS[1]]}, config={"val_domain": "ArXiv"})
    os.remove(run_dir / "config.json")
    out = tmp_path / "out"
    assert report.main([str(run_dir), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "Complete" not in text.split("## Completeness")[1].split("##")[0]
    assert "No config.json: the run's length is unknown; steps after the last one found (2)" in text
    assert "Partial run: 1 expected steps have no data (1)" in text


def test_plots_skipped_without_matplotlib(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "out"
    report.write_report(run_dir, out)
    assert "Plots skipped: matplotlib is not installed" in (out / "report.md").read_text()
    assert not list(out.glob("*.png"))


def test_the_terminal_says_plots_need_matplotlib_and_how_to_install_it(run_dir, tmp_path, capsys):
    """`python -m ghost_results.report` without matplotlib (hidden from the subprocess: sys.modules entry None,
    so its import fails) says on stderr that there are no PNG plots and gives the install commands; with it, no
    such note."""
    import subprocess

    out = tmp_path / "out"
    script = ("import sys; sys.modules['matplotlib'] = None; from ghost_results.report import main; "
              f"sys.exit(main([{str(run_dir)!r}, '--out', {str(out)!r}]))")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=repo))
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and not list(out.glob("*.png"))
    note = [line for line in done.stderr.splitlines() if "no PNG plots" in line]
    assert len(note) == 1 and 'pip install -e ".[plot]"' in note[0] and "pip install matplotlib" in note[0]
    assert "Plots skipped: matplotlib is not installed" in (out / "report.md").read_text()

    capsys.readouterr()
    report.write_report(run_dir, tmp_path / "with_matplotlib")
    assert "no PNG plots" not in capsys.readouterr().err and list((tmp_path / "with_matplotlib").glob("*.png"))


def test_bad_arguments_exit_2(tmp_path, run_dir):
    for argv in ([str(tmp_path / "nope")], [str(tmp_path)], [str(run_dir), "--top", "0"],
                 [str(run_dir), "--convention", "banana"]):
        with pytest.raises(SystemExit) as err:
            report.main(argv)
        assert err.value.code == 2


def test_text_snippets_use_the_text_source(run_dir, tmp_path, monkeypatch):
    class FakeText:
        available, reason = True, ""

        def snippet(self, domain, offset, count):
            return report.shorten(f"{domain} window at {offset} | {count} tokens")

    monkeypatch.setattr(report, "TextSource", lambda config: FakeText())
    out = tmp_path / "out"
    report.write_report(run_dir, out, top=1)
    text = (out / "report.md").read_text()
    assert "| 1 | 0.875 | ArXiv | 21 | 200 | 2 | `ArXiv window at 200 \\| 16 tokens` |" in text
    assert "snippets skipped" not in text


def test_run_to_pandas(run_dir):
    frame = read_run(run_dir).to_pandas()
    assert frame["dot_products"].tolist() == [4.0, -2.0, 1.0, 2.0, 7.0]


def test_steps_that_dominate_the_values_are_named():
    """A step holding most of the summed |value| (AdamW's fixed-state form at step 1) is named; an even run is not."""
    from ghost_results.report import dominant_steps

    steps = np.repeat(np.arange(1, 21), 2)
    even = np.ones(40)
    assert dominant_steps(steps, even) == []
    skewed = even.copy()
    skewed[:2] = 1000.0  # step 1: 2000 of 2038
    (step, share), = dominant_steps(steps, skewed)
    assert step == 1 and abs(share - 2000 / 2038) < 1e-12
    assert dominant_steps(steps[:8], skewed[:8]) == []  # too few steps to say


def test_snippets_are_withheld_once_the_data_is_not_the_runs(data_dir, tmp_path):
    """TextSource reads windows only from the data config.json's data_identity describes: a token file rewritten
    to the same size, or a change the run accepted mid-run, withholds every snippet with the reason."""
    import shutil

    from pile_tools.identity import data_identity

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    config = {"data_dir": str(data), "seq_len": 16, "data_identity": data_identity(str(data))}
    text = report.TextSource(config)
    assert text.available and text.snippet("Github", 0, 15)
    assert report.TextSource(dict(config, data_identity=None)).available  # a run recorded before identities
    withheld = report.TextSource(dict(config, data_changes=[{"from_step": 7, "change": "added ['x.bin']"}]))
    assert not withheld.available and "from step 7" in withheld.reason
    path = data / "train" / "github.bin"
    tokens = np.fromfile(path, np.uint16)
    tokens[::-1].tofile(path)  # the same size, other tokens at every offset
    changed = report.TextSource(config)
    assert not changed.available and "changed since" in changed.reason and "train/github.bin" in changed.reason
    assert changed.snippet("Github", 0, 15) == ""


def test_texts_of_another_tokenizer_are_not_decoded_with_gpt2(data_dir, run_dir):
    """Token ids of another vocabulary decode with GPT-2's BPE to other text without an error: neither the
    snippets nor the validation rows are decoded for a run whose data_tokenizer is not GPT-2's."""
    neox = {"name": "gpt-neox-20b", "vocab_size": 50277, "eot_id": 0}
    text = report.TextSource({"data_dir": data_dir, "seq_len": 16, "data_tokenizer": neox})
    assert not text.available and "gpt-neox-20b" in text.reason
    assert report.TextSource({"data_dir": data_dir, "seq_len": 16,
                              "data_tokenizer": {"name": "gpt2-bpe", "vocab_size": 50257}}).available
    from ghost_results.valset import write_valset_file

    valset_dir = os.path.join(os.path.dirname(str(run_dir)), "with_valset")
    os.makedirs(valset_dir, exist_ok=True)
    write_valset_file(os.path.join(valset_dir, "valset.pkl"), [[15496, 995, 0]], 2, ["Github"], [0], [0], [0])
    rows, note = report.validation_rows(valset_dir)
    assert rows[0][3] == "Hello world" and note == ""  # GPT-2's ids 15496, 995
    rows, note = report.validation_rows(valset_dir, tokenizer=neox)
    assert rows[0][3] == "" and "gpt-neox-20b" in note
