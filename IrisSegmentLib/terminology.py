"""Slicer terminology entries for structure names of the Hermes vocabulary and task libraries: Slicer
knowledge, kept out of iris_core. Pure Python (no slicer import): the logic tags segments with these strings.

Every code is one of 3D Slicer's own "General Anatomy" list
(Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json), with
its category, the CodeMeaning spelt as there, and a laterality modifier only where that type lists one: a
code Slicer's list lacks would show as an unknown type in Slicer's terminology selector. Structures the list
has no type for (brainstem, eye lens, optic nerve, parotid gland, myocardium, inferior vena cava, portal
vein, cerebrospinal fluid) get no terminology; Testing/Python/test_hermes.py checks every entry against the
list (Testing/Data/slicer/general_anatomy_codes.json)."""

from __future__ import annotations

ANATOMY = "123037004^Anatomical Structure"
ALTERED = "49755003^Morphologically Altered Structure"
# name -> (category, type code^CodeMeaning, whether the type takes a left/right modifier in Slicer's list)
SCT = {"liver": (ANATOMY, "10200004^Liver", False), "kidney": (ANATOMY, "64033007^Kidney", True),
       "spleen": (ANATOMY, "78961009^Spleen", False), "gallbladder": (ANATOMY, "28231008^Gallbladder", False),
       "esophagus": (ANATOMY, "32849002^Esophagus", False), "stomach": (ANATOMY, "69695003^Stomach", False),
       "aorta": (ANATOMY, "15825003^Aorta", False), "pancreas": (ANATOMY, "15776009^Pancreas", False),
       "adrenal gland": (ANATOMY, "23451007^Adrenal gland", True), "duodenum": (ANATOMY, "38848004^Duodenum", False),
       "bladder": (ANATOMY, "89837001^Bladder", False), "lung": (ANATOMY, "39607008^Lung", True),
       "heart": (ANATOMY, "80891009^Heart", False), "trachea": (ANATOMY, "44567001^Trachea", False),
       "spinal cord": (ANATOMY, "2748008^Spinal cord", False), "eye": (ANATOMY, "79652003^Eyeball", True),
       "temporal lobe": (ANATOMY, "78277001^Temporal lobe", True), "pituitary": (ANATOMY, "56329008^Pituitary", False),
       "mandible": (ANATOMY, "91609006^Mandible", False), "left ventricle": (ANATOMY, "87878005^Left Ventricle", False),
       "right ventricle": (ANATOMY, "53085002^Right Ventricle", False)}
# a tumour or lesion: Slicer's general anatomy list has no 'Neoplasm' type; its altered structures have 'Mass'
MASS = (ALTERED, "4147007^Mass", False)
SIDES = {"left": "7771000^Left", "right": "24028007^Right"}


def terminology(name: str) -> str:
    """Slicer terminology entry string for a structure name ('' where Slicer's list has no type for it)."""
    entry = MASS if (name.endswith("tumor") or name.endswith("tumour") or name == "lesion") else None
    side, base = "", name
    if entry is None:
        for s in SIDES:
            if name.startswith(s + " ") and name[len(s) + 1:] in SCT and SCT[name[len(s) + 1:]][2]:
                side, base = s, name[len(s) + 1:]
        entry = SCT.get(base)
    if entry is None:
        return ""
    category, code, _ = entry
    modifier = f"SCT^{SIDES[side]}" if side else "^^"
    return (f"Segmentation category and type - 3D Slicer General Anatomy list~SCT^{category}~SCT^{code}~{modifier}"
            "~Anatomic codes - DICOM master list~^^~^^")
