#!/bin/sh
# One command from a fresh clone to a comparison report:
#
#   sh benchmarks/run.sh            # quick: minutes on 2 cores
#   sh benchmarks/run.sh --full     # asv's default sampling, full size cap
#   sh benchmarks/run.sh -b CrossEntropy   # extra arguments go to `asv run`
#
# Needs only python3 with pip and venv.  It creates (or reuses) a virtualenv
# for the tools, installs torch==2.13.0 first (an unpinned torch would pull a
# multi-GB CUDA build), then fastce[bench]; asv then builds fastce into its own
# isolated environment under .asv/env (see asv.conf.json), benchmarks the
# checked-out commit, and fastce-report writes fastce-report/report.md + PNGs.
#
# Environment: PYTHON (default python3), FASTCE_BENCH_VENV (default
# .venv-bench), FASTCE_REPORT_DIR (default fastce-report),
# FASTCE_BENCH_MAX_ELEMENTS (size cap; quick mode default 2**25),
# FASTCE_BENCH_COMPILED_GRID (quick mode times torch-compile and jax on part of
# the grid, benchmarks/common.py COMPILED_GRID; --full sets it to "full").
set -eu

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${FASTCE_BENCH_VENV:-.venv-bench}
REPORT_DIR=${FASTCE_REPORT_DIR:-fastce-report}

mode=quick
if [ "${1:-}" = "--full" ]; then
    mode=full
    shift
    export FASTCE_BENCH_COMPILED_GRID=${FASTCE_BENCH_COMPILED_GRID:-full}
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
echo "== installing torch==2.13.0 (CPU), then fastce[bench] into $VENV"
$PIP install --quiet --disable-pip-version-check "torch==2.13.0" </dev/null
$PIP install --quiet --disable-pip-version-check -e ".[bench]" </dev/null

# numba's cache of the checked-out kernels, for --python=same runs from $VENV (asv's own
# environments precompile after each install: asv.conf.json's install_command).
"$VENV/bin/python" -m fastce precompile --quiet

ASV="$VENV/bin/asv"
# asv refuses to run without a machine file when stdin is not a terminal
"$ASV" machine --yes </dev/null >/dev/null

if [ "$mode" = quick ]; then
    # One process per parameter set, a short warm-up and 3-7 samples of at
    # most 1 s in all: stable medians at every size.  asv's own --quick takes
    # one cold sample, which overstates small-input times several-fold.
    export FASTCE_BENCH_MAX_ELEMENTS=${FASTCE_BENCH_MAX_ELEMENTS:-33554432}
    set -- -a rounds=1 -a "repeat=(3, 7, 1.0)" -a warmup_time=0.05 "$@"
fi

commit=$(git rev-parse HEAD)  # fixed now: the report must match what ran
echo "== asv run ($mode) of $commit in asv's isolated environment"
# HEAD^! = exactly the checked-out commit.  asv exits non-zero when any
# benchmark fails; the report still shows what ran, so go on and exit with it.
# the machine's load average before and after, for the report (it says how busy
# the machine was; a loaded machine inflates the threaded implementations' times)
load_dir=.asv/results/fastce-load
mkdir -p "$load_dir"
load_before=$(cat /proc/loadavg 2>/dev/null || echo unknown)
rc=0
"$ASV" run "$commit^!" "$@" </dev/null || rc=$?
load_after=$(cat /proc/loadavg 2>/dev/null || echo unknown)
printf '{"before": "%s", "after": "%s"}\n' "$load_before" "$load_after" \
    >"$load_dir/$commit.json"
echo "== load average before: $load_before; after: $load_after"

echo "== report"
"$VENV/bin/fastce-report" --commit "$commit" -o "$REPORT_DIR"
end=$(date +%s)
echo "== done in $((end - start)) s (asv exit status $rc); open $REPORT_DIR/report.md"
exit $rc
