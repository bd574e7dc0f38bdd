#!/usr/bin/env bash
# Issue 11: the authors' inference.py and ours on the MASS fixture's MR case, one after the other, so that
# the figures compare (run it on an otherwise idle machine).
#   bash scripts/mass_timing.sh MASS_CHECKOUT CHECKPOINT [OUT] [--compiled-only]
# MASS_CHECKOUT: a Stanford-AIMI/MASS clone (its inference.py needs einops importable, e.g. via PYTHONPATH);
# CHECKPOINT: mass_base.pth or the compat weight-rule checkpoint in its layout. Writes OUT/*.log and *.json:
# authors (time -v), ours eager, ours --compile with a cold then a warm cache of compiled networks (the
# cache lives in OUT/compiled), ours under CPU bf16. --compiled-only: the authors and the two --compile runs.
set -euo pipefail
MASS="$(cd "$1" && pwd)"; CK="$(realpath "$2")"; OUT="$(mkdir -p "${3:-runs/mass_timing}" && cd "${3:-runs/mass_timing}" && pwd)"
cd "$(dirname "$0")/.."
D="$PWD/Testing/Data/compat/mass_pipeline"
PY="$PWD/.venv/bin/python"
(cd "$MASS" && /usr/bin/time -v "$PY" inference.py --checkpoint "$CK" --test-image "$D/mr_target.nii.gz" \
    --reference-image "$D/mr_reference.nii.gz" --reference-mask "$D/mr_reference_labels.nii.gz" \
    --save-probability --disable-amp --modality mr --output "$OUT/authors_mr_seg.nii.gz") > "$OUT/authors.log" 2>&1
BENCH=(.venv/bin/iris-segment bench --pipeline --model "$CK" --threads 2 --further-targets 1)
[ "${4:-}" = "--compiled-only" ] || /usr/bin/time -v "${BENCH[@]}" --json "$OUT/eager.json" > "$OUT/eager.log" 2>&1
rm -rf "$OUT/compiled"  # cold: no compiled package (inductor's build files live in a folder removed after each build)
export IRIS_SEGMENT_COMPILED="$OUT/compiled"
/usr/bin/time -v "${BENCH[@]}" --compile --json "$OUT/compile_cold.json" > "$OUT/compile_cold.log" 2>&1
/usr/bin/time -v "${BENCH[@]}" --compile --json "$OUT/compile_warm.json" > "$OUT/compile_warm.log" 2>&1
if [ "${4:-}" = "--compiled-only" ]; then
    grep -H -E "Elapsed|Maximum resident|same label|first target total|further target|each further window" "$OUT"/*.log
    exit 0
fi
# bf16 autocast on the CPU: faster on CPUs with bf16 units, kept only if the labels stay >= 99.9 % identical
/usr/bin/time -v "$PY" - "$CK" "$OUT/bf16.json" > "$OUT/bf16.log" 2>&1 <<'PY'
import json, sys, torch
from iris_core.bench_pipeline import format_pipeline, pipeline_benchmark
with torch.autocast("cpu", dtype=torch.bfloat16):
    res = pipeline_benchmark(sys.argv[1], threads=2, further_targets=0)
print(format_pipeline(res))
open(sys.argv[2], "w").write(json.dumps(res, indent=2, default=str))
PY
grep -H -E "Elapsed|Maximum resident|same label|first target total|further target|each further window" "$OUT"/*.log
