"""Append-only writer of one split's domain files, with crash-safe checkpoints.

Data files are only appended to. A checkpoint flushes and fsyncs them, then atomically replaces
`ingest.json` with the committed lengths and, per input, how many lines were consumed. After a crash
the files are truncated back to the last checkpoint (and the temporary file of a manifest write in
flight is removed) and each input resumes after its last consumed line, so nothing is duplicated and
nothing half-written survives.
"""
from __future__ import annotations

import os
import re

import numpy as np

from pile_tools.layout import INGEST_FILE, TOKEN_DTYPE, domain_paths, domain_slug, read_json, write_json_atomic

MAX_SKIPPED_LISTED = 1000
STATE_VERSION = 1
TEMPORARY = re.compile(r".+\.json\.tmp-\d+")  # ghost_common.durable.write_atomically's temporary files


class SplitWriter:
    def __init__(self, split_dir: str, split: str, tokenizer_identity: dict, domain_filter: list[str] | None,
                 token_dtype: str = TOKEN_DTYPE):
        self.split_dir = split_dir
        os.makedirs(split_dir, exist_ok=True)
        self.state_path = os.path.join(split_dir, INGEST_FILE)
        # temporary files of manifest writes a kill interrupted (the caller holds the split's lock: no other
        # writer is live)
        for name in os.listdir(split_dir):
            if TEMPORARY.fullmatch(name):
                os.remove(os.path.join(split_dir, name))
        options = {"domains": sorted(domain_filter) if domain_filter else None}
        if os.path.exists(self.state_path):
            self.state = read_json(self.state_path)
            self.state.setdefault("dtype", TOKEN_DTYPE)  # splits written before the dtype was recorded
            self._check_compatible(tokenizer_identity, options)
            self._truncate_to_checkpoint()
        else:
            leftovers = [f for f in os.listdir(split_dir) if f.endswith(".bin")]
            if leftovers:
                raise ValueError(
                    f"{split_dir} holds token files {leftovers[:3]} but no {INGEST_FILE} to say what they contain; "
                    "use a new --output directory or --overwrite"
                )
            self.state = {
                "version": STATE_VERSION,
                "split": split,
                "status": "in_progress",
                "tokenizer": tokenizer_identity,
                "dtype": token_dtype,
                "options": options,
                "inputs": [],
                "domains": {},
                "skipped_count": 0,
                "skipped": [],
            }
        self._files: dict[str, dict] = {}
        self._dirty: set[str] = set()  # domains appended to since the last checkpoint

    def _check_compatible(self, tokenizer_identity: dict, options: dict) -> None:
        if self.state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.state_path} has an unknown format version; use a new --output or --overwrite")
        if self.state["tokenizer"] != tokenizer_identity:
            raise ValueError(
                f"{self.split_dir} was tokenized with a different vocabulary ({self.state['tokenizer']}); "
                "use a new --output directory or --overwrite"
            )
        if self.state["options"] != options:
            raise ValueError(
                f"{self.split_dir} was built with --domains {self.state['options']['domains']}, "
                f"this run asks for {options['domains']}; use a new --output directory or --overwrite"
            )

    def _truncate_to_checkpoint(self) -> None:
        """Drop whatever a killed run appended after its last checkpoint: the tail of each domain's files, and
        the files of domains first seen after it (they hold nothing a checkpoint covers)."""
        committed = set()
        for info in self.state["domains"].values():
            paths = domain_paths(self.split_dir, info["slug"])
            committed.update(os.path.basename(paths[key]) for key in ("tokens", "doc_starts", "doc_origin"))
            lengths = {
                "tokens": info["num_tokens"] * np.dtype(self.dtype).itemsize,
                "doc_starts": info["num_documents"] * 8,
                "doc_origin": info["num_documents"] * 16,
            }
            for key, length in lengths.items():
                if os.path.getsize(paths[key]) < length:
                    raise ValueError(
                        f"{paths[key]} is shorter than its checkpoint in {self.state_path} says: the output is "
                        "damaged; re-run with --overwrite"
                    )
                os.truncate(paths[key], length)
            if "max_token_id" not in info:  # a split begun before the maximum was recorded: read it once
                tokens = np.memmap(paths["tokens"], dtype=self.dtype, mode="r") if info["num_tokens"] else None
                info["max_token_id"] = int(tokens.max()) if tokens is not None else -1
        for name in os.listdir(self.split_dir):
            if name.endswith(".bin") and name not in committed:
                os.remove(os.path.join(self.split_dir, name))

    @property
    def dtype(self) -> str:
        """Token file dtype: uint16, or uint32 for a vocabulary over 65536 ids."""
        return self.state["dtype"]

    # --- inputs -------------------------------------------------------------------------------

    def input_record(self, fingerprint: str, name: str, path: str) -> tuple[int, dict]:
        """(index, record) of an input, registering it on first sight."""
        for index, record in enumerate(self.state["inputs"]):
            if record["fingerprint"] == fingerprint:
                return index, record
        record = {"fingerprint": fingerprint, "name": name, "path": path, "lines_done": 0, "finished": False}
        self.state["inputs"].append(record)
        return len(self.state["inputs"]) - 1, record

    @property
    def num_tokens(self) -> int:
        return sum(info["num_tokens"] for info in self.state["domains"].values())

    # --- data ---------------------------------------------------------------------------------

    def _open(self, domain: str) -> dict:
        if domain not in self._files:
            if domain not in self.state["domains"]:
                slug = domain_slug(domain, taken={info["slug"] for info in self.state["domains"].values()})
                self.state["domains"][domain] = {"slug": slug, "num_tokens": 0, "num_documents": 0,
                                                 "max_token_id": -1}
            paths = domain_paths(self.split_dir, self.state["domains"][domain]["slug"])
            self._files[domain] = {key: open(paths[key], "ab") for key in ("tokens", "doc_starts", "doc_origin")}
        return self._files[domain]

    def append_document(self, domain: str, tokens: np.ndarray, input_index: int, line_no: int) -> None:
        """tokens: [n] ids ending with EOT."""
        files = self._open(domain)
        self._dirty.add(domain)
        info = self.state["domains"][domain]
        files["tokens"].write(tokens.astype(self.dtype, copy=False).tobytes())
        files["doc_starts"].write(np.int64(info["num_tokens"]).tobytes())
        files["doc_origin"].write(np.array([input_index, line_no], dtype=np.int64).tobytes())
        info["num_tokens"] += int(tokens.size)
        info["num_documents"] += 1
        info["max_token_id"] = max(info["max_token_id"], int(tokens.max()))  # checked against the vocabulary

    def record_skipped(self, input_name: str, line_no: int, reason: str) -> None:
        self.state["skipped_count"] += 1
        if len(self.state["skipped"]) < MAX_SKIPPED_LISTED:
            self.state["skipped"].append({"input": input_name, "line": line_no, "reason": reason})

    # --- commits ------------------------------------------------------------------------------

    def checkpoint(self, status: str = "in_progress") -> None:
        for domain in self._dirty:
            for fh in self._files[domain].values():
                fh.flush()
                os.fsync(fh.fileno())
        self._dirty.clear()
        self.state["status"] = status
        write_json_atomic(self.state_path, self.state)

    def complete(self) -> None:
        """Write every domain manifest, then mark the split complete."""
        if self._dirty or self.state["status"] == "complete":
            self.checkpoint("in_progress")
        for domain, info in self.state["domains"].items():
            paths = domain_paths(self.split_dir, info["slug"])
            write_json_atomic(
                paths["manifest"],
                {
                    "domain": domain,
                    "split": self.state["split"],
                    "dtype": self.dtype,
                    "num_tokens": info["num_tokens"],
                    "num_documents": info["num_documents"],
                    "max_token_id": info["max_token_id"],
                    "token_file": os.path.basename(paths["tokens"]),
                    "doc_starts_file": os.path.basename(paths["doc_starts"]),
                    "doc_origin_file": os.path.basename(paths["doc_origin"]),
                    "tokenizer": self.state["tokenizer"],
                },
            )
        self.checkpoint("complete")

    def close(self) -> None:
        for files in self._files.values():
            for fh in files.values():
                fh.close()
        self._files.clear()
