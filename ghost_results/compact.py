"""Compaction: a run's step files merged into few large Parquet files (`python -m ghost_results compact RUN`).

A run writes grad_dotprods/iter_XXXXXX.parquet (and/or .pkl) every --dot_prod_save_interval steps: 10,000 small
files per 100,000 steps. `compact(run_dir)` merges them window by window of `steps_per_file` steps (a step file
belongs to the window of its last step: 1..N, N+1..2N, ...) into grad_dotprods/compact_<first>_<last>.parquet
(format: ghost_results.results_io, "Compacted files"). Each step file becomes one *segment* of the compacted file:
its rows as they were read and verified, in their order, whole in one row group, with the file's identity
(run_name, run_id, world_size, value, schema_version) and its own content digests, which the loader checks per
segment exactly as it checked the step file. A window already compacted gets the step files written since merged
into a new file; a window that is one compacted file and nothing else is left as it is (compaction twice changes
nothing), and one whose other files are copies of its segments (a compaction stopped while removing them) only
has those copies removed, each once its digests are found equal to the verified segment's.

What is merged: the step files of the run's identity (config.json's run_id, or its run_name for a run started
before run ids; compaction refuses a run without config.json, since it removes files), read as `read_run` reads
them (the Parquet file, or its pickle twin if that is damaged or another run's), verified against their digests.
Left in place, and named: files of another run, damaged or unreadable files, files written before content
digests, a pickle with a step twice, a step file whose segment a compacted file already holds with other
contents; a window whose compacted file is damaged is not rewritten at all.

Crash safety (docs/RELIABILITY.md): the compacted file is written durably (temporary file, fsync, rename, fsync of
the directory), read back and verified; only then are the files it replaces removed (the step files, both formats
when the twin carries the same digests, and the window's older compacted files), the directory fsynced last. A
kill at any point leaves a run that reads the same rows: before the rename a temporary file no reader takes (the
next compaction removes it); after it, step files or older compacted files beside the new one hold the same
segments with the same digests, which the loader reads once. The run's lock (run.lock) is held throughout, so
training and compaction never touch one run at once.
"""
import collections
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ghost_common.durable import fsync_directory
from ghost_results import results_io
from ghost_results.results_io import (COMPACT_FILE, DOTPROD_DIR, FIRST_ORDER_COLUMN, PER_LAYER_PREFIX,
                                      ResultsFormatError, read_compacted, safe_load_pickle, write_compacted)
from ghost_results.run_directory import RunLock

STEPS_PER_FILE = 10_000  # steps a compacted file covers: 1,000 step files of 10 steps
ROW_GROUP_ROWS = 65_536  # rows a row group holds at least before it closes (whole segments only)
_PREFETCH = 8  # step files read ahead (Parquet decoding releases the GIL)


@dataclass
class Compaction:
    """What `compact` did to one run."""

    written: list = field(default_factory=list)  # compacted files written
    removed: list = field(default_factory=list)  # files removed: their segments are in a compacted file
    left: list = field(default_factory=list)  # [(path, why)] files left in place


def _after(phase, path):
    """Called after each phase of a window ("written": the compacted file is durable and verified; "removed": one
    replaced file is gone). Does nothing; the tests make it raise to stop a compaction between phases."""


def compact(run_dir, steps_per_file=STEPS_PER_FILE, row_group_rows=ROW_GROUP_ROWS) -> Compaction:
    """Merge the run's step files into compacted files, window by window (module docstring). Holds run.lock
    (RunBusyError naming its holder if a training process has it). ValueError for a run without config.json."""
    run_dir = os.fspath(run_dir)
    if steps_per_file < 1 or row_group_rows < 1:
        raise ValueError(f"steps_per_file={steps_per_file}, row_group_rows={row_group_rows}: both must be >= 1")
    config_path = os.path.join(run_dir, "config.json")
    identity = results_io._config_identity(results_io._read_json(config_path), config_path)
    if identity is None:
        raise ValueError(f"{run_dir}: no config.json naming the run (run_id or run_name); compaction removes files "
                         "and merges only the run's own, so it needs to know which those are")
    lock = RunLock(run_dir).acquire()
    try:
        directory = os.path.join(run_dir, DOTPROD_DIR)
        for name in os.listdir(directory):  # a compaction killed before its rename (the lock says none runs)
            if name.startswith("compact.tmp-"):
                os.remove(os.path.join(directory, name))
        done = Compaction()
        windows = collections.defaultdict(lambda: ([], []))  # window -> (step iterations, compacted paths)
        for last, paths in results_io._dotprod_files(run_dir):
            windows[(last - 1) // steps_per_file][0].append(paths)
        for path in results_io._compacted_files(run_dir):
            last = int(COMPACT_FILE.match(os.path.basename(path)).group(2))
            windows[(last - 1) // steps_per_file][1].append(path)
        for window in sorted(windows):
            iterations, compacted = windows[window]
            if iterations or len(compacted) > 1:
                _compact_window(directory, identity, iterations, compacted, row_group_rows, done)
        return done
    finally:
        lock.release()


def _layout(paths: list, compacted: list):
    """(every parameter name, whether first_order_dot_products occurs) over the window's files, from footers
    (Parquet) or the records (pickles): the compacted file's columns. A file that cannot be read adds nothing."""
    names, first_order = set(), False
    for path in compacted + [path for iteration in paths for path in iteration]:
        try:
            if path.endswith(".parquet"):
                _, schema, metadata, _ = results_io._open_parquet(path)
                layers = results_io._layer_names_of(path, metadata, schema.names).values()
                names |= {name[len(PER_LAYER_PREFIX):] for name in layers}
                first_order |= FIRST_ORDER_COLUMN in schema.names
            else:
                for record in safe_load_pickle(path).get("steps", []):
                    names |= set(record.get("per_layer") or {})
                    first_order |= record.get(FIRST_ORDER_COLUMN) is not None
        except Exception:  # damaged: the read below names it
            continue
    return sorted(names), first_order


class _Abandon(Exception):
    """A window that is not rewritten (a damaged compacted file in it): the reason, its file."""


def _compact_window(directory, identity, iterations, compacted, row_group_rows, done):
    """One window's files -> one compacted file, then the files it replaces removed (module docstring)."""
    order = []  # (source step, 0: a compacted file's segment / 1: a step iteration, its path(s)) in step order
    for path in compacted:
        try:
            order += [(results_io._source_step(segment["source"]), 0, path)
                      for segment in results_io.compacted_segments(path)]
        except ResultsFormatError as err:
            done.left.append((path, f"{err}; window not compacted"))
            return
    order += [(int(results_io.ITER_FILE.match(os.path.basename(paths[0])).group(1)), 1, paths) for paths in iterations]
    order.sort(key=lambda entry: entry[:2])
    held = {step for step, kind, _ in order if kind == 0}
    if len(compacted) == 1 and all(step in held for step, kind, _ in order if kind == 1):
        _drop_copies(directory, identity, iterations, compacted[0], done)  # nothing new: no file to write
        return
    layer_names, first_order = _layout(iterations, compacted)
    remove = []  # files whose every segment the new file holds
    seen = {}  # source -> digests written

    def segments(pool):
        readers = {path: iter(results_io.iter_compacted(path, per_layer=True)) for path in compacted}
        steps = [paths for _, kind, paths in order if kind == 1]
        ahead = collections.deque(pool.submit(results_io._read_iteration, paths, True, identity)
                                  for paths in steps[:_PREFETCH])
        next_step = len(ahead)
        for _, kind, what in order:
            if kind == 1:
                attempt = ahead.popleft().result()
                if next_step < len(steps):
                    ahead.append(pool.submit(results_io._read_iteration, steps[next_step], True, identity))
                    next_step += 1
                yield from _step_segment(what, attempt, seen, remove, done)
                continue
            _, content = next(readers[what])
            refusal = content if isinstance(content, ResultsFormatError) else identity.refusal(what, content)
            if refusal is not None:
                raise _Abandon(what, str(refusal))
            if content.source in seen:
                if seen[content.source] != content.digests:
                    raise _Abandon(what, f"holds {content.source} with other contents than another compacted file "
                                         "of these steps")
                continue
            seen[content.source] = content.digests
            yield content.source, content.header, content.columns
        remove.extend(compacted)

    try:
        with ThreadPoolExecutor(max_workers=min(_PREFETCH, os.cpu_count() or 1)) as pool:
            path, records = write_compacted(directory, segments(pool), layer_names, first_order, row_group_rows)
    except _Abandon as err:
        where, why = err.args
        done.left.append((where, f"{why}; window not compacted"))
        return
    if path is None:
        return
    check = read_compacted(path, per_layer=True)  # read back: every segment verified before anything is removed
    bad = [str(content) for _, content in check if isinstance(content, ResultsFormatError)]
    if bad or [content.source for _, content in check] != [record["source"] for record in records]:
        os.remove(path)
        raise ResultsFormatError(f"{path}: did not read back as written ({bad[:1] or 'other segments'}); removed, "
                                 "nothing else changed")
    done.written.append(path)
    _after("written", path)
    for old in remove:
        if os.path.abspath(old) != os.path.abspath(path):
            os.remove(old)
            done.removed.append(old)
            _after("removed", old)
    fsync_directory(directory)


def _drop_copies(directory, identity, iterations, path, done):
    """Step files every one of which the compacted file `path` already holds (a compaction stopped while it
    removed them): each removed if its digests are those of the segment, read and verified; else left."""
    verified = {}
    for _, content in read_compacted(path, per_layer=True):
        refusal = content if isinstance(content, ResultsFormatError) else identity.refusal(path, content)
        if refusal is not None:
            done.left.append((path, f"{refusal}; its step files are left in place"))
            return
        verified[content.source] = content.digests
    remove = []
    for paths in iterations:
        for step_file in paths:
            try:
                digests = results_io._digests_of(results_io.file_header(step_file))
            except (ResultsFormatError, ValueError) as err:
                done.left.append((step_file, str(err)))
                continue
            if digests is not None and digests == verified[results_io._source_of(step_file)]:
                remove.append(step_file)
            else:
                done.left.append((step_file, f"{step_file}: holds the steps of {results_io._source_of(step_file)} "
                                             f"with other contents than {path}; left in place"))
    for step_file in remove:
        os.remove(step_file)
        done.removed.append(step_file)
        _after("removed", step_file)
    fsync_directory(directory)


def _step_segment(paths, attempt, seen, remove, done):
    """The segment of one step iteration (its file read, verified and the run's), or nothing, with what to
    remove once the compacted file is durable: the file read, and its twin if it carries the same digests."""
    read_path, content = attempt[-1]
    if not isinstance(content, results_io._Content):
        done.left += [(path, str(result)) for path, result in attempt]
        return
    if not content.verified or content.repeated:
        why = ("written before content digests: compaction keeps only what it can verify" if not content.verified
               else f"holds steps {sorted(content.repeated)} more than once")
        done.left.append((read_path, why))
        return
    if content.source in seen and seen[content.source] != content.digests:
        done.left.append((read_path, f"a compacted file holds {content.source} with other contents"))
        return
    twins = []
    for path in paths:
        if path == read_path:
            continue
        try:
            same = results_io._digests_of(results_io.file_header(path)) == content.digests
        except (ResultsFormatError, ValueError):
            same = False
        if same:
            twins.append(path)
        else:
            done.left.append((path, f"not the same contents as {os.path.basename(read_path)} (another run's, or "
                                    "damaged); left in place"))
    if content.source not in seen:
        seen[content.source] = content.digests
        yield content.source, content.header, content.columns
    remove.extend([read_path] + twins)


def main_compact(run_dirs, steps_per_file=STEPS_PER_FILE, row_group_rows=ROW_GROUP_ROWS) -> int:
    """The command: compact every run, print what was done; 0 if nothing was left in place, 1 otherwise (each
    file named) or if a run is in use or cannot be compacted."""
    from ghost_results.run_directory import RunBusyError

    status = 0
    for run_dir in run_dirs:
        before = len(os.listdir(os.path.join(run_dir, DOTPROD_DIR)))
        try:
            done = compact(run_dir, steps_per_file, row_group_rows)
        except (RunBusyError, ValueError) as err:
            print(f"{run_dir}: not compacted: {err}", flush=True)
            status = 1
            continue
        after = len(os.listdir(os.path.join(run_dir, DOTPROD_DIR)))
        print(f"{run_dir}: {before} file(s) -> {after}: wrote {len(done.written)} compacted file(s), removed "
              f"{len(done.removed)} file(s) they hold" + (f", left {len(done.left)} in place" if done.left else ""),
              flush=True)
        for path, why in done.left:
            print(f"  left {why}" if why.startswith(path) else f"  left {path}: {why}", flush=True)
        status = max(status, 1 if done.left else 0)
    return status
