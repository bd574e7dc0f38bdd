#!/usr/bin/env bash
# The dev benchmark: regenerates every figure of a model's card, registration beside it on the same pairs.
#   bash scripts/model_card_eval.sh [MODEL] [OUT]
#   MODEL: a model file or 'default' (the bundled model, the default); OUT: docs/model-card/eval, where the model
#   card (Resources/Models/iris-default.md) reads it. Git keeps only the summaries the card cites there (the root
#   .gitignore lists them): per-case rows (results.csv), box plots, overlays and JSON stay on this disk.
# Written to OUT (each cohort with iris:one-shot, align (the pipeline's deterministic affine), antspyx Affine and
# SyN, identity on the same pairs):
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
#   ablation/         issue [20]: the same weights without alignment, without the position term, without the prior
#   benchmark.md      one table: mean Dice per cohort and method, Iris against the deterministic affine; the ablation
# Needs the eval extra (antspyx, itk-elastix, nimare). Registration makes it slow: about 20 SyN runs.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-default}"
OUT="${2:-docs/model-card/eval}"
bash scripts/setup.sh
.venv/bin/pip install -q -e ".[eval]"
# Registration rows do not depend on the model: they are kept between runs (evaluate resumes, so only the
# model's rows run again); FRESH=1 clears everything. REGISTRATION_ONLY=1 runs the registration rows alone (to
# fill them while a model is still training).
if [[ "${FRESH:-0}" == 1 ]]; then rm -rf "$OUT"; fi
mkdir -p "$OUT"
.venv/bin/python - "$OUT" <<'PY'
import csv, shutil, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("check", "demo", "ablation"):
    shutil.rmtree(out / name, ignore_errors=True)
for path in out.rglob("results.csv"):  # drop the model's rows, keep registration's
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if not r["method"].startswith("iris")]
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
PY
mkdir -p "$OUT/check"
REGISTRATION=(align ants:Affine ants:SyN identity)
if [[ "${REGISTRATION_ONLY:-0}" == 1 ]]; then METHODS=("${REGISTRATION[@]}"); else
    METHODS=(iris:one-shot "${REGISTRATION[@]}"); fi
EVAL=(.venv/bin/iris-segment evaluate --model "$MODEL" --device cpu --method "${METHODS[@]}")
COHORTS=(copy gyri-moved sample-pair templates cross-atlas macaque)
folder() { if [[ "$1" == templates ]]; then echo "$OUT"; else echo "$OUT/$1"; fi; }
for c in "${COHORTS[@]}"; do "${EVAL[@]}" --dataset "$c" --out "$(folder "$c")"; done
if [[ "${REGISTRATION_ONLY:-0}" == 1 ]]; then exit 0; fi

# Issue [20]'s ablation: the same weights with parts of the pipeline switched off (model files written from MODEL
# by scripts/export_model.py, changing the policy only), Iris one-shot on the cohorts without SyN's cost
ABL="$OUT/ablation"
mkdir -p "$ABL/models"
# (the fourth row, everything on, is MODEL's own iris:one-shot rows above)
declare -A VARIANT=([features]="--align none --prior-weight 0" [unaligned]="--align identity --prior-weight 0"
                    [aligned]="--prior-weight 0")
for v in features unaligned aligned; do
    # shellcheck disable=SC2086  # the options are words
    .venv/bin/python scripts/export_model.py "$MODEL" "$ABL/models/$v.safetensors" --keep-choices ${VARIANT[$v]}
    for c in gyri-moved sample-pair cross-atlas macaque; do
        .venv/bin/iris-segment evaluate --model "$ABL/models/$v.safetensors" --device cpu --method iris:one-shot \
            --dataset "$c" --out "$ABL/$v/$c"
    done
done
rm -rf "$ABL/models"

# exit code 1 means the model does not follow its reference or fails the copy test: record it, go on
.venv/bin/iris-segment check-model "$MODEL" --output "$OUT/check" > "$OUT/check/stdout.md" \
    || echo "check-model: FAILED, see $OUT/check/check.md and copy.md"
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
