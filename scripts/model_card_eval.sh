#!/usr/bin/env bash
# The dev benchmark: regenerates every figure of a model's card, registration beside it on the same pairs.
#   bash scripts/model_card_eval.sh [MODEL] [OUT]
#   MODEL: a model file or 'default' (the bundled model, the default); OUT: docs/model-card/eval, where the model
#   card (Resources/Models/iris-default.md) reads it. Git keeps only the summaries the card cites there (the root
#   .gitignore lists them): per-case rows (results.csv), box plots, overlays and JSON stay on this disk.
# Written to OUT (each cohort with iris:one-shot, antspyx Affine and SyN, identity on the same pairs):
#   check/            check-model: reference sensitivity (ten Colin27 structures as references) and the copy
#                     test (ten bilateral gyri, the reference image itself as the target)
#   copy/             the copy test as a cohort (identity scores 1 there: the bar is the reference itself)
#   gyri-moved/       the same ten gyri onto a rigidly moved copy of Colin27
#   demo/             the README demo (Colin27's six lobes onto the moved MNI152 head with its skull), SyN beside
#   sample-pair/      the shipped Slicer sample pair (Colin27 2 mm brain onto the moved ICBM 2009a)
#   summary.md ...    every moved-template brain pair (Colin27, ICBM 2009a, MNI152NLin6Asym; target moved
#                     off MNI space)
#   cross-atlas/      held-out structures across templates: Colin27 AAL regions as references, the
#                     Harvard-Oxford regions that mean the same on the moved MNI152NLin6Asym as truth
#   macaque/          held-out species (evaluation only): inia19 structures onto a moved, warped copy
#   bench.md/json     speed on the real template pair; speed.md/json: a whole 1 mm brain in-process
#   benchmark.md      one table: mean Dice per cohort and method, Iris against the best registration
# Needs the eval extra (antspyx, itk-elastix, nimare). Registration makes it slow: about 20 SyN runs.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-default}"
OUT="${2:-docs/model-card/eval}"
bash scripts/setup.sh
.venv/bin/pip install -q -e ".[eval]"
rm -rf "$OUT"
mkdir -p "$OUT/check"
METHODS=(iris:one-shot ants:Affine ants:SyN identity)
EVAL=(.venv/bin/iris-segment evaluate --model "$MODEL" --device cpu --method "${METHODS[@]}")

# exit code 1 means the model does not follow its reference or fails the copy test: record it, go on
.venv/bin/iris-segment check-model "$MODEL" --output "$OUT/check" > "$OUT/check/stdout.md" \
    || echo "check-model: FAILED, see $OUT/check/check.md and copy.md"
"${EVAL[@]}" --dataset copy --out "$OUT/copy"
"${EVAL[@]}" --dataset gyri-moved --out "$OUT/gyri-moved"
"${EVAL[@]}" --dataset sample-pair --out "$OUT/sample-pair"
"${EVAL[@]}" --dataset templates --out "$OUT"
"${EVAL[@]}" --dataset cross-atlas --out "$OUT/cross-atlas"
"${EVAL[@]}" --dataset macaque --out "$OUT/macaque"
.venv/bin/iris-segment demo --model "$MODEL" --device cpu --registration ants:SyN --output "$OUT/demo"
.venv/bin/iris-segment bench --pair --model "$MODEL" --repeats 3 --threads 2 --json "$OUT/bench.json" \
    | tee "$OUT/bench.md"
.venv/bin/python - "$MODEL" "$OUT" <<'PY'
import json, sys
from pathlib import Path
from iris_core.commands.bench import format_whole_brain, whole_brain_speed
res = whole_brain_speed(sys.argv[1], repeats=3, threads=2)
Path(sys.argv[2], "speed.json").write_text(json.dumps(res, indent=2))
Path(sys.argv[2], "speed.md").write_text(format_whole_brain(res) + "\n")
print(format_whole_brain(res))
PY
.venv/bin/python scripts/benchmark_table.py "$OUT" | tee "$OUT/benchmark.md"
