"""The benchmark's optimised path computes what the plain eager reference path computes."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_pair_benchmark_runs_and_paths_agree(tiny_model_file):
    from iris_core.commands.bench import format_pair, pair_benchmark

    res = pair_benchmark(str(tiny_model_file), repeats=1, registration=False)
    # an untrained network's logits can be large: compare relative to their magnitude
    assert res["max_abs_logit_difference"] <= 1e-5 * max(1.0, res["logit_range"])
    assert res["optimised"]["window_15_classes_s"]["median"] > 0
    assert len(res["optimised"]["dice"]) == 3 and all(0 <= d <= 1 for d in res["identity_dice"])
    text = format_pair(res)
    assert "plain eager reference" in text and "each additional target" in text


def test_per_model_benchmark_table():
    from iris_core.commands.bench import format_table, run_benchmark

    res = run_benchmark(["preset:iris-tiny"], window=32, classes=(1, 3), repeats=1)
    assert "error" not in res[0], res
    assert res[0]["window_3_classes_s"]["median"] > 0 and res[0]["peak_rss_mb"] > 0
    assert "iris-tiny" in format_table(res)


def test_pipeline_benchmark_on_the_fixture_case_reports_stages_memory_and_agreement(tiny_model_file, tmp_path,
                                                                                      capsys):
    """``bench --pipeline`` through the CLI on its default data (the MASS fixture's MR case): every stage
    timed, one further target, peak memory, and the agreement of its labels with the authors' output on
    the same grid; a label map of another grid is refused naming the file."""
    import json

    import numpy as np
    import SimpleITK as sitk

    from iris_core.commands.bench_pipeline import FIXTURE
    from iris_core.commands.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--pipeline", "--model", str(tiny_model_file), "--threads", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    s = res["seconds"]
    assert res["windows"] >= 1 and len(res["further_target_s"]) == 1 and res["peak_rss_mb"] > 50
    assert all(s[k] > 0 for k in ("prepare_target", "prepare_and_encode_references", "windows_total"))
    assert s["first_target_total"] >= s["windows_total"] + s["prepare_and_encode_references"]
    # the work per window, counted on the meta device, is what the same count on the CPU network gives
    # (it silently became None once when a decoder block entered autocast on the meta device)
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from iris_core.api import resolve_model

    net = resolve_model(str(tiny_model_file)).model.eval()
    with torch.no_grad():
        window = torch.randn(1, 1, *res["window"])
        tokens = net.encode_task(window, (torch.rand(1, res["classes"], *res["window"]) > 0.5).float())
        # attention by its reference (math) kernel: the CPU's fused one has no formula in the counter; the memory
        # readout in its one-attention form (grad enabled), which the meta count sees (the CPU's inference readout
        # by groups of rows depends on the mask values, which the meta device does not have)
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            net.segment(window, tokens)
    assert res["window_gflop"] == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-9)
    # the agreement is that of the labels the one pipeline writes: segment, run by the CLI on the same case
    # with the same model, writes a label map whose agreement with the authors' output is the figure reported
    authors = sitk.GetArrayFromImage(sitk.ReadImage(str(FIXTURE / "mr_authors_seg.nii.gz")))
    share = res["agreement"]["same_label_share"]
    assert res["agreement"]["file"].endswith("mr_authors_seg.nii.gz")
    written = tmp_path / "mr_seg.nii.gz"
    assert main(["segment", "--model", str(tiny_model_file), "--threads", "2", "--device", "cpu", "--quiet",
                 "--intensity", "MR", "--target", str(FIXTURE / "mr_target.nii.gz"), "--reference",
                 str(FIXTURE / "mr_reference.nii.gz"), str(FIXTURE / "mr_reference_labels.nii.gz"),
                 "--output", str(written)]) == 0
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(written)))
    assert share == pytest.approx(float(np.mean(ours == authors)), abs=1e-9)
    capsys.readouterr()
    assert main(["bench", "--pipeline", "--model", str(tiny_model_file), "--compare",
                 str(FIXTURE / "ct_authors_seg.nii.gz"), "--further-targets", "0"]) != 0
    assert "ct_authors_seg.nii.gz" in capsys.readouterr().err
