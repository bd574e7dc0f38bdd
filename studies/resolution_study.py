"""Model spacing vs accuracy on small structures and cost (issue 10 item 5): a benchmark that prints figures.

    python studies/resolution_study.py --model 3mm=runs/res3/model.safetensors --run 3mm=runs/res3 \
        --model 2mm=runs/res2/model.safetensors --run 2mm=runs/res2 --out runs/resolution

For each spacing it reports, per structure of the held-out evaluation pairs (cross-atlas Harvard-Oxford
truths on the moved MNI152NLin6Asym; the macaque inia19 structures on a moved, warped copy):

* the resolution ceiling: the Dice of the truth itself after the trip a prediction makes (anti-aliased
  down to the model grid as a soft mask, linearly back to the target grid, thresholded at 0.5): what a
  perfect model at that spacing could reach;
* each model's one-shot Iris Dice (``iris-segment evaluate``) and its reference-sensitivity check
  (``iris-segment check-model``: own vs other Dice of ten Colin27 structures);
* the cost per target (a whole 1 mm brain in-process, 2 threads) and, from the training run's state,
  seconds per training step and the crop it trained on.

Writes OUT/resolution.md, resolution.json and resolution.png (Dice against structure volume); the model card cites
the table of the issue-10 run, kept as docs/model-card/studies/resolution/resolution.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _pairs(spec: list[str], what: str) -> dict[str, str]:
    out = {}
    for s in spec:
        name, sep, value = s.partition("=")
        if not sep:
            sys.exit(f"--{what} wants NAME=VALUE, got {s!r}")
        out[name] = value
    return out


def ceiling(dataset, spacing: tuple[float, float, float]) -> list[dict]:
    """Dice of each target truth structure with itself after the model-grid round trip at ``spacing``."""
    from iris_core.io.resample import array_to_image, model_grid, resample_to, smooth_for_downsampling

    rows = []
    targets = sorted({t for t, _ in dataset.pairs})
    for name in targets:
        image, labels = dataset.case(name).read()
        grid = model_grid(image, spacing, 16)
        arr = sitk.GetArrayFromImage(labels)
        voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
        for v in sorted(int(x) for x in np.unique(arr) if x):
            truth = arr == v
            m = array_to_image(truth.astype(np.float32), labels)
            soft = resample_to(smooth_for_downsampling(m, spacing), grid)
            back = sitk.GetArrayFromImage(resample_to(soft, labels)) >= 0.5
            dice = 2.0 * float((back & truth).sum()) / max(float(back.sum() + truth.sum()), 1.0)
            rows.append({"dataset": dataset.name, "case": name, "class": v,
                         "class_name": dataset.label_names.get(v, f"label_{v}"),
                         "volume_ml": float(truth.sum()) * voxel_ml, "ceiling": dice})
    return rows


def training_cost(run_dir: str) -> dict:
    """Seconds per step (median of the run's last 100 steps), batch and crop sizes, from OUT/state.pt."""
    import torch

    state = torch.load(Path(run_dir) / "state.pt", map_location="cpu", weights_only=True)
    hist = json.loads(state["history"])
    cfg = json.loads(state["config"])
    last = hist[-100:]
    return {"steps": int(state["step"]), "sec_per_step_median": float(np.median([h["sec"] for h in last])),
            "batch": cfg["batch"], "crop_sizes": cfg["crop_sizes"], "spacing": cfg.get("spacing") or "preset"}


def evaluate_model(name: str, path: str, out: Path) -> dict:
    import torch

    from iris_core.api import resolve_model
    from iris_core.commands.bench import whole_brain_speed
    from iris_core.commands.evaluate import read_rows, run_evaluation
    from iris_core.io.datasets import cross_atlas_pairs, macaque_pairs
    from iris_core.training.checks import standard_check

    loaded = resolve_model(path)
    spacing = tuple(loaded.preprocessing.spacing)
    res: dict = {"name": name, "model": path, "model_name": loaded.name, "spacing": spacing,
                 "file_mb": Path(path).stat().st_size / 2**20 if Path(path).is_file() else None}
    dice = {}
    for ds in (cross_atlas_pairs(), macaque_pairs()):
        d = out / name / ds.name
        run_evaluation(ds, ["iris:one-shot"], d, model=path, device="cpu", overlays=False, progress=False)
        for r in read_rows([d / "results.csv"]):
            dice[(ds.name, int(r["class"]))] = float(r["dice"])
    res["dice"] = {f"{k[0]}:{k[1]}": v for k, v in dice.items()}
    rep = standard_check(path, out_dir=out / name / "check")
    res["check"] = {"own": rep.own_dice, "other": rep.other_dice, "passed": rep.passed,
                    "own_per_structure": dict(zip(rep.names, np.diag(np.array(rep.pred_truth_dice)).tolist()))}
    torch.set_num_threads(2)
    speed = whole_brain_speed(path, repeats=3, threads=2)
    res["whole_brain_s"] = speed["whole_brain_s"]["median"]
    res["whole_brain_cpu_s"] = speed["whole_brain_cpu_s"]
    res["encode_reference_s"] = speed["encode_reference_s"]
    return res


def plot(rows: list[dict], models: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, ds in zip(axes, ("cross-atlas", "macaque")):
        sel = [r for r in rows if r["dataset"] == ds]
        vol = np.array([r["volume_ml"] for r in sel])
        spacings = sorted({m["spacing"][0] for m in models}, reverse=True)
        for j, sp in enumerate(spacings):  # one ceiling per spacing, drawn once
            ax.scatter(vol, [r[f"ceiling {sp:g}mm"] for r in sel], marker="_", s=300, linewidths=2,
                       color=("0.6", "0.0", "0.3")[j % 3], label=f"ceiling at {sp:g} mm")
        for i, m in enumerate(models):
            ax.scatter(vol, [m["dice"].get(f"{ds}:{r['class']}", np.nan) for r in sel], marker="o",
                       color=colors[i % len(colors)], alpha=0.85,
                       label=f"{m['name']} ({m['model_name']}, {m['spacing'][0]:g} mm)")
        for k, (r, v) in enumerate(zip(sel, vol)):  # staggered: neighbours of similar volume do not overlap
            ax.annotate(r["class_name"][:18], (v, 0.02 + 0.12 * (k % 3)), rotation=90,
                        fontsize=6, va="bottom", ha="center", color="0.4")
        ax.set_xscale("log")
        ax.set_xlabel("structure volume (ml, log)")
        ax.set_title(ds)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Dice")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=len(labels))
    fig.suptitle("Model spacing: one-shot Dice (dots) and the resolution ceiling (bars) per structure")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[], metavar="NAME=FILE")
    ap.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                    help="training run folder of a model (its state.pt gives the cost per step)")
    ap.add_argument("--out", default="runs/resolution")
    ap.add_argument("--replot", action="store_true", help="redraw OUT/resolution.png from OUT/resolution.json")
    args = ap.parse_args(argv)
    if args.replot:
        data = json.loads((Path(args.out) / "resolution.json").read_text())
        plot(data["structures"], data["models"], Path(args.out) / "resolution.png")
        return 0
    from iris_core.io.datasets import cross_atlas_pairs, macaque_pairs

    if not args.model:
        ap.error("give at least one --model NAME=FILE (or --replot)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models, runs = _pairs(args.model, "model"), _pairs(args.run, "run")
    results = []
    for name, path in models.items():
        print(f"evaluating {name}: {path}", flush=True)
        r = evaluate_model(name, path, out)
        if name in runs:
            r["training"] = training_cost(runs[name])
        results.append(r)
    spacings = sorted({tuple(r["spacing"]) for r in results}, reverse=True)
    rows: dict[tuple, dict] = {}
    for sp in spacings:
        for ds in (cross_atlas_pairs(), macaque_pairs()):
            for c in ceiling(ds, sp):
                row = rows.setdefault((c["dataset"], c["class"]), {k: c[k] for k in
                                                                   ("dataset", "class", "class_name", "volume_ml")})
                row[f"ceiling {sp[0]:g}mm"] = c["ceiling"]
    table = sorted(rows.values(), key=lambda r: (r["dataset"], r["volume_ml"]))
    heads = [f"ceiling {sp[0]:g}mm" for sp in spacings] + [m["name"] for m in results]
    lines = ["# Model spacing: small structures vs cost", "",
             "| model | spacing (mm) | file MB | training s/step (batch, crop) | whole 1 mm brain s (CPU s) | "
             "check own / other | cross-atlas mean | macaque mean |", "|---|---|---|---|---|---|---|---|"]
    for m in results:
        t = m.get("training")
        tcost = f"{t['sec_per_step_median']:.2f} ({t['batch']}, {t['crop_sizes']})" if t else "-"
        ca = [v for k, v in m["dice"].items() if k.startswith("cross-atlas")]
        mq = [v for k, v in m["dice"].items() if k.startswith("macaque")]
        fmb = f"{m['file_mb']:.1f}" if m["file_mb"] else "-"
        lines.append(f"| {m['name']} ({m['model_name']}) | {m['spacing'][0]:g} | {fmb} | {tcost} | "
                     f"{m['whole_brain_s']:.2f} ({m['whole_brain_cpu_s']:.2f}) | {m['check']['own']:.3f} / "
                     f"{m['check']['other']:.3f} | {np.mean(ca):.3f} | {np.mean(mq):.3f} |")
    lines += ["", "Per structure (ceiling: the truth after the model-grid round trip; then each model's Dice):", "",
              "| dataset | structure | volume ml | " + " | ".join(heads) + " |", "|---" * (3 + len(heads)) + "|"]
    for r in table:
        vals = [f"{r[h]:.3f}" for h in heads[:len(spacings)]]
        key = f"{r['dataset']}:{r['class']}"
        vals += [f"{m['dice'].get(key, float('nan')):.3f}" for m in results]
        lines.append(f"| {r['dataset']} | {r['class_name']} | {r['volume_ml']:.1f} | " + " | ".join(vals) + " |")
    lines += ["", "Reference-sensitivity check, own-truth Dice per Colin27 structure:", "",
              "| structure | " + " | ".join(m["name"] for m in results) + " |", "|---" * (1 + len(results)) + "|"]
    for s in results[0]["check"]["own_per_structure"]:
        lines.append(f"| {s} | " + " | ".join(f"{m['check']['own_per_structure'][s]:.3f}" for m in results) + " |")
    (out / "resolution.md").write_text("\n".join(lines) + "\n")
    (out / "resolution.json").write_text(json.dumps({"models": results, "structures": table}, indent=2,
                                                    default=list))
    plot(table, results, out / "resolution.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
