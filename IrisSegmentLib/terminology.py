"""Slicer terminology entries for structure names of the Hermes vocabulary and task libraries, from the SNOMED CT
codes of iris_core.io.terminology (shared with DICOM SEG output). Pure Python (no slicer import): the logic
tags segments with these strings.

Every code is one of 3D Slicer's own "General Anatomy" list
(Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json), with
its category, the CodeMeaning spelt as there, and a laterality modifier only where that type lists one: a
code Slicer's list lacks would show as an unknown type in Slicer's terminology selector. Structures the list
has no type for (brainstem, eye lens, optic nerve, parotid gland, myocardium, inferior vena cava, portal
vein, cerebrospinal fluid) get no terminology; Testing/Python/test_hermes.py checks every entry against the
list (Testing/Data/slicer/general_anatomy_codes.json)."""

from __future__ import annotations

from iris_core.io.terminology import ALTERED, ANATOMY, MASS, SCT, SIDES, structure_codes

__all__ = ["ALTERED", "ANATOMY", "MASS", "SCT", "SIDES", "terminology"]


def terminology(name: str) -> str:
    """Slicer terminology entry string for a structure name ('' where Slicer's list has no type for it)."""
    codes = structure_codes(name)
    if codes is None:
        return ""
    (cat, cat_meaning), (code, meaning), side = codes
    modifier = f"SCT^{side[0]}^{side[1]}" if side else "^^"
    return (f"Segmentation category and type - 3D Slicer General Anatomy list~SCT^{cat}^{cat_meaning}~SCT^{code}^"
            f"{meaning}~{modifier}~Anatomic codes - DICOM master list~^^~^^")
