"""One flag style on every command line: underscores, the dashed spelling as an alias, no abbreviations."""
import argparse
import importlib
import importlib.util
import pathlib

import pytest

from ghost_common.flags import FlagParser

REPO = pathlib.Path(__file__).resolve().parent.parent
CODE_DIRS = ("ghost_engine", "ghost_results", "GradDotProd_LM", "pile_tools", "benchmarks", "examples")
CLI_MODULES = ("GradDotProd_LM.args", "GradDotProd_LM.export", "GradDotProd_LM.attribute",
               "GradDotProd_LM.curate",
               "GradDotProd_LM.bench_throughput", "ghost_results.report",
               "pile_tools.cli", "benchmarks.compare", "benchmarks.engine_overhead", "benchmarks.fidelity", "benchmarks.gpu_step",
               "benchmarks.host_overhead",
               "benchmarks.lowrank_attention", "benchmarks.plots", "benchmarks.profile_sweep", "benchmarks.results_load",
               "benchmarks.results_scale", "benchmarks.fsdp_memory",
               "benchmarks.tokenize_throughput", "benchmarks.grad_store", "benchmarks.projection_cost",
               "benchmarks.projection_fidelity", "benchmarks.attribution_quality", "benchmarks.curation",
               "ghost_results.convert",
               "examples.hf_trainer_llama")


def _sources():
    return [p for d in CODE_DIRS for p in sorted((REPO / d).rglob("*.py"))]


def _parsers(parser):
    """The parser and its sub-command parsers."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_command_line_builds_a_flag_parser():
    direct = [str(p.relative_to(REPO)) for p in _sources()
              if "ArgumentParser(" in p.read_text() and p.name != "flags.py"]
    assert direct == [], "build parsers with ghost_common.flags.FlagParser"
    with_parser = {".".join(p.relative_to(REPO).with_suffix("").parts) for p in _sources()
                   if "FlagParser(" in p.read_text() and p.name != "flags.py"}
    assert with_parser == set(CLI_MODULES)


def _build_parser(module):
    """The parser of a CLI module (examples/ is a directory of scripts, not a package: loaded from its file)."""
    if module.startswith("examples."):
        path = REPO / (module.replace(".", "/") + ".py")
        spec = importlib.util.spec_from_file_location(module.replace(".", "_"), path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded.build_parser()
    return importlib.import_module(module).build_parser()


@pytest.mark.parametrize("module", CLI_MODULES)
def test_flags_are_spelled_with_underscores(module):
    built = _build_parser(module)
    parser = built[0] if isinstance(built, tuple) else built
    for p in _parsers(parser):
        assert isinstance(p, FlagParser) and p.allow_abbrev is False
        for action in p._actions:
            for option in action.option_strings:
                assert option in ("-h", "--help") or (option.startswith("--") and "-" not in option[2:]), option


@pytest.mark.parametrize("module, underscored, dashed", [
    ("GradDotProd_LM.args", ["--seq_len", "64", "--val_domain", "Github", "--eval_only"],
     ["--seq-len", "64", "--val-domain=Github", "--eval-only"]),
    ("ghost_results.report", ["run", "--val_domain", "Github"], ["run", "--val-domain", "Github"]),
    ("GradDotProd_LM.curate", ["run", "--out", "o", "--drop_bottom", "10%", "--text_chars", "5"],
     ["run", "--out", "o", "--drop-bottom=10%", "--text-chars", "5"]),
    ("benchmarks.compare", ["--seq_len", "12", "--val_batch_size", "2", "--grad_ckpt", "on"],
     ["--seq-len", "12", "--val-batch-size=2", "--grad-ckpt", "on"]),
    ("pile_tools.cli", ["tokenize", "--input", "a.jsonl", "--output", "o", "--max_tokens", "5", "--no_progress"],
     ["tokenize", "--input", "a.jsonl", "--output", "o", "--max-tokens", "5", "--no-progress"]),
])
def test_dashed_spelling_is_an_alias(module, underscored, dashed):
    def parse(argv):
        built = importlib.import_module(module).build_parser()
        return vars((built[0] if isinstance(built, tuple) else built).parse_args(argv))

    assert parse(dashed) == parse(underscored)


def test_abbreviations_are_refused_and_errors_name_the_documented_spelling(capsys):
    parser = importlib.import_module("benchmarks.compare").build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--seq_le", "12"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --seq_le" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--seq-len", "one"])
    assert exit_info.value.code == 2 and "argument --seq_len" in capsys.readouterr().err


def test_train_yaml_keys_take_either_spelling(tmp_path):
    from GradDotProd_LM.args import parse_config

    for key in ("seq_len", "seq-len"):
        path = tmp_path / f"{key}.yaml"
        path.write_text(f"architecture: GPT2-Tiny\n{key}: 48\n")
        cfg = parse_config(["--config", str(path), "--results_dir", str(tmp_path / "results")])
        assert cfg["seq_len"] == 48
