"""Slicer terminology entries (SNOMED CT codes of Slicer's "General Anatomy" list) for structure
names of the Hermes vocabulary and task libraries: Slicer knowledge, kept out of iris_core. Pure
Python (no slicer import): the logic tags segments with these strings."""

from __future__ import annotations

# SNOMED CT codes of Slicer's "General Anatomy" terminology (type; laterality as modifier)
SCT = {"liver": "10200004^Liver", "kidney": "64033007^Kidney", "spleen": "78961009^Spleen",
       "gallbladder": "28231008^Gallbladder", "esophagus": "32849002^Esophagus", "stomach": "69695003^Stomach",
       "aorta": "15825003^Aorta", "inferior vena cava": "64131007^Inferior vena cava",
       "pancreas": "15776009^Pancreas", "adrenal gland": "23451007^Adrenal gland",
       "duodenum": "38848004^Duodenum", "bladder": "89837001^Urinary bladder", "lung": "39607008^Lung",
       "heart": "80891009^Heart", "trachea": "44567001^Trachea", "spinal cord": "2748008^Spinal cord",
       "brainstem": "15926001^Brainstem", "eye": "81745001^Eye", "lens": "78076003^Lens of eye",
       "optic nerve": "18234004^Optic nerve", "temporal lobe": "78277001^Temporal lobe",
       "pituitary": "56329008^Pituitary gland", "parotid gland": "45289007^Parotid gland",
       "mandible": "91609006^Mandible", "left ventricle": "87878005^Left ventricle",
       "right ventricle": "53085002^Right ventricle", "myocardium": "74281007^Myocardium",
       "cerebrospinal fluid": "65216001^Cerebrospinal fluid", "portal and splenic vein": "32764006^Portal vein"}
SIDES = {"left": "7771000^Left", "right": "24028007^Right"}


def terminology(name: str) -> str:
    """Slicer terminology entry string for a structure name ('' where none is known)."""
    if name.endswith("tumor") or name == "lesion":
        return ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^Morphologically "
                "Altered Structure~SCT^108369006^Neoplasm~^^~Anatomic codes - DICOM master list~^^~^^")
    side, base = "", name
    for s in SIDES:
        if name.startswith(s + " "):
            side, base = s, name[len(s) + 1 :]
    code = SCT.get(base)
    if code is None:
        return ""
    modifier = f"SCT^{SIDES[side]}" if side else "^^"
    return ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~"
            f"SCT^{code}~{modifier}~Anatomic codes - DICOM master list~^^~^^")
