#!/usr/bin/env bash
# Issue 11: the authors' inference.py and ours on the MASS fixture's MR case, one after the other, so that
# the figures compare (run it on an otherwise idle machine).
#   bash studies/mass_timing.sh MASS_CHECKOUT CHECKPOINT [OUT] [--compiled-only]
# MASS_CHECKOUT: a Stanford-AIMI/MASS clone (its inference.py needs einops importable, e.g. via PYTHONPATH);
# CHECKPOINT: mass_base.pth or the compat weight-rule checkpoint in its layout. Writes OUT/*.log and *.json:
# authors (time -v), the authors with glibc keeping freed memory (as our CLI does), ours --compile with a
# cold then a warm cache of compiled networks (the cache lives in OUT/compiled), on a CPU with native bf16
# ours --compile --precision bfloat16 (cold, warm) and --precision auto, then ours eager.
# --compiled-only: all but the eager run.
set -euo pipefail
MASS="$(cd "$1" && pwd)"; CK="$(realpath "$2")"; OUT="$(mkdir -p "${3:-runs/mass_timing}" && cd "${3:-runs/mass_timing}" && pwd)"
cd "$(dirname "$0")/.."
D="$PWD/Testing/Data/compat/mass_pipeline"
PY="$PWD/.venv/bin/python"
(cd "$MASS" && /usr/bin/time -v "$PY" inference.py --checkpoint "$CK" --test-image "$D/mr_target.nii.gz" \
    --reference-image "$D/mr_reference.nii.gz" --reference-mask "$D/mr_reference_labels.nii.gz" \
    --save-probability --disable-amp --modality mr --output "$OUT/authors_mr_seg.nii.gz") > "$OUT/authors.log" 2>&1
# the authors' run again with the allocator setting our CLI applies (iris_core.pipeline.device.retain_freed_memory:
# glibc keeps freed blocks for reuse), so that the comparison separates that setting from the rest
(cd "$MASS" && /usr/bin/time -v "$PY" -c "import runpy, sys; from iris_core.pipeline.device import retain_freed_memory; \
assert retain_freed_memory(); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
    inference.py --checkpoint "$CK" --test-image "$D/mr_target.nii.gz" \
    --reference-image "$D/mr_reference.nii.gz" --reference-mask "$D/mr_reference_labels.nii.gz" \
    --save-probability --disable-amp --modality mr --output "$OUT/authors_retain_mr_seg.nii.gz") > "$OUT/authors_retain.log" 2>&1
BENCH=(.venv/bin/iris-segment bench --pipeline --model "$CK" --threads 2 --further-targets 1)
rm -rf "$OUT/compiled"  # cold: no compiled package (inductor's build files live in a folder removed after each build)
export IRIS_SEGMENT_COMPILED="$OUT/compiled"
/usr/bin/time -v "${BENCH[@]}" --compile --json "$OUT/compile_cold.json" > "$OUT/compile_cold.log" 2>&1
/usr/bin/time -v "${BENCH[@]}" --compile --json "$OUT/compile_warm.json" > "$OUT/compile_warm.log" 2>&1
# bfloat16 (CPU autocast; with --compile a bf16 package of its own): forced, then --precision auto, which
# keeps bf16 only if the first window's labels pass its check. Only on a CPU with native bf16 (oneDNN's test).
if "$PY" -c "import sys; from iris_core.pipeline.precision import native_bf16; sys.exit(0 if native_bf16() else 1)"; then
    /usr/bin/time -v "${BENCH[@]}" --compile --precision bfloat16 --json "$OUT/bf16_cold.json" > "$OUT/bf16_cold.log" 2>&1
    /usr/bin/time -v "${BENCH[@]}" --compile --precision bfloat16 --json "$OUT/bf16_warm.json" > "$OUT/bf16_warm.log" 2>&1
    /usr/bin/time -v "${BENCH[@]}" --compile --precision auto --json "$OUT/auto.json" > "$OUT/auto.log" 2>&1
fi
[ "${4:-}" = "--compiled-only" ] || /usr/bin/time -v "${BENCH[@]}" --json "$OUT/eager.json" > "$OUT/eager.log" 2>&1
grep -H -E "Elapsed|Maximum resident|same label|first target total|further target|each further window|precision" "$OUT"/*.log
