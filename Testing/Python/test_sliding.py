"""The pipeline's sliding window in MONAI's layout (iris_core.pipeline.sliding.sliding_window_monai) against
MONAI's own sliding_window_inference: the same output, on volumes smaller than, equal to and larger than the
window, with batching and overlaps (issue [21]: the inference path no longer imports MONAI)."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference

from iris_core.pipeline.sliding import sliding_window_monai


def predictor(batch: torch.Tensor) -> torch.Tensor:
    """A position-dependent, window-dependent output (two classes), so every window's placement shows."""
    ramp = torch.linspace(0, 1, batch.shape[-1])
    return torch.cat([torch.sigmoid(batch[:, :1] * 3 + ramp), torch.tanh(batch[:, 1:2] - ramp).abs()], 1)


@pytest.mark.parametrize("shape,window,batch,overlap", [
    ((40, 37, 29), (16, 16, 16), 1, 0.5),
    ((40, 37, 29), (16, 12, 20), 3, 0.25),
    ((9, 21, 13), (16, 16, 16), 2, 0.5),     # smaller than the window on two axes (odd): padded on both sides
    ((16, 16, 16), (16, 16, 16), 1, 0.5),    # exactly one window
    ((33, 9, 50), (8, 8, 8), 4, 0.0),
])
def test_sliding_window_monai_equals_monai(shape, window, batch, overlap):
    torch.manual_seed(0)
    x = torch.randn(1, 2, *shape)
    ours = sliding_window_monai(x, window, batch, overlap, predictor, cval=-1.5)
    theirs = sliding_window_inference(x, window, batch, predictor, overlap=overlap, mode="gaussian",
                                      padding_mode="constant", cval=-1.5)
    assert ours.shape == theirs.shape == (1, 2, *shape)
    torch.testing.assert_close(ours, theirs.as_tensor() if hasattr(theirs, "as_tensor") else theirs,
                               rtol=1e-6, atol=1e-6)
