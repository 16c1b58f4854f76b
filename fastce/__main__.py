"""``python -m fastce precompile``: compile the common kernel signatures into numba's
on-disk cache ahead of time, in parallel processes (see ``fastce._precompile``)."""
import argparse
import sys

from ._precompile import COMMON, DTYPES, EXTRA, precompile


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastce", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("precompile", help="compile the common kernel signatures into "
                         "numba's on-disk cache, in parallel processes")
    pre.add_argument("--all", action="store_true",
                     help="also K-dim layouts and probability targets")
    pre.add_argument("--group", action="append", choices=COMMON + EXTRA,
                     help="only this group of calls (repeatable; default the common ones, "
                          "with --all every group)")
    pre.add_argument("--dtype", action="append", choices=DTYPES,
                     help="only this dtype (repeatable; default both)")
    pre.add_argument("-j", "--jobs", type=int, default=None,
                     help="worker processes (default: the CPU count)")
    pre.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    groups = tuple(args.group) if args.group else COMMON + EXTRA if args.all else COMMON
    precompile(groups, tuple(args.dtype or DTYPES), args.jobs, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
