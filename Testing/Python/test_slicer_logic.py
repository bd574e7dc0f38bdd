"""IrisSegmentLib on a real MRML scene (slicer-core): real files, real nodes, the real worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import slicer  # slicer-core, a test dependency: missing, these tests fail rather than vanish

from iris_core.options import SegmentOptions  # noqa: E402
from IrisSegmentLib import testing  # noqa: E402
from IrisSegmentLib.logic import ReferenceSpec, SegmentationLogic, SegmentRequest  # noqa: E402
from IrisSegmentLib.runner import WorkerCancelled, WorkerError  # noqa: E402
from IrisSegmentLib.scene import (  # noqa: E402
    SceneError,
    geometry_from_matrix,
    matrix_from_image,
    nodes_removed_after,
    volume_to_image,
)
from IrisSegmentLib.standalone import init_scene  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_file):
    scene = init_scene()
    nodes = testing.build_scene(scene, tmp_path_factory.mktemp("scene"))
    return scene, nodes, SegmentationLogic(scene), str(tiny_model_file)


def request(nodes, model, **options):
    return SegmentRequest(nodes["target"], [ReferenceSpec(nodes["reference"], nodes["reference_seg"])],
                          model=model, options=SegmentOptions(device="cpu", **options))


def test_geometry_bridge_matches_files(world):
    import SimpleITK as sitk

    _, nodes, _, _ = world
    img = volume_to_image(nodes["target"])
    ref = sitk.ReadImage(str(nodes["paths"]["target"]))
    assert img.GetSize() == ref.GetSize()
    assert np.allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    assert np.allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert np.allclose(img.GetSpacing(), ref.GetSpacing())
    sp, org, dr = geometry_from_matrix(matrix_from_image(ref))
    assert np.allclose(sp, ref.GetSpacing()) and np.allclose(org, ref.GetOrigin())


@pytest.mark.slow
def test_segment_compare_save_reload(world, tmp_path):
    scene, nodes, logic, model = world
    before = scene.GetNumberOfNodes()
    seen = []
    result = logic.segment(request(nodes, model), progress=lambda s, d, t: seen.append(s))
    assert result.GetName() == "ICBM2009a moved Iris"
    assert any(s.startswith("Segmenting") for s in seen)
    testing.check_result(result, nodes["target"], nodes["reference_seg"])
    assert scene.GetNumberOfNodes() > before
    import json

    from IrisSegmentLib.jobs import result_summary

    side = json.loads(result.GetAttribute("IrisSegment.Sidecar"))
    assert side["target"] == nodes["target"].GetName()  # not the deleted work file
    log = result_summary(side)
    assert len(log) == 1 and log[0].startswith("segmented 1 class with ") and " on cpu in " in log[0]  # float32
    # a class with no voxel is named in the Log
    none_found = side | {"classes": [side["classes"][0] | {"voxels": 0, "volume_ml": 0.0}]}
    assert result_summary(none_found)[1] == "not found in the target (no voxel): brain"
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "comparison")
    rows = logic.compare(result, nodes["manual"], nodes["target"], table)
    assert rows[0]["segment"] == "brain" and 0.0 <= rows[0]["dice"] <= 1.0
    # the worker's count of the class is the volume of the segment that landed in the scene
    assert side["classes"][0]["volume_ml"] == pytest.approx(rows[0]["volume_pred_ml"], rel=1e-4)
    assert rows[0]["volume_true_ml"] > 1000  # an adult brain mask
    assert table.GetTable().GetNumberOfRows() == 1 and table.GetTable().GetColumnByName("hd95_mm") is not None
    back = testing.save_and_reload(scene, result, tmp_path / "result.seg.nrrd")
    assert back.GetSegmentation().GetNthSegment(0).GetName() == "brain"
    assert np.allclose(back.GetSegmentation().GetNthSegment(0).GetColor(), testing.BRAIN_COLOR)


def test_cancel_leaves_scene_unchanged(world):
    scene, nodes, logic, model = world
    before = testing.node_ids(scene)
    with pytest.raises(WorkerCancelled):
        logic.segment(request(nodes, model), cancel=lambda: True)
    assert testing.node_ids(scene) == before


def test_worker_failure_is_a_clear_message_and_scene_unchanged(world, tmp_path):
    scene, nodes, logic, _ = world
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"\x00not a model" * 20)
    before = testing.node_ids(scene)
    with pytest.raises(WorkerError, match="broken.pth"):
        logic.segment(request(nodes, str(bad)))
    assert testing.node_ids(scene) == before


def test_worker_error_about_a_volume_names_its_node(world, tmp_path):
    """A target volume the model cannot use (constant: no intensity range) fails in the worker, whose
    message names its work file ('target.nrrd: ...'); the user reads the node's name instead."""
    import SimpleITK as sitk

    scene, nodes, logic, model = world
    like = sitk.ReadImage(str(nodes["paths"]["target"]))
    blank = sitk.Image(like.GetSize(), sitk.sitkInt16) + 40
    blank.CopyInformation(like)
    sitk.WriteImage(blank, str(tmp_path / "blank.nrrd"))
    node = testing.load_volume(tmp_path / "blank.nrrd", "Blank scan")
    try:
        before = testing.node_ids(scene)
        req = SegmentRequest(node, [ReferenceSpec(nodes["reference"], nodes["reference_seg"])], model=model,
                             options=SegmentOptions(device="cpu"))
        lines: list[str] = []
        with pytest.raises(WorkerError) as err:
            logic.segment(req, log_line=lines.append)
        assert "target volume 'Blank scan': no intensity range to normalise" in str(err.value)
        assert "target.nrrd" not in str(err.value) + err.value.details
        # the Log's lines too (the worker forwards warnings)
        assert any(line.startswith("target volume 'Blank scan' holds few integer values") for line in lines), lines
        assert not any(".nrrd" in line for line in lines)
        assert testing.node_ids(scene) == before
    finally:
        scene.RemoveNode(node)


@pytest.mark.slow
def test_overlapping_reference_segments_give_overlapping_result_segments(world):
    """A reference segmentation whose segments overlap (Slicer allows it: a 'core' drawn inside 'brain')
    gives a result whose segments overlap the same way: 'brain' is found whole, the 'core' found inside
    it, instead of one label per voxel cutting one out of the other (bundled model, real scene)."""
    import json

    import slicer.util

    scene, nodes, logic, _ = world
    ref, target = nodes["reference"], nodes["target"]
    brain = slicer.util.arrayFromSegmentBinaryLabelmap(
        nodes["reference_seg"], nodes["reference_seg"].GetSegmentation().GetNthSegmentID(0), ref).astype(bool)
    core = np.zeros_like(brain)
    z, y, x = (s // 3 for s in brain.shape)
    core[z:2 * z, y:2 * y, x:2 * x] = True
    core &= brain
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Brain and core")
    result = None
    try:
        seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(ref)
        for name, mask, color in [("brain", brain, (0.9, 0.8, 0.7)), ("core", core, (0.2, 0.5, 0.9))]:
            sid = seg.GetSegmentation().AddEmptySegment("", name, color)
            with nodes_removed_after(scene):
                slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), seg, sid, ref)
        kept = slicer.util.arrayFromSegmentBinaryLabelmap(seg, seg.GetSegmentation().GetSegmentIdBySegmentName("brain"),
                                                          ref)
        assert int(kept.sum()) == int(brain.sum())  # the reference itself overlaps: brain kept whole
        result = logic.segment(SegmentRequest(target, [ReferenceSpec(ref, seg)], model="default",
                                              options=SegmentOptions(device="cpu")))
        side = json.loads(result.GetAttribute("IrisSegment.Sidecar"))
        assert side["options"]["overlaps"] is True and side["layers"] == 2
        segmentation = result.GetSegmentation()
        found = {n: slicer.util.arrayFromSegmentBinaryLabelmap(result, segmentation.GetSegmentIdBySegmentName(n),
                                                                target).astype(bool) for n in ("brain", "core")}
        assert found["core"].sum() > 1000
        assert (found["brain"] & found["core"]).sum() > 0.9 * found["core"].sum()  # the core lies inside the brain
        assert [c["voxels"] for c in side["classes"]] == [int(found["brain"].sum()), int(found["core"].sum())]
        manual = slicer.util.arrayFromSegmentBinaryLabelmap(
            nodes["manual"], nodes["manual"].GetSegmentation().GetNthSegmentID(0), target).astype(bool)
        d = 2 * (found["brain"] & manual).sum() / (found["brain"].sum() + manual.sum())
        assert d > 0.7, d  # measured 0.764: ICBM 2009a's brain mask is drawn unlike Colin27's (README: 0.69-0.86)
    finally:
        for node in (seg, result):
            if node is not None:
                scene.RemoveNode(node)


def test_bad_requests_are_refused_before_running(world):
    scene, nodes, logic, model = world
    before = testing.node_ids(scene)
    with pytest.raises(SceneError, match="choose a target"):
        logic.prepare(SegmentRequest(None, []))
    with pytest.raises(SceneError, match="add at least one reference"):
        logic.prepare(SegmentRequest(nodes["target"], []))
    with pytest.raises(SceneError, match="no segment 'nope'"):
        logic.prepare(SegmentRequest(nodes["target"], [ReferenceSpec(nodes["reference"], nodes["reference_seg"],
                                                                     ["nope"])], model=model))
    # refused here, in the scene's words, not by the worker after it started
    with pytest.raises(SceneError, match="model file .*missing.safetensors not found; choose another file"):
        logic.prepare(SegmentRequest(nodes["target"], [ReferenceSpec(nodes["reference"], nodes["reference_seg"])],
                                     model=str(Path(model).parent / "missing.safetensors")))
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Empty segmentation")
    try:
        with_empty = testing.node_ids(scene)
        with pytest.raises(SceneError, match="segmentation 'Empty segmentation' has no segments; draw the structures"):
            logic.prepare(SegmentRequest(nodes["target"], [ReferenceSpec(nodes["reference"], empty)], model=model))
        assert testing.node_ids(scene) == with_empty
    finally:
        scene.RemoveNode(empty)
    assert testing.node_ids(scene) == before


def test_worker_crash_becomes_a_message(tmp_path):
    """A worker that fails in Python reports what failed (an internal error keeps its traceback for the
    details); one that dies without a word (a crash in native code) is told apart from one killed for memory."""
    import os
    import signal
    import sys

    from IrisSegmentLib.runner import run_worker

    job = tmp_path / "job.json"
    job.write_text("{not json")
    with pytest.raises(WorkerError, match="Expecting property name enclosed in double quotes") as err:
        run_worker(job)
    assert "Traceback" in err.value.details and "json" in err.value.details
    if os.name == "posix":  # a worker killed by a signal after it announced itself
        fake = tmp_path / "python"
        fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import json, os, signal; "
                        f"print(\"IRIS-START \" + json.dumps({{\"pid\": os.getpid()}}), flush=True); "
                        f"os.kill(os.getpid(), signal.SIGSEGV)'\n")
        fake.chmod(0o755)
        with pytest.raises(WorkerError, match=rf"the segmentation process crashed \(signal {int(signal.SIGSEGV)}\)"):
            run_worker(job, python=str(fake))


def test_parameter_node_round_trip(world):
    """The widget's parameter node (a real vtkMRMLScriptedModuleNode) describes the request."""
    import json

    from IrisSegmentLib.parameters import (
        can_segment,
        request_from_parameters,
        set_defaults,
        set_reference_rows,
    )

    scene, nodes, logic, model = world
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "IrisSegment")
    set_defaults(node)
    assert node.GetParameter("Strategy") == "one-shot" and not can_segment(node)
    node.SetNodeReferenceID("Target", nodes["target"].GetID())
    set_reference_rows(node, [{"volume": nodes["reference"], "segmentation": nodes["reference_seg"],
                               "segments": "brain"}])
    node.SetParameter("ModelPath", model)
    node.SetParameter("Strategy", "tuning")
    node.SetParameter("TuneSteps", "7")
    node.SetParameter("MaxClassesPerForward", "1")  # the MASS memory option (issue 11)
    node.SetParameter("Postprocess", "largest")
    node.SetParameter("Precision", "auto")  # bfloat16 where checked safe (CPU)
    set_defaults(node)  # keeps the user's choices
    assert can_segment(node)
    req = request_from_parameters(scene, node)
    assert req.target is nodes["target"] and req.model == model
    # the rest: the one set of defaults
    assert req.options == SegmentOptions(strategy="tuning", tune_steps=7, max_classes_per_forward=1,
                                         postprocess="largest", precision="auto")
    # the worker job holds exactly these options
    run = logic.prepare(req)
    try:
        job = json.loads(run.job_file.read_text())
        assert SegmentOptions.from_dict(job["options"]) == req.options
        assert job["inputs"]["model"] == model and len(job["inputs"]["references"]) == 1
    finally:
        logic.cleanup(run)
    seg_id = nodes["reference_seg"].GetSegmentation().GetNthSegmentID(0)
    assert req.references[0].segment_ids == [seg_id] and req.output is None
    scene.RemoveNode(node)


def test_worker_killed_like_out_of_memory_is_reported(world, tmp_path):
    """A worker killed by the system (as the OOM killer does) becomes a clear message."""
    import psutil

    from conftest import wait_for
    from IrisSegmentLib.runner import WorkerProcess

    scene, nodes, logic, model = world
    run = logic.prepare(request(nodes, model))
    try:
        proc = WorkerProcess(run.job_file)
        # once it has said it runs: killed before, it is "could not start" instead
        wait_for(lambda: proc.worker_pid, 60, "the worker's start", poll=proc.poll)
        psutil.Process(proc.proc.pid).kill()  # SIGKILL, as the OOM killer sends
        wait_for(lambda: proc.done, 30, "the outcome of the killed worker", poll=proc.poll)
        assert proc.error is not None and "killed (most likely out of memory)" in str(proc.error)
    finally:
        logic.cleanup(run)
    assert not run.workdir.exists()


def read_seg_nrrd_as_slicer_does(path):
    """A new segmentation node in a fresh scene, filled from ``path`` by Slicer's own reader
    (vtkMRMLSegmentationStorageNode)."""
    scene = init_scene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read back")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def test_cli_seg_nrrd_opens_in_slicer_as_named_segments(phantom_files, tiny_model_file, tmp_path, capsys):
    """`iris-segment segment --output x.seg.nrrd` writes the header fields Slicer's segmentation reader
    takes names, colours and label values from: read back with vtkMRMLSegmentationStorageNode (not as
    Segment_1, Segment_2...), each segment holding exactly the voxels of its label."""
    import SimpleITK as sitk

    from iris_core.commands.cli import main

    out = tmp_path / "result.seg.nrrd"
    code = main(["segment", "--model", str(tiny_model_file), "--device", "cpu", "--quiet",
                 "--reference", str(phantom_files["ref"]), str(phantom_files["ref_lab"]),
                 "--target", str(phantom_files["tgt"]), "--classes", "ball=1,box=2", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    node = read_seg_nrrd_as_slicer_does(out)  # a fresh scene, which the target is loaded into next
    target = testing.load_volume(phantom_files["tgt"], "target")
    seg = node.GetSegmentation()
    got = {}
    for i in range(seg.GetNumberOfSegments()):
        s = seg.GetNthSegment(i)
        arr = slicer.util.arrayFromSegmentBinaryLabelmap(node, seg.GetNthSegmentID(i), target)
        got[s.GetName()] = (s.GetLabelValue(), int(np.count_nonzero(arr)))
        assert s.GetColor() != (0.0, 0.0, 0.0)
    assert got == {"ball": (1, int((labels == 1).sum())), "box": (2, int((labels == 2).sum()))}
    assert got["ball"][1] > 0


@pytest.mark.slow
def test_cli_seg_nrrd_keeps_overlapping_classes_as_slicer_layers(tmp_path, capsys):
    """`segment --output x.seg.nrrd` with classes that overlap in the references (Colin27's six lobes and
    its brain, two label maps of one image; bundled model, MNI152 moved off MNI space): the file holds one
    layer per group of classes that do not overlap, and Slicer's own storage node reads it as segments
    that overlap: the brain found whole, the lobes inside it, each segment the voxels the sidecar counts."""
    import json

    import SimpleITK as sitk

    from iris_core import sampledata
    from iris_core.commands.cli import main

    lobes, brain = sampledata.colin27("lobes"), sampledata.colin27("brain")
    target = sampledata.move_off_mni(sampledata.mni152nlin6asym("brain"), seed=0)
    files = {"t1": tmp_path / "colin27.nii.gz", "lobes": tmp_path / "lobes.nii.gz", "brain": tmp_path / "brain.nii.gz",
             "target": tmp_path / "target.nii.gz"}
    for key, img in [("t1", lobes.image), ("lobes", lobes.labels),
                     ("brain", sitk.Cast(brain.labels, sitk.sitkUInt8) * 7), ("target", target.image)]:
        sitk.WriteImage(img, str(files[key]))
    out = tmp_path / "result.seg.nrrd"
    code = main(["segment", "--device", "cpu", "--quiet", "--target", str(files["target"]),
                 "--reference", str(files["t1"]), str(files["lobes"]), "--reference", str(files["t1"]),
                 str(files["brain"]), "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    side = json.loads((tmp_path / "result.json").read_text())
    assert side["layers"] == 2
    node = read_seg_nrrd_as_slicer_does(out)  # a fresh scene, which the target is loaded into next
    target_node = testing.load_volume(files["target"], "target")
    seg = node.GetSegmentation()
    assert seg.GetNumberOfSegments() == 7 and seg.GetNumberOfLayers() == 2
    found = {}
    for i in range(seg.GetNumberOfSegments()):
        found[seg.GetNthSegment(i).GetLabelValue()] = slicer.util.arrayFromSegmentBinaryLabelmap(
            node, seg.GetNthSegmentID(i), target_node).astype(bool)
    assert [c["voxels"] for c in side["classes"]] == [int(found[v].sum()) for v in range(1, 8)]
    lobe_union = np.any([found[v] for v in range(1, 7)], axis=0)
    # inside the brain as far as in the reference (89.6 % of Colin27's lobe voxels lie inside its brain mask)
    nested = float((sitk.GetArrayFromImage(brain.labels) > 0)[sitk.GetArrayFromImage(lobes.labels) > 0].mean())
    assert lobe_union.sum() > 100_000 and (found[7] & lobe_union).sum() > (nested - 0.03) * lobe_union.sum()


def test_readme_console_example_runs_as_written(tmp_path):
    """The README's Slicer-console block, unchanged, on a real scene (``slicer.mrmlScene``) holding the sample
    pair as Sample Data loads it, with the bundled model: it finds its nodes by name, segments the moved ICBM
    target from Colin27 and compares with the manual segmentation."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"usable from Slicer's Python console:\n\n```python\n(.*?)```", readme, re.S).group(1)
    scene = init_scene()
    nodes = testing.load_sample_pair(scene)  # what Sample Data loads, under its node names
    scope = {"slicer": slicer}  # nothing else: the block finds its nodes itself
    exec(compile(block, "README.md", "exec"), scope)
    testing.check_result(scope["seg"], nodes["target"], nodes["reference_seg"])
    (row,) = scope["rows"]
    assert row["dice"] > 0.7, row  # the bundled model, brain mask across templates: 0.76 measured
