"""Where does the copy test lose the reference's labels? (issue [11] item 2)

The copy test: Colin27 with ten bilateral AAL gyri as the reference, the same Colin27 image as the target.
A model that can copy what its reference shows gives the labels back. This script measures it at each
stage on the model grid (the whole prepared volume in one pass, as the trainer's check does), with the
reference crop and masks the pipeline uses:

- ceilings of the grids alone: the truth on the model grid (3 mm) read back at half resolution (6 mm,
  where the memory readout works) with trilinear upsampling;
- the model's parts: the whole head, the memory readout alone, the prototype alone;
- the readout's choices: the memory sample (2,048 rows) vs every reference voxel (dense); the value read
  out (the mask fraction per 6 mm voxel vs its eight 3 mm sub-voxels);
- ten classes in one pass vs one class per pass; thresholds.

Usage: python studies/copy_study.py [MODEL] [--json OUT.json]   (MODEL: default, a file, preset:NAME)
Prints a Markdown table; --json also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from iris_core.api import resolve_model
from iris_core.models.iris import pixel_shuffle_3d, pixel_unshuffle_3d, sample_memory
from iris_core.training.checks import copy_case


def dice(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-class Dice of bool [K, ...] tensors."""
    a2, b2 = a.flatten(1).float(), b.flatten(1).float()
    return (2 * (a2 * b2).sum(1) / (a2.sum(1) + b2.sum(1)).clamp(min=1)).numpy()


def readout(model, feats, keys_ref, masks_ref, size: int | None, subvoxel: bool) -> torch.Tensor:
    """The memory readout [K, D, H, W] at full model-grid resolution with a chosen memory and value."""
    half = keys_ref.shape[2:]
    frac = F.adaptive_avg_pool3d(masks_ref, half)
    n = int(np.prod(half))
    mem = sample_memory(keys_ref, frac, size or n)  # [1, K, M, C + 2]
    c = keys_ref.shape[1]
    q = model.memory_keys(feats)
    qf = q.flatten(2).transpose(1, 2)[0] * model.memory_temperature.exp()  # [N, C]
    flat_keys = keys_ref[0].flatten(1).T  # [n, C]
    out = []
    for k in range(masks_ref.shape[1]):
        keys, logw = mem[0, k, :, :c], mem[0, k, :, c + 1]
        if subvoxel:
            # values: the 8 full-resolution sub-voxels of each memory row's 6 mm voxel; the rows are a subset
            # of the n voxels, found by their keys (exact copies)
            sub = pixel_unshuffle_3d(masks_ref[:, k : k + 1], 2)[0].flatten(1).T  # [n, 8]
            vals = sub[torch.cdist(keys, flat_keys).argmin(1)]  # [M, 8]
        else:
            vals = mem[0, k, :, c : c + 1]
        r = torch.cat([torch.softmax(qc @ keys.T + logw, dim=1) @ vals for qc in qf.split(4096)])  # [N, V]
        r = r.T.reshape(1, vals.shape[1], *q.shape[2:])
        if subvoxel:
            out.append(pixel_shuffle_3d(r, 2)[0, 0])
        else:
            out.append(F.interpolate(r, size=masks_ref.shape[2:], mode="trilinear", align_corners=False)[0, 0])
    return torch.stack(out)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = resolve_model(args.model)
    model = loaded.model.eval()
    image, masks, names = copy_case(loaded.preprocessing)  # [1,1,D,H,W], [K,D,H,W] bool, model grid
    truth = masks
    m = masks[None].float()
    rows: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()

    # ceilings of the grids
    half = F.adaptive_avg_pool3d(m, [s // 2 for s in m.shape[2:]])
    up = F.interpolate(half, size=m.shape[2:], mode="trilinear", align_corners=False)[0]
    rows["ceiling: 6 mm mask fraction, trilinear back, > 0.5"] = dice(up > 0.5, truth)

    feats = model.encoder(image)
    emb = model.encode_task_from_features(feats, m)
    full = model.segment_from_features(feats, emb)[0]
    rows["model: all ten classes in one pass (logit > 0)"] = dice(full > 0, truth)
    for thr in (0.3, 0.2, 0.1):
        rows[f"model: threshold {thr}"] = dice(torch.sigmoid(full) > thr, truth)
    single = model.segment_from_features(feats, [e[0][:, None] for e in emb])[:, 0]
    rows["model: one class per pass"] = dice(single > 0, truth)
    n = model.config.num_prior_stage
    model.segment_from_features(feats, emb)  # decoder levels of the joint pass for the prototype
    proto = model.prototype_scale * (model.prototype_similarity(emb[n].to(feats[0].dtype))[0]
                                     - model.prototype_shift)
    rows["prototype term alone (> 0)"] = dice(proto > 0, truth)
    keys_ref = model.memory_keys(feats)
    variants = {"sampled 2,048, 6 mm fraction": (2048, False),
                "dense (every 6 mm voxel), 6 mm fraction": (None, False),
                "sampled 2,048, 3 mm sub-voxels": (2048, True),
                "sampled 4,096, 3 mm sub-voxels": (4096, True),
                "dense, 3 mm sub-voxels": (None, True)}
    reads = {}
    for label, (size, sub) in variants.items():
        r = readout(model, feats, keys_ref, m, size, sub)
        reads[label] = r
        rows[f"readout alone ({label}) > 0.5"] = dice(r > 0.5, truth)
    # the whole head with the sub-voxel readout in place of the fraction readout
    own = model.memory_readout(feats, emb[-1])[0]  # the readout the model itself runs
    base = reads["sampled 2,048, 6 mm fraction"]
    for label in variants:
        swapped = full + model.memory_scale * (reads[label] - own)
        rows[f"model with readout {label}"] = dice(swapped > 0, truth)
    seconds = time.perf_counter() - t0

    short = [nm.replace("_", " ") for nm in names]
    print(f"# Copy test by stage: {loaded.name} ({args.model}), Colin27, ten gyri, model grid "
          f"{tuple(image.shape[2:])} at {loaded.preprocessing.spacing[0]:g} mm ({seconds:.0f} s)\n")
    print("| stage | mean Dice | " + " | ".join(short) + " |")
    print("|---|---|" + "---|" * len(short))
    for label, d in rows.items():
        print(f"| {label} | **{d.mean():.3f}** | " + " | ".join(f"{x:.2f}" for x in d) + " |")
    inside = torch.sigmoid(full)[truth]
    print(f"\nmedian probability inside the structures: {inside.median():.3f}; readout alone (sampled fraction) "
          f"inside: {base[truth].median():.3f}, the model's own readout inside: {own[truth].median():.3f}; memory scale {float(model.memory_scale):.1f}, prototype scale "
          f"{float(model.prototype_scale):.2f} shift {float(model.prototype_shift):.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "names": names, "rows": {k: v.tolist() for k, v in rows.items()}}, f,
                      indent=1)


if __name__ == "__main__":
    main()
