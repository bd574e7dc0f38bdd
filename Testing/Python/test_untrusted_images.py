"""Uploaded images checked from their headers (io/untrusted.py, issue [19]): the files real writers make (SimpleITK,
nibabel's NIfTI-2, 3D Slicer's sample .nrrd and .seg.nrrd) pass; each header that would make the reader open
another file, allocate more than allowed or read what is not there is refused, naming the part only."""

from __future__ import annotations

import gzip
import logging
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from iris_core.errors import InputError
from iris_core.io.untrusted import check_untrusted_image
from iris_core.resources import SAMPLE_DATA
from iris_core.service.server import read_tokens


@pytest.mark.parametrize("name", ["a.nii", "a.nii.gz", "a.nrrd", "a.mha", "c.nrrd", "c.mha", "c.nii.gz"])
def test_files_simpleitk_writes_pass(phantom_files, tmp_path, name):
    image = sitk.ReadImage(str(phantom_files["tgt"]))
    if name.startswith("c"):  # integer labels, compressed
        image = sitk.Cast(sitk.ReadImage(str(phantom_files["tgt_lab"])), sitk.sitkUInt16)
    sitk.WriteImage(image, str(tmp_path / name), useCompression=name.startswith("c"))
    facts = check_untrusted_image(tmp_path / name, "target", 10**6)
    assert facts.sizes[:3] == image.GetSize()


def test_big_endian_nifti_and_slicer_sample_files_pass_nifti2_is_refused(tmp_path):
    data = np.arange(24 * 20 * 16, dtype=">i2").reshape(24, 20, 16)
    nib.save(nib.Nifti2Image(data, np.eye(4)), tmp_path / "n2.nii.gz")  # ITK does not read NIfTI-2
    with pytest.raises(InputError, match="target: refused: a NIfTI-2 file, which the image reader here"):
        check_untrusted_image(tmp_path / "n2.nii.gz", "target", 10**6)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "be.nii")
    assert check_untrusted_image(tmp_path / "be.nii", "target", 10**6).value_bytes == 2
    for name in ("Colin27.nrrd", "ICBM2009a-moved.nrrd"):
        check_untrusted_image(SAMPLE_DATA / name, "target", 2 * 10**7)
    for name in ("Colin27.seg.nrrd", "ICBM2009a-moved.seg.nrrd"):
        check_untrusted_image(SAMPLE_DATA / name, "reference_labels_0", 10**8, labels=True)


def test_a_layered_segmentation_is_a_label_part_only(tmp_path):
    layers = sitk.Compose([sitk.Image([20, 18, 16], sitk.sitkUInt8)] * 2)
    sitk.WriteImage(layers, str(tmp_path / "l.seg.nrrd"), useCompression=True)
    assert check_untrusted_image(tmp_path / "l.seg.nrrd", "reference_labels_0", 10**5, labels=True).values == 11520
    with pytest.raises(InputError, match="^target: has 2 components per voxel"):
        check_untrusted_image(tmp_path / "l.seg.nrrd", "target", 10**5)
    with pytest.raises(InputError, match="over this server's limit of 10,000 per image"):
        check_untrusted_image(tmp_path / "l.seg.nrrd", "reference_labels_0", 10_000, labels=True)


def _nrrd(tmp_path, header: str, data: bytes = b"", name: str = "t.nrrd"):
    (tmp_path / name).write_bytes(f"NRRD0004\n{header}\n\n".encode() + data)
    return tmp_path / name


HEADER = "type: uint8\ndimension: 3\nsizes: 10 10 10\nencoding: raw"


@pytest.mark.parametrize("header, data, refusal", [
    (HEADER + "\nDATA FILE: /etc/passwd", b"", "names another file for its voxels (data file: '/etc/passwd')"),
    (HEADER + "\ndata_file: x", b"\0" * 1000, "failed to parse \"data_file\" as field identifier"),  # teem's refusal
    (HEADER + "\n Data\tFile := /etc/passwd", b"", "names another file"),
    (HEADER + "\ndata file: LIST", b"", "names another file"),
    (HEADER.replace("raw", "hex"), b"00" * 1000, "NRRD encoding 'hex'; save it as raw or gzip"),
    (HEADER.replace("uint8", "block") + "\nblock size: 4", b"\0" * 4000, "NRRD type 'block'"),
    (HEADER + "\nbyte skip: -1", b"\0" * 1000, "'byteskip: -1' is not supported"),
    (HEADER.replace("10 10 10", "10 10"), b"\0" * 100, "do not fit its dimension 3"),
    (HEADER.replace("10 10 10", "10 10 -10"), b"", "do not fit its dimension 3"),
    (HEADER, b"\0" * 999, "fewer voxel bytes than its header declares (1,000 = 10 x 10 x 10 x 1 bytes)"),
    (HEADER, b"\0" * 1001, "more voxel bytes than its header declares"),
    (HEADER.replace("raw", "gzip"), b"not gzip at all", "its compressed voxels are damaged"),
    (HEADER.replace("raw", "gzip"), gzip.compress(b"\0" * 1000), None),
    (HEADER.replace("raw", "gzip"), gzip.compress(b"\0" * 500) + gzip.compress(b"\0" * 500), None),  # two members
])
def test_nrrd_headers(tmp_path, header, data, refusal):
    path = _nrrd(tmp_path, header, data)
    if refusal is None:
        assert check_untrusted_image(path, "target", 10**6).values == 1000
        return
    with pytest.raises(InputError, match="^target: ") as err:
        check_untrusted_image(path, "target", 10**6)
    assert refusal in str(err.value) and str(tmp_path) not in str(err.value).replace("/etc/passwd", "")


def test_a_text_header_that_never_ends_or_lies_about_its_format(tmp_path):
    (tmp_path / "t.nrrd").write_bytes(b"NRRD0004\n" + b"# comment\n" * 200_000)
    with pytest.raises(InputError, match="its header is over 1 MiB"):
        check_untrusted_image(tmp_path / "t.nrrd", "target", 10**6)
    (tmp_path / "t.nrrd").write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n")
    with pytest.raises(InputError, match="no voxels follow its header"):
        check_untrusted_image(tmp_path / "t.nrrd", "target", 10**6)
    nii = tmp_path / "t.nii.gz"
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkUInt8), str(tmp_path / "x.nrrd"))
    nii.write_bytes((tmp_path / "x.nrrd").read_bytes())  # an NRRD named .nii.gz: never read as NRRD
    with pytest.raises(InputError, match="target: unreadable \\(not a gzip-compressed NIfTI"):
        check_untrusted_image(nii, "target", 10**6)
    (tmp_path / "m.mha").write_bytes(b"NDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\nBinaryData = True\n"
                                     b"ElementDataFile = LIST\n/etc/passwd\n")
    with pytest.raises(InputError, match="ElementDataFile = 'LIST'"):
        check_untrusted_image(tmp_path / "m.mha", "target", 10**6)
    (tmp_path / "m.mha").write_bytes(b"NDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\nBinaryData = False\n"
                                     b"ElementDataFile = LOCAL\n" + b"0 " * 64)
    with pytest.raises(InputError, match="its voxels are text"):
        check_untrusted_image(tmp_path / "m.mha", "target", 10**6)


def test_a_nifti_whose_voxels_start_past_1_mib_is_refused(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4))
    img.header.set_data_offset(2**21)
    nib.save(img, tmp_path / "far.nii")
    with pytest.raises(InputError, match="its voxels start at byte 2097152"):
        check_untrusted_image(tmp_path / "far.nii", "target", 10**6)


@pytest.mark.skipif(os.name == "nt", reason="Windows files have no POSIX mode (their ACLs are not checked)")
def test_a_token_file_others_may_read_is_warned_about(tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text("0123456789abcdef0123\n")
    os.chmod(path, 0o600)
    with caplog.at_level(logging.WARNING, "iris_core.service.server"):
        read_tokens(path)
    assert not caplog.records
    os.chmod(path, 0o644)
    with caplog.at_level(logging.WARNING, "iris_core.service.server"):
        assert read_tokens(path) == ["0123456789abcdef0123"]
    assert "readable by other users of this machine (mode -rw-r--r--)" in caplog.text and "chmod 600" in caplog.text
