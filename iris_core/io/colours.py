"""One colour per class, the same everywhere a result is shown: previews, plots, the segments of a .seg.nrrd
and the segments Slicer shows (no heavy import: the Slicer side reads it too)."""

from __future__ import annotations

#: 15 distinct colours (Sasha Trubetskoy's list), class i takes COLOURS[i % 15]
COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
           "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3"]


def colour_rgb(i: int) -> tuple[float, float, float]:
    """Class ``i``'s colour as (r, g, b) in 0..1."""
    h = COLOURS[i % len(COLOURS)].lstrip("#")
    return tuple(int(h[k : k + 2], 16) / 255.0 for k in (0, 2, 4))
