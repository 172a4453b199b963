"""graddotprod-curate on a tiny real run of the app (GPT2-Tiny, the bundled sample): the units removed are exactly
the lowest-valued (or highest, or a seeded draw) by an independent computation from the results files, every
kept token is the source's, the other splits are copied byte for byte, the app trains on the output, and bad
input exits 2 with nothing written."""
import filecmp
import json
import math
import os
import shutil

import numpy as np
import pytest

from ghost_results.results_io import load_run
from GradDotProd_LM import curate, train
from pile_tools.reader import PileReader
from pile_tools.tokenizer import load_gpt2_tokenizer

B, T, STEPS = 8, 32, 5


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    assert train.main(["--architecture", "GPT2-Tiny", "--batch_size", str(B), "--seq_len", str(T),
                       "--val_batch_size", "2", "--max_steps", str(STEPS), "--warmup_step", "2",
                       "--learning_rate", "1e-3", "--eval_interval", "1000", "--eval_iter", "1", "--eval_bs", "2",
                       "--dot_prod_save_interval", "2", "--seed", "3", "--data_dir", data_dir,
                       "--results_dir", str(results), "--run_name", "valued"]) == 0
    return str(results / "valued")


def expected_values(run_dir, key, all_steps=False):
    """{(domain, key): value} summed over the run's rows in row order, from the files alone: the run records the
    default estimator under AdamW, adamw (the rate inside: φ = w·dot), and steps 1-2 are left out unless
    `all_steps` (no per-step estimator is faithful over AdamW's first two updates)."""
    frame = load_run(run_dir)
    assert (frame.attrs["config"]["value"], frame.attrs["config"]["optimizer"]) == ("adamw", "AdamW")
    if not all_steps:
        frame = frame[frame["step"] > 2]
    phi = frame["batch_weight"].to_numpy(np.float64) * frame["dot_products"].to_numpy(np.float64)
    sums = {}
    for domain, k, value in zip(frame["domain"], frame[key], phi):
        sums[str(domain), int(k)] = sums.get((str(domain), int(k)), 0.0) + float(value)
    return sums


def ranked(sums, lowest=True):
    """Keys by value (lowest or highest first), ties in key order."""
    keys = sorted(sums)
    return sorted(keys, key=lambda k: (sums[k] if lowest else -sums[k], keys.index(k)))


def documents(data_dir, domain):
    """[(tokens with EOT, origin)] of every document of a domain of the train split, read from the files."""
    reader = PileReader(str(data_dir), split="train")
    if domain not in reader.domains:
        return []
    tokens = reader.read_tokens(domain, 0, reader.num_tokens(domain))
    starts = list(reader.document_starts(domain)) + [len(tokens)]
    return [(tokens[starts[i]:starts[i + 1]], reader.document_source(domain, i)) for i in range(len(starts) - 1)]


def expected_pieces(reader, domain, spans, eot=50256):
    """The documents a domain should hold once `spans` are removed, by a mask over its tokens: the text tokens
    outside every span, in runs that never cross a document boundary, each run followed by EOT. Returns
    (pieces, their source documents' origins, text tokens removed)."""
    tokens = reader.read_tokens(domain, 0, reader.num_tokens(domain))
    starts = list(reader.document_starts(domain)) + [len(tokens)]
    removed = np.zeros(len(tokens), dtype=bool)
    for start, end in spans:
        removed[start:end] = True
    pieces, origins, cut = [], [], 0
    for doc in range(len(starts) - 1):
        text = slice(starts[doc], starts[doc + 1] - 1)
        cut += int(removed[text].sum())
        kept = np.flatnonzero(~removed[text]) + starts[doc]
        for run in np.split(kept, np.flatnonzero(np.diff(kept) > 1) + 1) if len(kept) else []:
            pieces.append(np.append(tokens[run], eot))
            origins.append(reader.document_source(domain, doc))
    return pieces, origins, cut


def curated(run_dir, out, *flags):
    assert curate.main([run_dir, "--out", str(out), *flags]) == 0
    with open(os.path.join(out, "curation.json")) as f:
        return json.load(f)


def assert_other_splits_copied(data_dir, out):
    for split in ("validation", "test"):
        names = sorted(os.listdir(os.path.join(data_dir, split)))
        assert sorted(os.listdir(os.path.join(out, split))) == names
        match, mismatch, errors = filecmp.cmpfiles(os.path.join(data_dir, split), os.path.join(out, split), names,
                                                   shallow=False)
        assert mismatch == [] and errors == []


def test_drop_bottom_documents_removes_exactly_the_lowest_valued(run_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "curated"
    manifest = curated(run_dir, out, "--drop_bottom", "10%", "--by", "document")
    sums = expected_values(run_dir, "doc_id")
    k = math.ceil(len(sums) * 10 / 100)
    expected = ranked(sums)[:k]
    assert [(r["domain"], r["doc_id"]) for r in manifest["removed"]] == expected
    assert [r["value"] for r in manifest["removed"]] == [sums[key] for key in expected]
    kept_values = [v for key, v in sums.items() if key not in expected]
    assert max(r["value"] for r in manifest["removed"]) <= min(kept_values)
    assert (manifest["run_id"], manifest["estimator"], manifest["convention"], manifest["by"], manifest["amount"]) == \
        (load_run(run_dir).attrs["run_id"], "adamw", "first_order", "document", "10%")
    assert manifest["run_warnings"]["steps_left_out"] == [1, 2]
    assert manifest["valued_units"] == len(sums) and manifest["removed_units"] == k

    # every other document is kept, byte for byte with its EOT and origin, in the source's order
    reader = PileReader(data_dir, split="train")
    removed_tokens, unvalued = 0, 0
    for domain in reader.domains:
        source, kept = documents(data_dir, domain), documents(out, domain)
        gone = {doc for d, doc in expected if d == domain}
        survivors = [entry for i, entry in enumerate(source) if i not in gone]
        assert len(kept) == len(survivors)
        for (tokens, origin), (want, want_origin) in zip(kept, survivors):
            np.testing.assert_array_equal(tokens, want)
            assert origin == want_origin
        removed_tokens += sum(len(source[doc][0]) for doc in gone)
        unvalued += sum(1 for i in range(len(source)) if (domain, i) not in sums)
        assert manifest["domains"][domain]["documents_unvalued_kept"] == \
            sum(1 for i in range(len(source)) if (domain, i) not in sums)
    assert unvalued > 0  # the run saw a few dozen of the sample's documents: the others are kept, and counted
    assert manifest["removed_unit_tokens"] == removed_tokens
    assert [r["token_count"] for r in manifest["removed"]] == [len(documents(data_dir, d)[doc][0])
                                                                for d, doc in expected]
    assert_other_splits_copied(data_dir, out)
    assert f"kept {unvalued} documents the run never saw" in capsys.readouterr().out

    # what was removed, with its text decoded through GPT-2's tokenizer
    decode = load_gpt2_tokenizer().decode
    with open(out / "removed.jsonl") as f:
        lines = [json.loads(line) for line in f]
    for line, (domain, doc) in zip(lines, expected):
        assert line["text"] == decode(documents(data_dir, domain)[doc][0][:-1])[:2000]
    text = (out / "removed.md").read_text()
    assert "never saw" in text and f"| 1 | {manifest['removed'][0]['value']:.4g} | {expected[0][0]} |" in text


def test_drop_bottom_windows_cuts_exactly_their_spans(run_dir, data_dir, tmp_path):
    out = tmp_path / "windows"
    manifest = curated(run_dir, out, "--drop_bottom", "6", "--by", "window")
    sums = expected_values(run_dir, "token_offset")
    expected = ranked(sums)[:6]
    assert [(r["domain"], r["token_offset"]) for r in manifest["removed"]] == expected
    assert all(r["token_count"] == T for r in manifest["removed"])

    reader = PileReader(data_dir, split="train")
    for domain in reader.domains:
        spans = [(offset, offset + T) for d, offset in expected if d == domain]
        pieces, origins, cut = expected_pieces(reader, domain, spans)
        written = documents(out, domain)
        assert len(written) == len(pieces)
        for (got, origin), want, want_origin in zip(written, pieces, origins):
            np.testing.assert_array_equal(got, want)
            assert origin == want_origin
        if not spans:  # a domain no removed window touched: the same bytes
            assert filecmp.cmp(os.path.join(data_dir, "train", domain_file(data_dir, domain)),
                               os.path.join(out, "train", domain_file(out, domain)), shallow=False)
        assert manifest["domains"][domain]["text_tokens_removed"] == cut
    assert_other_splits_copied(data_dir, out)


def domain_file(data_dir, domain):
    with open(os.path.join(data_dir, "train", "ingest.json")) as f:
        return json.load(f)["domains"][domain]["slug"] + ".bin"


def test_the_app_trains_on_the_curated_corpus(run_dir, data_dir, tmp_path):
    out = tmp_path / "curated"
    curated(run_dir, out, "--drop_bottom", "25%")
    results = tmp_path / "results"
    assert train.main(["--method", "Regular", "--architecture", "GPT2-Tiny", "--batch_size", "2", "--seq_len", "32",
                       "--max_steps", "2", "--warmup_step", "1", "--eval_interval", "2", "--eval_iter", "1",
                       "--eval_bs", "2", "--data_dir", str(out), "--results_dir", str(results),
                       "--run_name", "on_curated"]) == 0
    with open(results / "on_curated" / "config.json") as f:
        assert json.load(f)["data_dir"] == str(out)
    with open(results / "on_curated" / "training_log.json") as f:
        evals = json.load(f)["evals"]
    assert set(evals[-1]["validation"]["domains"]) == set(PileReader(data_dir, split="validation").domains)


def test_drop_top_and_drop_random(run_dir, tmp_path, monkeypatch):
    sums = expected_values(run_dir, "doc_id")
    monkeypatch.setenv("GRADDOTPROD_RESULTS_DIR", os.path.dirname(run_dir))  # RUN by its name, as the README has it
    top = curated(os.path.basename(run_dir), tmp_path / "top", "--drop_top", "3")
    assert top["run"] == run_dir
    assert [(r["domain"], r["doc_id"]) for r in top["removed"]] == ranked(sums, lowest=False)[:3]
    every_step = curated(run_dir, tmp_path / "top-all", "--drop_top", "3", "--all_steps")
    assert every_step["run_warnings"]["steps_left_out"] == []
    assert [(r["domain"], r["doc_id"]) for r in every_step["removed"]] == \
        ranked(expected_values(run_dir, "doc_id", all_steps=True), lowest=False)[:3]

    first = curated(run_dir, tmp_path / "r1", "--drop_random", "20%", "--seed", "7")
    again = curated(run_dir, tmp_path / "r2", "--drop_random", "20%", "--seed", "7")
    keys = [(r["domain"], r["doc_id"]) for r in first["removed"]]
    assert keys == [(r["domain"], r["doc_id"]) for r in again["removed"]]
    assert len(keys) == math.ceil(len(sums) * 20 / 100) and set(keys) <= set(sums)
    order = np.random.default_rng(7).permutation(len(sums))
    assert keys == [sorted(sums)[i] for i in order[:len(keys)]]

    # by tokens: the fewest units, in removal order, whose tokens reach the amount
    by_tokens = curated(run_dir, tmp_path / "t", "--drop_bottom", "5000", "--measure", "tokens")
    counts = [r["token_count"] for r in by_tokens["removed"]]
    assert sum(counts) >= 5000 > sum(counts[:-1])


def call(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        curate.main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def copy_run(run_dir, tmp_path, **config_changes):
    copy = tmp_path / "run-copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    with open(copy / "config.json") as f:
        config = json.load(f)
    config.update(config_changes)
    with open(copy / "config.json", "w") as f:
        json.dump(config, f)
    return copy, config


def test_bad_input_exits_2_and_writes_nothing(run_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = call(capsys, tmp_path / "no-such-run", "--drop_bottom", "10%", "--out", out)
    assert code == 2 and "no such run" in err
    for amount, says in (("150%", "[0%, 100%]"), ("-1%", "[0%, 100%]"), ("-3", ">= 0"), ("ten", "neither"),
                         ("1.5", "neither"), ("nan%", "not a percentage")):
        code, err = call(capsys, run_dir, f"--drop_bottom={amount}", "--out", out)
        assert code == 2 and says in err, (amount, err)
    code, err = call(capsys, run_dir, "--drop_bottom", "100000", "--out", out)
    assert code == 2 and "fewer than that" in err
    code, err = call(capsys, run_dir, "--drop_bottom", "1", "--drop_top", "1", "--out", out)
    assert code == 2 and "not allowed with" in err
    code, err = call(capsys, run_dir, "--out", out)
    assert code == 2 and "one of the arguments" in err

    without_results = tmp_path / "no-results"
    without_results.mkdir()
    shutil.copy(os.path.join(run_dir, "config.json"), without_results)
    code, err = call(capsys, without_results, "--drop_bottom", "1", "--out", out)
    assert code == 2 and "no results" in err

    moved, config = copy_run(run_dir, tmp_path, data_dir=str(tmp_path / "gone"))
    code, err = call(capsys, moved, "--drop_bottom", "1", "--out", out)
    assert code == 2 and "is missing" in err
    identity = dict(config["data_identity"])
    identity["train/github.bin"] = identity["train/github.bin"].replace(" bytes,", "0 bytes,")  # another size
    shutil.rmtree(moved)
    changed, _ = copy_run(run_dir, tmp_path, data_identity=identity)
    code, err = call(capsys, changed, "--drop_bottom", "1", "--out", out)
    assert code == 2 and "changed since the run" in err and "train/github.bin" in err
    code, err = call(capsys, run_dir, "--drop_bottom", "1", "--out", os.path.join(data_dir, "curated"))
    assert code == 2 and "data directory" in err
    assert not out.exists()

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = call(capsys, run_dir, "--drop_bottom", "1", "--out", out)
    assert code == 2 and "--overwrite" in err
    code, err = call(capsys, run_dir, "--drop_bottom", "1", "--out", out, "--overwrite")
    assert code == 2 and "not an earlier curation" in err
    assert os.listdir(out) == ["notes.txt"]


def test_writes_are_all_or_nothing(run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "curated"
    first = curated(run_dir, out, "--drop_bottom", "2")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(curate, "copy_split", full_disk)
    assert curate.main([run_dir, "--drop_bottom", "4", "--out", str(out), "--overwrite"]) == 1
    assert "No space left" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["curated"]  # no temporary directory left beside it
    with open(out / "curation.json") as f:
        assert json.load(f)["removed"] == first["removed"]  # the earlier curation, untouched
    assert curate.main([run_dir, "--drop_bottom", "4", "--out", str(tmp_path / "new")]) == 1
    assert sorted(os.listdir(tmp_path)) == ["curated"]

    monkeypatch.undo()
    rename = os.replace

    def failing_rename(source, target):  # the new corpus cannot be renamed into place
        if os.fspath(target) == str(out) and ".tmp-" in os.fspath(source):
            raise OSError(5, "Input/output error")
        return rename(source, target)

    monkeypatch.setattr(os, "replace", failing_rename)
    assert curate.main([run_dir, "--drop_bottom", "4", "--out", str(out), "--overwrite"]) == 1
    assert sorted(os.listdir(tmp_path)) == ["curated"]
    with open(out / "curation.json") as f:
        assert json.load(f)["removed"] == first["removed"]  # put back

    monkeypatch.undo()
    second = curated(run_dir, out, "--drop_bottom", "4", "--overwrite")
    assert len(second["removed"]) == 4 and sorted(os.listdir(tmp_path)) == ["curated"]


def test_window_cuts_at_the_edges(tmp_path):
    """Windows that overlap, cross a document boundary, cover a whole document or only an end-of-text token,
    against the mask reference, through the same writer the command uses."""
    from pile_tools.cli import main as pile_tools_main
    from pile_tools.subset import write_subset

    texts = ["alpha beta gamma delta epsilon zeta eta theta iota kappa", "short one",
             "lambda mu nu xi omicron pi rho sigma tau upsilon", "phi chi psi omega", "the last document here"]
    source = tmp_path / "jsonl" / "train.jsonl"
    source.parent.mkdir()
    source.write_text("".join(json.dumps({"text": t, "meta": {"pile_set_name": "Words"}}) + "\n" for t in texts))
    data = tmp_path / "data"
    assert pile_tools_main(["tokenize", "--input", str(source), "--output", str(data), "--split", "train",
                            "--workers", "1", "--no_progress"]) == 0
    reader = PileReader(str(data), split="train")
    starts = [int(s) for s in reader.document_starts("Words")]
    spans = [(starts[0] + 2, starts[0] + 5), (starts[0] + 4, starts[0] + 7),  # overlapping, inside document 0
             (starts[2] - 2, starts[2] + 2),  # across the end of document 1 into document 2
             (starts[3] - 1, starts[3]),  # only document 2's end-of-text token
             (starts[3], starts[4] - 1)]  # all of document 3's text
    pieces, counts = curate.window_pieces(reader, {"Words": np.asarray(spans)})
    write_subset(str(data), "train", str(tmp_path / "out"), pieces)
    want, origins, cut = expected_pieces(reader, "Words", spans)
    got = documents(tmp_path / "out", "Words")
    assert len(got) == len(want) == 5  # document 0 in two pieces, 1 and 2 shortened, 3 gone, 4 whole
    for (tokens, origin), expected, expected_origin in zip(got, want, origins):
        np.testing.assert_array_equal(tokens, expected)
        assert origin == expected_origin
    np.testing.assert_array_equal(got[-1][0], documents(data, "Words")[4][0])
    assert counts["Words"] == {"documents_cut": 4, "documents_removed": 1, "text_tokens_removed": cut,
                               "documents_written": 5}
