#!/bin/sh
# Install everything the test suite needs into ./.venv and run it.  Works on a fresh machine
# with only python3 and pip; safe to re-run.  Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test,bench,cuda-ptx,dask]"
# Compile the common kernel signatures into numba's cache in parallel processes first: the
# tests then load them instead of compiling each in turn (README "First use").
.venv/bin/python -m fastce precompile --quiet
# Two workers (pytest-xdist) for CI's two cores; FASTCE_TEST_WORKERS=0 runs in one process.
exec .venv/bin/python -m pytest -q -n "${FASTCE_TEST_WORKERS:-2}" "$@"
