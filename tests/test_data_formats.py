"""Training data in nanoGPT's, Megatron's and Hugging Face's formats: the same token documents written in each format
and in pile_tools' own (through SplitWriter) give the same batches with the same provenance, and that provenance
names the documents written (checked against them, not against a reader); bad inputs stop with the file named; a
short app run per format records the rows it trained on, the report reads their text back, curation refuses
them, and a changed file stops --resume."""
import json
import os
import struct

import numpy as np
import pytest
import yaml

from ghost_results.report import TextSource, shorten
from ghost_results.results_io import read_run
from GradDotProd_LM import train
from GradDotProd_LM.curate import CurationError, curate
from pile_tools.identity import data_identity
from pile_tools.reader import PileReader
from pile_tools.split_writer import SplitWriter
from pile_tools.tokenizer import load_gpt2_tokenizer

EOT = 50256
IDENTITY = {"name": "gpt2-bpe", "vocab_size": 50257, "eot_id": EOT}  # the formats' default vocabulary
SPLITS = {"train": 30, "validation": 12, "test": 8}  # documents per domain
DOMAINS = ("alpha", "beta")
SEQ = 16


def documents(seed: int, count: int) -> list:
    """Token documents each ending with EOT, some of only the EOT (an empty text), none holding EOT inside."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        text = rng.integers(0, EOT, size=0 if i % 11 == 4 else int(rng.integers(1, 70)))
        docs.append(np.append(text, EOT).astype(np.int64))
    return docs


@pytest.fixture(scope="module")
def corpus():
    return {split: {d: documents(100 * k + j, n) for j, d in enumerate(DOMAINS)}
            for k, (split, n) in enumerate(SPLITS.items())}


# --- the writers: pile_tools' own, and independent ones following each format's published layout -------------------

def write_native(root, corpus):
    for split, domains in corpus.items():
        writer = SplitWriter(os.path.join(root, split), split, IDENTITY, None)
        index, _ = writer.input_record(f"synthetic-{split}", "synthetic", "synthetic.jsonl")
        for domain, docs in domains.items():
            for line, doc in enumerate(docs):
                writer.append_document(domain, doc, index, line)
        writer.complete()
        writer.close()
    return str(root)


def write_nanogpt(path, docs, dtype=np.uint16):
    """nanoGPT's prepare.py: every document's ids, then the end-of-text id, concatenated into one flat file."""
    np.concatenate(docs).astype(dtype).tofile(path)


def write_megatron(prefix, docs, rng, code=8, dtype=np.uint16, version=1, magic=b"MMIDIDX\x00\x00"):
    """MMIDIDX version 1 as Megatron's _IndexWriter lays it out: each document cut into 1-3 sequences."""
    sequences, doc_index = [], [0]
    for doc in docs:
        cuts = np.sort(rng.choice(np.arange(1, len(doc)), size=min(len(doc) - 1, int(rng.integers(0, 3))),
                                  replace=False)) if len(doc) > 1 else []
        sequences += np.split(doc, cuts)
        doc_index.append(len(sequences))
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    pointers = np.zeros(len(sequences), dtype=np.int64)
    pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize)
    np.concatenate(sequences).astype(dtype).tofile(prefix + ".bin")
    with open(prefix + ".idx", "wb") as f:
        f.write(magic + struct.pack("<Q", version) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sequences)) + struct.pack("<Q", len(doc_index)))
        f.write(lengths.tobytes() + pointers.tobytes() + np.array(doc_index, dtype=np.int64).tobytes())
    return int(np.sum(np.diff(doc_index) > 1))  # documents spanning several sequences


def write_hf(path, split_docs, column="input_ids"):
    """A DatasetDict saved with save_to_disk, one row per document, the train split in two shards."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    dd = datasets.DatasetDict({split: datasets.Dataset.from_dict({column: [d.tolist() for d in docs]})
                               for split, docs in split_docs.items()})
    dd.save_to_disk(str(path), num_shards={split: 2 if split == "train" else 1 for split in split_docs})


def write_spec(path, entries, **top):
    """A data spec: {split: {domain: entry}} (JSON)."""
    with open(path, "w") as f:
        json.dump({**top, **entries}, f)
    return str(path)


@pytest.fixture(scope="module")
def formats(corpus, tmp_path_factory):
    """{name: data path}: the native corpus and the same documents in each format (specs with both domains, and
    the auto-detected single-domain directories of nanoGPT and Hugging Face)."""
    root = tmp_path_factory.mktemp("formats")
    paths = {"native": write_native(root / "native", corpus)}
    rng = np.random.default_rng(7)
    nanogpt, megatron, hf = {}, {}, {}
    spanning = 0
    for split, domains in corpus.items():
        for domain, docs in domains.items():
            (root / "nanogpt").mkdir(exist_ok=True)
            write_nanogpt(root / "nanogpt" / f"{domain}_{split}.bin", docs)
            nanogpt.setdefault(split, {})[domain] = {"format": "nanogpt", "path": f"nanogpt/{domain}_{split}.bin"}
            (root / "megatron").mkdir(exist_ok=True)
            spanning += write_megatron(str(root / "megatron" / f"{domain}_{split}"), docs, rng)
            megatron.setdefault(split, {})[domain] = {"format": "megatron", "path": f"megatron/{domain}_{split}"}
            hf.setdefault(split, {})[domain] = {"format": "hf", "path": f"hf_{domain}", "split": split}
    assert spanning > 20  # many documents span several sequences
    for domain in DOMAINS:
        write_hf(root / f"hf_{domain}", {split: corpus[split][domain] for split in corpus})
    paths["nanogpt"] = write_spec(root / "nanogpt.json", nanogpt)
    paths["megatron"] = write_spec(root / "megatron.json", megatron, tokenizer=IDENTITY)
    paths["hf"] = write_spec(root / "hf.json", hf)
    # one domain named after its directory, found by its files
    single = {split: {"alpha": domains["alpha"]} for split, domains in corpus.items()}
    paths["native_alpha"] = write_native(root / "alpha_native", single)
    (root / "nanogpt_dir" / "alpha").mkdir(parents=True)
    for split, name in (("train", "train.bin"), ("validation", "val.bin"), ("test", "test.bin")):
        write_nanogpt(root / "nanogpt_dir" / "alpha" / name, corpus[split]["alpha"])
    paths["nanogpt_dir"] = str(root / "nanogpt_dir" / "alpha")
    write_hf(root / "hf_dir" / "alpha", {split: corpus[split]["alpha"] for split in corpus})
    paths["hf_dir"] = str(root / "hf_dir" / "alpha")
    return paths


def assert_same_batch(got, want):
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert got.domain == want.domain
    for key in ("token_offset", "doc_id", "sample_index"):
        np.testing.assert_array_equal(getattr(got, key), getattr(want, key), err_msg=key)


def assert_names_the_documents(batch, split_docs):
    """Each row's (domain, doc_id, token_offset), checked against the documents written: the window starts at
    token_offset of the domain's concatenated documents, inside document doc_id."""
    for row, (domain, doc_id, offset) in enumerate(zip(batch.domain, batch.doc_id, batch.token_offset)):
        docs = split_docs[domain]
        stream = np.concatenate(docs)
        starts = np.cumsum([0] + [len(d) for d in docs])
        assert starts[doc_id] <= offset < starts[doc_id + 1]
        np.testing.assert_array_equal(batch.tokens[row], stream[offset:offset + batch.tokens.shape[1]])
        if offset == starts[doc_id]:  # a window at a document's start begins with that document's tokens
            n = min(len(docs[doc_id]), batch.tokens.shape[1])
            np.testing.assert_array_equal(batch.tokens[row, :n], docs[doc_id][:n])


@pytest.mark.parametrize("name, reference", [("nanogpt", "native"), ("megatron", "native"), ("hf", "native"),
                                             ("nanogpt_dir", "native_alpha"), ("hf_dir", "native_alpha")])
def test_every_format_gives_the_native_batches_and_provenance(formats, corpus, name, reference):
    for split in SPLITS:
        native = PileReader(formats[reference], split=split, seed=3)
        other = PileReader(formats[name], split=split, seed=3)
        assert other.domains == native.domains and other.mixture == native.mixture
        assert other.tokenizer == IDENTITY
        for domain in other.domains:
            written = np.concatenate(corpus[split][domain])
            np.testing.assert_array_equal(other.read_tokens(domain, 0, len(written)), written)  # across HF shards too
            np.testing.assert_array_equal(other.document_starts(domain), native.document_starts(domain))
            assert other.num_documents(domain) == len(corpus[split][domain])
        split_docs = {d: corpus[split][d] for d in other.domains}
        for step in range(6):
            want = native.get_batch(step, 8, SEQ)
            got = other.get_batch(step, 8, SEQ)
            assert_same_batch(got, want)
            assert_names_the_documents(got, split_docs)
            for rank in range(2):
                assert_same_batch(other.get_batch(step, 8, SEQ, rank=rank, world_size=2),
                                  native.get_batch(step, 8, SEQ, rank=rank, world_size=2))
        fixed = other.fixed_batch(4, SEQ)
        assert_same_batch(fixed, native.fixed_batch(4, SEQ))
        assert_names_the_documents(fixed, split_docs)


def test_document_boundaries_by_format(tmp_path):
    """The definitions of docs/training.md on small cases: nanoGPT's separators (a trailing one starts no document,
    a file without one is one document), a Megatron document of three sequences, empty HF rows."""
    write_nanogpt(tmp_path / "a.bin", [np.array([5, EOT]), np.array([EOT]), np.array([7, 8, EOT]), np.array([9])])
    write_nanogpt(tmp_path / "b.bin", [np.array([1, 2, 3])])
    prefix = str(tmp_path / "m")
    np.array([4, 5, 6, 7, 8, 9], dtype=np.uint16).tofile(prefix + ".bin")
    with open(prefix + ".idx", "wb") as f:  # documents: [4 | 5 6 | 7] and [8 9]; lengths 1, 2, 1, 2
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 4, 3))
        f.write(np.array([1, 2, 1, 2], np.int32).tobytes() + np.array([0, 2, 6, 8], np.int64).tobytes()
                + np.array([0, 3, 4], np.int64).tobytes())
    write_hf(tmp_path / "h", {"train": [np.array([1, 2]), np.array([], np.int64), np.array([3])],
                              "validation": [np.array([4])]})
    spec = write_spec(tmp_path / "s.json", {"train": {
        "a": {"format": "nanogpt", "path": "a.bin"}, "b": {"format": "nanogpt", "path": "b.bin"},
        "m": {"format": "megatron", "path": "m.idx"}, "h": {"format": "hf", "path": "h", "split": "train"}}})
    r = PileReader(spec)
    np.testing.assert_array_equal(r.document_starts("a"), [0, 2, 3, 6])
    np.testing.assert_array_equal(r.doc_id_at("a", [0, 1, 2, 3, 5, 6]), [0, 0, 1, 2, 2, 3])
    np.testing.assert_array_equal(r.document_starts("b"), [0])
    np.testing.assert_array_equal(r.document_starts("m"), [0, 4])
    np.testing.assert_array_equal(r.doc_id_at("m", [0, 3, 4, 5]), [0, 0, 1, 1])
    np.testing.assert_array_equal(r.document_starts("h"), [0, 2, 2])
    np.testing.assert_array_equal(r.doc_id_at("h", [1, 2]), [0, 2])
    assert r.document_source("m", 1) == (prefix, 1)
    with open(spec) as f:  # the same spec in YAML
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(json.load(f)))
    np.testing.assert_array_equal(PileReader(str(tmp_path / "s.yaml")).document_starts("m"), [0, 4])


# --- bad inputs ---------------------------------------------------------------------------------------------------

def _megatron_spec(tmp_path, corpus, **damage):
    rng = np.random.default_rng(0)
    entries = {}
    for split in ("train", "validation"):
        write_megatron(str(tmp_path / split), corpus[split]["alpha"], rng, **damage)
        entries[split] = {"alpha": {"format": "megatron", "path": split}}
    return write_spec(tmp_path / "spec.json", entries)


def _truncated(tmp_path, corpus):
    spec = _megatron_spec(tmp_path, corpus)
    with open(tmp_path / "train.bin", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "train.bin") - 6)
    return spec, r"train.bin holds \d+ bytes but train.idx describes \d+ .*truncated"


def _fairseq(tmp_path, corpus):
    """fairseq's MMIDIDX: the same magic and version, no document count and no document index."""
    spec = _megatron_spec(tmp_path, corpus)
    raw = open(tmp_path / "train.idx", "rb").read()
    _, _, _, n_seq, n_doc_index = struct.unpack("<9sQBQQ", raw[:34])
    with open(tmp_path / "train.idx", "wb") as f:
        f.write(raw[:26] + raw[34:34 + 12 * n_seq])
    return spec, "it is fairseq's MMIDIDX, which has no documents"


def _no_validation(tmp_path, corpus):
    write_nanogpt(tmp_path / "train.bin", corpus["train"]["alpha"])
    return str(tmp_path), r"split 'validation' is not in .*nanogpt.*\(it has \['train'\]\)"


def _beyond_vocabulary(tmp_path, corpus):
    for split, name in (("train", "train.bin"), ("validation", "val.bin")):
        docs = list(corpus[split]["alpha"])
        docs[3] = np.array([60000, EOT])  # an id GPT-2's 50257 does not hold
        write_nanogpt(tmp_path / name, docs)
    return str(tmp_path), r"token ids up to \{'.*': 60000\} .* do not fit a vocabulary of 50257"


def _hf_without_input_ids(tmp_path, corpus):
    write_hf(tmp_path / "d", {s: corpus[s]["alpha"] for s in ("train", "validation")}, column="tokens")
    return str(tmp_path / "d"), r"has no 'input_ids' column \(its columns: \['tokens'\]\)"


BAD_INPUTS = {
    "wrong magic": (lambda p, c: (_megatron_spec(p, c, magic=b"TNTIDX\x00\x00\x00"), "TNTIDX")),
    "wrong version": (lambda p, c: (_megatron_spec(p, c, version=2), "is MMIDIDX version 2; this reader knows version 1")),
    "unknown dtype code": (lambda p, c: (_megatron_spec(p, c, code=9), "dtype code 9, which this reader does not know")),
    "float dtype code": (lambda p, c: (_megatron_spec(p, c, code=7, dtype=np.float32), "floating-point values")),
    "truncated bin": _truncated,
    "fairseq index": _fairseq,
    "missing split": _no_validation,
    "ids beyond the vocabulary": _beyond_vocabulary,
    "hf without input_ids": _hf_without_input_ids,
}


@pytest.mark.parametrize("fault", BAD_INPUTS)
def test_bad_inputs_stop_the_app_before_training_with_the_file_named(fault, corpus, tmp_path, capsys):
    data, message = BAD_INPUTS[fault](tmp_path, corpus)
    flags = ["--architecture", "GPT2-Tiny", "--max_steps", "1", "--batch_size", "2", "--seq_len", "8",
             "--val_batch_size", "2", "--eval_iter", "1", "--eval_bs", "2", "--data_dir", data,
             "--results_dir", str(tmp_path / "results"), "--run_name", "bad"]
    assert train.main(flags) == 2
    err = capsys.readouterr().err
    assert f"data in {data}" in err
    assert __import__("re").search(message, err), err
    assert not os.path.exists(tmp_path / "results" / "bad")


@pytest.mark.parametrize("mistake, message", [
    ({"train": {"a": {"format": "parquet", "path": "x"}}}, "must be {format: nanogpt | megatron | hf"),
    ({"train": {"a": {"format": "nanogpt", "path": "x", "column": "ids"}}}, r"option\(s\) \['column'\] are not"),
    ({"val": {"a": {"format": "nanogpt", "path": "x"}}}, r"unknown key\(s\) \['val'\]"),
    ({"tokenizer": {"vocab_size": 100}, "train": {}}, "tokenizer must be"),
    ({"train": {"a": {"format": "nanogpt", "path": "missing.bin"}}}, r"missing.bin: no such file"),
    ({"train": {"a": {"format": "nanogpt", "path": "x", "separator": True}}}, "separator must be a token id"),
])
def test_a_bad_spec_is_named(tmp_path, mistake, message):
    with pytest.raises(ValueError, match=message):
        PileReader(write_spec(tmp_path / "spec.json", mistake))


def test_a_megatron_pair_named_like_nanogpts_files_is_not_read_as_nanogpt(tmp_path):
    """train.bin with a train.idx beside it is a Megatron dataset (int32 tokens read as nanoGPT's uint16 would be
    other ids, all in the vocabulary): the directory is refused, naming the format to give in a spec."""
    write_megatron(str(tmp_path / "train"), [np.array([70000 % EOT, 5, EOT])], np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"train.bin has a train.idx beside it, a Megatron indexed dataset"):
        PileReader(str(tmp_path))


def test_a_yaml_domain_name_that_is_not_a_string_is_named(tmp_path):
    """YAML reads `010:` as the number 8 and `On:` as True: such a domain would be named other than written."""
    np.array([1, 2, EOT], np.uint16).tofile(tmp_path / "x.bin")
    for key in ("010", "On"):
        (tmp_path / "spec.yaml").write_text(f"train:\n  {key}: {{format: nanogpt, path: x.bin}}\n")
        with pytest.raises(ValueError, match=r"domain name\(s\) \[.*\] that are not strings; quote them"):
            PileReader(str(tmp_path / "spec.yaml"))
    (tmp_path / "spec.yaml").write_text('train:\n  "010": {format: nanogpt, path: x.bin}\n')
    assert PileReader(str(tmp_path / "spec.yaml")).domains == ["010"]


# --- the app ------------------------------------------------------------------------------------------------------

B, T = 4, 16


def _change(name, data) -> tuple[str, bytes]:
    """Rewrite one file of the data, still valid, so that its identity changes: a document appended to nanoGPT's
    train.bin, a Megatron index with every document in one sequence (same tokens, same documents), a DatasetDict's
    manifest. Returns (path, its bytes before)."""
    path = {"nanogpt_dir": os.path.join(data, "train.bin"), "hf_dir": os.path.join(data, "dataset_dict.json"),
            "megatron": os.path.join(os.path.dirname(data), "megatron", "alpha_train.idx")}[name]
    before = open(path, "rb").read()
    if name == "nanogpt_dir":
        after = before + np.array([1, EOT], np.uint16).tobytes()
    elif name == "hf_dir":
        after = before + b" "
    else:
        _, _, _, n_seq, n_doc_index = struct.unpack("<9sQBQQ", before[:34])
        lengths = np.frombuffer(before, np.int32, n_seq, 34)
        doc_index = np.frombuffer(before, np.int64, n_doc_index, 34 + 12 * n_seq)
        merged = np.add.reduceat(lengths, doc_index[:-1]).astype(np.int32)  # no empty documents in the corpus
        pointers = np.zeros(len(merged), np.int64)
        pointers[1:] = np.cumsum(merged[:-1].astype(np.int64) * 2)
        after = (before[:18] + struct.pack("<QQ", len(merged), len(merged) + 1) + merged.tobytes()
                 + pointers.tobytes() + np.arange(len(merged) + 1, dtype=np.int64).tobytes())
    with open(path, "wb") as f:
        f.write(after)
    return path, before


@pytest.mark.parametrize("name, reference", [("nanogpt_dir", "native_alpha"), ("megatron", "native"),
                                             ("hf_dir", "native_alpha")])
def test_app_trains_on_each_format_and_resume_sees_a_changed_file(formats, name, reference, tmp_path, capsys):
    data = formats[name]
    results = str(tmp_path / "results")
    flags = ["--architecture", "GPT2-Tiny", "--max_steps", "2", "--batch_size", str(B), "--seq_len", str(T),
             "--val_batch_size", "2", "--eval_iter", "1", "--eval_bs", "2", "--dot_prod_save_interval", "1",
             "--warmup_step", "1", "--seed", "5", "--data_dir", data, "--results_dir", results, "--run_name", "run"]
    assert train.main(flags) == 0
    run_dir = os.path.join(results, "run")
    cols = read_run(run_dir, strict=True).columns
    native = PileReader(formats[reference], split="train", seed=5)
    for step in (1, 2):  # the rows trained on, named as the native reader names the same tokens
        batch, rows = native.get_batch(step, B, T), cols["step"] == step
        assert list(cols["domain"][rows]) == batch.domain
        np.testing.assert_array_equal(cols["token_offset"][rows], batch.token_offset)
        np.testing.assert_array_equal(cols["doc_id"][rows], batch.doc_id)
    assert np.isfinite(cols["dot_products"]).all()
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert config["data_identity"] == data_identity(data) and config["data_tokenizer"] == IDENTITY
    text = TextSource(config)  # the report's snippets read the same windows back
    assert text.available, text.reason
    assert text.snippet(cols["domain"][0], cols["token_offset"][0], T - 1) == shorten(
        load_gpt2_tokenizer().decode(native.read_tokens(cols["domain"][0], int(cols["token_offset"][0]), T)))
    with pytest.raises(CurationError, match="not a pile_tools corpus: curation writes"):
        curate(run_dir, str(tmp_path / "curated"), amount="1")
    capsys.readouterr()
    path, before = _change(name, data)
    try:
        PileReader(data).get_batch(0, B, T)  # still valid data
        assert train.main(flags + ["--resume"]) == 2  # checked before anything else of the run
        err = capsys.readouterr().err
        assert "changed since" in err and os.path.basename(path) in err, err
    finally:
        with open(path, "wb") as f:  # the module's datasets are shared by the tests
            f.write(before)



def test_a_token_file_rewritten_to_the_same_size_stops_resume(formats, tmp_path, capsys):
    """A token file's identity reads its content (all of a small file, 16 blocks spread over a large one), so a
    corpus shuffled or tokenized again to the same size stops --resume; a run recorded before that (token files
    by their size) still resumes on the same sizes."""
    import shutil

    data = str(tmp_path / "nanogpt")
    shutil.copytree(formats["nanogpt_dir"], data)
    results = str(tmp_path / "results")
    flags = ["--architecture", "GPT2-Tiny", "--batch_size", str(B), "--seq_len", str(T), "--val_batch_size", "2",
             "--eval_iter", "1", "--eval_bs", "2", "--dot_prod_save_interval", "1", "--warmup_step", "1",
             "--seed", "5", "--data_dir", data, "--results_dir", results, "--run_name", "run"]
    assert train.main(flags + ["--max_steps", "1"]) == 0
    config_path = os.path.join(results, "run", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    sizes = {key: os.path.getsize(os.path.join(data, key)) for key in config["data_identity"]}
    with open(config_path, "w") as f:  # as an earlier version recorded the token files
        json.dump(dict(config, data_identity=sizes), f)
    assert train.main(flags + ["--max_steps", "2", "--resume"]) == 0
    with open(config_path) as f:
        assert json.load(f)["data_identity"] == data_identity(data)  # recorded anew, by content
    path = os.path.join(data, "train.bin")
    tokens = np.fromfile(path, np.uint16)
    tokens[::-1].tofile(path)  # the same tokens and size, another order: still valid data
    PileReader(data).get_batch(0, B, T)
    capsys.readouterr()
    assert train.main(flags + ["--max_steps", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "changed since" in err and "train.bin" in err, err


def test_token_file_identity_reads_blocks_over_the_whole_of_a_large_file(tmp_path):
    from pile_tools import identity

    path = tmp_path / "tokens.bin"
    original = np.random.default_rng(3).integers(0, 2**16, 3 * 2**20 // 2, dtype=np.uint16)  # 3 MiB
    original.tofile(path)
    before = identity.token_file_identity(path)
    assert before.startswith(f"{3 * 2**20} bytes, sha256 of 16 blocks")
    for offset in (0, len(original) - 1):  # the first and the last block
        changed = original.copy()
        changed[offset] ^= 1
        changed.tofile(path)
        assert identity.token_file_identity(path) != before
    halves = np.split(original, 2)  # the same tokens, reordered: every block in between moves
    np.concatenate([halves[1], halves[0]]).tofile(path)
    assert identity.token_file_identity(path) != before
    original.tofile(path)
    assert identity.token_file_identity(path) == before
    assert identity.describe_data_change({"tokens.bin": 3 * 2**20}, {"tokens.bin": before}) == ""
    assert "changed ['tokens.bin']" in identity.describe_data_change({"tokens.bin": 3 * 2**20 + 2},
                                                                       {"tokens.bin": before})


def test_a_large_index_is_identified_by_its_edges_and_blocks_spread_over_it(tmp_path):
    """An .idx over WHOLE_HASH_LIMIT: its size, first and last MiB and 16 blocks in between, so document lengths
    edited in the middle (same size, same ends) change it; an identity recorded from the edges alone still matches
    the same file."""
    from pile_tools import identity

    path = tmp_path / "big.idx"
    size = identity.WHOLE_HASH_LIMIT + (1 << 20)
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: quick to write and to read
    before = identity.content_hash(path)
    edges, blocks = before.split(" ")
    assert edges.startswith("edges:") and blocks.startswith("blocks:")
    assert identity.describe_data_change({"big.idx": edges}, {"big.idx": before}) == ""  # recorded edges only
    middle = 7 * (size - identity.SAMPLE_BYTES) // (identity.SAMPLE_BLOCKS - 1)  # inside the 8th block
    with open(path, "r+b") as f:
        f.seek(middle + 100)
        f.write(b"\x01")
    after = identity.content_hash(path)
    assert after.split(" ")[0] == edges and after != before
    assert "changed ['big.idx']" in identity.describe_data_change({"big.idx": before}, {"big.idx": after})
