"""graddotprod-attribute index / query (GradDotProd_LM/attribute.py) on a small GPT-2 saved as a Hugging Face model
directory: windows and provenance, rows independent of batching and padding, resuming, refusals, and planted
copies found at rank 1."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from ghost_results.grad_store import GradStore
from GradDotProd_LM import attribute
from pile_tools.tokenizer import EOT_ID, load_gpt2_tokenizer

SEQ = 16
WORDS = ("river stone cloud lamp orbit velvet copper maple signal harbor quartz meadow ember falcon tundra "
         "lantern cobalt saffron glacier thistle").split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model directory, corpus.jsonl, the documents' texts): a 1-layer GPT-2 with GPT-2's vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("attribute")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=64, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0))
    model.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 40)))) for _ in range(10)]
    with open(root / "corpus.jsonl", "w") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"text": text, "domain": "even" if i % 2 == 0 else "odd"}) + "\n")
    return root, docs


def index(root, store, *extra):
    return attribute.main(["index", str(root / "model"), "--data", str(root / "corpus.jsonl"), "--store", str(store),
                           "--seq_len", str(SEQ), "--project_dim", "300", "--batch_size", "3", *extra])


def test_windows_provenance_and_rows_independent_of_batching(setup, tmp_path):
    root, docs = setup
    assert index(root, tmp_path / "store", "--dtype", "float32") == 0
    store = GradStore(tmp_path / "store")
    prov = store.provenance()
    tokenizer = load_gpt2_tokenizer()
    expected = []  # every document's consecutive windows of SEQ tokens, its EOT included
    for doc_id, text in enumerate(docs):
        ids = tokenizer.encode(text) + [EOT_ID]
        expected += [(doc_id, start, "even" if doc_id % 2 == 0 else "odd", min(SEQ, len(ids) - start) - 1)
                     for start in range(0, len(ids), SEQ) if len(ids) - start >= 2]
    got = list(zip(prov["doc_id"], prov["token_offset"], prov["domain"], prov["n_tokens"]))
    assert got == expected
    # each window projected alone (no padding, batch of one) gives the stored row of the padded batches
    model, _ = attribute.load_model(str(root / "model"))
    from ghost_engine.projection import Projection

    projection = Projection.from_description(store.meta["projection"])
    rows = store.rows(np.arange(len(store)))
    for i in (0, 4, len(store) - 1):
        doc_id, start = int(prov["doc_id"][i]), int(prov["token_offset"][i])
        window = (tokenizer.encode(docs[doc_id]) + [EOT_ID])[start:start + SEQ]
        alone = attribute.project_rows(model, projection, [np.array(window)])[0]
        np.testing.assert_allclose(rows[i], alone, rtol=1e-4, atol=1e-6 * np.abs(alone).max())


def test_an_index_resumes_where_it_stopped_and_refuses_other_arguments(setup, tmp_path):
    root, _ = setup
    assert index(root, tmp_path / "whole", "--shard_rows", "4") == 0
    assert index(root, tmp_path / "parts", "--shard_rows", "4", "--max_windows", "7") == 0
    assert len(GradStore(tmp_path / "parts")) == 7
    assert index(root, tmp_path / "parts", "--shard_rows", "4") == 0  # continues at window 7
    whole, parts = GradStore(tmp_path / "whole"), GradStore(tmp_path / "parts")
    assert len(parts) == len(whole)
    # window 6 ended the first run's last batch alone: its row may differ from the batched one by rounding
    got, expected = parts.rows(np.arange(len(parts))), whole.rows(np.arange(len(whole)))
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=1e-3 * np.abs(expected).max())
    np.testing.assert_array_equal(got[9:], expected[9:])  # from the next batch boundary on: the same batches
    assert parts.provenance().equals(whole.provenance())
    assert index(root, tmp_path / "parts", "--shard_rows", "4", "--seq_len", "12") == 2  # another index


def test_an_index_killed_mid_way_resumes_to_the_same_store(setup, tmp_path):
    """kill -9 while shards are being written; running the same command again completes the same store."""
    root, _ = setup
    cmd = [sys.executable, "-m", "GradDotProd_LM.attribute", "index", str(root / "model"), "--data",
           str(root / "corpus.jsonl"), "--store", str(tmp_path / "killed"), "--seq_len", str(SEQ), "--project_dim",
           "300", "--batch_size", "1", "--shard_rows", "2", "--max_windows", "12"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    manifest = tmp_path / "killed" / "manifest.json"
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode == 0
    assert index(root, tmp_path / "whole", "--shard_rows", "2", "--batch_size", "1", "--max_windows", "12") == 0
    killed, whole = GradStore(tmp_path / "killed"), GradStore(tmp_path / "whole")
    np.testing.assert_array_equal(killed.rows(np.arange(len(killed))), whole.rows(np.arange(len(whole))))


@pytest.mark.parametrize("score", ["cosine", "raw", "precond"])
def test_planted_copies_are_found_at_rank_one(setup, tmp_path, score):
    """A query that is a stored window's text has that window's gradient: cosine 1 at rank 1; raw and precond
    scores find its document too (checked against a brute-force numpy ranking of the store's rows)."""
    root, docs = setup
    assert index(root, tmp_path / "store", "--dtype", "float32") == 0
    tokenizer = load_gpt2_tokenizer()
    picks = [2, 7]  # the first window of documents 2 and 7, as text
    queries = []
    for doc_id in picks:
        window = tokenizer.encode(docs[doc_id])[:SEQ]
        assert tokenizer.encode(tokenizer.decode(window)) == window
        queries.append(tokenizer.decode(window))
    with open(tmp_path / "q.jsonl", "w") as f:
        f.writelines(json.dumps({"text": q}) + "\n" for q in queries)
    out = tmp_path / "out"
    assert attribute.main(["query", str(tmp_path / "store"), "--queries", str(tmp_path / "q.jsonl"), "--out",
                           str(out), "--top", "3", "--score", score]) == 0
    table = pd.read_parquet(out / "attribution.parquet")
    best = table[table["rank"] == 0].sort_values("query")
    assert list(best["doc_id"]) == picks and list(best["token_offset"]) == [0, 0]
    if score == "cosine":
        np.testing.assert_allclose(best["score"], 1.0, rtol=1e-4)
    report = (out / "attribution.md").read_text()
    assert f"score: {score}" in report and queries[0].split()[0] in report


def test_bad_queries_and_sources_exit_2(setup, tmp_path):
    root, _ = setup
    (tmp_path / "q.jsonl").write_text("not json\n")
    assert index(root, tmp_path / "store", "--max_windows", "2") == 0
    assert attribute.main(["query", str(tmp_path / "store"), "--queries", str(tmp_path / "q.jsonl"), "--out",
                           str(tmp_path / "out")]) == 2
    assert attribute.main(["index", str(root / "model"), "--data", str(tmp_path / "missing.jsonl"), "--store",
                           str(tmp_path / "s2")]) == 2


def test_a_saved_hugging_face_dataset_and_a_pile_tools_corpus_are_indexed(setup, data_dir, tmp_path):
    """save_to_disk datasets ("text" or "input_ids" columns) give the JSONL file's windows; a pile_tools corpus
    gives consecutive windows of each domain with the reader's document ids."""
    import datasets

    from pile_tools.reader import PileReader

    root, docs = setup
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "texts"))
    tokenizer = load_gpt2_tokenizer()
    ids = [tokenizer.encode(d) + [EOT_ID] for d in docs]
    datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(tmp_path / "ids"))
    stores = {}
    for name in ("texts", "ids"):
        assert attribute.main(["index", str(root / "model"), "--data", str(tmp_path / name), "--store",
                               str(tmp_path / f"store-{name}"), "--seq_len", str(SEQ), "--project_dim", "300",
                               "--dtype", "float32"]) == 0
        stores[name] = GradStore(tmp_path / f"store-{name}")
    expected = [(i, start) for i, t in enumerate(ids) for start in range(0, len(t), SEQ) if len(t) - start >= 2]
    for store in stores.values():
        prov = store.provenance()
        assert list(zip(prov["doc_id"], prov["token_offset"])) == expected
    np.testing.assert_array_equal(stores["texts"].rows(np.arange(4)), stores["ids"].rows(np.arange(4)))
    assert attribute.main(["index", str(root / "model"), "--data", data_dir, "--store", str(tmp_path / "corpus"),
                           "--seq_len", str(SEQ), "--project_dim", "300", "--max_windows", "5"]) == 0
    prov = GradStore(tmp_path / "corpus").provenance()
    reader = PileReader(data_dir, split="train")
    first = reader.domains[0]
    assert list(prov["domain"]) == [first] * 5 and list(prov["token_offset"]) == [0, 16, 32, 48, 64]
    assert list(prov["doc_id"]) == list(reader.doc_id_at(first, [0, 16, 32, 48, 64]))


def test_a_model_of_another_vocabulary_is_refused(tmp_path):
    """Texts are tokenized with GPT-2's BPE: a model with fewer embedding rows would read them wrongly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=8, n_layer=1, n_head=2, n_positions=16)).save_pretrained(
        tmp_path / "small-vocab")
    (tmp_path / "c.jsonl").write_text('{"text": "one two three four"}\n')
    assert attribute.main(["index", str(tmp_path / "small-vocab"), "--data", str(tmp_path / "c.jsonl"), "--store",
                           str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s").exists()


def test_a_changed_corpus_is_another_index_and_its_texts_are_withheld(setup, tmp_path):
    """The index records its data's identity: resuming it on a corpus changed since is refused, and a query of a
    store whose corpus changed says so instead of showing the changed file's text as the stored windows'."""
    import shutil

    root, docs = setup
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(root / "corpus.jsonl", corpus)

    def index_of(store, *extra):
        return attribute.main(["index", str(root / "model"), "--data", str(corpus), "--store", str(store),
                               "--seq_len", str(SEQ), "--project_dim", "300", "--batch_size", "3", *extra])

    assert index_of(tmp_path / "store", "--max_windows", "4") == 0
    (tmp_path / "q.jsonl").write_text(json.dumps({"text": docs[0]}) + "\n")

    def report():
        assert attribute.main(["query", str(tmp_path / "store"), "--queries", str(tmp_path / "q.jsonl"), "--out",
                               str(tmp_path / "out"), "--top", "2"]) == 0
        return (tmp_path / "out" / "attribution.md").read_text()

    shown = report()
    assert "texts not shown" not in shown and "(not shown)" not in shown and docs[0].split()[0] in shown
    lines = corpus.read_text().splitlines()
    corpus.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # documents reordered
    assert index_of(tmp_path / "store") == 2  # the rest of a changed corpus is not appended to the first windows
    assert len(GradStore(tmp_path / "store")) == 4
    withheld = report()
    assert "texts not shown: the data under" in withheld and "corpus.jsonl" in withheld
    assert withheld.count("(not shown)") == 2


def test_an_index_again_with_another_projection_is_refused(setup, tmp_path):
    """--project_dim or --seed other than the store's: another index, refused, nothing appended (they were
    ignored, the store's own projection silently used)."""
    root, _ = setup
    assert index(root, tmp_path / "store", "--max_windows", "4") == 0
    for other in (["--project_dim", "200"], ["--seed", "3"]):
        assert index(root, tmp_path / "store", *other) == 2
        assert len(GradStore(tmp_path / "store")) == 4
