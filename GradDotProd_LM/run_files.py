"""The app's side of its run directory: what the run's data is (`data_identity`, `describe_data_change`), which a
resume compares with config.json's record. The run directory itself (its files, their names, order, identity
and durability, the lock, the set-aside on resume, the checkpoint series) is owned by
ghost_results.run_directory.RunDirectory, shared with the framework integrations, which also has the readers
the app uses before a run is opened (read_json, read_valset_tokens, the lock).
"""
import hashlib
import os


def data_identity(data_dir):
    """What the run's data is: {relative path: sha256} of every manifest (ingest.json and the per-domain
    .json files) and {relative path: size} of every token file. Cheap to compute (no token file is read);
    any ingest, added domain or changed split changes it."""
    identity = {}
    for root, _, names in sorted(os.walk(data_dir)):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, data_dir)
            if name.endswith(".json"):
                with open(path, "rb") as f:
                    identity[rel] = hashlib.sha256(f.read()).hexdigest()
            elif name.endswith(".bin"):
                identity[rel] = os.path.getsize(path)
    return identity


def describe_data_change(saved, now):
    """One line naming what differs between two data identities."""
    added = sorted(set(now) - set(saved))
    removed = sorted(set(saved) - set(now))
    changed = sorted(k for k in set(now) & set(saved) if now[k] != saved[k])
    parts = [f"{label} {names[:4]}{'...' if len(names) > 4 else ''}"
             for label, names in (("added", added), ("removed", removed), ("changed", changed)) if names]
    return "; ".join(parts)
