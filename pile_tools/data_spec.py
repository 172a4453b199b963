"""What a data path names, and each split's domains as token sources (`pile_tools.token_sources`).

    DIR holding <split>/ingest.json       pile_tools' own format (layout.py)
    SPEC.json, SPEC.yaml or SPEC.yml      a data spec (below)
    DIR holding train.bin / val.bin       nanoGPT: train.bin, val.bin and test.bin are the train, validation and test
                                          splits; one domain named after DIR; GPT-2's vocabulary
    DIR holding dataset_dict.json         a Hugging Face DatasetDict saved with save_to_disk: its splits train,
                                          validation (or valid, val) and test; one domain named after DIR; GPT-2's
    DIR holding state.json                a Hugging Face Dataset saved with save_to_disk: the train split alone

A data spec maps split -> domain -> source (relative paths are relative to the spec's directory):

    tokenizer: {name: gpt2-bpe, vocab_size: 50257, eot_id: 50256}   # optional; these are the defaults
    train:
      Pile: {format: megatron, path: pile_20B_tokenizer_text_document}   # PREFIX of PREFIX.bin + PREFIX.idx
    validation:
      Pile: {format: megatron, path: pile_val_text_document}
      OpenWebText: {format: nanogpt, path: owt/val.bin}
    test:
      Books: {format: hf, path: books_tokenized, split: test}

Options per format: nanogpt: `dtype` (uint16, the default, or uint32), `separator` (the end-of-document id, by
default the tokenizer's eot_id); megatron: none (path is PREFIX, PREFIX.bin or PREFIX.idx); hf: `column` (the
list-of-ids column, default input_ids), `split` (when path is a DatasetDict's directory). Every split read by one
run shares the spec's tokenizer; `name: gpt2-bpe` says the ids are GPT-2's (texts are then decoded and exported).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from pile_tools.layout import INGEST_FILE, SPEC_SUFFIXES, SPLITS, check_split, domain_paths, read_json
from pile_tools.token_sources import NativeDomain, hf_shards, open_source

FORMATS = {"nanogpt": ("dtype", "separator"), "megatron": (), "hf": ("column", "split")}  # format -> its options
NANOGPT_FILES = {"train": "train.bin", "validation": "val.bin", "test": "test.bin"}
HF_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}
GPT2_TOKENIZER = {"name": "gpt2-bpe", "vocab_size": 50257, "eot_id": 50256}
_SPLIT_HINT = "; a data spec names each split's files (docs/training.md)"


@dataclass
class Split:
    """One split of the data: its domains' token sources and its vocabulary."""

    where: str  # the split as messages name it: its directory, or the spec and the split
    domains: dict  # domain -> token source
    tokenizer: dict  # the vocabulary's identity (native: ingest.json's "tokenizer", possibly malformed)


def data_format(data_dir: str) -> str:
    """native, spec, nanogpt or hf: what `data_dir` holds (native when nothing else matches, so that the native
    reader names what is missing)."""
    if os.path.isfile(data_dir):
        if data_dir.endswith(SPEC_SUFFIXES):
            return "spec"
        raise ValueError(f"{data_dir} is a file, neither a data directory nor a data spec (.json, .yaml, .yml)")
    if any(os.path.exists(os.path.join(data_dir, s, INGEST_FILE)) for s in SPLITS):
        return "native"
    if any(os.path.isfile(os.path.join(data_dir, name)) for name in NANOGPT_FILES.values()):
        indexed = [name for name in NANOGPT_FILES.values()
                   if os.path.isfile(os.path.join(data_dir, name[:-len(".bin")] + ".idx"))]
        if indexed:  # a Megatron pair: its .bin read as nanoGPT's uint16 stream would be other tokens
            raise ValueError(f"{data_dir}: {indexed[0]} has a {indexed[0][:-len('.bin')]}.idx beside it, a Megatron "
                             "indexed dataset, not nanoGPT's token stream; name it in a data spec "
                             "({format: megatron, path: ...}, docs/training.md)")
        return "nanogpt"
    if any(os.path.isfile(os.path.join(data_dir, name)) for name in ("dataset_dict.json", "state.json")):
        return "hf"
    return "native"


def open_split(data_dir: str, split: str) -> Split:
    """The domains of one split of the data `data_dir` names (module docstring); a ValueError naming what is wrong."""
    check_split(split)
    if data_format(data_dir) == "native":
        return _open_native(data_dir, split)
    spec, where = load_spec(data_dir)
    if split not in spec["splits"]:
        raise ValueError(f"split {split!r} is not in {where} (it has {sorted(spec['splits'])}){_SPLIT_HINT}")
    domains = {}
    for name, entry in spec["splits"][split].items():
        options = {k: v for k, v in entry.items() if k not in ("format", "path")}
        if entry["format"] == "nanogpt":
            options.setdefault("separator", spec["tokenizer"]["eot_id"])
        domains[name] = open_source(entry["format"], entry["path"], **options)
    return Split(f"{where}, split {split!r}", domains, spec["tokenizer"])


def load_spec(data_dir: str) -> tuple[dict, str]:
    """({"tokenizer": identity, "splits": {split: {domain: {"format", "path", options}}}}, its description) of a spec
    file or of a directory in a format found by its files; paths are absolute, every entry checked."""
    kind = data_format(data_dir)
    if kind == "spec":
        raw = _read_spec_file(data_dir)
        base, where = os.path.dirname(os.path.abspath(data_dir)), f"the data spec {data_dir}"
    else:
        raw = _detected_spec(data_dir, kind)
        base, where = os.path.abspath(data_dir), f"{data_dir} ({kind})"
    unknown = sorted(set(raw) - {"tokenizer", *SPLITS})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; a data spec has 'tokenizer' and splits {list(SPLITS)}")
    tokenizer = _tokenizer(raw.get("tokenizer"), where)
    splits = {}
    for split in SPLITS:
        if split not in raw:
            continue
        domains = raw[split]
        if not isinstance(domains, dict) or not domains:
            raise ValueError(f"{where}: split {split!r} must map domain names to sources, got {domains!r}")
        named = [name for name in domains if not isinstance(name, str)]
        if named:  # YAML reads 010: as 8 and On: as True: the domain would be named other than written
            raise ValueError(f"{where}: split {split!r} has domain name(s) {named} that are not strings; quote "
                             "them (\"010\": ..., \"On\": ...)")
        splits[split] = {str(name): _entry(entry, base, f"{where}: {split}.{name}") for name, entry in domains.items()}
    return {"tokenizer": tokenizer, "splits": splits}, where


def data_files(data_dir: str) -> dict | None:
    """{path: "content" | "tokens"} of every file the data of `data_dir` is read from: small files whose content
    identifies the data (the spec, indices, dataset manifests) and token files (identified by their size and
    sampled content: pile_tools.identity). None for a native corpus (its identity is the walk of its
    directory)."""
    kind = data_format(data_dir)
    if kind == "native":
        return None
    spec, _ = load_spec(data_dir)
    files = {os.path.abspath(data_dir): "content"} if kind == "spec" else {}
    for domains in spec["splits"].values():
        for entry in domains.values():
            path = entry["path"]
            if entry["format"] == "nanogpt":
                files[path] = "tokens"
            elif entry["format"] == "megatron":
                files.update({path + ".idx": "content", path + ".bin": "tokens"})
            else:
                for name in ("state.json", "dataset_info.json"):
                    files[os.path.join(path, name)] = "content"
                parent = os.path.join(os.path.dirname(path), "dataset_dict.json")
                if os.path.isfile(parent):
                    files[parent] = "content"
                try:
                    files.update({shard: "tokens" for shard in hf_shards(path)})
                except (OSError, ValueError):
                    pass  # state.json missing or damaged: its own entry says so
    return files


# --- the formats ---------------------------------------------------------------------------------------------------

def _read_spec_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                raw = json.load(f)
            else:
                import yaml

                raw = yaml.safe_load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"the data spec {path} cannot be read ({type(err).__name__}: {err})") from None
    except Exception as err:  # yaml's own errors
        raise ValueError(f"the data spec {path} is not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"the data spec {path} must be a mapping of splits (and 'tokenizer'), got {type(raw).__name__}")
    return raw


def _detected_spec(data_dir: str, kind: str) -> dict:
    """The spec a nanoGPT or Hugging Face directory stands for: one domain named after the directory."""
    domain = os.path.basename(os.path.normpath(os.path.abspath(data_dir)))
    if kind == "nanogpt":
        return {split: {domain: {"format": "nanogpt", "path": name}} for split, name in NANOGPT_FILES.items()
                if os.path.isfile(os.path.join(data_dir, name))}
    if not os.path.isfile(os.path.join(data_dir, "dataset_dict.json")):
        return {"train": {domain: {"format": "hf", "path": "."}}}
    manifest = read_json(os.path.join(data_dir, "dataset_dict.json"))
    saved = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(saved, list):
        raise ValueError(f"{data_dir}/dataset_dict.json lists no splits: not a DatasetDict written by save_to_disk")
    spec = {}
    for split, names in HF_SPLIT_NAMES.items():
        found = next((name for name in names if name in saved), None)
        if found is not None:
            spec[split] = {domain: {"format": "hf", "path": found}}
    return spec


def _tokenizer(value, where: str) -> dict:
    if value is None:
        return dict(GPT2_TOKENIZER)
    keys = set(GPT2_TOKENIZER)
    if not isinstance(value, dict) or set(value) != keys or not isinstance(value["name"], str) or not all(
            isinstance(value[k], int) and not isinstance(value[k], bool) for k in ("vocab_size", "eot_id")):
        raise ValueError(f"{where}: tokenizer must be {{name: str, vocab_size: int, eot_id: int}} (GPT-2's: "
                         f"{GPT2_TOKENIZER}), got {value!r}")
    if not 0 <= value["eot_id"] < value["vocab_size"]:
        raise ValueError(f"{where}: tokenizer eot_id {value['eot_id']} is outside its vocabulary of "
                         f"{value['vocab_size']}")
    return dict(value)


def _entry(entry, base: str, where: str) -> dict:
    if not isinstance(entry, dict) or entry.get("format") not in FORMATS or not isinstance(entry.get("path"), str):
        raise ValueError(f"{where} must be {{format: {' | '.join(FORMATS)}, path: PATH, options}}, got {entry!r}")
    kind = entry["format"]
    unknown = sorted(set(entry) - {"format", "path", *FORMATS[kind]})
    if unknown:
        raise ValueError(f"{where}: option(s) {unknown} are not {kind}'s (it takes {list(FORMATS[kind]) or 'none'})")
    resolved = dict(entry, path=os.path.normpath(os.path.join(base, os.path.expanduser(entry["path"]))))
    if kind == "megatron":
        for suffix in (".idx", ".bin"):
            if resolved["path"].endswith(suffix):
                resolved["path"] = resolved["path"][:-len(suffix)]  # the prefix
    if kind == "hf" and "split" in resolved:
        resolved["path"] = os.path.join(resolved["path"], str(resolved.pop("split")))
    if kind == "nanogpt" and "separator" in entry and (not isinstance(entry["separator"], int)
                                                       or isinstance(entry["separator"], bool)):
        raise ValueError(f"{where}: separator must be a token id, got {entry['separator']!r}")
    return resolved


# --- pile_tools' own format ----------------------------------------------------------------------------------------

def _open_native(data_dir: str, split: str) -> Split:
    split_dir = os.path.join(data_dir, split)
    state_path = os.path.join(split_dir, INGEST_FILE)
    if not os.path.exists(state_path):
        raise ValueError(f"{split_dir} is not a tokenized split (no {INGEST_FILE}); run `python -m pile_tools tokenize`"
                         " (or give a nanoGPT, Megatron or Hugging Face dataset: docs/training.md)")
    state = read_manifest(state_path, ("status", "domains"))
    if state["status"] != "complete":
        raise ValueError(f"tokenization of {split_dir} did not finish; re-run the same tokenize command to resume it")
    domains = {}
    for name, info in state["domains"].items():
        slug = info.get("slug") if isinstance(info, dict) else None
        if not isinstance(slug, str) or not slug or os.path.basename(slug) != slug or slug.startswith("."):
            raise ValueError(f"{state_path}: domain {name!r} has no valid file name ({slug!r}); the file is "
                             "damaged or was not written by pile_tools: re-tokenize this split")
        manifest = domain_paths(split_dir, slug)["manifest"]
        domains[name] = NativeDomain(split_dir, read_manifest(manifest, ()), state.get("inputs", []))
    return Split(split_dir, domains, state.get("tokenizer"))


def read_manifest(path: str, keys) -> dict:
    """A JSON manifest of a tokenized split, or a ValueError naming the file (damaged, foreign, missing)."""
    try:
        state = read_json(path)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: the split is incomplete; re-tokenize it") from None
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise ValueError(f"{path} is not a readable manifest ({type(err).__name__}: {err}); the file is damaged: "
                         "re-tokenize this split") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it was not written by pile_tools or is damaged: re-tokenize")
    return state
