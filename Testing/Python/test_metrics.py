"""Metrics on hand-computable cases: cubes, shifted spheres, empty masks, anisotropic spacing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from iris_core.metrics import dice_score, segment_metrics

# a cohort's evaluation log carries no FutureWarning per case from MONAI's own internal calls
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


def cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def test_shifted_cubes():
    a = cube((30, 30, 30), (5, 5, 5), (15, 15, 15))
    b = cube((30, 30, 30), (7, 5, 5), (17, 15, 15))  # shifted by 2 voxels along axis 0
    m = segment_metrics(a, b, (1.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(2 * 800 / 2000)
    assert m["hd95_mm"] == pytest.approx(2.0)
    assert m["volume_pred_ml"] == pytest.approx(1.0) and m["volume_true_ml"] == pytest.approx(1.0)


def test_anisotropic_spacing_scales_distances():
    a = cube((30, 30, 30), (5, 5, 5), (15, 15, 15))
    b = cube((30, 30, 30), (7, 5, 5), (17, 15, 15))
    m = segment_metrics(a, b, (3.0, 1.0, 1.0))
    assert m["hd95_mm"] == pytest.approx(6.0)
    assert m["volume_true_ml"] == pytest.approx(3.0)


def test_spheres_distance():
    z, y, x = np.mgrid[:40, :40, :40]
    s1 = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 10**2
    s2 = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 8**2
    m = segment_metrics(s2, s1, (1.0, 1.0, 1.0))
    assert 1.5 <= m["hd95_mm"] <= 2.5
    assert m["dice"] == pytest.approx(2 * s2.sum() / (s1.sum() + s2.sum()))


def test_empty_cases():
    e = np.zeros((10, 10, 10), bool)
    c = cube((10, 10, 10), (2, 2, 2), (5, 5, 5))
    both = segment_metrics(e, e, (1, 1, 1))
    assert both["dice"] == 1.0 and both["hd95_mm"] == 0.0
    miss = segment_metrics(e, c, (1, 1, 1))
    assert miss["dice"] == 0.0 and math.isinf(miss["hd95_mm"])
    extra = segment_metrics(c, e, (1, 1, 1))
    assert extra["dice"] == 0.0 and extra["volume_true_ml"] == 0.0
    assert dice_score(c, c) == 1.0
