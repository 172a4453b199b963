"""What a run's data is, so that nothing computed on one version of the data is read against another: `data_identity`
of a data directory or spec (config.json records it; a resume, curation, the report's texts and attribution compare
it with the data now), `source_identity` of any source `graddotprod-attribute index` reads (a JSONL file as well),
`describe_data_change` naming what differs, and `changed_since` for readers that show the data's text.
"""
import hashlib
import os

from pile_tools.data_spec import data_files

WHOLE_HASH_LIMIT = 64 << 20  # a larger index is identified by its size, first and last MiB
EDGE_BYTES = 1 << 20
SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 16 << 10  # what a token file's identity reads of it (256 KiB)


def data_identity(data_dir):
    """What the run's data is. A pile_tools corpus: {relative path: sha256} of every manifest (ingest.json and the
    per-domain .json files) and {relative path: token_file_identity} of every token file. Another format
    (pile_tools.data_spec.data_files): {path: sha256} of the spec, the indices and the dataset manifests,
    {path: token_file_identity} of the token files (None: missing), paths relative to the spec's (or the
    dataset's) directory when inside it. Cheap to compute (256 KiB read of a token file, whatever its size);
    any ingest, added domain, changed split or rewritten file changes it, a rewrite to the same size too
    (a corpus shuffled or tokenized again)."""
    files = data_files(data_dir)
    if files is not None:
        base = os.path.dirname(os.path.abspath(data_dir)) if os.path.isfile(data_dir) else os.path.abspath(data_dir)
        identity = {}
        for path, kind in sorted(files.items()):
            rel = os.path.relpath(path, base)
            key = path if rel.startswith(os.pardir) else rel
            if not os.path.isfile(path):
                identity[key] = None
            else:
                identity[key] = token_file_identity(path) if kind == "tokens" else content_hash(path)
        return identity
    identity = {}
    for root, _, names in sorted(os.walk(data_dir)):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, data_dir)
            if name.endswith(".json"):
                with open(path, "rb") as f:
                    identity[rel] = hashlib.sha256(f.read()).hexdigest()
            elif name.endswith(".bin"):
                identity[rel] = token_file_identity(path)
    return identity


def token_file_identity(path) -> str:
    """"N bytes, sha256 H": H over the whole file up to SAMPLE_BLOCKS × SAMPLE_BYTES, over that many blocks spread
    evenly from its first byte to its last above (a shuffle or another tokenization moves every block)."""
    size = os.path.getsize(path)
    if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
        with open(path, "rb") as f:
            return f"{size} bytes, sha256 {hashlib.sha256(f.read()).hexdigest()}"
    return f"{size} bytes, sha256 of {SAMPLE_BLOCKS} blocks of {SAMPLE_BYTES >> 10} KiB {_sampled(path, size)}"


def _unchanged(saved, now) -> bool:
    """A recorded identity value against today's. Recorded before this: a token file by its size alone is unchanged
    when its size is; a large index by its edges alone when they are."""
    if isinstance(saved, int) and not isinstance(saved, bool) and isinstance(now, str):
        return now.startswith(f"{saved} bytes,")
    if isinstance(saved, str) and saved.startswith("edges:") and " " not in saved and isinstance(now, str):
        return now.startswith(saved + " blocks:")
    return saved == now


def describe_data_change(saved, now):
    """One line naming what differs between two data identities."""
    added = sorted(set(now) - set(saved))
    removed = sorted(set(saved) - set(now))
    changed = sorted(k for k in set(now) & set(saved) if not _unchanged(saved[k], now[k]))
    parts = [f"{label} {names[:4]}{'...' if len(names) > 4 else ''}"
             for label, names in (("added", added), ("removed", removed), ("changed", changed)) if names]
    return "; ".join(parts)


def content_hash(path):
    """sha256 of a file; over WHOLE_HASH_LIMIT (a Megatron index of the whole Pile is gigabytes) "edges:H1
    blocks:H2", H1 of its size, first and last MiB, H2 of SAMPLE_BLOCKS blocks spread over it (document lengths
    edited in the middle keep the size and both ends)."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= WHOLE_HASH_LIMIT:
            digest.update(f.read())
            return digest.hexdigest()
        digest.update(str(size).encode())
        digest.update(f.read(EDGE_BYTES))
        f.seek(size - EDGE_BYTES)
        digest.update(f.read(EDGE_BYTES))
    return f"edges:{digest.hexdigest()} blocks:{_sampled(path, size)}"


def _sampled(path, size) -> str:
    """sha256 of SAMPLE_BLOCKS blocks of SAMPLE_BYTES spread evenly from the first byte of a file to its last."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for i in range(SAMPLE_BLOCKS):
            f.seek(i * (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def source_identity(source: str) -> dict:
    """data_identity of a data directory or spec; of a single file that is not a spec (a JSONL corpus):
    {its name: token_file_identity}."""
    if os.path.isfile(source) and not source.endswith((".json", ".yaml", ".yml")):
        return {os.path.basename(source): token_file_identity(source)}
    return data_identity(source)


def changed_since(recorded: dict | None, source: str, changes: list | None = None) -> str:
    """"" when `source` is still the data `recorded` (a data_identity or source_identity) describes and no change
    was accepted mid-run (`changes`: config.json's data_changes); else why a text read from it now would not be
    the text the numbers were computed on."""
    if changes:
        steps = ", ".join(str(c.get("from_step")) for c in changes)
        return f"the run accepted a change of its data from step {steps} on (config.json's data_changes)"
    if recorded is None:
        return ""
    change = describe_data_change(recorded, source_identity(source))
    return f"the data under {source} changed since ({change})" if change else ""
