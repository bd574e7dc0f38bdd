"""The pipeline's sliding window in MONAI's layout (iris_core.pipeline.sliding.sliding_window_monai) against
MONAI's own sliding_window_inference: the same output, on volumes smaller than, equal to and larger than the
window, with batching and overlaps (issue [21]: the inference path no longer imports MONAI)."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import sliding_window_inference

from iris_core.pipeline.sliding import sliding_window_monai
from iris_core.pipeline.windows import fitted_window


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


def test_fitted_window_takes_a_small_grid_whole_along_each_axis():
    """fit_window: an axis the grid spans within the fit gets one window as long as the grid (never shorter
    than the model's); a longer axis keeps the model's window; 0 keeps the window everywhere."""
    assert fitted_window((96, 80, 48), (64, 64, 64), 96) == (96, 80, 64)
    assert fitted_window((112, 80, 48), (64, 64, 64), 96) == (64, 80, 64)
    assert fitted_window((96, 80, 48), (64, 64, 64), 0) == (64, 64, 64)


def test_a_policy_fit_window_segments_a_small_target_in_one_window(tiny_model, phantom_files, tmp_path):
    """A model whose policy fits the window runs one window over a target that fits (the sidecar says which),
    a model without it and an explicit --window run the overlapping ones; the policy survives the model file."""
    import dataclasses

    import SimpleITK as sitk

    from iris_core.api import resolve_model, segment
    from iris_core.errors import ConfigError
    from iris_core.hub.checkpoint import save_checkpoint
    from iris_core.pipeline.policy import Preprocessing
    from iris_core.types import Reference

    small = dataclasses.replace(tiny_model, preprocessing=dataclasses.replace(tiny_model.preprocessing,
                                                                               spacing=(2.0, 2.0, 2.0)))
    path = save_checkpoint(tmp_path / "fit.safetensors", small.model,
                           dataclasses.replace(small.preprocessing, fit_window=64), info={"name": "fit"})
    fitted = resolve_model(str(path))
    assert fitted.preprocessing.fit_window == 64
    target = sitk.ReadImage(str(phantom_files["tgt"]))
    refs = [Reference(sitk.ReadImage(str(phantom_files["ref"])), sitk.ReadImage(str(phantom_files["ref_lab"])), "ref")]

    def run(model, **options):
        totals = []
        res = segment(target, refs, None, model=model, device="cpu",
                      progress=lambda msg, done, total: totals.append(total) if msg.startswith("Segmenting") else None,
                      **options)
        return res.sidecar["window"], max(totals)

    window, count = run(fitted)
    assert count == 1 and max(window) > 32 and min(window) >= 32
    window, count = run(small)
    assert window == [32, 32, 32] and count > 1
    window, count = run(fitted, window=(32, 32, 32))  # the user's window is used as given
    assert window == [32, 32, 32] and count > 1
    with pytest.raises(ConfigError, match="fit_window"):
        Preprocessing(fit_window=-16)
