"""End to end: train GPT2-Tiny with GradDotProd on a tiny corpus in which the validation
passage is planted verbatim inside one training document; the report must rank that
document first among the samples of the steps where it appeared (the paper's sanity check).
"""
import json
import os
import pathlib
import random
import re

import numpy as np
import pandas as pd

from ghost_results import analysis, report
from ghost_results.results_io import read_run


SEQ_LEN = 32
VAL_DOMAIN = "Wikipedia (en)"
PASSAGE = ("The lighthouse keeper of Varnholm recorded every storm in a green ledger, noting the hour "
           "the lamp failed, the colour of the waves, and the names of the fishing boats that came home late.")

WORDS = {
    "Github": ["def", "return", "self", "import", "class", "value", "index", "buffer", "parse", "config",
               "None", "True", "len", "range", "print", "error", "path", "open", "write", "list"],
    "ArXiv": ["theorem", "lemma", "proof", "manifold", "we", "show", "that", "bound", "convergence",
              "estimator", "variance", "prior", "kernel", "matrix", "eigenvalue", "let", "denote", "space"],
    VAL_DOMAIN: ["river", "town", "century", "founded", "population", "railway", "county", "church",
                 "north", "valley", "mayor", "school", "built", "market", "bridge", "old", "region"],
}


def filler(domain, rng, n_words):
    """Deterministic text of the domain's vocabulary (no overlap with the planted passage)."""
    words = WORDS[domain]
    return " ".join(rng.choice(words) for _ in range(n_words)) + "."


def write_corpus(tmp_path):
    """train.jsonl: 4 documents per domain; Wikipedia doc 2 wraps the passage.
    validation.jsonl: the passage alone. Returns the tokenized data directory."""
    rng = random.Random(0)
    train, planted_text = [], None
    for domain in WORDS:
        for i in range(4):
            text = filler(domain, rng, 60)
            if domain == VAL_DOMAIN and i == 2:
                text = filler(domain, rng, 6) + " " + PASSAGE + " " + filler(domain, rng, 6)
                planted_text = text
            train.append({"text": text, "meta": {"pile_set_name": domain}})
    jsonl = {"train": train, "validation": [{"text": PASSAGE, "meta": {"pile_set_name": VAL_DOMAIN}}]}
    data_dir = tmp_path / "tokenized"
    from pile_tools.cli import main as pile_tools_main

    for split, records in jsonl.items():
        path = tmp_path / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        assert pile_tools_main(["tokenize", "--input", str(path), "--output", str(data_dir), "--split", split,
                                "--workers", "1", "--no_progress"]) == 0
    return data_dir, planted_text


def planted_doc_id(data_dir, planted_text):
    """doc_id of the planted document, found through the reader (not assumed from the input order)."""
    from pile_tools.reader import PileReader
    from pile_tools.tokenizer import load_gpt2_tokenizer

    reader, tokenizer = PileReader(str(data_dir), split="train"), load_gpt2_tokenizer()
    for doc_id in range(reader.num_documents(VAL_DOMAIN)):
        start, end = reader.document_span(VAL_DOMAIN, doc_id)
        if tokenizer.decode(reader.read_tokens(VAL_DOMAIN, start, end - start)) == planted_text:
            return doc_id
    raise AssertionError("planted document not found in the tokenized corpus")


def test_report_ranks_the_planted_document_first(tmp_path):
    from GradDotProd_LM.train import main as train_main

    data_dir, planted_text = write_corpus(tmp_path)
    planted = planted_doc_id(data_dir, planted_text)
    results = tmp_path / "Results"
    assert train_main([
        "--method", "GradDotProd", "--architecture", "GPT2-Tiny", "--batch_size", "8", "--val_batch_size", "1",
        "--seq_len", str(SEQ_LEN), "--max_steps", "30", "--data_dir", str(data_dir),
        "--results_dir", str(results), "--run_name", "planted", "--val_domain", VAL_DOMAIN,
        "--dot_prod_save_interval", "10", "--learning_rate", "1e-3", "--warmup_step", "5", "--seed", "0",
        "--eval_interval", "1000", "--eval_iter", "1", "--eval_bs", "2", "--checkpoint_interval", "1000",
    ]) == 0
    run_dir = results / "planted"

    run = read_run(run_dir)
    cols = run.columns
    assert run.missing_steps == [] and run.skipped == []
    is_planted = (cols["domain"] == VAL_DOMAIN) & (cols["doc_id"] == planted)
    planted_steps = np.unique(cols["step"][is_planted])
    assert len(planted_steps) >= 2, "the corpus must make the planted document appear at several steps"

    in_steps = analysis.rows_in_steps(cols, planted_steps)
    window = {name: col[in_steps] for name, col in cols.items()}
    samples = analysis.aggregate(window, analysis.compute_values(window, value=run.value), by="sample")
    best = analysis.rank(samples, 1)[0]
    assert (samples["domain"][best], samples["doc_id"][best]) == (VAL_DOMAIN, planted)

    # the report on the whole run: the planted document leads the document ranking and its text shows
    out = tmp_path / "report"
    assert report.main([str(run_dir), "--top", "5", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    top_documents = text.split("## Top 5 documents")[1].splitlines()
    assert top_documents[4].startswith("| 1 | ") and f"| {VAL_DOMAIN} | {planted} |" in top_documents[4]
    assert "lighthouse keeper of Varnholm" in text  # validation batch and the planted window's snippet
    assert os.path.exists(out / "cumulative_value.png")

    # the README's notebook example, as written, on this run: DataFrames throughout
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "load_run(" in b)
    scope = {}
    exec(compile(block.replace("Results/quickstart", str(run_dir)), "README.md", "exec"), scope)
    frame, top = scope["frame"], scope["top"]
    # the default estimator under AdamW is adamw (the rate inside its values: φ = w·dot), and steps 1-2 are
    # left out, as the report leaves them out
    assert run.value == "adamw" and frame.attrs["config"]["run_name"] == "planted"
    later = cols["step"] > 2
    assert len(frame) == int(later.sum()) and frame["step"].min() == 3
    phi = (cols["batch_weight"].astype(np.float64) * cols["dot_products"])[later]
    np.testing.assert_allclose(scope["values"].to_numpy(), phi, rtol=1e-12)
    assert len(top) == 10 and top["value"].is_monotonic_decreasing
    by_window = pd.DataFrame({"domain": cols["domain"][later], "token_offset": cols["token_offset"][later],
                              "value": phi})
    expected = by_window.groupby(["domain", "token_offset"])["value"].sum().sort_values(ascending=False)
    np.testing.assert_allclose(top["value"].to_numpy(), expected.to_numpy()[:10], rtol=1e-12)
