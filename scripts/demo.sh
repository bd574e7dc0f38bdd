#!/usr/bin/env bash
# The main job: set up, then segment six brain structures in one pass on a real head MR with its
# skull (MNI152NLin6Asym) moved off MNI space, from one real reference (Colin27 with its AAL lobes),
# with the bundled default model; beside it antspyx SyN registration, identity and a threshold.
# Writes the label map, a JSON sidecar, two pictures and the Dice table into out/demo.
# Extra arguments go to `iris-segment demo` (--registration ants:Affine|elastix|none, --seed N, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/iris-segment demo --output out/demo "$@"
