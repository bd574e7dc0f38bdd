"""SNOMED CT codes of structure names (the Hermes vocabulary's, task libraries', a reference's segment names),
shared by the two places that label a result with them: the Slicer module's segments and DICOM SEG files.

Every code is one of 3D Slicer's own "General Anatomy" list
(Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json), with
its category, the CodeMeaning spelt as there, and a laterality modifier only where that type lists one.
Structures the list has no type for (brainstem, eye lens, optic nerve, parotid gland, myocardium, inferior
vena cava, portal vein, cerebrospinal fluid) get none; Testing/Python/test_hermes.py checks every entry
against the list (Testing/Data/slicer/general_anatomy_codes.json)."""

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
       "right ventricle": (ANATOMY, "53085002^Right Ventricle", False), "brain": (ANATOMY, "12738006^Brain", False)}
# a tumour or lesion: Slicer's general anatomy list has no 'Neoplasm' type; its altered structures have 'Mass'
MASS = (ALTERED, "4147007^Mass", False)
SIDES = {"left": "7771000^Left", "right": "24028007^Right"}

#: a (code, meaning) pair of SNOMED CT
Code = tuple[str, str]


def _code(text: str) -> Code:
    code, _, meaning = text.partition("^")
    return code, meaning


def structure_codes(name: str) -> tuple[Code, Code, Code | None] | None:
    """(category, type, laterality modifier or None) of a structure name in SNOMED CT, or None where the list
    has no type for it. 'left kidney' -> Anatomical Structure, Kidney, Left; 'kidney tumor' -> Morphologically
    Altered Structure, Mass."""
    name = name.strip().lower()
    entry = MASS if (name.endswith("tumor") or name.endswith("tumour") or name == "lesion") else None
    side, base = "", name
    if entry is None:
        for s in SIDES:
            if name.startswith(s + " ") and name[len(s) + 1:] in SCT and SCT[name[len(s) + 1:]][2]:
                side, base = s, name[len(s) + 1:]
        entry = SCT.get(base)
    if entry is None:
        return None
    category, code, _ = entry
    return _code(category), _code(code), _code(SIDES[side]) if side else None
