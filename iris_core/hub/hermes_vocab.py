"""Hermes task vocabulary: global task index -> source dataset, label value and structure name;
names resolve to indices for ``--structures liver,spleen``. (Slicer's terminology codes for these
names live on the Slicer side: ``IrisSegmentLib/terminology.py``.)

The published Hermes-R vocabulary (71 tasks, 11 public datasets) is built in; a Hermes model we
train stores its own vocabulary in its checkpoint (``class_names`` = "dataset/structure")."""

from __future__ import annotations

from dataclasses import dataclass

from iris_core.errors import InputError

# Hermes-R modality prior slots (not the intensity policy of the preprocessing: see options.INTENSITY_POLICIES)
HERMES_MODALITIES = {"CT": 0, "PET": 1, "T1 MRI": 2, "T2 MRI": 3, "cine MRI": 4}
MODALITY_ALIASES = {"ct": "CT", "pet": "PET", "t1": "T1 MRI", "t1 mri": "T1 MRI", "mr": "T1 MRI", "mri": "T1 MRI",
                    "t2": "T2 MRI", "t2 mri": "T2 MRI", "cine": "cine MRI", "cine mri": "cine MRI"}

# Structure names from each dataset's own label definition (label value 1..n)
AMOS = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
        "inferior vena cava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder",
        "prostate/uterus"]
DATASETS: dict[str, tuple[str, list[str]]] = {
    "lits": ("CT", ["liver", "liver tumor"]),
    "kits": ("CT", ["kidney", "kidney tumor"]),
    "amos_ct": ("CT", AMOS),
    "bcv": ("CT", ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
                   "inferior vena cava", "portal and splenic vein", "pancreas", "right adrenal gland",
                   "left adrenal gland"]),
    "structseg_oar": ("CT", ["left lung", "right lung", "heart", "esophagus", "trachea", "spinal cord"]),
    "chaos": ("T1 MRI", ["liver", "right kidney", "left kidney", "spleen"]),
    "structseg_head_oar": ("CT", ["brainstem", "left eye", "right eye", "left lens", "right lens",
                                  "left optic nerve", "right optic nerve", "optic chiasm", "left temporal lobe",
                                  "right temporal lobe", "pituitary", "left parotid gland", "right parotid gland",
                                  "left inner ear", "right inner ear", "left middle ear", "right middle ear",
                                  "left temporomandibular joint", "right temporomandibular joint", "spinal cord",
                                  "left mandible", "right mandible"]),
    "mnm": ("cine MRI", ["left ventricle", "myocardium", "right ventricle"]),
    "brain_structure": ("T1 MRI", ["grey matter", "white matter", "cerebrospinal fluid"]),
    "autopet": ("PET", ["lesion"]),
}
HERMES_R_ORDER = ["lits", "kits", "amos_ct", "bcv", "structseg_oar", "chaos", "structseg_head_oar", "mnm",
                  "brain_structure", "autopet"]

@dataclass(frozen=True)
class Task:
    index: int
    dataset: str
    label: int
    name: str
    modality: str

    @property
    def qualified(self) -> str:
        return f"{self.dataset}/{self.name}"


def hermes_r_vocabulary() -> list[Task]:
    """The 71 tasks of the published Hermes-R, in global index order."""
    tasks = []
    for ds in HERMES_R_ORDER:
        modality, names = DATASETS[ds]
        for label, name in enumerate(names, start=1):
            tasks.append(Task(len(tasks), ds, label, name, modality))
    return tasks


def vocabulary_from_names(class_names: list[str], modalities: list[str] | None = None) -> list[Task]:
    """A trained model's vocabulary from its checkpoint class names ('dataset/structure')."""
    tasks = []
    for i, q in enumerate(class_names):
        ds, _, name = q.rpartition("/")
        mod = (modalities[i] if modalities and i < len(modalities) else "") or DATASETS.get(ds, ("", []))[0]
        tasks.append(Task(i, ds or "custom", 0, name, mod))
    return tasks


def resolve_modality(text: str) -> tuple[str, int]:
    """Canonical modality name and its prior slot."""
    canon = MODALITY_ALIASES.get(text.strip().lower(), text.strip())
    if canon not in HERMES_MODALITIES:
        raise InputError(f"unknown Hermes modality {text!r}; use one of {', '.join(HERMES_MODALITIES)} "
                         "(or CT, PET, T1, T2, cine)")
    return canon, HERMES_MODALITIES[canon]


def intensity_for(hermes_modality: str) -> str:
    """The intensity policy that preprocesses a target of this (canonical) Hermes modality."""
    return {"CT": "CT", "PET": "PET"}.get(hermes_modality, "MR")


def resolve_structures(text: str, vocab: list[Task], modality: str) -> list[Task]:
    """'liver,spleen' or 'amos_ct/liver' -> tasks. An unqualified name takes the first task of that
    name whose dataset has the given modality (else the first of that name)."""
    out = []
    for raw in [t.strip() for t in text.split(",") if t.strip()]:
        low = raw.lower()
        if raw.isdigit():
            match = [t for t in vocab if t.index == int(raw)]
        elif "/" in low:
            match = [t for t in vocab if t.qualified.lower() == low]
        else:
            named = [t for t in vocab if t.name.lower() == low]
            match = [t for t in named if t.modality == modality] or named
        if not match:
            names = sorted({t.name for t in vocab})
            raise InputError(f"unknown structure {raw!r}; valid names: {', '.join(names)} "
                             "(or dataset/name, e.g. amos_ct/liver, or a task index)")
        out.append(match[0])
    if not out:
        raise InputError("--structures is empty")
    return out


def model_vocabulary(class_names: list[str] | None, task_modalities: list[str] | None = None,
                     task_prior_slots: int | None = None) -> list:
    """The task vocabulary of a Hermes model from what its file stores: its class names (with their
    modalities) when it has them, else the published Hermes-R vocabulary, else (a model with fewer task slots
    than Hermes-R and no names) tasks by index, ``custom/task_<i>``."""
    if class_names:
        return vocabulary_from_names(class_names, task_modalities)
    vocab = hermes_r_vocabulary()
    if task_prior_slots and task_prior_slots < len(vocab):
        return vocabulary_from_names([f"custom/task_{i}" for i in range(task_prior_slots)])
    return vocab
