"""PileReader on a hand-made tokenized corpus: determinism, rank slices, provenance, file bounds."""
import json

import numpy as np
import pytest
import zstandard

from pile_tools.jsonl_io import ShardSource
from pile_tools.reader import PileReader
from pile_tools.tokenize_corpus import tokenize_sources
from pile_tools.tokenizer import EOT_ID, load_gpt2_tokenizer

SEQ = 16


def _shard(path, docs):
    lines = "".join(json.dumps({"text": t, "meta": {"pile_set_name": d}}) + "\n" for d, t in docs)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three domains of numbered documents of varied lengths, in train and validation splits."""
    root = tmp_path_factory.mktemp("corpus")
    docs = []
    for i in range(60):
        docs.append(("Github", f"def f{i}():\n    return {i}\n" * (1 + i % 5)))
        docs.append(("DM Mathematics", f"What is {i} + {i}?\n{2 * i}\n" * (1 + i % 3)))
        if i % 4 == 0:
            docs.append(("Enron Emails", f"Subject: note {i}\n\nMeet at {i} pm. " * 3))
    tokenize_sources([ShardSource(_shard(root / "00.jsonl.zst", docs))], str(root / "tok"), progress=False)
    tokenize_sources([ShardSource(_shard(root / "val.jsonl.zst", docs[:40]))], str(root / "tok"), split="validation", progress=False)
    return str(root / "tok"), docs


def test_domains_and_mixture(corpus):
    data_dir, _ = corpus
    r = PileReader(data_dir)
    assert r.domains == ["DM Mathematics", "Enron Emails", "Github"]
    total = sum(r.num_tokens(d) for d in r.domains)
    assert r.mixture["Github"] == pytest.approx(r.num_tokens("Github") / total)
    only = PileReader(data_dir, domains={"Github": 1.0, "Enron Emails": 3.0})
    assert only.mixture == {"Enron Emails": 0.75, "Github": 0.25}
    with pytest.raises(ValueError, match="not in this split"):
        PileReader(data_dir, domains=["Pile-CC"])


def test_batches_are_deterministic_and_resumable(corpus):
    data_dir, _ = corpus
    a = PileReader(data_dir, seed=3)
    b = PileReader(data_dir, seed=3)
    later = b.get_batch(7, 8, SEQ)  # asked first: no hidden iterator state
    for step in range(8):
        a.get_batch(step, 8, SEQ)
    again = a.get_batch(7, 8, SEQ)
    np.testing.assert_array_equal(later.tokens, again.tokens)
    assert later.domain == again.domain
    assert not np.array_equal(a.get_batch(8, 8, SEQ).tokens, again.tokens)
    assert not np.array_equal(PileReader(data_dir, seed=4).get_batch(7, 8, SEQ).tokens, again.tokens)


def test_rank_slices_partition_the_global_batch(corpus):
    data_dir, _ = corpus
    r = PileReader(data_dir, seed=1)
    full = r.get_batch(5, 8, SEQ)
    parts = [r.get_batch(5, 8, SEQ, rank=k, world_size=4) for k in range(4)]
    np.testing.assert_array_equal(np.concatenate([p.tokens for p in parts]), full.tokens)
    np.testing.assert_array_equal(np.concatenate([p.sample_index for p in parts]), np.arange(8))
    assert sum((p.domain for p in parts), []) == full.domain
    starts = {(d, o) for p in parts for d, o in zip(p.domain, p.token_offset)}
    assert len(starts) == 8  # ranks get distinct windows
    with pytest.raises(ValueError, match="divisible"):
        r.get_batch(0, 6, SEQ, rank=0, world_size=4)


def test_provenance_matches_documents(corpus):
    data_dir, docs = corpus
    tok = load_gpt2_tokenizer()
    r = PileReader(data_dir, seed=2)
    by_domain = {}
    for d, t in docs:
        by_domain.setdefault(d, []).append(t)
    for step in range(5):
        batch = r.get_batch(step, 8, SEQ)
        assert batch.tokens.shape == (8, SEQ + 1) and batch.tokens.dtype == np.int64
        for row in range(8):
            domain, offset, doc = batch.domain[row], int(batch.token_offset[row]), int(batch.doc_id[row])
            np.testing.assert_array_equal(batch.tokens[row], r.read_tokens(domain, offset, SEQ + 1))
            start, end = r.document_span(domain, doc)
            assert start <= offset <= end  # the first token is in the document (or its EOT)
            assert tok.encode(by_domain[domain][doc]) == r.read_tokens(domain, start, end - start).tolist()
            assert r.read_tokens(domain, end, 1)[0] == EOT_ID
            path, line = r.document_source(domain, doc)
            assert path.endswith("00.jsonl.zst") and json.loads(_line(path, line))["text"] == by_domain[domain][doc]


def _line(path, line_no):
    with open(path, "rb") as f:
        return zstandard.ZstdDecompressor().decompress(f.read()).split(b"\n")[line_no - 1]


def test_windows_never_pass_the_end_of_a_file(corpus):
    data_dir, _ = corpus
    r = PileReader(data_dir, domains=["Enron Emails"], seed=0)
    n = r.num_tokens("Enron Emails")
    seq = n - 3  # only 3 valid window starts: 0, 1, 2
    offsets = np.concatenate([r.get_batch(s, 4, seq).token_offset for s in range(40)])
    assert set(offsets.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="fewer than seq_len"):
        r.get_batch(0, 2, n)
    with pytest.raises(ValueError, match="outside"):
        r.read_tokens("Enron Emails", n - 1, 2)


def test_fixed_validation_batch(corpus):
    data_dir, _ = corpus
    v = PileReader(data_dir, split="validation", domains=["Github"], seed=0)
    first, second = v.fixed_batch(6, SEQ), v.fixed_batch(6, SEQ)
    np.testing.assert_array_equal(first.tokens, second.tokens)
    assert first.domain == ["Github"] * 6
    ends = np.sort(first.token_offset)
    assert (np.diff(ends) >= SEQ + 1).all()  # windows do not overlap
    assert (first.token_offset + SEQ + 1 <= v.num_tokens("Github")).all()
    with pytest.raises(ValueError, match="room for"):
        v.fixed_batch(v.num_tokens("Github"), SEQ)


def test_damaged_or_hostile_manifests_are_named(corpus, tmp_path):
    """Random bytes as ingest.json, a domain file name that walks out of the split, a manifest without its
    keys: a ValueError naming the file, never a traceback from deep inside or a file outside the split."""
    import os
    import shutil

    data_dir, _ = corpus
    copy = tmp_path / "tok"
    shutil.copytree(data_dir, copy)
    ingest = copy / "train" / "ingest.json"
    ingest.write_bytes(bytes(range(256)) * 2)
    with pytest.raises(ValueError, match=r"ingest.json is not a readable manifest"):
        PileReader(str(copy))
    ingest.write_text(json.dumps({"status": "complete", "domains": {"X": {"slug": "../../etc/passwd"}}}))
    with pytest.raises(ValueError, match=r"domain 'X' has no valid file name"):
        PileReader(str(copy))
    ingest.write_text(json.dumps({"domains": {}}))
    with pytest.raises(ValueError, match=r"lacks \['status'\]"):
        PileReader(str(copy))
    assert os.path.exists(copy / "validation" / "ingest.json")
