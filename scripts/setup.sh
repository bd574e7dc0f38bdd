#!/usr/bin/env bash
# Set up everything the project needs on a fresh Debian/Ubuntu machine: a virtual
# environment in .venv with the project and its test extras, and the sample data
# package (Colin27 and atlases, Debian's mricron-data). Idempotent: quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
# exact torch pin: the CPU wheel on this machine; a range would pull a multi-GB CUDA build
if ! .venv/bin/python -c "import iris_core, pytest, nilearn" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  # bytecode compiled afterwards on every core, the installed packages' own test suites left out (pip compiles
  # every file one at a time: 139 s for this install vs 48 + 50 s; a compile error in a file nobody imports is
  # ignored, as pip ignores it)
  .venv/bin/pip install -q --no-compile -e ".[test,train]"
  .venv/bin/python -m compileall -q -j 0 -x '/tests?/|/testing/_internal/' \
    "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || :
  touch .venv/.installed
fi
if [ ! -f /usr/share/mricron/templates/ch2.nii.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq mricron-data) >/dev/null
  else
    echo "sample data missing: run 'sudo apt-get install mricron-data'" >&2
    exit 1
  fi
fi
