"""Tokenizing hand-made Pile shards: round trip, idempotence, crash recovery, bad input."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from pile_tools.jsonl_io import HFDatasetSource, ShardSource
from pile_tools.slow_bpe import SlowGPT2BPE
from pile_tools.tokenize_corpus import KILL_AFTER_DOCS_ENV, tokenize_sources
from pile_tools.tokenizer import EOT_ID, load_gpt2_tokenizer

DOCS = [
    ("Github", "import os\n\ndef main():\n    print(os.getcwd())\n"),
    ("DM Mathematics", "What is 2 + 3?\n5\nSolve 4*x = 8 for x.\n2\n"),
    ("Wikipedia (en)", "Paris is the capital of France. Café, naïve, 東京."),
    ("Github", "class A:\n\tpass  # tabs and  spaces   \n"),
    ("Wikipedia (en)", "A page that mentions <|endoftext|> literally."),
    ("DM Mathematics", "Let f(x) = x**2. What is f(3)?\n9\n"),
    ("Github", "x = [1, 2, 3]\n" * 20),
]


def _records(docs):
    return [{"text": text, "meta": {"pile_set_name": domain}} for domain, text in docs]


def write_shard(path, lines):
    data = "".join(line + "\n" for line in lines).encode()
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor(level=3).compress(data) if str(path).endswith(".zst") else data)
    return str(path)


def read_split(out_dir, split="train"):
    """{domain: (tokens, doc_starts, doc_origin)} plus ingest.json, read back by hand."""
    split_dir = os.path.join(out_dir, split)
    with open(os.path.join(split_dir, "ingest.json")) as f:
        state = json.load(f)
    result = {}
    for domain, info in state["domains"].items():
        with open(os.path.join(split_dir, info["slug"] + ".json")) as f:
            manifest = json.load(f)
        tokens = np.fromfile(os.path.join(split_dir, manifest["token_file"]), dtype=manifest["dtype"])
        starts = np.fromfile(os.path.join(split_dir, manifest["doc_starts_file"]), dtype=np.int64)
        origin = np.fromfile(os.path.join(split_dir, manifest["doc_origin_file"]), dtype=np.int64).reshape(-1, 2)
        assert manifest["num_tokens"] == tokens.size and manifest["num_documents"] == starts.size
        assert manifest["max_token_id"] == (int(tokens.max()) if tokens.size else -1)
        result[domain] = (tokens, starts, origin)
    return result, state


def split_bytes(out_dir, split="train"):
    split_dir = os.path.join(out_dir, split)
    return {f: open(os.path.join(split_dir, f), "rb").read() for f in sorted(os.listdir(split_dir)) if f.endswith(".bin")}


def run_cli(*args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pile_tools", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def tok():
    return load_gpt2_tokenizer()


def test_round_trip_tokens_counts_offsets(tmp_path, tok):
    shard = write_shard(tmp_path / "00.jsonl.zst", [json.dumps(r) for r in _records(DOCS)])
    summary = tokenize_sources([ShardSource(shard)], str(tmp_path / "out"), progress=False)
    assert summary.documents == len(DOCS) and not summary.skipped
    got, state = read_split(tmp_path / "out")
    assert state["status"] == "complete"
    slow = SlowGPT2BPE()
    for domain in {d for d, _ in DOCS}:
        tokens, starts, origin = got[domain]
        texts = [(line, text) for line, (d, text) in enumerate(DOCS, start=1) if d == domain]
        expected = []
        for _, text in texts:
            assert tok.encode(text) == slow.encode(text)
            expected += tok.encode(text) + [EOT_ID]
        assert tokens.tolist() == expected
        lengths = [len(tok.encode(t)) + 1 for _, t in texts]
        assert starts.tolist() == np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        assert origin[:, 1].tolist() == [line for line, _ in texts]
        assert (tokens[starts[1:] - 1] == EOT_ID).all() and tokens[-1] == EOT_ID


def test_plain_jsonl_and_domain_filter_and_max_tokens(tmp_path, tok):
    shard = write_shard(tmp_path / "a.jsonl", [json.dumps(r) for r in _records(DOCS)])
    summary = tokenize_sources([ShardSource(shard)], str(tmp_path / "f"), domains=["Github"], progress=False)
    got, _ = read_split(tmp_path / "f")
    assert list(got) == ["Github"] and summary.filtered == 4
    first_two = sum(len(tok.encode(t)) + 1 for d, t in DOCS[:2])
    tokenize_sources([ShardSource(shard)], str(tmp_path / "m"), max_tokens=first_two - 1, progress=False)
    got, _ = read_split(tmp_path / "m")
    assert sum(t.size for t, _, _ in got.values()) == first_two  # stops after the document reaching the limit
    again = tokenize_sources([ShardSource(shard)], str(tmp_path / "m"), max_tokens=first_two - 1, progress=False)
    assert again.documents == 0
    tokenize_sources([ShardSource(shard)], str(tmp_path / "m"), progress=False)  # no limit: continues, no duplicates
    tokenize_sources([ShardSource(shard)], str(tmp_path / "full"), progress=False)
    assert split_bytes(tmp_path / "m") == split_bytes(tmp_path / "full")


def test_rerun_is_a_no_op_and_new_input_appends(tmp_path):
    records = [json.dumps(r) for r in _records(DOCS)]
    first = write_shard(tmp_path / "00.jsonl.zst", records[:4])
    second = write_shard(tmp_path / "01.jsonl.zst", records[4:])
    out = str(tmp_path / "out")
    tokenize_sources([ShardSource(first)], out, progress=False)
    before = split_bytes(out)
    again = tokenize_sources([ShardSource(first)], out, progress=False)
    assert again.documents == 0 and again.inputs_already_done == ["00.jsonl.zst"]
    assert split_bytes(out) == before
    tokenize_sources([ShardSource(first), ShardSource(second)], out, progress=False)
    tokenize_sources([ShardSource(first), ShardSource(second)], str(tmp_path / "both"), progress=False)
    assert split_bytes(out) == split_bytes(tmp_path / "both")


def test_killed_run_recovers_to_clean_output(tmp_path):
    lines = [json.dumps(r) for r in _records(DOCS * 100)]
    shard = write_shard(tmp_path / "00.jsonl.zst", lines)
    tokenize_sources([ShardSource(shard)], str(tmp_path / "clean"), progress=False)
    out = str(tmp_path / "out")
    # Dies by SIGKILL after 600 documents (chunks of 256 lines, a checkpoint after each): data past the
    # last checkpoint is already on disk when it dies.
    killed = run_cli("tokenize", "--input", shard, "--output", out, "--workers", "1", "--no_progress",
                     "--checkpoint_docs", "40", env_extra={KILL_AFTER_DOCS_ENV: "600"})
    assert killed.returncode == -9
    with open(os.path.join(out, "train", "ingest.json")) as f:
        state = json.load(f)
    assert state["status"] == "in_progress" and 0 < state["inputs"][0]["lines_done"] < len(lines)
    from pile_tools.reader import PileReader

    with pytest.raises(ValueError, match="did not finish"):
        PileReader(out)
    resumed = run_cli("tokenize", "--input", shard, "--output", out, "--workers", "1", "--no_progress")
    assert resumed.returncode == 0, resumed.stderr
    assert split_bytes(out) == split_bytes(str(tmp_path / "clean"))
    assert read_split(out)[1]["domains"] == read_split(str(tmp_path / "clean"))[1]["domains"]


PAUSE_INSIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pause_inside.py")


@pytest.mark.parametrize("written, occurrences", [
    (r"train/ingest\.json$", (2, 2)),  # the first checkpoint after data: the previous one knows no domain yet
    (r"train/ingest\.json$", (3, 4)),  # a later mid-stream checkpoint
    (r"train/(?!ingest)[^/]+\.json$", (1, 3)),  # a domain manifest, written at the end
], ids=["first-checkpoint", "checkpoint", "domain-manifest"])
def test_kill_9_inside_a_manifest_write_then_a_rerun_equals_a_clean_run(tmp_path, written, occurrences):
    """kill -9 while tokenize is inside a durable write (half of the file in its temporary file): a checkpoint
    of ingest.json, or a domain manifest at the end (which of them is drawn at random). The previous ingest.json
    stays whole, the split is refused until finished, and the same command again removes the temporary file
    and ends with the output of a run never killed."""
    import random
    import signal
    import time

    from pile_tools.reader import PileReader

    shard = write_shard(tmp_path / "00.jsonl.zst", [json.dumps(r) for r in _records(DOCS * 100)])
    tokenize_sources([ShardSource(shard)], str(tmp_path / "clean"), progress=False)
    out, marker = str(tmp_path / "out"), str(tmp_path / "paused")
    args = ["tokenize", "--input", shard, "--output", out, "--workers", "1", "--no_progress", "--checkpoint_docs", "40"]
    n = random.Random(written).randint(*occurrences)
    job = subprocess.Popen([sys.executable, PAUSE_INSIDE, marker, f"write:{written}", str(n), "pile_tools", *args],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not os.path.exists(marker) and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    job.kill()
    output = job.communicate(timeout=60)[0]
    assert os.path.exists(marker) and job.returncode == -signal.SIGKILL, output
    split_dir = os.path.join(out, "train")
    temporary = [f for f in os.listdir(split_dir) if ".tmp-" in f]
    assert len(temporary) == 1 and os.path.getsize(os.path.join(split_dir, temporary[0])) > 0
    with open(os.path.join(split_dir, "ingest.json")) as f:
        assert json.load(f)["status"] == "in_progress"  # the previous checkpoint, whole
    with pytest.raises(ValueError, match="did not finish"):
        PileReader(out)

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert [f for f in os.listdir(split_dir) if ".tmp-" in f] == []
    assert split_bytes(out) == split_bytes(str(tmp_path / "clean"))
    manifests = {f: open(os.path.join(split_dir, f)).read() for f in os.listdir(split_dir)
                 if f.endswith(".json") and f != "ingest.json"}
    clean_dir = os.path.join(tmp_path, "clean", "train")
    assert manifests == {f: open(os.path.join(clean_dir, f)).read() for f in manifests} and len(manifests) == 3
    assert read_split(out)[1]["domains"] == read_split(str(tmp_path / "clean"))[1]["domains"]


def _limit_file_size():
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_a_full_disk_stops_with_a_message_and_a_rerun_completes(tmp_path):
    """Files may not grow past 20 kB (a full disk): the job stops with exit 1 and a message naming the output,
    no traceback; the split keeps its last checkpoint, and the same command with space completes it to the
    output of a run that never ran out."""
    shard = write_shard(tmp_path / "00.jsonl.zst", [json.dumps(r) for r in _records(DOCS * 100)])
    tokenize_sources([ShardSource(shard)], str(tmp_path / "clean"), progress=False)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "pile_tools", "tokenize", "--input", shard, "--output", out, "--workers", "1",
           "--no_progress", "--checkpoint_docs", "40"]
    full = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size)
    assert full.returncode == 1, full.stderr
    assert f"error: no space left to write {out}/train" in full.stderr and "Traceback" not in full.stderr
    with open(os.path.join(out, "train", "ingest.json")) as f:
        assert json.load(f)["status"] == "in_progress"
    again = run_cli(*cmd[3:])
    assert again.returncode == 0, again.stderr
    assert split_bytes(out) == split_bytes(str(tmp_path / "clean"))


def test_worker_pool_gives_identical_output(tmp_path):
    shard = write_shard(tmp_path / "00.jsonl.zst", [json.dumps(r) for r in _records(DOCS * 80)])
    tokenize_sources([ShardSource(shard)], str(tmp_path / "one"), workers=1, progress=False)
    tokenize_sources([ShardSource(shard)], str(tmp_path / "two"), workers=2, progress=False)
    assert split_bytes(tmp_path / "one") == split_bytes(tmp_path / "two")


def test_malformed_lines_are_counted_and_named(tmp_path):
    good = [json.dumps(r) for r in _records(DOCS[:3])]
    lines = [good[0], "{not json", json.dumps({"meta": {"pile_set_name": "Github"}}), good[1],
             json.dumps({"text": 7, "meta": {"pile_set_name": "Github"}}), json.dumps({"text": "no meta"}), good[2]]
    shard = write_shard(tmp_path / "bad.jsonl.zst", lines)
    result = run_cli("tokenize", "--input", shard, "--output", str(tmp_path / "out"), "--workers", "1", "--no_progress",
                     "--split", "train")
    assert result.returncode == 0, result.stderr
    assert "skipped 4 bad records" in result.stdout
    for line in (2, 3, 5, 6):
        assert f"bad.jsonl.zst:{line}:" in result.stdout
    got, state = read_split(tmp_path / "out")
    assert sum(s.size for _, s, _ in got.values()) == 3
    assert [(s["line"], s["reason"].split(" (")[0]) for s in state["skipped"]] == [
        (2, "malformed JSON"), (3, "no 'text' field"), (5, "'text' is a int, not a string"), (6, "no 'meta.pile_set_name'")]


def test_truncated_zst_names_file_and_keeps_output_consistent(tmp_path, tok):
    # Numbered texts keep zstd blocks of similar size, so a cut at 2/3 leaves whole blocks before it.
    records = _records([(d, f"{t} #{i * 7919 % 10007}") for i, (d, t) in enumerate(DOCS * 400)])
    shard = write_shard(tmp_path / "00.jsonl.zst", [json.dumps(r) for r in records])
    data = open(shard, "rb").read()
    truncated = tmp_path / "cut.jsonl.zst"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    result = run_cli("tokenize", "--input", str(truncated), "--output", str(tmp_path / "out"), "--workers", "1",
                     "--no_progress", "--split", "train")
    assert result.returncode == 1
    assert "cut.jsonl.zst is truncated or corrupt" in result.stdout and "compressed bytes" in result.stdout
    got, state = read_split(tmp_path / "out")
    assert state["status"] == "complete" and "truncated" in state["inputs"][0]["error"]
    # Every complete line the damaged stream still holds is kept (counted here by decompressing it directly)
    # and what was kept is exactly the tokenization of those records.
    readable = b""
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(truncated.read_bytes()))
    try:
        while chunk := reader.read(1 << 16):
            readable += chunk
    except zstandard.ZstdError:
        pass
    assert state["inputs"][0]["lines_done"] == readable.count(b"\n")
    kept = records[: state["inputs"][0]["lines_done"]]
    assert 0 < len(kept) < len(records)
    for domain, (tokens, _, _) in got.items():
        expected = [t for r in kept if r["meta"]["pile_set_name"] == domain for t in tok.encode(r["text"]) + [EOT_ID]]
        assert tokens.tolist() == expected


# Why the damaged shards of the bug report (item 9) escaped the test above: it cuts a one-frame file inside its
# frame, the one case the decompressor notices (a frame begun and not ended). A 0-byte file, a cut exactly at a
# frame boundary and a zstd frame of nothing decompress cleanly, so they were ingested as "finished"; a file that
# is not zstd at all, or cannot be read, failed only once reached. The class: a shard that is unreadable, empty,
# not zstd, or whose decompressed text holds no record or ends inside one.

UNREADABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_unreadable.py")


def _frames(data, cut):
    """data compressed as two zstd frames, split at byte `cut`: (first frame, both frames)."""
    first = zstandard.ZstdCompressor(level=3).compress(data[:cut])
    return first, first + zstandard.ZstdCompressor(level=3).compress(data[cut:])


def test_unreadable_empty_or_non_zstd_inputs_are_named_before_anything_is_written(tmp_path):
    """A directory of shards where one is empty (0 bytes) and one is JSON lines named .zst, beside good ones: exit 2
    naming both, and nothing written (no split); without them the same command ingests the good shards."""
    lines = [json.dumps(r) for r in _records(DOCS)]
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_shard(inputs / "00.jsonl.zst", lines)
    (inputs / "01.jsonl.zst").write_bytes(b"")
    (inputs / "02.jsonl.zst").write_bytes("".join(line + "\n" for line in lines).encode())
    write_shard(inputs / "03.jsonl.zst", lines[::-1])  # other content: not taken for 00's copy
    out = tmp_path / "out"
    result = run_cli("tokenize", "--input", str(inputs), "--output", str(out), "--workers", "1", "--no_progress")
    assert result.returncode == 2
    assert "2 of the 4 inputs cannot be tokenized" in result.stderr
    assert f"{inputs / '01.jsonl.zst'} is empty (0 bytes)" in result.stderr
    assert f"{inputs / '02.jsonl.zst'} is not zstd-compressed" in result.stderr
    assert not os.path.exists(out / "train")
    for bad in ("01.jsonl.zst", "02.jsonl.zst"):
        os.remove(inputs / bad)
    result = run_cli("tokenize", "--input", str(inputs), "--output", str(out), "--workers", "1", "--no_progress")
    assert result.returncode == 0, result.stderr
    state = read_split(out)[1]
    assert [(i["name"], i["finished"]) for i in state["inputs"]] == [("00.jsonl.zst", True), ("03.jsonl.zst", True)]


def _damaged_zst(path, how):
    """A .jsonl.zst damaged `how`; returns (its records, how many complete lines it still holds)."""
    records = _records([(d, f"{t} #{i}") for i, (d, t) in enumerate(DOCS * 3)])
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    ends = [i + 1 for i, byte in enumerate(data) if byte == ord("\n")]
    if how == "frame_of_nothing":  # a valid zstd frame whose content is empty
        path.write_bytes(zstandard.ZstdCompressor().compress(b""))
        return records, 0
    if how == "cut_at_frame_boundary":  # two frames, the first ending inside line 9; the second frame lost
        path.write_bytes(_frames(data, ends[8] + 20)[0])
        return records, 9
    if how == "stream_without_end":  # a streaming writer flushed but never closed: its frame has no last block
        buffer = io.BytesIO()
        writer = zstandard.ZstdCompressor(level=3).stream_writer(buffer, closefd=False)
        writer.write(data)
        writer.flush(zstandard.FLUSH_BLOCK)
        path.write_bytes(buffer.getvalue())
        return records, len(records)
    raise ValueError(how)


@pytest.mark.parametrize("how", ["frame_of_nothing", "cut_at_frame_boundary", "stream_without_end"])
def test_a_zst_holding_no_record_or_ending_early_is_an_error_never_finished(tmp_path, tok, how):
    """Between two good shards, a .zst that decompresses cleanly to nothing, one cut exactly at a frame boundary
    (inside a line), one whose zstd stream misses its end: exit 1 naming it; its complete lines are kept, it is
    not recorded as finished (a re-run says so again), and the shard after it is named as not read."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = [json.dumps(r) for r in _records(DOCS)]
    write_shard(inputs / "00.jsonl.zst", good)
    records, complete = _damaged_zst(inputs / "01.jsonl.zst", how)
    write_shard(inputs / "02.jsonl.zst", good[::-1])  # other content than 00's
    out = tmp_path / "out"
    for attempt in range(2):
        result = run_cli("tokenize", "--input", str(inputs), "--output", str(out), "--workers", "1", "--no_progress")
        assert result.returncode == 1, (attempt, result.stdout, result.stderr)
        named = f"error: {inputs / '01.jsonl.zst'} "
        assert named in result.stderr and "not recorded as finished" in result.stderr
        assert "not read, after it: 02.jsonl.zst" in result.stdout
        got, state = read_split(out)
        assert state["status"] == "complete"
        assert [(i["name"], i["finished"]) for i in state["inputs"]] == [("00.jsonl.zst", True),
                                                                        ("01.jsonl.zst", False)]
        assert state["inputs"][1]["lines_done"] == complete and state["inputs"][1]["error"]
    kept = _records(DOCS) + records[:complete]
    for domain, (tokens, _, _) in got.items():
        expected = [t for r in kept if r["meta"]["pile_set_name"] == domain for t in tok.encode(r["text"]) + [EOT_ID]]
        assert tokens.tolist() == expected


def test_a_cut_between_frames_at_a_line_end_is_indistinguishable_from_a_shorter_shard(tmp_path):
    """The limit of the check above, stated: a cut at a frame boundary that is also a line boundary leaves a valid
    shorter file (zstd frames do not know the file's length), ingested as such."""
    data = "".join(json.dumps(r) + "\n" for r in _records(DOCS)).encode()
    cut = data.index(b"\n") + 1
    (tmp_path / "00.jsonl.zst").write_bytes(_frames(data, cut)[0])
    result = run_cli("tokenize", "--input", str(tmp_path / "00.jsonl.zst"), "--output", str(tmp_path / "out"),
                     "--workers", "1", "--no_progress")
    assert result.returncode == 0 and "wrote 1 documents" in result.stdout


@pytest.mark.parametrize("how", ["eacces", "eacces-from:2", "eio-from:3"])
def test_an_unreadable_input_is_named_never_finished(tmp_path, how):
    """One shard of two unreadable (tests/_unreadable.py makes open() raise EACCES for it, as chmod 000 does for
    anyone but root; from its start, or from its second open, i.e. during the run) or failing with EIO halfway
    through (a bad sector): exit 2 before anything is written, or exit 1 naming it with the documents before the
    failure kept and the shard not recorded as finished."""
    good = write_shard(tmp_path / "00.jsonl.zst", [json.dumps(r) for r in _records(DOCS)])
    records = _records([(d, f"{t} #{i * 7919 % 10007}") for i, (d, t) in enumerate(DOCS * 400)])
    bad = write_shard(tmp_path / "01.jsonl.zst", [json.dumps(r) for r in records])
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, UNREADABLE, bad, how, "pile_tools", "tokenize", "--input", good, bad,
                             "--output", str(out), "--workers", "1", "--no_progress"],
                            capture_output=True, text=True, env=env, timeout=120)
    if how == "eacces":  # found by the check before the run
        assert result.returncode == 2
        assert f"{bad} cannot be read (Permission denied)" in result.stderr
        assert not os.path.exists(out / "train")
        return
    assert result.returncode == 1, result.stderr
    what = "cannot be read (Permission denied)" if how.startswith("eacces") else "could not be read to its end"
    assert f"error: {bad} {what}" in result.stderr
    got, state = read_split(out)
    assert [(i["name"], i["finished"]) for i in state["inputs"]][:1] == [("00.jsonl.zst", True)]
    assert all(not i["finished"] for i in state["inputs"][1:])
    if how.startswith("eio"):
        failed = state["inputs"][1]
        assert 0 < failed["lines_done"] < len(records) and "Input/output error" in failed["error"]
        assert sum(s.size for _, s, _ in got.values()) == len(DOCS) + failed["lines_done"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode; "
                                              "test_an_unreadable_input_is_named_never_finished injects EACCES")
def test_a_file_without_read_permission_is_named(tmp_path):
    bad = write_shard(tmp_path / "00.jsonl.zst", [json.dumps(r) for r in _records(DOCS)])
    os.chmod(bad, 0)
    result = run_cli("tokenize", "--input", bad, "--output", str(tmp_path / "out"), "--workers", "1", "--no_progress")
    assert result.returncode == 2 and f"{bad} cannot be read (Permission denied)" in result.stderr


def test_hf_dataset_from_local_disk(tmp_path, tok):
    import datasets

    datasets.Dataset.from_list(_records(DOCS)).save_to_disk(str(tmp_path / "ds"))
    tokenize_sources([HFDatasetSource(str(tmp_path / "ds"), "train")], str(tmp_path / "out"), progress=False)
    shard = write_shard(tmp_path / "00.jsonl", [json.dumps(r) for r in _records(DOCS)])
    tokenize_sources([ShardSource(shard)], str(tmp_path / "ref"), progress=False)
    assert split_bytes(tmp_path / "out") == split_bytes(tmp_path / "ref")


def test_cli_errors_exit_2(tmp_path):
    missing = run_cli("tokenize", "--input", str(tmp_path / "nope.jsonl.zst"), "--output", str(tmp_path / "o"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    bad_flag = run_cli("tokenize", "--input", "x", "--output", "o", "--workers", "0")
    assert bad_flag.returncode == 2
    no_output = run_cli("tokenize", "--input", "x")
    assert no_output.returncode == 2 and "--output" in no_output.stderr


def test_split_is_inferred_from_pile_names_or_required(tmp_path):
    """val.jsonl.zst without --split goes to the validation split (said on stdout), not into train; a name
    that says nothing, or inputs of two splits, are usage errors."""
    lines = [json.dumps(r) for r in _records(DOCS)]
    val = write_shard(tmp_path / "val.jsonl.zst", lines)
    result = run_cli("tokenize", "--input", val, "--output", str(tmp_path / "out"), "--workers", "1", "--no_progress")
    assert result.returncode == 0, result.stderr
    assert "split: validation (from the input file names" in result.stdout
    assert os.path.exists(tmp_path / "out" / "validation" / "ingest.json")
    assert not os.path.exists(tmp_path / "out" / "train")
    other = write_shard(tmp_path / "shard.jsonl.zst", lines)
    unnamed = run_cli("tokenize", "--input", other, "--output", str(tmp_path / "o2"))
    assert unnamed.returncode == 2 and "cannot tell its split" in unnamed.stderr
    mixed = run_cli("tokenize", "--input", val, write_shard(tmp_path / "00.jsonl.zst", lines),
                    "--output", str(tmp_path / "o3"))
    assert mixed.returncode == 2 and "mixes splits ['train', 'validation']" in mixed.stderr


def test_an_input_with_no_valid_record_is_an_error(tmp_path):
    """Records without meta.pile_set_name (or with a string meta) are all skipped, or --domains matches none
    of them: exit 1, not 'wrote 0'."""
    lines = [json.dumps({"text": t, "meta": "Github"}) for _, t in DOCS] + [json.dumps({"text": "x"})]
    shard = write_shard(tmp_path / "00.jsonl.zst", lines)
    result = run_cli("tokenize", "--input", shard, "--output", str(tmp_path / "out"), "--workers", "1", "--no_progress")
    assert result.returncode == 1
    assert f"all {len(lines)} records read were bad" in result.stderr
    good = write_shard(tmp_path / "01.jsonl.zst", [json.dumps(r) for r in _records(DOCS)])
    result = run_cli("tokenize", "--input", good, "--output", str(tmp_path / "out2"), "--workers", "1",
                     "--no_progress", "--domains", "github")  # not the Pile's spelling: no record matches
    assert result.returncode == 1
    assert f"{len(DOCS)} records read are of other domains than --domains 'github'" in result.stderr


def test_concurrent_jobs_into_one_output_take_turns(tmp_path):
    """Two tokenize jobs into the same split at once: both are started while the split's lock is held, so both
    wait (and say so); once it is free they take turns. Every input's documents stay whole and in order, and
    the split equals ingesting the inputs one after the other."""
    import time

    from ghost_common.durable import FileLock

    shards = []
    for k in range(2):
        records = _records([(d, f"{t} job{k} #{i}") for i, (d, t) in enumerate(DOCS * 60)])
        shards.append(write_shard(tmp_path / f"{k:02d}.jsonl.zst", [json.dumps(r) for r in records]))
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "pile_tools", "tokenize", "--output", out, "--workers", "1", "--no_progress",
           "--checkpoint_docs", "10", "--input"]
    held = FileLock(os.path.join(out, ".train.lock"))
    assert held.acquire()
    errors = [tmp_path / f"err{k}.txt" for k in range(2)]
    try:
        jobs = []
        for shard, err in zip(shards, errors):
            with open(err, "w") as stderr:
                jobs.append(subprocess.Popen(cmd + [shard], stdout=subprocess.PIPE, stderr=stderr, text=True))
        deadline = time.time() + 60
        while not all("waiting for another tokenize job" in e.read_text() for e in errors):
            assert time.time() < deadline and all(job.poll() is None for job in jobs), [e.read_text() for e in errors]
            time.sleep(0.05)
    finally:
        held.release()
    results = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], results
    got, state = read_split(out)
    assert state["status"] == "complete" and sorted(i["name"] for i in state["inputs"]) == ["00.jsonl.zst",
                                                                                           "01.jsonl.zst"]
    first = state["inputs"][0]["name"]
    order = [s for s in shards if os.path.basename(s) == first] + [s for s in shards if os.path.basename(s) != first]
    tokenize_sources([ShardSource(p) for p in order], str(tmp_path / "serial"), progress=False)
    assert split_bytes(out) == split_bytes(str(tmp_path / "serial"))


def test_one_bad_record_is_skipped_not_the_shard(tmp_path):
    """An escaped lone surrogate in one record's text (not Unicode) and a non-printable domain name skip
    those records, named by line; the rest of the shard is ingested. A directory named *.jsonl.zst inside
    an --input directory is not taken for a shard."""
    good = [json.dumps(r) for r in _records(DOCS[:3])]
    lines = [good[0], json.dumps({"text": "bad \ud800 text", "meta": {"pile_set_name": "Github"}}), good[1],
             json.dumps({"text": "x", "meta": {"pile_set_name": "Git\x00hub"}}), good[2]]
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_shard(inputs / "00.jsonl.zst", lines)
    (inputs / "01.jsonl.zst").mkdir()
    result = run_cli("tokenize", "--input", str(inputs), "--output", str(tmp_path / "out"), "--workers", "1",
                     "--no_progress")
    assert result.returncode == 0, result.stderr
    assert "skipped 2 bad records" in result.stdout
    assert "00.jsonl.zst:2: 'text' is not valid Unicode" in result.stdout
    assert "00.jsonl.zst:4: 'meta.pile_set_name'" in result.stdout
    got, state = read_split(tmp_path / "out")
    assert sum(s.size for _, s, _ in got.values()) == 3 and [i["name"] for i in state["inputs"]] == ["00.jsonl.zst"]


def test_domains_whose_names_fold_to_one_file_name_get_their_own_files(tmp_path, tok):
    """'Alpha' and 'alpha' (and a name with no letters) each keep their own token files; the reader
    serves each by its exact name."""
    from pile_tools.reader import PileReader

    docs = [("Alpha", "upper case domain " * 30), ("alpha", "lower case domain " * 30), ("++", "symbols " * 30)]
    shard = write_shard(tmp_path / "00.jsonl.zst", [json.dumps(r) for r in _records(docs)])
    result = run_cli("tokenize", "--input", shard, "--output", str(tmp_path / "out"), "--workers", "1", "--no_progress")
    assert result.returncode == 0, result.stderr
    got, state = read_split(tmp_path / "out")
    slugs = {d: info["slug"] for d, info in state["domains"].items()}
    assert len(set(slugs.values())) == 3 and slugs["Alpha"] == "alpha"
    for domain, text in docs:
        assert got[domain][0].tolist() == tok.encode(text) + [EOT_ID]
    assert PileReader(str(tmp_path / "out")).domains == sorted(slugs)


def _processes_mentioning(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    with open(f"/proc/{pid}/stat") as stat:
                        if stat.read().split(")")[-1].split()[0] != "Z":  # zombies hold no resources
                            found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_killed_job_leaves_no_worker_processes(tmp_path):
    """kill -9 of a tokenize job with 2 workers: its workers die with it (none left after 5 s)."""
    import time

    lines = [json.dumps(r) for r in _records(DOCS * 400)]
    shard = write_shard(tmp_path / "00.jsonl.zst", lines)
    out = str(tmp_path / "out-killed-with-workers")
    killed = run_cli("tokenize", "--input", shard, "--output", out, "--workers", "2", "--no_progress",
                     "--checkpoint_docs", "40", env_extra={KILL_AFTER_DOCS_ENV: "300"})
    assert killed.returncode == -9
    deadline = time.time() + 5
    while _processes_mentioning(out) and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(out) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_cleanly_and_a_rerun_completes(tmp_path, signame):
    """SIGINT to the job's process group (Ctrl-C) while 2 workers run: exit 130 with a message and no
    worker tracebacks, no process left; the same command then completes with the clean output. SIGTERM
    ends the job at once, as kill -9 would: no process left, and the re-run completes it the same way."""
    import signal
    import time

    lines = [json.dumps(r) for r in _records([(d, f"{t} #{i}") for i, (d, t) in enumerate(DOCS * 3000)])]
    shard = write_shard(tmp_path / "00.jsonl.zst", lines)
    tokenize_sources([ShardSource(shard)], str(tmp_path / "clean"), progress=False)
    out = str(tmp_path / "out-interrupted")
    cmd = [sys.executable, "-m", "pile_tools", "tokenize", "--input", shard, "--output", out, "--workers", "2",
           "--no_progress", "--checkpoint_docs", "200"]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ingest = os.path.join(out, "train", "ingest.json")
    deadline = time.time() + 60
    while not os.path.exists(ingest) and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    if job.poll() is not None:
        pytest.skip("the job finished before it could be interrupted on this machine")
    os.killpg(job.pid, getattr(signal, signame))
    _, err = job.communicate(timeout=60)
    if signame == "SIGINT":
        assert job.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err and "un-acquired lock" not in err
    else:
        assert job.returncode == -signal.SIGTERM, err
    deadline = time.time() + 5
    while _processes_mentioning(out) and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(out) == []
    again = run_cli("tokenize", "--input", shard, "--output", out, "--workers", "2", "--no_progress")
    assert again.returncode == 0, again.stderr
    assert split_bytes(out) == split_bytes(str(tmp_path / "clean"))


def test_a_split_begun_before_maxima_were_recorded_gets_them_from_its_files(tmp_path):
    """ingest.json of an older in-progress split has no max_token_id: resuming it reads the maximum from the
    committed token file, so the manifest written at the end covers the old documents too."""
    from pile_tools.split_writer import SplitWriter

    split_dir = str(tmp_path / "train")
    writer = SplitWriter(split_dir, "train", {"vocab": "test"}, None)
    index, _ = writer.input_record("fp", "in.jsonl.zst", "in.jsonl.zst")
    writer.append_document("A", np.array([7, 40000, EOT_ID], dtype=np.uint16), index, 1)
    writer.checkpoint()
    writer.close()
    state_path = os.path.join(split_dir, "ingest.json")
    with open(state_path) as f:
        state = json.load(f)
    del state["domains"]["A"]["max_token_id"]
    with open(state_path, "w") as f:
        json.dump(state, f)
    writer = SplitWriter(split_dir, "train", {"vocab": "test"}, None)
    writer.append_document("A", np.array([3, 5], dtype=np.uint16), index, 2)  # below the old maximum
    writer.complete()
    writer.close()
    with open(os.path.join(split_dir, state["domains"]["A"]["slug"] + ".json")) as f:
        assert json.load(f)["max_token_id"] == EOT_ID  # from the document written before the resume
