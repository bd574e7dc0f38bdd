"""``iris-segment embed``: task embeddings of many labelled references, saved as a task library,
and a 2-D map (t-SNE) coloured by structure and by dataset: the paper's observation that task
embeddings cluster by anatomy, made visible for the user's own data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iris_core.api import resolve_model
from iris_core.errors import InputError
from iris_core.io.datasets import Dataset
from iris_core.io.imaging import output_folder
from iris_core.io.resample import labels_to_masks
from iris_core.options import SegmentOptions
from iris_core.pipeline.embedding import TaskEmbedding, is_memory, model_fingerprint
from iris_core.pipeline.inference import Engine
from iris_core.types import ClassSpec, Reference


def embed_dataset(ds: Dataset, out_dir: str | Path, model: str = "default", device: str = "auto",
                  max_cases: int | None = None, progress: bool = False) -> dict:
    """Encode every class of every case; write library.safetensors, embeddings.json and map.png."""

    out = output_folder(out_dir)
    loaded = resolve_model(model)
    eng = Engine(loaded, SegmentOptions(device=device, intensity=ds.modality))
    parts, meta = [], []
    cases = ds.cases[:max_cases] if max_cases else ds.cases
    for i, case in enumerate(cases):
        img, lab = case.read()
        values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(lab)) if v]
        classes = [ClassSpec(f"{case.name}/{ds.label_names.get(v, f'label_{v}')}", v) for v in values]
        prep = eng.prepare(img, case.name)
        # classes too small to see at the model spacing are skipped (not an error here)
        m = labels_to_masks(lab, prep.grid, values)
        keep = [c for c, mk in zip(classes, m) if mk.any()]
        if not keep:
            continue
        emb = eng.encode(Reference(img, lab, case.name), keep, prep)
        parts.append(emb)
        for c in keep:
            meta.append({"case": case.name, "group": case.group or ds.name,
                         "structure": ds.label_names.get(c.value, f"label_{c.value}"), "value": c.value})
        if progress:
            print(f"[{i + 1}/{len(cases)}] {case.name}: {len(keep)} classes")
    lib = TaskEmbedding.concat(parts)
    lib.save(out / "library.safetensors", model_fingerprint(loaded.model), {"dataset": ds.name})
    vectors = np.concatenate([t[:, 0, :].numpy() for t in lib.tokens if not is_memory(t)], axis=1)  # token 0 per stage: the head's input
    xy = project_2d(vectors)
    for m_, (x, y) in zip(meta, xy):
        m_["x"], m_["y"] = float(x), float(y)
    (out / "embeddings.json").write_text(json.dumps(meta, indent=1))
    plot_map(meta, out / "map.png", f"Task embeddings ({loaded.name}, {len(meta)} classes)")
    return {"classes": len(meta), "library": str(out / "library.safetensors"), "map": str(out / "map.png")}


def project_2d(vectors: np.ndarray) -> np.ndarray:
    """t-SNE of L2-normalised vectors (cosine geometry); PCA when there are too few points."""
    v = vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-8)
    if len(v) < 5:
        u, s, _ = np.linalg.svd(v - v.mean(0), full_matrices=False)
        return (u[:, :2] * s[:2]) if u.shape[1] >= 2 else np.c_[u[:, :1] * s[:1], np.zeros(len(v))]
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise InputError("the embedding map of 5 or more classes needs scikit-learn: "
                         "pip install 'iris-segment[eval]'") from None

    return TSNE(n_components=2, perplexity=min(30.0, (len(v) - 1) / 3), init="pca", random_state=0,
                metric="cosine").fit_transform(v)


def plot_map(meta: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    if len({m["structure"] for m in meta}) > 20:  # many parcels: colour by family (AAL 'Frontal_Sup_L' -> Frontal)
        for m in meta:
            m["family"] = m["structure"].replace(" ", "_").split("_")[0]
    for ax, key in zip(axes, ("family" if "family" in meta[0] else "structure", "group")):
        labels = list(dict.fromkeys(m[key] for m in meta))
        cmap = plt.get_cmap("tab20", max(len(labels), 1))
        for i, lab in enumerate(labels):
            pts = np.array([[m["x"], m["y"]] for m in meta if m[key] == lab])
            ax.scatter(pts[:, 0], pts[:, 1], s=18, color=cmap(i), label=lab if len(labels) <= 20 else None)
        ax.set_title(f"coloured by {key}" + (f" ({len(labels)})" if len(labels) > 20 else ""))
        ax.set_xticks([])
        ax.set_yticks([])
        if len(labels) <= 20:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
