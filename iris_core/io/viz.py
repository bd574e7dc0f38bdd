"""Pictures people look at: three orthogonal planes with label overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iris_core.io.colours import COLOURS
from iris_core.io.outputs import PICTURE_EXTENSIONS, check_picture_output  # noqa: F401  (their home)
from iris_core.metrics import dice_score


def overlay_png(image: sitk.Image, labels: sitk.Image, path: str | Path, truth: sitk.Image | None = None,
                title: str = "", names: dict[int, str] | None = None) -> Path:
    """Save axial, coronal and sagittal planes through the labels' centre: filled prediction
    contours per class, and ground truth as dashed white contours when given."""
    check_picture_output(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    # present in RAS-like radiological view: reorient to a canonical axis order first
    img = sitk.DICOMOrient(image, "LPS")
    lab = sitk.DICOMOrient(labels, "LPS")
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    lab_arr = sitk.GetArrayFromImage(lab)
    tru_arr = sitk.GetArrayFromImage(sitk.DICOMOrient(truth, "LPS")) if truth is not None else None
    sp = img.GetSpacing()  # x, y, z
    fg = np.argwhere(lab_arr > 0) if lab_arr.any() else np.argwhere(np.ones_like(lab_arr))
    cz, cy, cx = fg.mean(0).astype(int)
    lo, hi = np.percentile(arr, [1, 99])
    planes = [
        ("axial", arr[cz], lab_arr[cz], None if tru_arr is None else tru_arr[cz], sp[1] / sp[0], False),
        ("coronal", arr[:, cy], lab_arr[:, cy], None if tru_arr is None else tru_arr[:, cy], sp[2] / sp[0], True),
        ("sagittal", arr[:, :, cx], lab_arr[:, :, cx], None if tru_arr is None else tru_arr[:, :, cx],
         sp[2] / sp[1], True),
    ]
    values = [int(v) for v in np.unique(lab_arr) if v]
    if tru_arr is not None:
        values = sorted(set(values) | {int(v) for v in np.unique(tru_arr) if v})
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (name, sl, ls, ts, aspect, flip) in zip(axes, planes):
        if flip:
            sl, ls = sl[::-1], ls[::-1]
            ts = None if ts is None else ts[::-1]
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        for i, v in enumerate(values):
            colour = COLOURS[i % len(COLOURS)]
            m = (ls == v).astype(float)
            if m.any():
                ax.contourf(m, levels=[0.5, 1.5], colors=[colour], alpha=0.35)
                ax.contour(m, levels=[0.5], colors=[colour], linewidths=1.2)
            if ts is not None and (ts == v).any():
                ax.contour((ts == v).astype(float), levels=[0.5], colors=["white"], linewidths=1.0,
                           linestyles="dashed")
        ax.set_title(name)
        ax.axis("off")
    handles = [Patch(color=COLOURS[i % len(COLOURS)], label=(names or {}).get(v, f"label {v}"))
               for i, v in enumerate(values)]
    if tru_arr is not None:
        handles.append(Patch(facecolor="none", edgecolor="black", linestyle="--", label="ground truth"))
    ncol = max(1, min(len(handles), 6))
    rows = -(-len(handles) // ncol)  # legend rows: the planes start above them
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False)
    return _save(fig, path, title, rect=(0, 0.02 + 0.055 * rows, 1, 0.95), dpi=90)


def _save(fig, path: str | Path, title: str, rect: tuple[float, float, float, float], dpi: int,
          fontsize: float | None = None) -> Path:
    """Title, lay out, write (creating the folder) and close a figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout(rect=rect)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the title in the file's own metadata too, where its format has a field for it (PNG, PDF, SVG)
    meta = {"Title": title} if title and path.suffix.lower() in (".png", ".pdf", ".svg") else None
    fig.savefig(path, dpi=dpi, metadata=meta)
    plt.close(fig)
    return path


def class_grid_png(image: sitk.Image, predictions: dict[str, sitk.Image], truth: sitk.Image,
                   names: dict[int, str], path: str | Path, title: str = "") -> Path:
    """One row per class, one column per method: the sagittal plane holding most of the class's truth,
    the method's mask of that class filled, the truth dashed white; Dice in each panel's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    img = sitk.DICOMOrient(image, "LPS")
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    tru = sitk.GetArrayFromImage(sitk.DICOMOrient(truth, "LPS"))
    preds = {k: sitk.GetArrayFromImage(sitk.DICOMOrient(v, "LPS")) for k, v in predictions.items()}
    sp = img.GetSpacing()
    lo, hi = np.percentile(arr, [1, 99])
    fig, axes = plt.subplots(len(names), len(preds), figsize=(2.6 * len(preds), 2.4 * len(names)), squeeze=False)
    for row, (v, name) in enumerate(names.items()):
        per_plane = (tru == v).sum(axis=(0, 1))  # the sagittal plane holding most of the class
        cx = int(per_plane.argmax()) if per_plane.any() else arr.shape[2] // 2
        for col, (method, pred) in enumerate(preds.items()):
            ax = axes[row, col]
            ax.imshow(arr[::-1, :, cx], cmap="gray", vmin=lo, vmax=hi, aspect=sp[2] / sp[1], interpolation="nearest")
            colour = COLOURS[row % len(COLOURS)]
            m = (pred[::-1, :, cx] == v).astype(float)
            if m.any():
                ax.contourf(m, levels=[0.5, 1.5], colors=[colour], alpha=0.45)
            t = (tru[::-1, :, cx] == v).astype(float)
            if t.any():
                ax.contour(t, levels=[0.5], colors=["white"], linewidths=0.9, linestyles="dashed")
            ax.set_title(f"{method}\n{name}: Dice {dice_score(pred == v, tru == v):.2f}", fontsize=8)
            ax.axis("off")
    return _save(fig, path, title, rect=(0, 0, 1, 0.97), dpi=80, fontsize=10)
