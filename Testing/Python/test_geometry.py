"""Geometry: model grids cover the image; predictions land on the exact target grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import dice, oblique_direction, phantom
from iris_core.errors import InputError
from iris_core.io.resample import labels_to_masks, model_grid, physical_bounds
from iris_core.models.iris import _linear_interp_matrix, masked_mean_of_upsampled
from iris_core.pipeline.policy import Preprocessing
from iris_core.pipeline.preprocess import prepare_image
from iris_core.pipeline.to_target import BackToTarget
from iris_core.types import Timer


def test_model_grid_covers_oblique_anisotropic_image():
    img, _ = phantom(spacing=(0.9, 1.3, 3.2), direction=oblique_direction(25))
    grid = model_grid(img, (2.0, 2.0, 2.0), multiple=16)
    assert all(s % 16 == 0 for s in grid.GetSize())
    assert np.allclose(grid.GetDirection(), np.eye(3).flatten())
    lo, hi = physical_bounds(img)
    glo, ghi = physical_bounds(grid)
    assert np.all(glo <= lo + 1e-6) and np.all(ghi >= hi - 1e-6)


def test_round_trip_onto_exact_target_grid():
    """Mask -> model grid -> back onto an oblique, anisotropic target: same geometry, Dice > 0.9."""
    img, lab = phantom(size=(50, 44, 22), spacing=(1.1, 1.4, 3.3), direction=oblique_direction(30),
                       origin=(12.0, -40.0, 7.5))
    policy = Preprocessing(spacing=(1.5, 1.5, 1.5))
    prep = prepare_image(img, "t", policy, "MR")
    probs = labels_to_masks(lab, prep.grid, [1, 2]).astype(np.float32)
    out = BackToTarget(policy, Timer()).to_target(probs, prep, [1, 2])
    assert out.GetSize() == img.GetSize()
    assert np.allclose(out.GetSpacing(), img.GetSpacing())
    assert np.allclose(out.GetOrigin(), img.GetOrigin())
    assert np.allclose(out.GetDirection(), img.GetDirection())
    a, b = sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(lab)
    assert (b == 2).sum() > 50
    assert dice(a == 1, b == 1) > 0.9
    assert dice(a == 2, b == 2) > 0.75  # small box, 1.5 mm grid vs 3.3 mm slices


def test_prepare_normalises_and_pads_with_background():
    img, _ = phantom()
    prep = prepare_image(img, "p", Preprocessing(spacing=(2.0, 2.0, 2.0)), "MR")
    assert prep.array.dtype == np.float32 and all(s % 16 == 0 for s in prep.array.shape)
    assert abs(float(prep.array.min()) - prep.intensity.background) < 1e-4
    inside = prep.array[prep.array > prep.intensity.background + 1e-3]
    assert abs(float(inside.mean())) < 1.0


def test_foreground_token_at_feature_resolution_equals_upsampling():
    torch.manual_seed(0)
    feat = torch.randn(1, 8, 4, 5, 3)
    masks = (torch.rand(1, 2, 16, 20, 12) > 0.6).float()
    up = torch.nn.functional.interpolate(feat, size=(16, 20, 12), mode="trilinear", align_corners=True)
    direct = torch.einsum("bcxyz,bkxyz->bkc", up, masks) / masks.sum((2, 3, 4))[..., None]
    assert torch.allclose(masked_mean_of_upsampled(feat, masks), direct, atol=1e-5)
    assert torch.allclose(_linear_interp_matrix(7, 3).sum(1), torch.ones(7, dtype=torch.float64))


@pytest.mark.parametrize("low,high", [((4, 5, 6), (8, 10, 12)), ((1, 3, 7), (2, 6, 13)), ((5, 5, 5), (5, 9, 1))])
def test_separable_upsampling_and_its_instance_norm_equal_torch(low, high):
    # the decoder's upsampling (a GEMM along W, row gathers along H, D) and the instance norm of the
    # upsampled map computed at the low resolution: the same numbers as F.interpolate + instance_norm,
    # including sizes 1 and odd ratios; a constant channel stays finite
    from iris_core.models.blocks import normalise_for_upsampling, upsample_trilinear

    torch.manual_seed(0)
    x = torch.randn(2, 6, *low) * 3 + 2
    x[0, 1] = 5.0
    up = torch.nn.functional.interpolate(x, size=high, mode="trilinear", align_corners=True)
    assert torch.allclose(upsample_trilinear(x, high), up, atol=1e-5)
    normed = torch.nn.functional.instance_norm(up, eps=1e-4)
    ours = upsample_trilinear(normalise_for_upsampling(x, high, 1e-4), high)
    assert torch.isfinite(ours).all()
    # the constant channel normalises to 0 up to float32 rounding of its mean times 1/sqrt(eps) = 100
    assert float(ours[0, 1].abs().max()) < 1e-4 and float(normed[0, 1].abs().max()) < 1e-4
    ours[0, 1] = normed[0, 1] = 0
    assert torch.allclose(ours, normed, atol=2e-5)


def test_up_block_equals_norm_of_concatenation_forward_and_backward():
    # UpBlock normalises the skip and the upsampled halves apart; the published function is conv blocks on
    # cat([skip, interpolate(x)]): same output and same gradients (with activation checkpointing)
    from iris_core.models.blocks import UpBlock

    torch.manual_seed(0)
    block = UpBlock(16, 8, 2).train()
    block.checkpointing = True
    x = (torch.randn(1, 16, 4, 5, 6) * 2 + 1).requires_grad_()
    skip = torch.randn(1, 8, 8, 10, 12, requires_grad=True)

    def published(x, skip):
        up = torch.nn.functional.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=True)
        return block.conv(torch.cat([skip, up], 1))

    ours, theirs = block(x, skip), published(x, skip)
    assert torch.allclose(ours, theirs, atol=1e-5)
    g_ours = torch.autograd.grad(ours.square().sum(), (x, skip))
    g_theirs = torch.autograd.grad(theirs.square().sum(), (x, skip))
    for a, b in zip(g_ours, g_theirs):
        assert torch.allclose(a, b, atol=1e-4 * float(b.abs().max()))


def test_up_block_under_bfloat16_autocast_is_as_accurate_as_the_published_form():
    # under CPU bf16 autocast (--precision bfloat16/auto) the published form upsampled and normalised in
    # float32; ours must too (its statistics are matmuls, which autocast would round to bf16: 1.8x the
    # error, caught here)
    from iris_core.models.blocks import UpBlock
    from iris_core.pipeline.precision import cpu_bf16_autocast

    torch.manual_seed(0)
    block = UpBlock(16, 8, 2).eval()
    x = torch.randn(1, 16, 4, 5, 6) * 2 + 3
    skip = torch.randn(1, 8, 8, 10, 12)

    def published(x, skip):
        up = torch.nn.functional.interpolate(x.float(), size=skip.shape[2:], mode="trilinear", align_corners=True)
        return block.conv(torch.cat([skip, up.to(x.dtype)], 1))

    with torch.no_grad():
        exact = published(x, skip)
        with cpu_bf16_autocast():
            ours, theirs = block(x, skip).float(), published(x, skip).float()
    assert float((ours - exact).abs().mean()) <= 1.2 * float((theirs - exact).abs().mean())


def test_largest_component_postprocessing():
    """'largest' keeps each class's largest component; the policy resolves a run's choice (None: its own,
    'largest' for MASS models) and refuses an unknown one."""
    from iris_core.pipeline.postprocess import keep_largest_component

    arr = np.zeros((20, 20, 20), np.uint8)
    arr[2:10, 2:10, 2:10] = 1
    arr[15:17, 15:17, 15:17] = 1  # an island
    arr[12:14, 2:4, 2:4] = 2
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 1.0, 1.5))
    assert Preprocessing().postprocess_of(None) == "none" and Preprocessing.mass().postprocess_of(None) == "largest"
    assert Preprocessing.mass().postprocess_of("none") == "none"
    with pytest.raises(InputError, match="unknown post-processing 'biggest'"):
        Preprocessing().postprocess_of("biggest")
    out = keep_largest_component(img, [1, 2])
    res = sitk.GetArrayFromImage(out)
    assert (res == 1).sum() == 8**3 and (res == 2).sum() == 8 and out.GetSpacing() == img.GetSpacing()

