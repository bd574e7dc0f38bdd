"""Cohort evaluation: Iris strategies, atlas registration and identity against manual labels.

Per case and class: Dice, HD95, ASSD, predicted and true volume, seconds. Writes results.csv
(appended as it goes: a rerun resumes), summary.md, a box plot per class and method, and PNG
overlays. Reference choice is seeded and reported. Under torchrun, targets are sharded by rank
and rank 0 merges.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iris_core.api import hermes_task, resolve_model
from iris_core.commands.registration import register_labels
from iris_core.errors import InputError, IrisError, reason
from iris_core.hub.hermes_vocab import intensity_for, resolve_modality
from iris_core.io.datasets import Dataset
from iris_core.io.dicom_seg import segment_names
from iris_core.io.imaging import output_folder
from iris_core.io.outputs import write_csv
from iris_core.io.resample import resample_to
from iris_core.io.segmentations import matching_value
from iris_core.io.viz import overlay_png
from iris_core.metrics import finite_mean, segment_metrics
from iris_core.options import STRATEGIES, SegmentOptions
from iris_core.pipeline.inference import Engine
from iris_core.pipeline.strategies import encode_references
from iris_core.pipeline.task import ReferenceTask, segment_target
from iris_core.types import ClassSpec, Reference

log = logging.getLogger(__name__)

FIELDS = ["case", "method", "class", "class_name", "references", "dice", "hd95_mm", "assd_mm", "volume_pred_ml",
          "volume_true_ml", "seconds"]
FAILURE_FIELDS = ["case", "method", "references", "error"]


@dataclass(frozen=True)
class Method:
    kind: str  # iris, hermes, ants, elastix, align, identity
    option: str = ""
    k: int = 1

    @property
    def name(self) -> str:
        if self.kind == "iris":
            return f"iris:{self.option}" + (f":{self.k}" if self.k > 1 else "")
        return self.kind + (f":{self.option}" if self.option else "")


# antspyx's registration(type_of_transform=...) names (as ants.registration's source tests them), checked
# before any work
ANTS_TRANSFORMS = ("Translation", "Rigid", "Similarity", "QuickRigid", "DenseRigid", "BOLDRigid", "Affine",
                   "AffineFast", "BOLDAffine", "TRSAA", "SyN", "SyNRA", "SyNOnly", "SyNCC", "SyNabp", "SyNBold",
                   "SyNBoldAff", "SyNAggro", "SyNLessAggro", "Elastic", "ElasticSyN", "TVMSQ", "TVMSQC")


def parse_method(text: str) -> Method:
    parts = text.split(":")
    kind = parts[0]
    if kind == "iris":
        strategy = parts[1] if len(parts) > 1 else "one-shot"

        if strategy not in STRATEGIES:
            raise InputError(f"method {text!r}: unknown strategy; use one of {', '.join(STRATEGIES)}")
        k = int(parts[2]) if len(parts) > 2 else (1 if strategy == "one-shot" else 3)
        if strategy == "one-shot" and k != 1:
            raise InputError(f"method {text!r}: one-shot segments from one reference; for {k} references use "
                             f"iris:ensemble:{k} or iris:retrieval:{k}")
        return Method("iris", strategy, k)
    if kind == "ants":
        transform = parts[1] if len(parts) > 1 else "SyN"
        if transform not in ANTS_TRANSFORMS and not transform.startswith("antsRegistrationSyN"):
            raise InputError(f"method {text!r}: unknown ANTs transform {transform!r}; use one of "
                             f"{', '.join(ANTS_TRANSFORMS)} (antspyx's type_of_transform)")
        return Method("ants", transform)
    if kind in ("elastix", "identity", "hermes", "align"):
        return Method(kind)
    raise InputError(f"method {text!r}: use iris:STRATEGY[:K], hermes, ants[:SyN|Affine], elastix, align "
                     f"(the pipeline's deterministic affine) or identity")


def choose_references(ds: Dataset, target: str, k: int, seed: int, fixed: str | None = None) -> list[str]:
    """A fixed reference case when given; the paired reference(s) when the dataset has pairs; else k
    other cases drawn with a seed derived from the target's name (reproducible, independent of order
    and sharding)."""
    if fixed:
        ds.case(fixed)  # must exist
        return [fixed]
    if ds.pairs:
        refs = [r for t, r in ds.pairs if t == target]
        return refs[:k] if refs else []
    others = sorted(c.name for c in ds.cases if c.name != target)
    if not others:
        raise InputError(f"dataset {ds.name}: a single case cannot be both reference and target")
    rng = np.random.default_rng([seed, sum(map(ord, target))])
    return [str(x) for x in rng.choice(others, size=min(k, len(others)), replace=False)]


class Evaluator:
    """Runs methods over a dataset; Iris reference embeddings are computed once and cached."""

    def __init__(self, ds: Dataset, methods: list[Method], out_dir: str | Path, model: str = "default",
                 device: str = "auto", seed: int = 0, overlays: bool = True, progress: bool = True,
                 hermes_model: str | None = None, hermes_modality: str | None = None, fixed_reference: str | None = None,
                 postprocess: str | None = None):
        self.ds, self.methods, self.out = ds, methods, Path(out_dir)
        self.model_spec, self.device, self.seed = model, device, seed
        self.hermes_spec, self.hermes_modality, self.fixed = hermes_model, hermes_modality, fixed_reference
        self._hermes = None
        self.postprocess = postprocess  # applied to Iris and Hermes predictions; None: the model's policy
        self.overlays, self.progress = overlays, progress
        self._engine = None
        self._cache: dict = {}
        self._images: dict = {}
        self._names: dict[str, dict[int, str]] = {}

    def _read(self, name: str) -> tuple[sitk.Image, sitk.Image]:
        if name not in self._images:
            self._images[name] = self.ds.case(name).read()
        return self._images[name]

    def engine(self) -> Engine:
        if self._engine is None:
            options = SegmentOptions(device=self.device, intensity=self.ds.modality)
            self._engine = Engine(resolve_model(self.model_spec), options)
        return self._engine

    def names(self, case: str) -> dict[int, str]:
        """A case's class names: the dataset's (dataset.json, a built-in cohort's), and over them the segment
        names its label file holds (a Slicer .seg.nrrd, a DICOM SEG)."""
        if case not in self._names:
            labels = self.ds.case(case).labels
            self._names[case] = self.ds.label_names | (segment_names(labels) if isinstance(labels, str) else {})
        return self._names[case]

    def classes(self, ref_names: list[str]) -> list[ClassSpec]:
        """The classes of the references' label maps, named as their files (the first reference's first) or the
        dataset name them, else ``label_<value>``."""
        values: set[int] = set()
        names: dict[int, str] = {}
        for r in ref_names:
            values |= {int(v) for v in np.unique(sitk.GetArrayViewFromImage(self._read(r)[1])) if v}
            names = self.names(r) | names
        return [ClassSpec(names.get(v, f"label_{v}"), v) for v in sorted(values)]

    def score(self, target: str, refs: list[str], pred: sitk.Image) -> list[tuple[ClassSpec, dict]]:
        """Each class's metrics against the target's truth; a class is found in the truth by its name when the
        references and the truth both name their classes (a .seg.nrrd's segments need not share values),
        else by its value. Hermes (no reference): the dataset's named classes."""
        truth = self._read(target)[1]
        p, t = sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(truth)
        classes = self.classes(refs) if refs else [
            ClassSpec(self.ds.label_names[v], v) for v in sorted(self.ds.label_names)]
        out = []
        for c in classes:
            named = any(c.value in self.names(r) for r in refs)
            value = matching_value(c.name if named else None, c.value, self.names(target))
            truth_mask = t == value if value is not None else np.zeros(t.shape, bool)
            out.append((c, segment_metrics(p == c.value, truth_mask, truth.GetSpacing()[::-1])))
        return out

    def run_iris(self, method: Method, target: str, refs: list[str]) -> sitk.Image:
        """The label map segment writes for ``target`` from the references with the method's strategy; each
        reference is encoded once for the whole cohort."""
        eng = self.engine()
        classes = self.classes(refs)
        encoded = []
        for r in refs:
            key = (r, tuple(c.value for c in classes))
            if key not in self._cache:
                self._cache[key] = encode_references(eng, [Reference(*self._read(r), r)], classes)
            encoded += self._cache[key]
        task = ReferenceTask(classes, method.option, encoded)
        return segment_target(eng, task, self._read(target)[0], target, self.postprocess).labels

    def run_hermes(self, target: str) -> sitk.Image:
        """Hermes segments the dataset's named classes (names from dataset.json looked up in the model's
        vocabulary); no reference."""

        if not self.hermes_spec:
            raise InputError("method hermes needs --hermes-model FILE")
        if self._hermes is None:
            values = sorted(self.ds.label_names)
            if not values:
                raise InputError(f"dataset {self.ds.name}: method hermes needs label names (dataset.json)")
            loaded = resolve_model(self.hermes_spec)
            modality = resolve_modality(self.hermes_modality or {"CT": "CT", "MR": "T1"}.get(self.ds.modality, "CT"))
            options = SegmentOptions(device=self.device, intensity=intensity_for(modality[0]))
            task = hermes_task(loaded, ",".join(self.ds.label_names[v] for v in values), modality, values)
            self._hermes = (Engine(loaded, options), task)
        eng, task = self._hermes
        return segment_target(eng, task, self._read(target)[0], target, self.postprocess).labels

    def predict(self, method: Method, target: str, refs: list[str]) -> sitk.Image:
        timg = self._read(target)[0]
        if method.kind in ("iris", "hermes"):  # the label map segment writes (segment_target: one way to labels)
            return self.run_iris(method, target, refs) if method.kind == "iris" else self.run_hermes(target)
        rimg, rlab = self._read(refs[0])
        if method.kind == "identity":
            return resample_to(rlab, timg, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
        return register_labels(method, timg, rimg, rlab)

    def _done(self, path: Path) -> set[tuple[str, str, str]]:
        if not path.is_file():
            return set()
        with path.open(encoding="utf-8", newline="") as f:
            return {(r["case"], r["method"], r["references"]) for r in csv.DictReader(f)}

    def units(self, targets: list[str]) -> list[tuple[str, Method, list[str]]]:
        """(target, method, references) runs: with explicit pairs, every pair is a one-reference run and
        multi-reference methods take all of a target's partners; else seeded draws per target."""
        out = []
        for t in targets:
            for m in self.methods:
                if m.kind == "hermes":
                    out.append((t, m, []))
                elif self.ds.pairs and m.k == 1 and not self.fixed:
                    out += [(t, m, [r]) for tt, r in self.ds.pairs if tt == t]
                else:
                    out.append((t, m, choose_references(self.ds, t, m.k, self.seed, self.fixed)))
        return out

    def run(self, rank: int = 0, world: int = 1) -> Path:
        """Evaluate this rank's share of targets; returns its CSV."""

        output_folder(self.out)
        csv_path = self.out / ("results.csv" if world == 1 else f"results.rank{rank}.csv")
        done = self._done(csv_path)
        targets = [t for t, _ in self.ds.pairs] if self.ds.pairs else [c.name for c in self.ds.cases]
        targets = [t for t in dict.fromkeys(targets) if t != self.fixed][rank::world]
        todo = [(t, m, refs) for t, m, refs in self.units(targets)
                if (t, m.name, "+".join(refs) or "-") not in done]
        new_file = not csv_path.is_file()
        failures: list[dict] = []
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="evaluate", unit="run")
        with csv_path.open("a", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new_file:
                writer.writeheader()
            for target, method, refs in todo:
                t0 = time.perf_counter()
                try:
                    pred = self.predict(method, target, refs)
                except (IrisError, RuntimeError) as exc:  # RuntimeError: ITK's and ANTs' failures
                    # one case a method cannot do is reported, not the end of the cohort (and is tried again
                    # by the next run, which resumes the rest)
                    why = reason(exc, type(exc).__name__)
                    log.warning("%s on %s (references %s) failed: %s", method.name, target, "+".join(refs) or "-",
                                why)
                    failures.append({"case": target, "method": method.name, "references": "+".join(refs) or "-",
                                     "error": why})
                    if bar is not None:
                        bar.update(1)
                    continue
                secs = time.perf_counter() - t0
                scored = self.score(target, refs, pred)
                for c, m in scored:
                    writer.writerow({"case": target, "method": method.name, "class": c.value,
                                     "class_name": c.name, "references": "+".join(refs) or "-",
                                     "seconds": round(secs, 3)} | {k: round(v, 5) for k, v in m.items()})
                f.flush()
                if self.overlays:

                    # a file name on every system: case names from a CSV may hold folders ('s1/image.nii.gz')
                    stem = re.sub(r"[^A-Za-z0-9._+-]+", "_", f"{target}__{'+'.join(refs)}__{method.name}")
                    overlay_png(self._read(target)[0], pred, self.out / "overlays" / f"{stem}.png",
                                truth=self._read(target)[1], title=f"{target}: {method.name} (ref {'+'.join(refs)})",
                                names={c.value: c.name for c, _ in scored})
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        fail_path = self.out / ("failures.csv" if world == 1 else f"failures.rank{rank}.csv")
        if failures:
            write_csv(fail_path, FAILURE_FIELDS, failures)
        else:  # a previous run's failures were retried and succeeded
            fail_path.unlink(missing_ok=True)
        return csv_path


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        with p.open(encoding="utf-8", newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def summarize(rows: list[dict], out_dir: Path, title: str = "", failures: list[dict] | None = None) -> Path:
    """summary.md (mean / median / std per class and method, and the runs that failed) and boxplot.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    classes = list(dict.fromkeys(r["class_name"] for r in rows))
    lines = [f"# Evaluation{': ' + title if title else ''}", "",
             f"{len({r['case'] for r in rows})} target cases, {len({(r['case'], r['references']) for r in rows})} "
             "(target, references) runs; the references of each run are in results.csv.", "",
             "| class | method | n | Dice mean | Dice median | Dice std | HD95 mean (mm) | ASSD mean (mm) | seconds mean |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in classes:
        for m in methods:
            sel = [r for r in rows if r["class_name"] == c and r["method"] == m]
            if not sel:
                continue
            d = np.array([float(r["dice"]) for r in sel])
            hd = np.array([float(r["hd95_mm"]) for r in sel])
            asd = np.array([float(r["assd_mm"]) for r in sel])
            sec = np.array([float(r["seconds"]) for r in sel])
            lines.append(f"| {c} | {m} | {len(sel)} | {d.mean():.4f} | {np.median(d):.4f} | {d.std():.4f} | "
                         f"{finite_mean(hd):.2f} | {finite_mean(asd):.2f} | {sec.mean():.1f} |")
    if len(rows) <= 300:
        lines += ["", "## Every run", "", "| target | references | class | method | Dice | HD95 (mm) | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["case"], r["references"], r["class_name"], r["method"])):
            lines.append(f"| {r['case']} | {r['references']} | {r['class_name']} | {r['method']} | "
                         f"{float(r['dice']):.4f} | {float(r['hd95_mm']):.2f} | {float(r['seconds']):.1f} |")
    if failures:
        lines += ["", f"## Failed runs ({len(failures)}, not in the figures above; failures.csv)", "",
                  "| target | references | method | error |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['references']} | {r['method']} | {r['error']} |" for r in failures]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if not classes:  # every run failed: no figure
        (out_dir / "boxplot.png").unlink(missing_ok=True)
        return out_dir / "summary.md"
    fig, axes = plt.subplots(1, len(classes), figsize=(max(4, 2 + 1.3 * len(methods)) * len(classes), 4),
                             squeeze=False)
    for ax, c in zip(axes[0], classes):
        data = [[float(r["dice"]) for r in rows if r["class_name"] == c and r["method"] == m] for m in methods]
        ax.boxplot(data, tick_labels=methods)
        ax.set_title(c)
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out_dir / "boxplot.png", dpi=90)
    plt.close(fig)
    return out_dir / "summary.md"


#: the package each registration baseline needs: (module to find, what to install)
METHOD_PACKAGES = {"ants": ("ants", "antspyx"), "elastix": ("itk", "itk-elastix")}


def require_method_packages(methods: list[Method]) -> None:
    """Refuse, before the first case, a registration baseline whose package is not installed (every case
    would fail the same way), naming what to install."""
    for method in methods:
        module, package = METHOD_PACKAGES.get(method.kind, (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise InputError(f"method {method.kind} needs {package}, which is not installed: pip install {package} "
                             f"(or leave {method.kind} out of --method)", inputs=("method",))


def run_evaluation(dataset: Dataset, methods: list[str], out_dir: str | Path, model: str = "default",
                   device: str = "auto", seed: int = 0, overlays: bool = True, progress: bool = True,
                   hermes_model: str | None = None, hermes_modality: str | None = None,
                   fixed_reference: str | None = None, postprocess: str | None = None) -> Path:
    """Evaluate (sharded under torchrun: RANK / WORLD_SIZE) and summarise; returns summary.md (rank 0)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and device == "auto":
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    out = Path(out_dir)
    # a method named twice ('--method ants --method ants:SyN') runs once
    parsed = list(dict.fromkeys(parse_method(m) for m in methods))
    require_method_packages(parsed)
    ev = Evaluator(dataset, parsed, out, model, device, seed, overlays, progress,
                   hermes_model, hermes_modality, fixed_reference, postprocess)
    ev.run(rank, world)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        dist.barrier()
        if rank != 0:
            return out / "summary.md"
        paths = sorted(out.glob("results.rank*.csv"))
        fail_paths = sorted(out.glob("failures.rank*.csv"))
    else:
        paths = [out / "results.csv"]
        fail_paths = [p for p in [out / "failures.csv"] if p.is_file()]
    rows, failures = read_rows(paths), read_rows(fail_paths)
    if world > 1:
        write_csv(out / "results.csv", FIELDS, rows)
        if failures:
            write_csv(out / "failures.csv", FAILURE_FIELDS, failures)
        else:
            (out / "failures.csv").unlink(missing_ok=True)
    return summarize(rows, out, dataset.name, failures)


