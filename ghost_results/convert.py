"""Results files of a run, from the command line.

    python -m ghost_results convert Results/<run> [Results/<run2> ...]
    python -m ghost_results compact Results/<run> [...] [--steps_per_file 10000] [--row_group_rows 65536]

convert: writes grad_dotprods/iter_XXXXXX.parquet beside every iter_XXXXXX.pkl that has none (runs trained
before the app wrote Parquet, or with --results_format pickle). The pickles are read with the restricted
unpickler, checked against their content digests, and kept; the Parquet file carries the pickle's run_id and
the same digests (a pickle written before digests: digests of what was read). A Parquet file that exists is
left as it is. Exit 0 when every pickle has its Parquet file, 1 if a pickle could not be read, is damaged
(its content does not match its digest) or could not be converted (named; the others are converted), 2 on bad
arguments.

compact: merges the run's step files into grad_dotprods/compact_<first>_<last>.parquet, one file per
--steps_per_file steps, one segment per step file with its own digests (ghost_results.compact). Exit 0 when
every step file was merged, 1 if one was left in place (each named: another run's, damaged, written before
digests) or a run is in use by training, 2 on bad arguments.
"""
import os
import sys

from ghost_common.flags import FlagParser
from ghost_results.results_io import DOTPROD_DIR, ITER_FILE, load_dotprod_pickle, save_dotprod_parquet


def convert(run_dir):
    """Write the missing Parquet files of one run; returns (written paths, [(pickle path, error)])."""
    directory = os.path.join(run_dir, DOTPROD_DIR)
    written, failed = [], []
    for name in sorted(os.listdir(directory)):
        match = ITER_FILE.match(name)
        if not match or match.group(2) != "pkl":
            continue
        source = os.path.join(directory, name)
        target = source[:-len(".pkl")] + ".parquet"
        if os.path.exists(target):
            continue
        try:
            save_dotprod_parquet(target, load_dotprod_pickle(source))
        except Exception as err:  # unsafe, truncated, damaged or off-schema pickles: name it, go on
            failed.append((source, f"{type(err).__name__}: {err}"))
            continue
        written.append(target)
    print(f"{run_dir}: wrote {len(written)} Parquet file(s)" + (f", {len(failed)} failed" if failed else ""),
          flush=True)
    for source, reason in failed:
        print(f"  {source}: {reason}", flush=True)
    return written, failed


def positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError(f"{text} is not >= 1")
    return value


def build_parser():
    from ghost_results.compact import ROW_GROUP_ROWS, STEPS_PER_FILE

    parser = FlagParser(prog="python -m ghost_results", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert_parser = commands.add_parser("convert",
                                         help="write iter_XXXXXX.parquet beside every iter_XXXXXX.pkl lacking one")
    convert_parser.add_argument("run_dirs", nargs="+", metavar="RUN", help="a run directory, e.g. Results/<run>")
    compact_parser = commands.add_parser("compact", help="merge a run's step files into few large Parquet files")
    compact_parser.add_argument("run_dirs", nargs="+", metavar="RUN", help="a run directory, e.g. Results/<run>")
    compact_parser.add_argument("--steps_per_file", type=positive_int, default=STEPS_PER_FILE, metavar="N",
                                help=f"steps one compacted file covers [{STEPS_PER_FILE}]")
    compact_parser.add_argument("--row_group_rows", type=positive_int, default=ROW_GROUP_ROWS, metavar="N",
                                help="rows a row group holds (whole step files; a lazy scan skips row groups by "
                                     f"step and domain) [{ROW_GROUP_ROWS}]")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        if not os.path.isdir(os.path.join(run_dir, DOTPROD_DIR)):
            parser.error(f"{run_dir!r} has no {DOTPROD_DIR}/ directory; give a run directory of a "
                         "--method GradDotProd run")
    if args.command == "compact":
        from ghost_results.compact import main_compact

        return main_compact(args.run_dirs, args.steps_per_file, args.row_group_rows)
    failures = sum(len(convert(run_dir)[1]) for run_dir in args.run_dirs)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
