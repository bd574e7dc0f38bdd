#!/usr/bin/env bash
# The Slicer-like environment (issue [18]): two virtual environments in .venv-slicer/ that hold what a user's
# 3D Slicer has, and nothing of this project's extras, so the module's logic can be run in the Python Slicer
# really has.
#   bare/       the packages Slicer 5.10.0 (the stated minimum) ships: Testing/Slicer/slicer-5.10-python.txt, read
#               from Slicer's SuperBuild (cited there), with slicer-core standing in for MRML. What a clinician's
#               Slicer holds before the module installs anything.
#   installed/  bare + exactly what the module's installer installs: the lines IrisSegmentLib.dependencies
#               .missing_packages() returns there (Resources/requirements.txt less what Slicer already satisfies),
#               installed with pip as slicer.util.pip_install does.
# torch: the module's line is torch~=2.5; on a computer without a GPU the PyTorch extension's installer
# (light-the-torch) takes the CPU build, and the CI workflow takes PyTorch's CPU index. Here the CPU build is the
# wheel on this disk (torch 2.13.0+cpu, cp311), so the install is constrained to it: unconstrained, pip would pick
# PyPI's newest torch, a multi-GB CUDA build. That wheel exists for CPython 3.11 only, hence Python 3.11 here
# (Slicer 5.10 runs 3.12.10; the Slicer-side files are also parsed with that grammar by test_slicer_module.py, and
# the GitHub workflow runs real Slicers).
# Built once: a stamp of the inputs makes a second call (scripts/test.sh, then the test fixture) return at once.
# Usage: bash scripts/slicer_like_env.sh  (prints the two interpreters' paths)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEST=${IRIS_SLICER_ENV:-$ROOT/.venv-slicer}
PY=${SLICER_LIKE_PYTHON:-python3.11}
SHIPPED=Testing/Slicer/slicer-5.10-python.txt
TORCH_BUILD=${SLICER_LIKE_TORCH:-torch==2.13.0+cpu}
stamp=$(cat "$SHIPPED" Resources/requirements.txt IrisSegmentLib/dependencies.py "$0" | sha256sum | cut -c1-16)-$TORCH_BUILD
if [ -f "$DEST/.stamp" ] && [ "$(cat "$DEST/.stamp")" = "$stamp" ]; then
  echo "$DEST/bare/bin/python"; echo "$DEST/installed/bin/python"; exit 0
fi
rm -rf "$DEST"
mkdir -p "$DEST"
quiet() { grep -v -e "is ignored: it is neither a file nor a directory" -e "^$" >&2 || true; }
"$PY" -m venv "$DEST/bare"  # its pip is then replaced by the one Slicer ships (in the list)
# --no-deps: Slicer installs these with --require-hashes, a closed list; vtk's matplotlib is not in Slicer
"$DEST/bare/bin/python" -m pip install -q --no-deps -r "$SHIPPED" 2>&1 | quiet
# installed/ starts as a copy of bare/ (hard links: instant; pip replaces files, never writes into them)
cp -al "$DEST/bare" "$DEST/installed"
missing=$(cd "$ROOT" && PYTHONPATH="$ROOT" "$DEST/installed/bin/python" -c \
  "from IrisSegmentLib.dependencies import missing_packages; print('\n'.join(missing_packages()))")
echo "$TORCH_BUILD" > "$DEST/torch-constraint.txt"
# shellcheck disable=SC2086  # one argument per requirement line, as the installer passes them
"$DEST/installed/bin/python" -m pip install -q -c "$DEST/torch-constraint.txt" $missing 2>&1 | quiet
printf '%s\n' "$missing" > "$DEST/installed-by-module.txt"
echo "$stamp" > "$DEST/.stamp"
echo "$DEST/bare/bin/python"; echo "$DEST/installed/bin/python"
