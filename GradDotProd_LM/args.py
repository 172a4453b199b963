"""Command-line flags of `./train.sh` / `python -m GradDotProd_LM.train`.

Precedence, lowest first: DEFAULTS < the run's saved config.json (with --resume) < --config YAML < flags.
Every bad value ends in `parser.error` (exit code 2) before anything is started.
"""
import argparse
import json
import os

import yaml

from ghost_engine.engine import DEFERRED, VALUES
from ghost_engine.flags import FlagParser
from ghost_results.results_io import dotprod_steps_on_disk
from GradDotProd_LM.experiment_log import SINKS, missing_packages
from GradDotProd_LM.model import (ATTENTIONS, MODEL_ARCHITECTURES, load_model_config, max_seq_len,
                                  supports_lowrank_attention)
from GradDotProd_LM.settings import load_settings

METHODS = ("GradDotProd", "Regular")
OPTIMIZERS = ("AdamW", "SGD")
DTYPES = ("float32", "bfloat16")
RESULTS_FORMATS = ("pickle", "parquet", "both")

DEFAULTS = dict(
    method="GradDotProd", architecture="GPT2-Small", batch_size=16, val_batch_size=1,
    val_domain=None, train_domains=None, warmup_step=2000, learning_rate=6e-4, min_lr=6e-5,
    optimizer="AdamW", max_steps=10000, lr_decay_steps=None, grad_accum=1, grad_clip=1.0, seed=42,
    eval_only=False, eval_interval=500, eval_iter=10, eval_bs=8, dot_prod_save_interval=10,
    checkpoint_interval=1000, model_dtype="float32", train_dtype="auto", seq_len=1024,
    data_dir=None, results_dir=None, run_name=None, resume=False, compile=False, grad_ckpt=False,
    init_from=None, vocab_pad_multiple=64, accept_data_change=False, model_config=None, report_to=[],
    results_format="both", attention="standard", attention_rank=16, attention_block=64, value="first_order",
)
# What a run saved before a setting existed used (its config.json lacks the key).
LEGACY_DEFAULTS = dict(vocab_pad_multiple=1)

# These define which samples are seen and how they are valued; a resumed run must keep them.
RUN_IDENTITY = ("method", "architecture", "batch_size", "val_batch_size", "val_domain", "train_domains",
                "seq_len", "seed", "model_dtype", "data_dir", "init_from", "vocab_pad_multiple", "optimizer",
                "model_config", "attention", "attention_rank", "attention_block", "value")


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _model_config(path):
    try:
        return load_model_config(path)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_domains(text):
    """'Github,ArXiv' -> ['Github', 'ArXiv']; 'Github:0.7,ArXiv:0.3' -> {'Github': 0.7, 'ArXiv': 0.3}."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("needs at least one domain name")
    if not any(":" in p for p in parts):
        return parts
    weights = {}
    for part in parts:
        name, sep, weight = part.rpartition(":")
        try:
            weights[name] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: write every entry as Domain:weight") from None
        if not sep or not name or not weights[name] > 0:
            raise argparse.ArgumentTypeError(f"{part!r}: write every entry as Domain:weight with weight > 0")
    return weights


def parse_report_to(text):
    """'csv,tensorboard' -> ['csv', 'tensorboard']; 'none' (or nothing) -> []."""
    sinks = [p.strip() for p in text.split(",") if p.strip()]
    if sinks == ["none"]:
        return []
    if "none" in sinks:
        raise argparse.ArgumentTypeError(f"{text!r}: none cannot be combined with other sinks")
    unknown = [s for s in sinks if s not in SINKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: choose from none or a comma-separated list of "
                                         f"{', '.join(SINKS)}")
    return list(dict.fromkeys(sinks))


def build_parser():
    # argument_default=SUPPRESS: the namespace holds only what the user gave, so the layers can be merged.
    # FlagParser: no abbreviations (a typo such as --max_step must not silently become --max_steps), and
    # every flag also accepts its dashed spelling (--seq-len).
    p = FlagParser(
        prog="train.sh", argument_default=argparse.SUPPRESS,
        description="GPT-2 pretraining on the Pile; with --method GradDotProd every training sample's "
                    "gradient dot product with the validation gradient is saved (first-order In-Run Data "
                    "Shapley). Defaults in brackets.")
    d = DEFAULTS
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file of flag values (keys = flag names); flags override it")
    g = p.add_argument_group("run")
    g.add_argument("--method", choices=METHODS, help=f"[{d['method']}]")
    g.add_argument("--value", choices=VALUES,
                   help="what is saved per sample (GradDotProdEngine's value, docs/METHOD.md section 2.1): the "
                        "first-order dot product; its second-order expansion; AdamW's update sensitivity with v "
                        "held (adamw) or through v_t (adamw_vt), both need --optimizer AdamW; the optimizer's "
                        "step differentiated at half the batch gradient (midpoint); or the cosine. second_order, "
                        f"adamw_vt and midpoint keep the step's activations until the update [{d['value']}]")
    g.add_argument("--architecture", choices=tuple(MODEL_ARCHITECTURES),
                   help=f"GPT-2, Llama-style or Pythia size (docs/MODELS.md) [{d['architecture']}]")
    g.add_argument("--model_config", metavar="FILE.json", type=_model_config,
                   help="a Hugging Face causal-LM config.json to build the model from instead of --architecture "
                        "(its contents are saved with the run)")
    g.add_argument("--attention", choices=ATTENTIONS,
                   help="lowrank: exact attention within blocks of --attention_block positions plus "
                        "--attention_rank learned summaries of every earlier block (Llama family only; "
                        f"docs/MODELS.md) [{d['attention']}]")
    g.add_argument("--attention_rank", type=_positive_int,
                   help=f"with --attention lowrank: summaries per block, at most --attention_block "
                        f"[{d['attention_rank']}]")
    g.add_argument("--attention_block", type=_positive_int,
                   help=f"with --attention lowrank: positions per block [{d['attention_block']}]")
    g.add_argument("--run_name",
                   help="directory name under --results_dir [<method>-<architecture>-bs<B>-seq<T>-seed<S>, "
                        "with -lowrank<r>x<c> appended for --attention lowrank]")
    g.add_argument("--results_dir", help="[$GRADDOTPROD_RESULTS_DIR, else RESULTS_DIR of the settings file "
                   "(./config_file.py), else ./Results]")
    g.add_argument("--data_dir", help="tokenized Pile written by pile_tools [$GRADDOTPROD_PILE_DATA_DIR, else "
                   "PILE_DATA_DIR of the settings file, else ./data/pile_tokenized; if absent, the bundled sample]")
    g.add_argument("--resume", action="store_true", help="continue Results/<run_name> from its last checkpoint")
    g.add_argument("--accept_data_change", action="store_true",
                   help="with --resume: continue although the data under --data_dir changed since the run started "
                        "(the change is recorded in config.json; valset.pkl is kept)")
    g.add_argument("--eval_only", action="store_true",
                   help="evaluate the fresh model (or with --resume the run's checkpoint) and exit")
    g.add_argument("--init_from", help="local directory written by save_pretrained() to initialise the weights")
    g.add_argument("--seed", type=int, help=f"[{d['seed']}]")
    g = p.add_argument_group("data")
    g.add_argument("--batch_size", type=_positive_int,
                   help=f"global batch of one step over all processes [{d['batch_size']}]")
    g.add_argument("--val_batch_size", type=_non_negative_int,
                   help=f"validation rows of the dot product [{d['val_batch_size']}]")
    g.add_argument("--val_domain", help="Pile domain of the validation rows, e.g. 'Github' [all domains]")
    g.add_argument("--train_domains", type=parse_domains,
                   help="'Github,ArXiv' or weighted 'Github:0.7,ArXiv:0.3' [all domains]")
    g.add_argument("--seq_len", type=_positive_int, help=f"tokens per row, at most 1024 for GPT-2, 2048 for the RoPE sizes [{d['seq_len']}]")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help=f"[{d['optimizer']}]")
    g.add_argument("--learning_rate", type=_non_negative_float, help=f"peak learning rate [{d['learning_rate']}]")
    g.add_argument("--min_lr", type=_non_negative_float, help=f"end of the cosine decay [{d['min_lr']}]")
    g.add_argument("--warmup_step", type=_non_negative_int, help=f"linear warmup steps [{d['warmup_step']}]")
    g.add_argument("--max_steps", type=_positive_int, help=f"optimizer steps [{d['max_steps']}]")
    g.add_argument("--lr_decay_steps", type=_positive_int, help="step where the cosine reaches --min_lr [--max_steps]")
    g.add_argument("--grad_accum", type=_positive_int, help=f"micro-batches per step [{d['grad_accum']}]")
    g.add_argument("--grad_clip", type=_non_negative_float,
                   help=f"max global gradient norm, 0 = off [{d['grad_clip']}]")
    g.add_argument("--model_dtype", choices=DTYPES, help=f"parameter dtype [{d['model_dtype']}]")
    g.add_argument("--train_dtype", choices=("auto",) + DTYPES,
                   help="autocast dtype; auto = bfloat16 on GPU, float32 on CPU [auto]")
    g.add_argument("--vocab_pad_multiple", type=_positive_int,
                   help=f"pad the embedding/head rows to a multiple of this (fast GPU kernels; 1 = off) "
                        f"[{d['vocab_pad_multiple']}]")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (activation recomputation)")
    g = p.add_argument_group("evaluation, checkpoints, dot products")
    g.add_argument("--eval_interval", type=_positive_int, help=f"[{d['eval_interval']}]")
    g.add_argument("--eval_iter", type=_positive_int, help=f"batches per split and domain [{d['eval_iter']}]")
    g.add_argument("--eval_bs", type=_positive_int, help=f"rows per evaluation batch [{d['eval_bs']}]")
    g.add_argument("--checkpoint_interval", type=_positive_int, help=f"[{d['checkpoint_interval']}]")
    g.add_argument("--dot_prod_save_interval", type=_positive_int,
                   help=f"steps per grad_dotprods/iter_XXXXXX file [{d['dot_prod_save_interval']}]")
    g.add_argument("--results_format", choices=RESULTS_FORMATS,
                   help="dot-product files as iter_XXXXXX.pkl, .parquet (the same rows as a table), or both "
                        f"[{d['results_format']}]")
    g.add_argument("--report_to", type=parse_report_to, metavar="{none,csv,tensorboard,wandb}",
                   help="also send loss, lr, tokens/s and per-domain dot-product sums of every step to these "
                        "(comma-separated; training_log.jsonl is always written) [none]")
    return p


def _yaml_to_argv(path, parser):
    """YAML mapping -> the flags it stands for, so YAML values get exactly the flags' checks."""
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        parser.error(f"--config {path}: cannot read YAML ({err})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    argv = []
    for key, value in values.items():
        key = key.replace("-", "_") if isinstance(key, str) else key  # the dashed spelling, as on the command line
        if key not in DEFAULTS:
            parser.error(f"--config {path}: unknown key {key!r}; keys are the flag names: {', '.join(DEFAULTS)}")
        if value is None or value is False:
            continue
        argv.append(f"--{key}")
        if value is True:
            continue
        if isinstance(value, dict):
            value = ",".join(f"{name}:{weight}" for name, weight in value.items())
        elif isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        argv.append(str(value))
    return argv


def run_dir_of(cfg):
    return os.path.join(cfg["results_dir"], cfg["run_name"])


def model_name(cfg):
    """--architecture, or "config-<model_type>" for a run built from --model_config."""
    return cfg["architecture"] if cfg.get("model_config") is None else f"config-{cfg['model_config']['model_type']}"


def default_run_name(cfg):
    name = f"{cfg['method']}-{model_name(cfg)}-bs{cfg['batch_size']}-seq{cfg['seq_len']}-seed{cfg['seed']}"
    if cfg["attention"] == "lowrank":
        name += f"-lowrank{cfg['attention_rank']}x{cfg['attention_block']}"
    return name


def parse_config(argv, world_size=1):
    """argv -> the run's full config dict (plain JSON values). Exits with code 2 on any bad value."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    if "config" in given:
        from_yaml = vars(parser.parse_args(_yaml_to_argv(given.pop("config"), parser)))
        from_yaml.update(given)
        given = from_yaml

    if given.get("model_config") is not None and "architecture" in given:
        parser.error("--model_config and --architecture both name the model; give one")
    cfg = dict(DEFAULTS)
    cfg.update(given)
    try:
        dirs = load_settings()
    except (OSError, ValueError) as err:
        parser.error(str(err))
    cfg["results_dir"] = os.path.abspath(cfg["results_dir"] or dirs.results_dir)
    cfg["run_name"] = cfg["run_name"] or default_run_name(cfg)
    checkpoint = os.path.join(run_dir_of(cfg), "checkpoints", "latest.pt")
    saved_path = os.path.join(run_dir_of(cfg), "config.json")

    if cfg["resume"]:
        if not os.path.exists(saved_path):
            parser.error(f"--resume: no run at {run_dir_of(cfg)} (no config.json); check --run_name / --results_dir")
        try:
            with open(saved_path) as f:
                saved = json.load(f)
            if not isinstance(saved, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            parser.error(f"--resume: cannot read {saved_path} ({type(err).__name__}: {err}); restore it from a "
                         "backup, or keep this run's results and start a new --run_name")
        if given.get("data_dir") is not None:
            given["data_dir"] = os.path.abspath(given["data_dir"])
        saved = {k: saved.get(k, LEGACY_DEFAULTS.get(k, DEFAULTS.get(k))) for k in set(saved) | set(DEFAULTS)}
        changed = [k for k in RUN_IDENTITY if k in given and given[k] != saved.get(k)]
        if changed:
            parser.error(f"--resume: {', '.join('--' + k for k in changed)} differ from the saved run "
                         f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); they define the run, "
                         "start a new --run_name to change them")
        cfg = {k: saved[k] for k in DEFAULTS}
        cfg.update(given)
        cfg["results_dir"] = os.path.abspath(given.get("results_dir") or saved.get("results_dir"))
        cfg["resume"] = True
        if cfg["eval_only"] and not os.path.exists(checkpoint):
            parser.error(f"--eval_only --resume: {checkpoint} does not exist")
        written = dotprod_steps_on_disk(run_dir_of(cfg))
        # a run that diverged before its first checkpoint restarts from its initial weights (config.json says so)
        divergences = saved.get("divergences")
        restarts = (isinstance(divergences, list) and bool(divergences) and isinstance(divergences[-1], dict)
                    and divergences[-1].get("last_finite_checkpoint") == 0)
        if not os.path.exists(checkpoint) and written and not restarts:
            parser.error(f"--resume: {run_dir_of(cfg)} has no checkpoint ({checkpoint}) but holds "
                         f"{len(written)} dot-product file(s) up to step {written[-1]}; resuming would redo "
                         "those steps, so nothing was changed. Restore the checkpoint, or keep these results "
                         "and start a new --run_name (or move the directory away to start this name afresh)")
    elif not cfg["eval_only"] and os.path.exists(saved_path):
        parser.error(f"{run_dir_of(cfg)} already holds a run: pass --resume to continue it, "
                     "or --run_name NEW (or another --results_dir) to start a new one")

    for flag in ("attention_rank", "attention_block"):
        if flag in given and cfg["attention"] != "lowrank":
            parser.error(f"--{flag} applies to --attention lowrank only (this run's attention is {cfg['attention']})")
    _check_values(cfg, parser, world_size)
    if cfg["lr_decay_steps"] is None:
        cfg["lr_decay_steps"] = cfg["max_steps"]
    if cfg["data_dir"] is not None:
        cfg["data_dir"] = os.path.abspath(cfg["data_dir"])
    return cfg


def eval_only_without_writes(cfg):
    """--eval_only without --resume evaluates the fresh model and writes nothing."""
    return cfg["eval_only"] and not cfg["resume"]


def _check_values(cfg, parser, world_size):
    rows_per_micro_batch = world_size * cfg["grad_accum"]
    if cfg["batch_size"] % rows_per_micro_batch:
        parser.error(f"--batch_size {cfg['batch_size']} must be divisible by processes x --grad_accum = "
                     f"{world_size} x {cfg['grad_accum']} (every micro-batch of every rank has the same rows)")
    if cfg["eval_bs"] % world_size:
        parser.error(f"--eval_bs {cfg['eval_bs']} must be divisible by the {world_size} processes")
    longest = max_seq_len(cfg["architecture"], cfg["model_config"])
    if cfg["seq_len"] < 2 or cfg["seq_len"] > longest:
        parser.error(f"--seq_len {cfg['seq_len']}: must be between 2 and {longest} ({model_name(cfg)})")
    if cfg["attention"] == "lowrank":
        if not supports_lowrank_attention(cfg["architecture"], cfg["model_config"]):
            parser.error(f"--attention lowrank: available for the Llama-style sizes and --model_config files of "
                         f"model_type llama only, not {model_name(cfg)}")
        if cfg["attention_rank"] > cfg["attention_block"]:
            parser.error(f"--attention_rank {cfg['attention_rank']} must not exceed --attention_block "
                         f"{cfg['attention_block']} (summaries of a block of that many positions)")
    if cfg["value"] != "first_order" and cfg["method"] != "GradDotProd":
        parser.error(f"--value {cfg['value']} needs --method GradDotProd")
    if cfg["value"] in ("adamw", "adamw_vt") and cfg["optimizer"] != "AdamW":
        parser.error(f"--value {cfg['value']} needs --optimizer AdamW (got {cfg['optimizer']})")
    if cfg["value"] in DEFERRED and cfg["compile"]:
        parser.error(f"--value {cfg['value']} runs the engine's hooks eagerly (they keep each layer's rows for "
                     "the end of the step): drop --compile")
    if cfg["method"] == "GradDotProd" and cfg["val_batch_size"] < 1:
        parser.error("--val_batch_size must be >= 1 with --method GradDotProd")
    if cfg["learning_rate"] <= 0:
        parser.error(f"--learning_rate {cfg['learning_rate']} must be > 0")
    if cfg["min_lr"] > cfg["learning_rate"]:
        parser.error(f"--min_lr {cfg['min_lr']} must not exceed --learning_rate {cfg['learning_rate']}")
    if cfg["lr_decay_steps"] is not None and cfg["lr_decay_steps"] < cfg["warmup_step"]:
        parser.error(f"--lr_decay_steps {cfg['lr_decay_steps']} must be >= --warmup_step {cfg['warmup_step']}")
    for flag in ("data_dir", "init_from"):
        if cfg[flag] is not None and not os.path.isdir(cfg[flag]):
            parser.error(f"--{flag} {cfg[flag]}: no such directory")
    missing = missing_packages(cfg["report_to"])
    if missing and not cfg["eval_only"]:
        parser.error(f"--report_to {','.join(missing)}: needs the package(s) {', '.join(missing.values())}; "
                     "install them with pip install -e \".[logging]\" (or pass --report_to none)")
    if os.sep in cfg["run_name"] or cfg["run_name"] in ("", ".", ".."):
        parser.error(f"--run_name {cfg['run_name']!r} must be a plain directory name")
    if len(cfg["run_name"].encode()) > 200:
        parser.error(f"--run_name is {len(cfg['run_name'].encode())} bytes long; use at most 200 (file names "
                     "under it get longer)")
    results = cfg["results_dir"]
    if os.path.exists(results) and not os.path.isdir(results):
        parser.error(f"--results_dir {results}: exists and is not a directory")
    existing = results
    while not os.path.exists(existing):  # the nearest existing ancestor must be a writable directory
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        parser.error(f"--results_dir {results}: {existing} is a file, not a directory")
    if not eval_only_without_writes(cfg) and not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--results_dir {results}: {existing} is not writable")


if __name__ == "__main__":  # `python -m GradDotProd_LM.args FLAGS`: check flags only (train.sh before torchrun)
    import sys

    parse_config(sys.argv[1:], world_size=int(os.environ.get("WORLD_SIZE", 1)))
