"""The fault battery of issue 12 on a real MRML scene (slicer-core): each case failed on the code
before the fix. Real nodes from the shipped sample pair, the real worker, small real models."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer  # slicer-core, a test dependency: missing, these tests fail rather than vanish

from conftest import wait_for  # noqa: E402
from iris_core.options import SegmentOptions  # noqa: E402
from IrisSegmentLib import testing  # noqa: E402
from IrisSegmentLib.logic import ReferenceSpec, SegmentationLogic, SegmentRequest  # noqa: E402
from IrisSegmentLib.runner import WorkerError, WorkerProcess, run_worker  # noqa: E402
from IrisSegmentLib.scene import SceneError  # noqa: E402
from IrisSegmentLib.standalone import init_scene  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "Resources" / "SampleData"


def _load_pair(scene) -> dict:
    """The shipped pair loaded with slicer-core directly (independent of the code under test)."""
    out = {}
    for key, f, name in [("reference", "Colin27.nrrd", "Colin27"), ("reference_seg", "Colin27.seg.nrrd", "Colin27 seg"),
                         ("target", "ICBM2009a-moved.nrrd", "ICBM moved"),
                         ("manual", "ICBM2009a-moved.seg.nrrd", "ICBM manual")]:
        if f.endswith(".seg.nrrd"):
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
            reader.SetFileName(str(SAMPLE / f))
            assert reader.ReadData(node)
            node.CreateDefaultDisplayNodes()
        else:
            node = slicer.modules.volumes.logic().AddArchetypeVolume(str(SAMPLE / f), name, 0)
        out[key] = node
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """The scene, the pair and a tiny untrained model on a coarse grid (6 mm, 32^3 windows): the
    faults are about the plumbing, and this machine is slow."""
    from iris_core.hub.checkpoint import Preprocessing, save_checkpoint

    model = save_checkpoint(tmp_path_factory.mktemp("fast") / "fast.safetensors", tiny_model.model,
                            Preprocessing(spacing=(6.0, 6.0, 6.0), window=(32, 32, 32)))
    scene = init_scene()
    return scene, _load_pair(scene), SegmentationLogic(scene), str(model)


def request(nodes, model, output=None):
    return SegmentRequest(nodes["target"], [ReferenceSpec(nodes["reference"], nodes["reference_seg"])],
                          model=model, options=SegmentOptions(device="cpu", threads=1), output=output)


def node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def seg_array(seg_node, name, volume):
    sid = seg_node.GetSegmentation().GetSegmentIdBySegmentName(name)
    with testing_scene_unchanged(seg_node.GetScene()):
        return np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, sid, volume)) > 0


class testing_scene_unchanged:  # noqa: N801 (reading arrays leaves display nodes: remove them)
    def __init__(self, scene):
        self.scene = scene

    def __enter__(self):
        self.before = set(node_ids(self.scene))

    def __exit__(self, *exc):
        for nid in set(node_ids(self.scene)) - self.before:
            self.scene.RemoveNode(self.scene.GetNodeByID(nid))


def copy_segmentation(scene, seg_node, volume, name, extra: dict | None = None, rename: dict | None = None):
    """A new segmentation on ``volume`` with ``seg_node``'s segments (renamed) plus ``extra`` masks."""
    new = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    new.CreateDefaultDisplayNodes()
    new.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    seg = seg_node.GetSegmentation()
    masks = {}
    for i in range(seg.GetNumberOfSegments()):
        n = seg.GetNthSegment(i).GetName()
        masks[(rename or {}).get(n, n)] = seg_array(seg_node, n, volume)
    masks.update(extra or {})
    with testing_scene_unchanged(scene):
        for n, m in masks.items():
            sid = new.GetSegmentation().AddEmptySegment("", n)
            slicer.util.updateSegmentBinaryLabelmapFromArray(m.astype(np.uint8), new, sid, volume)
    return new, masks


def launcher(tmp_path: Path, body: str = "") -> str:
    """An executable that behaves like Slicer's PythonSlicer launcher: it runs the real Python as
    its child and exits 1 when the child fails or is killed."""
    path = tmp_path / "FakePythonSlicer"
    path.write_text(f"#!{sys.executable}\nimport subprocess, sys\n{body}\n"
                    f"sys.exit(1 if subprocess.call([{sys.executable!r}] + sys.argv[1:]) else 0)\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


# -- D1 ---------------------------------------------------------------------------------------
def test_d1_output_that_is_a_reference_segmentation_is_refused(world):
    scene, nodes, logic, model = world
    before = node_ids(scene)
    with pytest.raises(SceneError, match="Colin27 seg.*reference 1"):
        logic.prepare(request(nodes, model, output=nodes["reference_seg"]))
    assert node_ids(scene) == before


# -- D2 ---------------------------------------------------------------------------------------
def test_d2_output_under_another_transform_is_refused(world):
    scene, nodes, logic, model = world
    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "elsewhere")
    tf = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    m = tf.GetMatrixTransformToParent()
    m.SetElement(0, 3, 25.0)
    tf.SetMatrixTransformToParent(m)
    out.SetAndObserveTransformNodeID(tf.GetID())
    try:
        with pytest.raises(SceneError, match="different transform"):
            logic.prepare(request(nodes, model, output=out))
    finally:
        scene.RemoveNode(out)
        scene.RemoveNode(tf)


# -- D3 ---------------------------------------------------------------------------------------
def test_d3_undecodable_stderr_and_malformed_lines_do_not_block_the_run(tmp_path):
    """160 KB of non-UTF-8 bytes on stderr and malformed protocol lines before the worker starts:
    the reader threads survive, the pipes keep draining and the worker's own report arrives."""
    noisy = launcher(tmp_path, body=(
        "sys.stderr.buffer.write(b'\\xff\\xfe not utf-8 \\xc3\\x28\\n' * 8000); sys.stderr.flush()\n"
        "sys.stdout.write('IRIS-PROGRESS {not json\\n'); sys.stdout.write('IRIS-PROGRESS {\"done\": \"x\"}\\n')\n"
        "sys.stdout.write('IRIS-DONE [1]\\n'); sys.stdout.flush()"))
    job = tmp_path / "job.json"
    job.write_text("{}")  # the worker itself then reports a clear error (no target): quick
    lines = []
    deadline = time.time() + 240
    with pytest.raises(WorkerError) as info:
        run_worker(job, python=noisy, log=lines.append, cancel=lambda: time.time() > deadline)
    assert "target" in str(info.value)  # the worker's own report, not a timeout or a blocked pipe
    assert any("\ufffd" in ln for ln in lines)
    assert any("unreadable worker message" in ln for ln in lines)


# -- D4 and D7 --------------------------------------------------------------------------------
@pytest.mark.slow
def test_d4_overlapping_segments_stay_whole_and_d7_no_orphan_nodes(world):
    scene, nodes, logic, model = world
    brain = seg_array(nodes["reference_seg"], "brain", nodes["reference"])
    core = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(brain.astype(np.uint8)), [6] * 3)) > 0
    assert core.any() and np.all(brain[core])  # a segment inside another
    ref_seg, masks = copy_segmentation(scene, nodes["reference_seg"], nodes["reference"], "overlap",
                                       extra={"core": core})
    try:
        req = SegmentRequest(nodes["target"], [ReferenceSpec(nodes["reference"], ref_seg)], model=model,
                             options=SegmentOptions(device="cpu", threads=1))
        run = logic.prepare(req)
        try:
            job = json.loads(run.job_file.read_text())
            values = {c["name"]: c["value"] for c in job["inputs"]["classes"]}
            for name, mask in masks.items():  # each segment whole in the exported label maps
                got = np.zeros_like(mask)
                for _, lab in job["inputs"]["references"]:
                    got |= sitk.GetArrayFromImage(sitk.ReadImage(lab)) == values[name]
                assert np.array_equal(got, mask), name
        finally:
            logic.cleanup(run)
        before = set(node_ids(scene))
        result = logic.segment(req)
        added = {scene.GetNodeByID(n).GetClassName() for n in set(node_ids(scene)) - before}
        assert added == {"vtkMRMLSegmentationNode", "vtkMRMLSegmentationDisplayNode"}, added  # D7
        names = {result.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(result.GetSegmentation().GetNumberOfSegments())}
        assert names == {"brain", "core"}
        scene.RemoveNode(result)
    finally:
        scene.RemoveNode(ref_seg)


# -- D5 ---------------------------------------------------------------------------------------
def test_d5_target_removed_while_running_is_reported_and_nothing_imported(world):
    scene, nodes, logic, model = world
    target = slicer.modules.volumes.logic().AddArchetypeVolume(str(SAMPLE / "ICBM2009a-moved.nrrd"), "doomed", 0)
    req = SegmentRequest(target, [ReferenceSpec(nodes["reference"], nodes["reference_seg"])], model=model,
                         options=SegmentOptions(device="cpu", threads=1))
    run = logic.prepare(req)
    scene.RemoveNode(target)  # while the worker runs (the import is what is checked)
    before = node_ids(scene)
    with pytest.raises(SceneError, match="target volume 'doomed' was removed"):
        logic.finish(run, {"classes": [{"name": "brain", "value": 1}]})
    assert node_ids(scene) == before
    assert not run.workdir.exists()


def test_d5_output_removed_before_import_is_reported(world):
    scene, nodes, logic, model = world
    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my output")
    run = logic.prepare(request(nodes, model, output=out))
    scene.RemoveNode(out)
    before = node_ids(scene)
    with pytest.raises(SceneError, match="output segmentation 'my output' was removed"):
        logic.finish(run, {"classes": []})
    assert node_ids(scene) == before


# -- D6 ---------------------------------------------------------------------------------------
def test_d6_unusable_work_folder_is_a_clear_message(world, tmp_path):
    scene, nodes, _, model = world
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("x")
    logic = SegmentationLogic(scene, workdir=not_a_folder)
    before = node_ids(scene)
    with pytest.raises(SceneError, match="work folder.*a-file"):
        logic.prepare(request(nodes, model))
    assert node_ids(scene) == before


# -- D8 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [np.random.default_rng(8).bytes(4096), b"version https://git-lfs.github.com/spec/v1\n"
                                     b"oid sha256:0123\nsize 480000000\n"], ids=["random", "lfs-pointer"])
def test_d8_corrupt_safetensors_names_the_file(world, tmp_path, content):
    scene, nodes, logic, _ = world
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(content)
    from IrisSegmentLib.vocabulary import ModelFileError, known_structures

    with pytest.raises(ModelFileError, match="model.safetensors") as info:  # the GUI's model listing
        known_structures(str(bad))
    assert "Traceback" not in str(info.value)
    with pytest.raises(WorkerError, match="model.safetensors") as info:  # the worker
        logic.segment(request(nodes, str(bad)))
    if content.startswith(b"version"):
        assert "git-LFS" in str(info.value)


# -- D9 ---------------------------------------------------------------------------------------
def test_d9_errors_name_the_node_not_temporary_files(world):
    scene, nodes, logic, model = world
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no pixels")
    with pytest.raises(SceneError, match="'no pixels' has no image data"):
        logic.prepare(SegmentRequest(empty, [ReferenceSpec(nodes["reference"], nodes["reference_seg"])],
                                     model=model))
    scene.RemoveNode(empty)
    nan = slicer.modules.volumes.logic().AddArchetypeVolume(str(SAMPLE / "Colin27.nrrd"), "holey", 0)
    arr = slicer.util.arrayFromVolume(nan).astype(np.float32)
    arr[10, 10, 10] = np.nan
    slicer.util.updateVolumeFromArray(nan, arr)
    try:
        with pytest.raises(SceneError, match="'holey'.*NaN") as info:
            logic.prepare(SegmentRequest(nodes["target"], [ReferenceSpec(nan, nodes["reference_seg"])],
                                         model=model))
        assert ".nrrd" not in str(info.value)
    finally:
        scene.RemoveNode(nan)


# -- D10 --------------------------------------------------------------------------------------
def test_d10_repeated_segment_names_in_one_segmentation_are_refused(world):
    scene, nodes, logic, model = world
    brain = seg_array(nodes["reference_seg"], "brain", nodes["reference"])
    twice, _ = copy_segmentation(scene, nodes["reference_seg"], nodes["reference"], "twice",
                                 extra={"x": brain})
    twice.GetSegmentation().GetSegment(twice.GetSegmentation().GetSegmentIdBySegmentName("x")).SetName("brain")
    try:
        with pytest.raises(SceneError, match="'twice' has several segments named 'brain'"):
            logic.prepare(SegmentRequest(nodes["target"], [ReferenceSpec(nodes["reference"], twice)], model=model))
    finally:
        scene.RemoveNode(twice)


def test_d10_a_segment_name_with_a_comma_can_be_requested(world):
    from IrisSegmentLib import parameters

    scene, nodes, logic, model = world
    seg, _ = copy_segmentation(scene, nodes["reference_seg"], nodes["reference"], "commas",
                               rename={"brain": "brain, whole"})
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "IrisSegment")
    try:
        parameters.set_defaults(node)
        node.SetNodeReferenceID("Target", nodes["target"].GetID())
        cell = parameters.format_segment_names(["brain, whole"])
        assert parameters.parse_segment_names(cell) == ["brain, whole"]
        for segments in (["brain, whole"], cell):  # the list form and the table cell's text
            parameters.set_reference_rows(node, [{"volume": nodes["reference"], "segmentation": seg,
                                                  "segments": segments}])
            req = parameters.request_from_parameters(scene, node)
            sid = seg.GetSegmentation().GetSegmentIdBySegmentName("brain, whole")
            assert req.references[0].segment_ids == [sid]
        run = logic.prepare(req)
        assert [c["name"] for c in json.loads(run.job_file.read_text())["inputs"]["classes"]] == ["brain, whole"]
        logic.cleanup(run)
    finally:
        scene.RemoveNode(seg)
        scene.RemoveNode(node)


# -- items 2, 4, 12: the worker behind a launcher ---------------------------------------------
def _real_worker(proc: WorkerProcess):
    import psutil

    kids = psutil.Process(proc.proc.pid).children(recursive=True)
    return kids[0] if kids else None


@contextlib.contextmanager
def _worker_behind_launcher(world, tmp_path):
    """A prepared run whose worker runs behind a launcher process (as Slicer's PythonSlicer does on
    some platforms): yields the WorkerProcess and the real worker (a psutil.Process); cleans up."""
    scene, nodes, logic, model = world
    run = logic.prepare(request(nodes, model))
    try:
        proc = WorkerProcess(run.job_file, launcher(tmp_path))
        wait_for(lambda: _real_worker(proc), 120, "the real worker behind the launcher")
        yield proc, _real_worker(proc)
    finally:
        logic.cleanup(run)


def test_item4_worker_killed_behind_a_launcher_is_reported_as_out_of_memory(world, tmp_path):
    import psutil

    with _worker_behind_launcher(world, tmp_path) as (proc, real):
        # once it has said it runs (its process id): killed before, it is "could not start" instead
        assert wait_for(lambda: proc.worker_pid, 120, "the worker's start", poll=proc.poll) == real.pid
        real.kill()  # what the OOM killer does to the real Python
        wait_for(lambda: proc.done, 120, "the outcome of the killed worker", poll=proc.poll)
        assert proc.proc.returncode == 1  # the launcher hides the signal
        assert proc.error is not None and "killed (most likely out of memory)" in str(proc.error)
        assert psutil.pid_exists(proc.proc.pid) is False or psutil.Process(proc.proc.pid).status() == "zombie"


def test_item2_cancel_kills_the_real_worker_behind_the_launcher(world, tmp_path):
    import psutil

    with _worker_behind_launcher(world, tmp_path) as (proc, real):
        proc.cancel()
        wait_for(lambda: proc.done, 30, "the outcome of the cancelled worker", poll=proc.poll)
        assert proc.cancelled and proc.result is None and proc.error is None
        assert not real.is_running() or real.status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_item12_outcome_is_known_only_after_all_output_is_read(world, tmp_path):
    """A worker that exits right after its DONE line, its stdout still in the pipe: the result is
    not dropped (the outcome is decided once the pipes are read to the end)."""
    scene, nodes, logic, model = world
    job = tmp_path / "job.json"
    job.write_text("{}")
    fake = launcher(tmp_path, body=(
        "sys.stdout.write('log line\\n' * 20000 + "
        "'IRIS-DONE {\"sidecar\": {\"ok\": 1}}\\n'); sys.stdout.flush(); sys.exit(0)"))
    proc = WorkerProcess(job, fake)
    wait_for(lambda: proc.proc.poll() is not None, 120, "the fake worker's exit")
    wait_for(lambda: proc.done, 120, "the fake worker's outcome", poll=proc.poll)
    assert proc.error is None and proc.result == {"sidecar": {"ok": 1}}


# -- item 6: the model's kind from its header ---------------------------------------------------
def test_item6_model_kind_is_read_from_the_header_without_torch(tmp_path):
    from iris_core.hub.checkpoint import preset_model, save_checkpoint

    hermes = preset_model("hermes-tiny")
    path = save_checkpoint(tmp_path / "hermes.safetensors", hermes.model, hermes.preprocessing)
    data = path.read_bytes()
    head = 8 + int.from_bytes(data[:8], "little")
    cut = tmp_path / "hermes-cut.safetensors"
    cut.write_bytes(data[: head + 16])  # the weights are gone: loading them would fail
    code = ("import sys, json; from IrisSegmentLib.vocabulary import known_structures; "
            f"k, n = known_structures({str(cut)!r}); print(json.dumps([k, len(n), 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
        **os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr
    kind, count, torch_imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert kind == "hermes" and count > 0 and not torch_imported


def test_item6_pth_kind_from_its_key_names(tmp_path):
    import torch

    from IrisSegmentLib.vocabulary import model_kind

    hermes = __import__("iris_core.hub.checkpoint", fromlist=["preset_model"]).preset_model("hermes-tiny")
    torch.save({"model_state_dict": {"module." + k: v for k, v in hermes.model.state_dict().items()}},
               tmp_path / "hermes.pth")
    assert model_kind(str(tmp_path / "hermes.pth"))[0] == "hermes"
    assert model_kind("default")[0] == "iris"


# -- item 8: Compare --------------------------------------------------------------------------
def test_item8_failed_compare_leaves_no_table(world):
    scene, nodes, logic, _ = world
    other, _ = copy_segmentation(scene, nodes["reference_seg"], nodes["reference"], "renamed",
                                 rename={"brain": "not brain"})
    before = node_ids(scene)
    try:
        with pytest.raises(SceneError, match="no segment"):
            logic.compare_to_table(other, nodes["manual"], nodes["target"])
        assert node_ids(scene) == before
        table = logic.compare_to_table(nodes["manual"], nodes["manual"], nodes["target"])
        t = table.GetTable()  # a segmentation against itself: one row, Dice 1, distances 0
        assert t.GetNumberOfRows() == 1
        values = {t.GetColumnName(c): t.GetValue(0, c).ToString() for c in range(t.GetNumberOfColumns())}
        assert values["segment"] == "brain" and float(values["dice"]) == pytest.approx(1.0), values
        assert float(values["hd95_mm"]) == pytest.approx(0.0) and float(values["assd_mm"]) == pytest.approx(0.0)
        scene.RemoveNode(table)
    finally:
        scene.RemoveNode(other)


# -- item 7 and "edit, then reuse" --------------------------------------------------------------
def test_edit_then_reuse_adds_the_corrected_result_as_a_reference(world):
    from IrisSegmentLib import parameters

    scene, nodes, logic, model = world
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "IrisSegment")
    parameters.set_defaults(node)
    node.SetNodeReferenceID("Target", nodes["target"].GetID())
    node.SetParameter("ModelPath", model)
    parameters.add_reference(scene, node, nodes["reference"], nodes["reference_seg"])
    # a finished run's node (the run itself is covered by the D3/D4 tests)
    result, _ = copy_segmentation(scene, nodes["manual"], nodes["target"], "ICBM moved Iris")
    parameters.record_result(node, result)
    assert node.GetNodeReference("Result") is result
    assert parameters.request_from_parameters(scene, node).output is None  # item 7: next run makes a new node
    # the user corrects the result in the Segment Editor: here, the manual truth painted in
    sid = result.GetSegmentation().GetNthSegmentID(0)
    truth = seg_array(nodes["manual"], "brain", nodes["target"])
    with testing_scene_unchanged(scene):
        slicer.util.updateSegmentBinaryLabelmapFromArray(truth.astype(np.uint8), result, sid, nodes["target"])
    row = parameters.add_reference(scene, node, nodes["target"], result)
    assert row["segments"] == ["brain"]
    with pytest.raises(SceneError, match="already a reference"):
        parameters.add_reference(scene, node, nodes["target"], result)
    req = parameters.request_from_parameters(scene, node)
    assert [r.segmentation for r in req.references] == [nodes["reference_seg"], result]
    run = logic.prepare(req)
    try:
        assert run.strategy == "ensemble"  # the same name in two references
        job = json.loads(run.job_file.read_text())
        exported = sitk.GetArrayFromImage(sitk.ReadImage(job["inputs"]["references"][1][1])) > 0
        assert np.array_equal(exported, truth)  # the corrected mask is what the next run learns from
    finally:
        logic.cleanup(run)
        scene.RemoveNode(result)
        scene.RemoveNode(node)


# -- item 9: the shipped sample pair ------------------------------------------------------------
def test_item9_sample_pair_registers_and_loads_like_sample_data(tmp_path):
    import urllib.request

    src = testing.sample_data_source()
    lists = [src[k] for k in ("uris", "fileNames", "nodeNames", "loadFileTypes")]
    assert all(isinstance(v, list) for v in lists) and len({len(v) for v in lists}) == 1  # SampleDataSource
    for uri, name in zip(src["uris"], src["fileNames"]):  # SampleDataLogic.downloadFile: urlretrieve
        urllib.request.urlretrieve(uri, str(tmp_path / name))
    assert sum((tmp_path / n).stat().st_size for n in src["fileNames"]) < 5e6
    assert (SAMPLE / "NOTICE.md").is_file()
    scene = init_scene()
    nodes = testing.load_sample_pair(scene)
    ref = nodes["reference_seg"].GetSegmentation().GetNthSegment(0)
    assert ref.GetName() == "brain" and np.allclose(ref.GetColor(), testing.BRAIN_COLOR)
    from IrisSegmentLib.scene import volume_to_image

    a, b = volume_to_image(nodes["reference"]), volume_to_image(nodes["target"])
    assert not np.allclose(a.GetDirection(), b.GetDirection())  # the target is moved off the reference's space
