"""Shared fixtures: small real files on disk, small real models, real sample data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
#: the compatibility fixtures (vendored: public-data-derived, see Testing/Data/compat/README.md)
COMPAT = ROOT / "Testing" / "Data" / "compat"

torch.set_num_threads(min(2, os.cpu_count() or 1))

#: what the memory-heavy tests (marked ``heavy_memory``) need at their peak: the MASS parity tests segment with the
#: full-size network (the engine's own memory check asks for about 6.1 GiB there). Only one of them runs at a time
#: whatever the number of workers (``_one_memory_heavy_test_at_a_time``).
HEAVY_MEMORY = 7 * 2**30
#: what any other test needs at its peak, a worker's own share beside the one heavy test
WORKER_MEMORY = 3 * 2**30


def workers_for(cores: int, total_memory: int) -> int:
    """The number of xdist workers for a machine of ``cores`` physical cores and ``total_memory`` bytes: a worker
    per core, as many as the memory holds with one heavy test among them (``HEAVY_MEMORY`` + ``WORKER_MEMORY`` for
    each other worker), at least one. Of the machine alone: what happens to be free when a run starts is no input
    (with the free memory, a training beside the run once made it one worker and 30 minutes)."""
    return max(1, min(cores, 1 + (total_memory - HEAVY_MEMORY) // WORKER_MEMORY))


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (scripts/test.sh): :func:`workers_for` this machine's physical cores and total memory."""
    import psutil

    return workers_for(psutil.cpu_count(logical=False) or os.cpu_count() or 1, psutil.virtual_memory().total)


@pytest.fixture(autouse=True)
def _one_memory_heavy_test_at_a_time(request, tmp_path_factory):
    """A ``heavy_memory`` test on an xdist worker holds a lock shared by this run's workers (a file in the run's
    base folder), so two of them never run at once; a deadline below the per-test timeout (pyproject.toml) says so
    if one waits that long."""
    if request.node.get_closest_marker("heavy_memory") is None or not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    from filelock import FileLock

    with FileLock(str(tmp_path_factory.getbasetemp().parent / "heavy_memory.lock"), timeout=600):
        yield


@pytest.fixture(scope="session", autouse=True)
def _compiled_networks_in_a_temporary_cache(tmp_path_factory):
    """Networks compiled by the tests (``--compile``) go to a session folder, never the user's cache;
    subprocesses inherit it."""
    old = os.environ.get("IRIS_SEGMENT_COMPILED")
    os.environ["IRIS_SEGMENT_COMPILED"] = str(tmp_path_factory.mktemp("compiled_networks"))
    yield
    if old is None:
        os.environ.pop("IRIS_SEGMENT_COMPILED", None)
    else:
        os.environ["IRIS_SEGMENT_COMPILED"] = old


def oblique_direction(deg: float = 20.0) -> list[float]:
    a = np.deg2rad(deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    return (rz @ rx).flatten().tolist()


def phantom(size=(48, 40, 24), spacing=(1.5, 1.2, 3.0), direction=None, origin=(-30.0, 10.0, 5.0),
            centre_mm=None, radius_mm=18.0, seed=0):
    """A textured volume with a bright ball (label 1) and a dark box (label 2), in physical space."""
    rng = np.random.default_rng(seed)
    img = sitk.Image(list(size), sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), -1).reshape(-1, 3)
    pts = np.array(origin) + (idx * np.array(spacing)) @ np.array(img.GetDirection()).reshape(3, 3).T
    pts = pts.reshape(*size, 3).transpose(2, 1, 0, 3)  # z, y, x, 3
    lo = np.array(img.TransformIndexToPhysicalPoint([0, 0, 0]))
    hi = np.array(img.TransformIndexToPhysicalPoint([s - 1 for s in size]))
    c = (lo + hi) / 2 if centre_mm is None else np.array(centre_mm)
    ball = np.linalg.norm(pts - c, axis=-1) <= radius_mm
    box = np.all(np.abs(pts - (c + np.array([radius_mm + 7.0, 0, 0]))) <= [5, 6, 5], axis=-1) & ~ball
    arr = 100 + rng.normal(0, 5, ball.shape) + 200 * ball - 60 * box
    lab = np.zeros(ball.shape, np.uint8)
    lab[ball] = 1
    lab[box] = 2
    image = sitk.GetImageFromArray(arr.astype(np.float32))
    image.CopyInformation(img)
    labels = sitk.GetImageFromArray(lab)
    labels.CopyInformation(img)
    return image, labels


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory):
    """Reference and target phantoms on different grids (target anisotropic and oblique)."""
    d = tmp_path_factory.mktemp("phantoms")
    ref_img, ref_lab = phantom(seed=1)
    tgt_img, tgt_lab = phantom(size=(40, 44, 20), spacing=(1.8, 1.4, 3.5), direction=oblique_direction(),
                               origin=(-20.0, -5.0, 0.0), seed=2)
    paths = {}
    for name, im in [("ref", ref_img), ("ref_lab", ref_lab), ("tgt", tgt_img), ("tgt_lab", tgt_lab)]:
        paths[name] = d / f"{name}.nii.gz"
        sitk.WriteImage(im, str(paths[name]))
    return paths


def write_nnunet(root: Path, name: str, prefix: str, n: int, seed: int, radius_step: float = 0.0,
                 names: tuple[str, str] = ("ball", "box")) -> Path:
    """A small dataset of phantoms (ball = 1, box = 2, named ``names``) in the nnU-Net v2 layout, written to
    ``root``."""
    import json

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n):
        img, lab = phantom(seed=seed + i, radius_mm=18.0 + radius_step * (i - 1.5))
        sitk.WriteImage(img, str(root / "imagesTr" / f"{prefix}_{i:03d}_0000.nii.gz"))
        sitk.WriteImage(lab, str(root / "labelsTr" / f"{prefix}_{i:03d}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"name": name, "channel_names": {"0": "MR"},
                                                    "labels": {"background": 0, names[0]: 1, names[1]: 2},
                                                    "numTraining": n, "file_ending": ".nii.gz"}))
    return root


@pytest.fixture(scope="session")
def tiny_model():
    from iris_core.hub.checkpoint import preset_model

    return preset_model("iris-tiny")


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory, tiny_model):
    from iris_core.hub.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    return save_checkpoint(path, tiny_model.model, tiny_model.preprocessing, info={"name": "tiny"})


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def weight_rule(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The fixtures' deterministic weights, generated under the reference names (compat/README.md)."""
    import math
    import zlib

    out = {}
    for key in sorted(shapes):
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        r = torch.randn(shapes[key], generator=g, dtype=torch.float32)
        if len(shapes[key]) >= 2:
            out[key] = r / math.sqrt(math.prod(shapes[key][1:]))
        elif key.endswith("weight"):
            out[key] = 1 + 0.1 * r
        else:
            out[key] = 0.1 * r
    return out


@pytest.fixture(scope="session")
def mass_rule_checkpoint(tmp_path_factory) -> Path:
    """The weight-rule MASS-base network saved exactly as the authors' training format
    (compat/mass_pipeline/README.md step 1): about 480 MB, built once per session."""
    import json

    ref = json.loads((COMPAT / "iris_mass_state_dict.json").read_text())["state_dict"]
    path = tmp_path_factory.mktemp("mass") / "mass_base.pth"
    return save_in_authors_format(weight_rule(ref), path, 128, 0.5,
                                  model={"type": "iris", "in_ch": 1, "channels": [32, 64, 128, 256, 512], "tn": 73,
                                         "num_prior_stage": 3})


def save_in_authors_format(state_dict: dict, path: Path, window: int, overlap: float, **config) -> Path:
    """A network's weights as the MASS authors' training checkpoint (DDP ``module.`` prefix, their evaluation
    window and overlap; ``config`` adds other sections): such a file gets the MASS pipeline policy on load."""
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state_dict.items()},
                "config": {**config, "evaluation": {"window_size": [window] * 3, "overlap": overlap}}}, path)
    return path


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 that refuses connections for the test's duration: bound by this process and never
    listening, so nothing else can listen there meanwhile (a well-known port such as 9 may have a listener)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        yield port


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05, poll=None):
    """Call ``predicate`` until it returns something true (returned) or ``timeout`` seconds pass (an
    AssertionError naming ``what``); ``poll`` (a job's or a process's poll) is called before each look. The tests'
    one way to wait for an event: never an unbounded loop, never a sleep standing in for the event."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        if poll is not None:
            poll()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (torchrun's rendezvous, test servers: a fixed port fails when two runs
    meet)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_dicom_series(image, folder, modality: str = "MR", series_description: str = "test series") -> Path:
    """``image`` (3-D, any spacing and direction) as a DICOM series of MR (or CT) Image Storage files in ``folder``,
    one slice per file with real geometry tags (position, orientation, spacing), int16 pixels: what a scanner's
    export holds, written with pydicom."""
    import numpy as np
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = sitk.GetArrayFromImage(image).astype(np.int16)
    d = np.array(image.GetDirection()).reshape(3, 3)
    sp = image.GetSpacing()
    sop_class = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2"}[modality]
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for z in range(arr.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "IRIS0001", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20261203", "120000", "1", "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = modality, 1, z + 1, series_description
        ds.Manufacturer = "IrisSegment tests"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, z))]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])]
        ds.PixelSpacing = [f"{sp[1]:.6f}", f"{sp[0]:.6f}"]  # row spacing (between rows: y), column spacing (x)
        ds.SliceThickness, ds.SpacingBetweenSlices = f"{sp[2]:.6f}", f"{sp[2]:.6f}"
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = arr[z].tobytes()
        ds.save_as(folder / f"slice{z:04d}.dcm", enforce_file_format=True)
    return folder
