"""The bundled sample: truthful domains, enough tokens, deterministic bytes, correct math answers."""
import json
import os
import random
import re

import pytest
import sympy
import zstandard

from pile_tools import ensure_sample_dataset
from pile_tools.dm_math import GENERATORS, question_answer_pairs
from pile_tools.reader import PileReader
from pile_tools.sample_data import SAMPLE_FILES, write_sample_dataset


def _records(path):
    with open(path, "rb") as f:
        text = zstandard.ZstdDecompressor().stream_reader(f).read().decode()
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    cache = tmp_path_factory.mktemp("sample_cache")
    return str(cache), ensure_sample_dataset(str(cache))


def test_sample_splits_domains_and_sizes(sample):
    _, data_dir = sample
    train = PileReader(data_dir, "train")
    assert set(train.domains) == {"Github", "DM Mathematics", "Python Documentation", "Software Licenses"}
    assert sum(train.num_tokens(d) for d in train.domains) >= 300_000
    for split in ("validation", "test"):
        held_out = PileReader(data_dir, split)
        assert set(held_out.domains) == set(train.domains)
        assert sum(held_out.num_tokens(d) for d in held_out.domains) >= 10_000
    val = PileReader(data_dir, "validation", domains=["Github"]).fixed_batch(4, 256)
    assert val.tokens.shape == (4, 257)


def test_second_call_is_a_no_op(sample):
    cache, data_dir = sample
    stamps = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(cache) for f in fs}
    assert ensure_sample_dataset(cache) == data_dir
    assert stamps == {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(cache) for f in fs}


def test_sample_is_deterministic_and_truthful(sample, tmp_path):
    cache, _ = sample
    write_sample_dataset(str(tmp_path))
    for rel in SAMPLE_FILES.values():
        assert (tmp_path / rel).read_bytes() == open(os.path.join(cache, "raw", rel), "rb").read()
    records = _records(tmp_path / SAMPLE_FILES["train"])
    for r in records:
        if r["meta"]["pile_set_name"] == "Github":
            compile(r["text"], "<stdlib file>", "exec")  # real Python source
    assert os.path.getsize(tmp_path / SAMPLE_FILES["train"]) < 5_000_000


def test_dm_math_answers_are_correct():
    rng = random.Random(11)
    checked = 0
    for question, answer in question_answer_pairs(rng, 400):
        if m := re.fullmatch(r"Solve ([^,]+) = (-?\d+) for (\w)\.", question):
            lhs, rhs, var = m.groups()
            assert sympy.sympify(lhs).subs(var, int(answer)) == int(rhs)
        elif m := re.fullmatch(r"Solve (.+) = (-?\d+), (.+) = (-?\d+) for (\w)\.", question):
            e1, r1, e2, r2, var = m.groups()
            solution = sympy.solve([sympy.sympify(f"{e1} - ({r1})"), sympy.sympify(f"{e2} - ({r2})")], dict=True)[0]
            assert solution[sympy.Symbol(var)] == int(answer)
        elif m := re.fullmatch(r"What is the derivative of (.+) wrt (\w)\?", question):
            assert sympy.expand(sympy.diff(sympy.sympify(m[1]), m[2]) - sympy.sympify(answer)) == 0
        elif m := re.fullmatch(r"Let \w\((\w)\) = (.+)\. What is \w\((-?\d+)\)\?", question):
            assert sympy.sympify(m[2]).subs(m[1], int(m[3])) == int(answer)
        elif m := re.fullmatch(r"(?:What is|Calculate) (-?\d+) ([+-]) (-?\d+)[?.]", question):
            assert eval(f"{m[1]} {m[2]} ({m[3]})") == int(answer)
        elif m := re.fullmatch(r"Divide (-?\d+) by (-?\d+)\.", question):
            assert int(m[1]) == int(answer) * int(m[2])
        elif m := re.fullmatch(r"Is (\d+) a prime number\?", question):
            assert sympy.isprime(int(m[1])) == (answer == "True")
        elif m := re.fullmatch(r"Reduce (\d+)/(\d+) to lowest terms\.", question):
            assert sympy.Rational(int(m[1]), int(m[2])) == sympy.Rational(answer)
        else:
            continue
        checked += 1
    assert checked > 200 and len(GENERATORS) >= 10
