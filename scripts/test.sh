#!/usr/bin/env bash
# The test command: set up, lint, run every test (slow ones included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the Slicer-like environment (Testing/Python/test_slicer_like_env.py), built once per run: 40 s, then a stamp
bash scripts/slicer_like_env.sh >/dev/null
.venv/bin/ruff check .
# Test files spread over workers (pytest-xdist; how many: pytest_xdist_auto_num_workers in
# Testing/Python/conftest.py). Each file stays on one worker, so its module fixtures are built once.
# PASSIVE: a worker's idle OpenMP threads sleep instead of spinning on the core the other worker needs.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
.venv/bin/python -m pytest -q -n auto --dist loadfile "$@"
