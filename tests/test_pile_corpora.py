"""Corpora other than the Pile and tokenizers other than GPT-2's: dotted text/domain fields (a "meta" stored
as a JSON string too), a default domain, a tokenizer.json trained on the spot with `tokenizers` (exact ids
checked against that tokenizer), uint32 token files for a vocabulary over 65536 ids, and the training app
on such data (its model's vocabulary follows the data's)."""
import json
import os

import numpy as np
import pytest
import torch
from _reference import app_first_step_reference, as_recorded_at_step_1
from test_pile_tokenize import read_split, run_cli, write_shard
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from ghost_results.results_io import read_run
from GradDotProd_LM import export, train
from GradDotProd_LM.model import build_model
from pile_tools.reader import PileReader

WEB = [
    {"text": "The quick brown fox jumps over the lazy dog. " * 3, "metadata": json.dumps({"source": "news"})},
    {"text": "Data attribution asks which training samples helped.", "metadata": {"source": "blog"}},
    {"text": "A record without any source field at all <|endoftext|> inside.", "id": 7},
    {"text": "Another news story about foxes and dogs, and a lazy afternoon.", "metadata": "{\"source\": \"news\"}"},
]


def bpe_tokenizer(path, texts):
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<|endoftext|>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(path))
    return Tokenizer.from_file(str(path))


def test_web_corpus_with_a_tokenizer_trained_on_the_spot(tmp_path):
    shard = write_shard(tmp_path / "web.jsonl", [json.dumps(r) for r in WEB])
    tok_path = tmp_path / "tokenizer.json"
    reference = bpe_tokenizer(tok_path, [r["text"] for r in WEB])
    reference.encode_special_tokens = True  # special-token text inside a document is text
    out = str(tmp_path / "out")
    done = run_cli("tokenize", "--input", shard, "--output", out, "--split", "train", "--workers", "2",
                   "--tokenizer", str(tok_path), "--text_field", "text", "--domain_field", "metadata.source",
                   "--default_domain", "web", "--no_progress")
    assert done.returncode == 0, done.stderr
    splits, state = read_split(out)
    assert state["dtype"] == "uint16" and state["tokenizer"]["name"] == "tokenizer-json"
    eot = reference.token_to_id("<|endoftext|>")
    assert state["tokenizer"]["eot_id"] == eot and state["tokenizer"]["vocab_size"] == reference.get_vocab_size()
    expected = {}
    for record in WEB:
        meta = record.get("metadata")
        domain = (json.loads(meta) if isinstance(meta, str) else meta)["source"] if meta else "web"
        expected.setdefault(domain, []).extend(reference.encode(record["text"], add_special_tokens=False).ids + [eot])
    assert set(splits) == {"news", "blog", "web"}
    for domain, ids in expected.items():
        np.testing.assert_array_equal(splits[domain][0], ids)
    assert list(splits["web"][0]).count(eot) == 1  # the literal "<|endoftext|>" in the text stayed text

    done = run_cli("tokenize", "--input", shard, "--output", str(tmp_path / "strict"), "--split", "train",
                   "--tokenizer", str(tok_path), "--domain_field", "metadata.source", "--no_progress")
    assert done.returncode == 0 and "no 'metadata.source'" in done.stdout  # no default: the record is named
    done = run_cli("tokenize", "--input", shard, "--output", str(tmp_path / "bad"), "--split", "train",
                   "--tokenizer", str(tmp_path / "missing.json"), "--no_progress")
    assert done.returncode == 2 and "missing.json: no such file" in done.stderr


def word_level_tokenizer(path, size):
    """A vocabulary of `size` words w0..w{size-2} plus <|endoftext|> at the end: ids beyond uint16."""
    vocab = {f"w{i}": i for i in range(size - 1)}
    vocab["<|endoftext|>"] = size - 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))


@pytest.fixture(scope="module")
def big_vocab_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigvocab")
    tok_path = root / "tokenizer.json"
    size = 70_000
    word_level_tokenizer(tok_path, size)
    rng = np.random.default_rng(0)
    out = str(root / "data")
    for split, docs in (("train", 40), ("validation", 8), ("test", 8)):
        records = [{"text": " ".join(f"w{i}" for i in rng.integers(0, size - 1, 60)),
                    "meta": {"pile_set_name": "Alpha" if d % 2 else "Beta"}} for d in range(docs)]
        shard = write_shard(root / f"{split}.jsonl", [json.dumps(r) for r in records])
        done = run_cli("tokenize", "--input", shard, "--output", out, "--split", split, "--tokenizer", str(tok_path),
                       "--no_progress")
        assert done.returncode == 0, done.stderr
    return out, records, size


def test_a_vocabulary_over_65536_ids_is_stored_as_uint32(big_vocab_data):
    out, _, size = big_vocab_data
    splits, state = read_split(out, "test")
    assert state["dtype"] == "uint32" and state["tokenizer"]["vocab_size"] == size
    reader = PileReader(out, split="test")
    assert max(int(tokens.max()) for tokens, _, _ in splits.values()) > 65535  # ids a uint16 file would wrap
    for domain, (tokens, _, _) in splits.items():
        np.testing.assert_array_equal(reader.read_tokens(domain, 0, tokens.size), tokens)
        assert tokens[-1] == size - 1  # every document ends with the vocabulary's end-of-text id


def test_the_app_trains_on_another_vocabulary(big_vocab_data, tmp_path):
    out, _, size = big_vocab_data
    results = str(tmp_path / "results")
    seed, rows, seq_len = 3, 2, 16
    flags = ["--architecture", "GPT2-Tiny", "--batch_size", str(rows), "--seq_len", str(seq_len), "--val_batch_size",
             "1", "--max_steps", "2", "--warmup_step", "1", "--eval_interval", "2", "--eval_iter", "1", "--eval_bs",
             "2", "--dot_prod_save_interval", "1", "--seed", str(seed), "--data_dir", out, "--results_dir", results,
             "--run_name", "big"]
    assert train.main(flags) == 0
    with open(os.path.join(results, "big", "config.json")) as f:
        config = json.load(f)
    assert config["data_tokenizer"]["vocab_size"] == size
    state = torch.load(os.path.join(results, "big", "checkpoints", "latest.pt"), weights_only=True)
    assert state["model"]["transformer.wte.weight"].shape[0] == 70_016  # 70000 padded to a multiple of 64
    # step 1 on ids beyond uint16: the recorded dot products equal float64 autograd on the initial weights
    torch.manual_seed(seed)
    model = build_model("GPT2-Tiny", vocab_size=size).double()
    expected, _, val_loss = app_first_step_reference(model, out, seed, rows, seq_len, 1)
    run = read_run(os.path.join(results, "big"), strict=True)
    cols, first = run.columns, run.columns["step"] == 1
    expected = as_recorded_at_step_1(expected, run)  # the default under AdamW, adamw
    np.testing.assert_allclose(cols["dot_products"][first], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(cols["val_loss"][first], val_loss, rtol=1e-5)
    with pytest.raises(SystemExit) as exit_info:  # export writes GPT-2's tokenizer files only
        export.main([os.path.join(results, "big"), "--out", str(tmp_path / "hf")])
    assert exit_info.value.code == 2
