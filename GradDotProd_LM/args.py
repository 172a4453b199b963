"""Command-line flags of `./train.sh` / `python -m GradDotProd_LM.train`.

Precedence, lowest first: DEFAULTS < the run's saved config.json (with --resume) < --config YAML < flags.
A value from a file is checked by the rules of its flag, as the same text after the flag would be (a YAML
scalar is read as its text: `off` is not a number, `6e-4` is). Every bad value ends in `parser.error` (exit
code 2, one line naming the flag, or the file and the key) before anything is started.

Torch-free: the flags are parsed before torch and transformers are imported (transformers is imported here
only to read a --model_config, the results package only with --resume, the logging sinks only with
--report_to), so `-h` and a bad flag answer at once.
"""
import argparse
import json
import os

import yaml

from ghost_common.flags import FlagParser
from ghost_engine.values import AUTO, CHOICES, DEFERRED, value_for
from GradDotProd_LM.architectures import ARCHITECTURE_NAMES, ATTENTIONS, named_max_seq_len, supports_lowrank_attention
from GradDotProd_LM.settings import load_settings
from pile_tools.layout import SPEC_SUFFIXES

METHODS = ("GradDotProd", "Regular")
OPTIMIZERS = ("AdamW", "SGD")
DTYPES = ("float32", "bfloat16")
RESULTS_FORMATS = ("pickle", "parquet", "both")

DEFAULTS = dict(
    method="GradDotProd", architecture="GPT2-Small", batch_size=16, val_batch_size=1,
    val_domain=None, train_domains=None, warmup_step=2000, learning_rate=6e-4, min_lr=6e-5,
    optimizer="AdamW", max_steps=10000, lr_decay_steps=None, grad_accum=1, grad_clip=1.0, seed=42,
    eval_only=False, eval_interval=500, eval_iter=10, eval_bs=8, dot_prod_save_interval=10,
    checkpoint_interval=1000, keep_checkpoints=1, model_dtype="float32", train_dtype="auto", seq_len=1024,
    data_dir=None, results_dir=None, run_name=None, resume=False, compile=False, grad_ckpt=False,
    init_from=None, vocab_pad_multiple=64, accept_data_change=False, model_config=None, report_to=[],
    results_format="parquet", attention="standard", attention_rank=16, attention_block=64, value=AUTO,
    project_dim=0, project_seed=0, project_dtype="bfloat16", fsdp=False, replicate_degree=1,
)
# Settings added after the app's first version, with what a run saved before each existed used (its config.json
# lacks the key): the default of today, but vocab_pad_multiple (those runs were unpadded) and results_format
# (those runs wrote pickles and Parquet files, "both", the default then). A config.json lacking any other
# setting was not written by the app, or was damaged since.
ADDED_LATER = dict(vocab_pad_multiple=1, accept_data_change=False, model_config=None, report_to=[],
                   results_format="both", attention="standard", attention_rank=16, attention_block=64,
                   value="first_order", keep_checkpoints=1, project_dim=0, project_seed=0,
                   project_dtype="bfloat16", fsdp=False, replicate_degree=1)

# What config.json holds beside the flags and a resume reads (GradDotProd_LM/training.py), with its JSON type;
# run_id is null or absent for a run started before identities existed.
RECORDS = dict(data_identity="an object", data_changes="a list", divergences="a list of objects", run_id="a string",
               launches="a list of objects")

PER_LAUNCH = ("resume", "accept_data_change", "eval_only")  # what one launch asks, not a setting of the run
# These define which samples are seen and how they are valued; a resumed run must keep them.
RUN_IDENTITY = ("method", "architecture", "batch_size", "val_batch_size", "val_domain", "train_domains",
                "seq_len", "seed", "model_dtype", "data_dir", "init_from", "vocab_pad_multiple", "optimizer",
                "model_config", "attention", "attention_rank", "attention_block", "value", "project_dim",
                "project_seed")


def _number(kind, low, wording):
    """An argparse type: `kind` (int or float) of the flag's text, at least `low` (a NaN never is)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= low:
            raise argparse.ArgumentTypeError(f"must be {wording}, got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__} >= {low}"
    return parse


_positive_int = _number(int, 1, "a positive integer")
_non_negative_int = _number(int, 0, "an integer >= 0")
_non_negative_float = _number(float, 0.0, "a number >= 0")


def _model_config(path):
    from GradDotProd_LM.model import load_model_config  # transformers, for the one flag that needs it

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
    from GradDotProd_LM.experiment_log import SINKS  # numpy, pyarrow: only when --report_to is given

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


def build_parser(exit_on_error=True):
    # argument_default=SUPPRESS: the namespace holds only what the user gave, so the layers can be merged.
    # FlagParser: no abbreviations (a typo such as --max_step must not silently become --max_steps), and
    # every flag also accepts its dashed spelling (--seq-len). exit_on_error=False: a bad value raises
    # argparse.ArgumentError (used to check the values of files with the flags' own rules).
    p = FlagParser(
        prog="train.sh", argument_default=argparse.SUPPRESS, exit_on_error=exit_on_error,
        description="GPT-2 pretraining on the Pile; with --method GradDotProd every training sample's "
                    "gradient dot product with the validation gradient is saved (first-order In-Run Data "
                    "Shapley). Defaults in brackets.")
    d = DEFAULTS
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file of flag values (keys = flag names); flags override it")
    _run_flags(p.add_argument_group("run"), d)
    _data_flags(p.add_argument_group("data"), d)
    _optimisation_flags(p.add_argument_group("optimisation"), d)
    _evaluation_flags(p.add_argument_group("evaluation, checkpoints, dot products"), d)
    return p


def _run_flags(g, d):
    """What is trained and valued, where its files go, resume and evaluation-only runs."""
    g.add_argument("--method", choices=METHODS, help=f"[{d['method']}]")
    g.add_argument("--value", choices=CHOICES,
                   help="what is saved per sample (GradDotProdEngine's value, docs/METHOD.md section 2.1): auto "
                        "follows the optimizer (adamw under AdamW, first_order under SGD; docs/FIDELITY.md); the "
                        "first-order dot product; its second-order expansion; AdamW's update sensitivity with v "
                        "held (adamw) or through v_t (adamw_vt), both need --optimizer AdamW; the optimizer's "
                        "step differentiated at half the batch gradient (midpoint); or the cosine. second_order, "
                        "adamw_vt and midpoint keep the step's activations until the update. config.json keeps "
                        f"the estimator auto became [{d['value']}]")
    g.add_argument("--project_dim", type=_non_negative_int, metavar="K",
                   help="also keep every training row's projected gradient, K columns over all parameters, in "
                        "<run>/grad_store for graddotprod-attribute query (docs/ATTRIBUTION.md); with --method "
                        f"Regular the projections only, no validation rows; 0 = off [{d['project_dim']}]")
    g.add_argument("--project_seed", type=int, help=f"seed of the projection matrices [{d['project_seed']}]")
    g.add_argument("--project_dtype", choices=("bfloat16", "float16", "float32"),
                   help=f"precision of the stored projections [{d['project_dtype']}]")
    g.add_argument("--architecture", choices=ARCHITECTURE_NAMES,
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
    g.add_argument("--data_dir", help="tokenized Pile written by pile_tools, a nanoGPT (train.bin, val.bin) or "
                   "Hugging Face save_to_disk directory of token ids, or a data spec FILE.json/.yaml naming "
                   "nanoGPT, Megatron or Hugging Face files per split (docs/training.md) [$GRADDOTPROD_PILE_DATA_DIR, "
                   "else PILE_DATA_DIR of the settings file, else ./data/pile_tokenized; if absent, the bundled "
                   "sample]")
    g.add_argument("--resume", action="store_true", help="continue Results/<run_name> from its last checkpoint")
    g.add_argument("--accept_data_change", action="store_true",
                   help="with --resume: continue although the data under --data_dir changed since the run started "
                        "(the change is recorded in config.json; valset.pkl is kept)")
    g.add_argument("--eval_only", action="store_true",
                   help="evaluate the fresh model (or with --resume the run's checkpoint) and exit")
    g.add_argument("--init_from", help="local directory written by save_pretrained() to initialise the weights")
    g.add_argument("--seed", type=int, help=f"[{d['seed']}]")


def _data_flags(g, d):
    """Which data the run trains and validates on."""
    g.add_argument("--batch_size", type=_positive_int,
                   help=f"global batch of one step over all processes [{d['batch_size']}]")
    g.add_argument("--val_batch_size", type=_non_negative_int,
                   help=f"validation rows of the dot product [{d['val_batch_size']}]")
    g.add_argument("--val_domain", help="Pile domain of the validation rows, e.g. 'Github' [all domains]")
    g.add_argument("--train_domains", type=parse_domains,
                   help="'Github,ArXiv' or weighted 'Github:0.7,ArXiv:0.3' [all domains]")
    g.add_argument("--seq_len", type=_positive_int, help=f"tokens per row, at most 1024 for GPT-2, 2048 for the RoPE sizes [{d['seq_len']}]")


def _optimisation_flags(g, d):
    """The optimizer, its schedule and the batch."""
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
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard parameters, gradients and optimizer state over the processes (FSDP2 "
                        "fully_shard per transformer block; bfloat16 through its mixed-precision policy) and write "
                        "sharded checkpoints (checkpoints/step_XXXXXX.dcp/), which a resume reads on any number of "
                        "processes; --value auto, adamw or first_order (docs/training.md)")
    g.add_argument("--replicate_degree", type=_positive_int, metavar="R",
                   help="with --fsdp: R replicas, each sharded over processes / R (HSDP: shards within a node, "
                        "replicas across nodes) [1]")
    g.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (activation recomputation)")


def _evaluation_flags(g, d):
    """Evaluation, checkpoints, the dot-product files and the log's sinks."""
    g.add_argument("--eval_interval", type=_positive_int, help=f"[{d['eval_interval']}]")
    g.add_argument("--eval_iter", type=_positive_int, help=f"batches per split and domain [{d['eval_iter']}]")
    g.add_argument("--eval_bs", type=_positive_int, help=f"rows per evaluation batch [{d['eval_bs']}]")
    g.add_argument("--checkpoint_interval", type=_positive_int, help=f"[{d['checkpoint_interval']}]")
    g.add_argument("--keep_checkpoints", type=_non_negative_int, metavar="N",
                   help="keep the checkpoints of the last N --checkpoint_interval steps as checkpoints/"
                        "step_XXXXXX.pt beside latest.pt (hard links: no extra bytes); 1 = latest.pt only, "
                        f"0 = keep all [{d['keep_checkpoints']}]")
    g.add_argument("--dot_prod_save_interval", type=_positive_int,
                   help=f"steps per grad_dotprods/iter_XXXXXX file [{d['dot_prod_save_interval']}]")
    g.add_argument("--results_format", choices=RESULTS_FORMATS,
                   help="dot-product files as iter_XXXXXX.parquet (a table any Parquet reader reads), "
                        "iter_XXXXXX.pkl (the same rows as a pickle), or both; pickles are read whatever is "
                        f"chosen [{d['results_format']}]")
    g.add_argument("--report_to", type=parse_report_to, metavar="{none,csv,tensorboard,wandb}",
                   help="also send loss, lr, tokens/s and per-domain dot-product sums of every step to these "
                        "(comma-separated; training_log.jsonl is always written) [none]")


# ---------------------------------------------------------------- values from files, checked as flags

# The spellings of true and false: a switch (--compile) in a file takes these, as YAML 1.1 writes booleans.
SWITCH_TEXT = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
LIST_KEYS = ("train_domains", "report_to")  # the flags whose value is a comma-separated list


class _TextLoader(yaml.SafeLoader):
    """PyYAML's safe loader with every scalar but null kept as its text (YAML 1.1 would make off/no a
    boolean, 010 an octal 8 and 6e-4 a string); the text is then read by the flag's own type."""


_TextLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers
            if tag.rsplit(":", 1)[-1] not in ("bool", "int", "float", "timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _action(checker, name):
    return next(a for a in checker._actions if a.dest == name)


def _value_of_text(checker, name, text):
    """What `--name text` gives on the command line (a switch takes true/false, yes/no, on/off instead);
    ValueError with the flag's message when the text is bad."""
    if _action(checker, name).nargs == 0:
        if text.lower() in SWITCH_TEXT:
            return SWITCH_TEXT[text.lower()]
        raise ValueError(f"a switch: write true or false, got {text!r}")
    try:
        return getattr(checker.parse_args([f"--{name}={text}"]), name)  # `=`: a text such as -3 is the value
    except argparse.ArgumentError as err:
        raise ValueError(err.message) from None


def _scalar_text(value):
    if isinstance(value, (list, dict)) or value is None:
        raise ValueError(f"takes a list of plain values, got {_shown(value)} inside it")
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _text_of(name, value):
    """A value read from a file -> the text it stands for after its flag (lists comma-separated, a mapping
    of domains as Domain:weight)."""
    if isinstance(value, list):
        if name not in LIST_KEYS:
            raise ValueError(f"takes one value, got a list {_shown(value)}")
        return ",".join(_scalar_text(v) for v in value)
    if isinstance(value, dict):
        if name != "train_domains":
            raise ValueError(f"takes one value, got a mapping {_shown(value)}")
        return ",".join(f"{_scalar_text(k)}:{_scalar_text(v)}" for k, v in value.items())
    return _scalar_text(value)


def _shown(value):
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(err):
    return " ".join(str(err).split())


def _yaml_values(path, parser):
    """--config FILE -> {flag name: value}, each value what its text gives after the flag. Exits 2 naming the
    file and the key on a bad value, an unknown or repeated key, or a file that is not a YAML mapping."""
    where = f"--config {path}"
    try:
        with open(path) as f:
            loader = _TextLoader(f)
            try:
                node = loader.get_single_node()
                keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)] \
                    if isinstance(node, yaml.MappingNode) else []
                document = loader.construct_document(node) if node is not None else {}
            finally:
                loader.dispose()
    except (OSError, yaml.YAMLError) as err:
        parser.error(f"{where}: cannot read YAML ({_one_line(err)})")
    if not isinstance(document, dict):
        parser.error(f"{where}: expected a mapping of flag names to values, got {type(document).__name__}")
    seen = set()
    for key in keys:  # PyYAML keeps the last of two equal keys without a word
        if key.replace("-", "_") in seen:
            parser.error(f"{where}: key {key!r} is given twice (either spelling); keep one")
        seen.add(key.replace("-", "_"))
    checker = build_parser(exit_on_error=False)
    values = {}
    for key, value in document.items():
        name = key.replace("-", "_") if isinstance(key, str) else key  # the dashed spelling, as on the command line
        if name not in DEFAULTS:
            parser.error(f"{where}: unknown key {key!r}; keys are the flag names: {', '.join(DEFAULTS)}")
        if value is None:
            if DEFAULTS[name] is None:  # null where the default is none: the same as leaving the key out
                continue
            parser.error(f"{where}, key {key}: no value (null); write one, or remove the key for the default "
                         f"({DEFAULTS[name]!r})")
        try:
            text = _text_of(name, value)
            values[name] = _value_of_text(checker, name, text)
        except ValueError as err:
            hint = ""
            if isinstance(value, str) and value.lower() in SWITCH_TEXT and _action(checker, name).nargs != 0:
                hint = f" ({value} is a YAML boolean, but {name} takes a value: see train.sh -h)"
            parser.error(f"{where}, key {key}: {err}{hint}")
    return values


def _json_kind(value):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _saved_value(checker, name, value):
    """A value of a run's config.json, checked as the app wrote it (the JSON type of the flag's value) and
    by the flag's rules; ValueError says what is wrong."""
    action = _action(checker, name)
    if value is None and DEFAULTS[name] is None:
        return None
    if action.nargs == 0:
        expected, ok = "true or false", isinstance(value, bool)
    elif name == "model_config":
        expected = "a Hugging Face model config (an object with a \"model_type\" string)"
        ok = isinstance(value, dict) and isinstance(value.get("model_type"), str)
    elif name == "train_domains":
        expected = "a list of domain names or an object of domain weights"
        ok = (isinstance(value, list) and all(isinstance(v, str) for v in value)) or (
            isinstance(value, dict) and all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                            for w in value.values()))
    elif name == "report_to":
        expected, ok = "a list of sink names", isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif action.type in (int, _positive_int, _non_negative_int):
        expected, ok = "an integer", isinstance(value, int) and not isinstance(value, bool)
    elif action.type is _non_negative_float:
        expected, ok = "a number", isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        expected, ok = "a string", isinstance(value, str)
    if not ok:
        found = "null" if value is None else f"{_shown(value)} is {_json_kind(value)}"
        raise ValueError(f"{found}, but {name} must be {expected}")
    if action.nargs == 0 or name == "model_config":
        return value
    parsed = _value_of_text(checker, name, _text_of(name, value))
    if name == "train_domains" and parsed != value:
        raise ValueError(f"{_shown(value)}: {name} must be {expected} (names without ',' or ':')")
    return parsed


def _record_ok(key, value):
    if key in ("divergences", "launches"):
        return isinstance(value, list) and all(isinstance(d, dict) for d in value)
    return isinstance(value, {"data_identity": dict, "data_changes": list, "run_id": (str, type(None))}[key])


def _saved_config(path, parser):
    """The run's config.json -> ({flag name: value} of every flag, each checked by its flag's rules; the whole
    file, its RECORDS checked for their shape). Exits 2 naming the file and the key on an unreadable file or
    a bad or missing value."""
    fix = "restore config.json from a backup, or keep this run's results and start a new --run_name"
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError(f"not a JSON object but {_json_kind(saved)}")
    except (OSError, ValueError) as err:
        parser.error(f"--resume: cannot read {path} ({type(err).__name__}: {_one_line(err)}); {fix}")
    missing = [k for k in DEFAULTS if k not in saved and k not in ADDED_LATER]
    if missing:
        parser.error(f"--resume: {path} lacks the key(s) {', '.join(missing)} that the app always writes; {fix}")
    for key, expected in RECORDS.items():  # the app's records beside the flags, read on resume
        if key in saved and not _record_ok(key, saved[key]):
            parser.error(f"--resume: {path}, key {key}: {_shown(saved[key])} is not {expected}; correct the key, "
                         f"or {fix}")
    checker = build_parser(exit_on_error=False)
    values = {}
    for name in DEFAULTS:
        try:
            values[name] = _saved_value(checker, name, saved[name]) if name in saved else ADDED_LATER[name]
        except ValueError as err:
            parser.error(f"--resume: {path}, key {name}: {err}; correct the key, or {fix}")
    return values, saved


# ---------------------------------------------------------------- the run's config

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


def _failing(parser, origin):
    """parser.error that also says which of the named settings came from a file (--config, config.json)."""
    def fail(message, *keys):
        by_file = {}
        for key in keys:
            if key in origin:
                by_file.setdefault(origin[key], []).append(key)
        parser.error(message + "".join(f" ({', '.join(names)} from {where})" for where, names in by_file.items()))
    return fail


def parse_config(argv, world_size=1):
    """argv -> the run's full config dict (plain JSON values). Exits with code 2 on any bad value."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    origin = {}  # setting -> the file its value comes from (absent: a flag or the default)
    if "config" in given:
        path = given.pop("config")
        from_yaml = _yaml_values(path, parser)
        origin.update((k, f"--config {path}") for k in from_yaml if k not in given)
        from_yaml.update(given)
        given = from_yaml
    fail = _failing(parser, origin)

    if given.get("model_config") is not None and "architecture" in given:
        fail("--model_config and --architecture both name the model; give one", "model_config", "architecture")
    cfg = dict(DEFAULTS)
    cfg.update(given)
    try:
        dirs = load_settings()
    except (OSError, ValueError) as err:
        parser.error(str(err))
    cfg["results_dir"] = os.path.abspath(cfg["results_dir"] or dirs.results_dir)
    cfg["run_name"] = cfg["run_name"] or default_run_name(cfg)
    checkpoint = os.path.join(run_dir_of(cfg), "checkpoints", "latest.pt")  # or a sharded one: has_checkpoint
    saved_path = os.path.join(run_dir_of(cfg), "config.json")

    if cfg["resume"]:
        if not os.path.exists(saved_path):
            parser.error(f"--resume: no run at {run_dir_of(cfg)} (no config.json); check --run_name / --results_dir")
        saved, records = _saved_config(saved_path, parser)
        if given.get("data_dir") is not None:
            given["data_dir"] = os.path.abspath(given["data_dir"])
        if given.get("value") == AUTO:  # what auto gives with the saved optimizer and method
            given["value"] = resolved_value({**saved, **given})
        changed = [k for k in RUN_IDENTITY if k in given and given[k] != saved[k]]
        if changed:
            fail(f"--resume: {', '.join('--' + k for k in changed)} differ from the saved run "
                 f"({', '.join(f'{k}={saved[k]!r}' for k in changed)}); they define the run, "
                 "start a new --run_name to change them", *changed)
        origin.update((k, saved_path) for k in saved
                      if k not in given and k not in ("results_dir", "run_name", *PER_LAUNCH))
        located = cfg["results_dir"], cfg["run_name"]  # where config.json was found: the run continues there,
        cfg = dict(saved)                              # wherever it began (a moved or renamed run directory)
        cfg.update({k: DEFAULTS[k] for k in PER_LAUNCH})  # what this launch asks, never a saved launch's
        cfg.update(given)
        cfg["results_dir"], cfg["run_name"] = located
        cfg["resume"] = True
        from ghost_results.results_io import dotprod_steps_on_disk  # numpy, pyarrow: only on resume
        from ghost_results.run_directory import has_checkpoint

        if cfg["eval_only"] and not has_checkpoint(run_dir_of(cfg)):
            parser.error(f"--eval_only --resume: {checkpoint} does not exist")

        written = dotprod_steps_on_disk(run_dir_of(cfg))
        # a run that diverged before its first checkpoint restarts from its initial weights (config.json says so),
        # until the restart has written steps past that divergence (an old record then excuses nothing)
        divergences = records.get("divergences")
        restarts = (bool(divergences) and divergences[-1].get("last_finite_checkpoint") == 0
                    and bool(written) and written[-1] <= int(divergences[-1].get("after_step", 0)))
        if not has_checkpoint(run_dir_of(cfg)) and written and not restarts:
            parser.error(f"--resume: {run_dir_of(cfg)} has no checkpoint ({checkpoint}) but holds "
                         f"{len(written)} dot-product file(s) up to step {written[-1]}; resuming would redo "
                         "those steps, so nothing was changed. Restore the checkpoint, or keep these results "
                         "and start a new --run_name (or move the directory away to start this name afresh)")
    elif not cfg["eval_only"] and os.path.exists(saved_path):
        parser.error(f"{run_dir_of(cfg)} already holds a run: pass --resume to continue it, "
                     "or --run_name NEW (or another --results_dir) to start a new one")

    for flag in ("attention_rank", "attention_block"):
        if flag in given and cfg["attention"] != "lowrank":
            fail(f"--{flag} applies to --attention lowrank only (this run's attention is {cfg['attention']})",
                 flag, "attention")
    cfg["value"] = resolved_value(cfg)
    _check_values(cfg, fail, world_size)
    if cfg["lr_decay_steps"] is None:
        cfg["lr_decay_steps"] = cfg["max_steps"]
    if cfg["data_dir"] is not None:
        cfg["data_dir"] = os.path.abspath(cfg["data_dir"])
    return cfg


def launch_record(saved: dict, cfg: dict, argv, start_step: int) -> dict:
    """config.json's record of one launch of a run: the step it trained from, its command, and the settings it
    changed from the saved ones (a resume may change the rate, clipping, dtype...: config.json's flags are the
    latest launch's, so the settings steps 1..k trained with are kept here)."""
    changed = {k: [saved[k], cfg[k]] for k in DEFAULTS
               if k in saved and k in cfg and saved[k] != cfg[k] and k not in PER_LAUNCH}
    return {"from_step": int(start_step) + 1, "argv": list(argv), "changed": changed}


def resolved_value(cfg) -> str:
    """--value, with auto the estimator that tracks the step's exact Shapley value at first-order cost
    (docs/FIDELITY.md): adamw for a GradDotProd run with --optimizer AdamW, else first_order."""
    return value_for(cfg["value"], cfg["optimizer"] == "AdamW" and cfg["method"] == "GradDotProd")


def eval_only_without_writes(cfg):
    """--eval_only without --resume evaluates the fresh model and writes nothing."""
    return cfg["eval_only"] and not cfg["resume"]


def _max_seq_len(cfg, fail):
    if cfg["model_config"] is None:
        return named_max_seq_len(cfg["architecture"])
    from GradDotProd_LM.model import max_seq_len  # transformers reads the config's position count

    try:
        return max_seq_len(cfg["architecture"], cfg["model_config"])
    except Exception as err:  # a bad field: ValueError, TypeError, huggingface_hub's StrictDataclassError, ...
        fail(f"--model_config: transformers cannot build its config ({type(err).__name__}: {_one_line(err)})",
             "model_config")


def _check_fsdp(cfg, fail, world_size):
    """What --fsdp runs: the engine's first-order value, eager, on a world the replicas divide."""
    if world_size % cfg["replicate_degree"]:
        fail(f"--replicate_degree {cfg['replicate_degree']} must divide the {world_size} processes",
             "replicate_degree")
    if cfg["value"] not in ("first_order", "adamw"):
        fail(f"--fsdp values first_order and adamw (--value {cfg['value']} needs the step's whole batch gradient "
             "or per-sample norms of sharded parameters): pick one of them, or train without --fsdp",
             "value", "fsdp")
    if cfg["compile"]:
        fail("--fsdp with --compile is not supported yet (the engine under a compiled FSDP2 model is untested); "
             "drop --compile", "compile", "fsdp")


def _check_values(cfg, fail, world_size):
    """The rules between settings; `fail(message, *settings)` exits 2 (naming the file of a setting from one)."""
    model_key = "architecture" if cfg["model_config"] is None else "model_config"  # what names the model
    rows_per_micro_batch = world_size * cfg["grad_accum"]
    if cfg["batch_size"] % rows_per_micro_batch:
        fail(f"--batch_size {cfg['batch_size']} must be divisible by processes x --grad_accum = "
             f"{world_size} x {cfg['grad_accum']} (every micro-batch of every rank has the same rows)",
             "batch_size", "grad_accum")
    if cfg["eval_bs"] % world_size:
        fail(f"--eval_bs {cfg['eval_bs']} must be divisible by the {world_size} processes", "eval_bs")
    longest = _max_seq_len(cfg, fail)
    if cfg["seq_len"] < 2 or cfg["seq_len"] > longest:
        fail(f"--seq_len {cfg['seq_len']}: must be between 2 and {longest} ({model_name(cfg)})",
             "seq_len", model_key)
    if cfg["attention"] == "lowrank":
        if not supports_lowrank_attention(cfg["architecture"], cfg["model_config"]):
            fail(f"--attention lowrank: available for the Llama-style sizes and --model_config files of "
                 f"model_type llama only, not {model_name(cfg)}", "attention", model_key)
        if cfg["attention_rank"] > cfg["attention_block"]:
            fail(f"--attention_rank {cfg['attention_rank']} must not exceed --attention_block "
                 f"{cfg['attention_block']} (summaries of a block of that many positions)",
                 "attention_rank", "attention_block")
    if cfg["value"] != "first_order" and cfg["method"] != "GradDotProd":
        fail(f"--value {cfg['value']} needs --method GradDotProd", "value", "method")
    if cfg["value"] in ("adamw", "adamw_vt") and cfg["optimizer"] != "AdamW":
        fail(f"--value {cfg['value']} needs --optimizer AdamW (got {cfg['optimizer']})", "value", "optimizer")
    if cfg["fsdp"]:
        _check_fsdp(cfg, fail, world_size)
    elif cfg["replicate_degree"] > 1:
        fail(f"--replicate_degree {cfg['replicate_degree']} needs --fsdp", "replicate_degree", "fsdp")
    if cfg["value"] in DEFERRED and cfg["compile"]:
        fail(f"--value {cfg['value']} runs the engine's hooks eagerly (they keep each layer's rows for "
             "the end of the step): drop --compile", "value", "compile")
    if cfg["method"] == "GradDotProd" and cfg["val_batch_size"] < 1:
        fail("--val_batch_size must be >= 1 with --method GradDotProd", "val_batch_size", "method")
    if cfg["learning_rate"] <= 0:
        fail(f"--learning_rate {cfg['learning_rate']} must be > 0", "learning_rate")
    if cfg["min_lr"] > cfg["learning_rate"]:
        fail(f"--min_lr {cfg['min_lr']} must not exceed --learning_rate {cfg['learning_rate']}",
             "min_lr", "learning_rate")
    if cfg["lr_decay_steps"] is not None and cfg["lr_decay_steps"] < cfg["warmup_step"]:
        fail(f"--lr_decay_steps {cfg['lr_decay_steps']} must be >= --warmup_step {cfg['warmup_step']}",
             "lr_decay_steps", "warmup_step")
    if cfg["init_from"] is not None and not os.path.isdir(cfg["init_from"]):
        fail(f"--init_from {cfg['init_from']}: no such directory", "init_from")
    data = cfg["data_dir"]
    if data is not None and not os.path.isdir(data) and not (os.path.isfile(data) and data.endswith(SPEC_SUFFIXES)):
        fail(f"--data_dir {data}: no such directory" + (f" (a data spec ends with {', '.join(SPEC_SUFFIXES)})"
                                                       if os.path.isfile(data) else ""), "data_dir")
    if cfg["report_to"] and not cfg["eval_only"]:
        from GradDotProd_LM.experiment_log import missing_packages  # numpy, pyarrow: only with --report_to

        missing = missing_packages(cfg["report_to"])
        if missing:
            fail(f"--report_to {','.join(missing)}: needs the package(s) {', '.join(missing.values())}; "
                 "install them with pip install -e \".[logging]\" (or pass --report_to none)", "report_to")
    if os.sep in cfg["run_name"] or cfg["run_name"] in ("", ".", ".."):
        fail(f"--run_name {cfg['run_name']!r} must be a plain directory name", "run_name")
    if len(cfg["run_name"].encode()) > 200:
        fail(f"--run_name is {len(cfg['run_name'].encode())} bytes long; use at most 200 (file names "
             "under it get longer)", "run_name")
    results = cfg["results_dir"]
    if os.path.exists(results) and not os.path.isdir(results):
        fail(f"--results_dir {results}: exists and is not a directory", "results_dir")
    existing = results
    while not os.path.exists(existing):  # the nearest existing ancestor must be a writable directory
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        fail(f"--results_dir {results}: {existing} is a file, not a directory", "results_dir")
    if not eval_only_without_writes(cfg) and not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--results_dir {results}: {existing} is not writable", "results_dir")


if __name__ == "__main__":  # `python -m GradDotProd_LM.args FLAGS`: check flags only (train.sh before torchrun)
    import sys

    parse_config(sys.argv[1:], world_size=int(os.environ.get("WORLD_SIZE", 1)))
