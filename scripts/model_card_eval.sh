#!/usr/bin/env bash
# Regenerates every figure of a model's card:  bash scripts/model_card_eval.sh [MODEL] [OUT]
#   MODEL: a model file or 'default' (the bundled model, the default); OUT: Resources/Models/eval.
# Written to OUT:
#   check/            reference sensitivity on Colin27 (iris-segment check-model): ten structures as
#                     references, prediction / truth Dice matrices, embedding cosines, verdict
#   summary.md ...    every moved-template brain pair (Colin27, ICBM 2009a, MNI152NLin6Asym; target moved
#                     off MNI space): Iris one-shot beside antspyx Affine and SyN and identity
#   cross-atlas/      held-out structures across templates: Colin27 AAL regions as references, the
#                     Harvard-Oxford regions that mean the same on the moved MNI152NLin6Asym as truth
#   macaque/          held-out species (evaluation only): inia19 structures onto a moved, warped copy
#   bench.md/json     speed on the real template pair; speed.md/json: a whole 1 mm brain in-process
# Needs the eval extra (antspyx, itk-elastix, nimare). Registration makes it slow: about 20 SyN runs.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-default}"
OUT="${2:-Resources/Models/eval}"
bash scripts/setup.sh
.venv/bin/pip install -q -e ".[eval]"
rm -rf "$OUT"
mkdir -p "$OUT/check"
METHODS=(iris:one-shot ants:Affine ants:SyN identity)

# exit code 1 means the model does not follow its reference: record it and go on measuring
.venv/bin/iris-segment check-model "$MODEL" --output "$OUT/check" > "$OUT/check/stdout.md" \
    || echo "check-model: FAILED, see $OUT/check/check.md"
.venv/bin/iris-segment evaluate --dataset templates --method "${METHODS[@]}" --model "$MODEL" --device cpu \
    --out "$OUT"
.venv/bin/iris-segment evaluate --dataset cross-atlas --method "${METHODS[@]}" --model "$MODEL" --device cpu \
    --out "$OUT/cross-atlas"
.venv/bin/iris-segment evaluate --dataset macaque --method "${METHODS[@]}" --model "$MODEL" --device cpu \
    --out "$OUT/macaque"
.venv/bin/iris-segment bench --pair --model "$MODEL" --repeats 3 --threads 2 --json "$OUT/bench.json" \
    | tee "$OUT/bench.md"
.venv/bin/python - "$MODEL" "$OUT" <<'PY'
import json, sys
from pathlib import Path
from iris_core.bench import format_whole_brain, whole_brain_speed
res = whole_brain_speed(sys.argv[1], repeats=3, threads=2)
Path(sys.argv[2], "speed.json").write_text(json.dumps(res, indent=2))
Path(sys.argv[2], "speed.md").write_text(format_whole_brain(res) + "\n")
print(format_whole_brain(res))
PY
