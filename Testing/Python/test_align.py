"""Issue [20]: the affine alignment of a reference to a target, and the position-aware memory readout that
uses it; issue [21]: one memory sample (and one attention) shared by every class of a reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import dice, phantom
from iris_core.api import segment
from iris_core.hub.checkpoint import LoadedModel, preset_model, save_checkpoint
from iris_core.io.resample import resample_to
from iris_core.models import build_model
from iris_core.models.config import PRESETS
from iris_core.models.iris import box_max, grouped_readout, sample_memory
from iris_core.pipeline.align import Alignment, AlignmentError, align_affine
from iris_core.pipeline.embedding import POSITION_COLUMNS, TaskEmbedding, memory_groups
from iris_core.resources import SAMPLE_DATA
from iris_core.types import ClassSpec, Reference


def warped_labels(labels: sitk.Image, target: sitk.Image, al: Alignment) -> np.ndarray:
    """Reference labels brought onto the target grid through an alignment (reference -> target map), written
    out here from the matrix (not through the code's own inverse)."""
    inv = np.linalg.inv(al.matrix)
    tr = sitk.AffineTransform(3)
    tr.SetMatrix(inv.ravel().tolist())
    tr.SetTranslation((-inv @ al.offset).tolist())
    return sitk.GetArrayFromImage(sitk.Resample(labels, target, tr, sitk.sitkNearestNeighbor, 0))


@pytest.fixture(scope="module")
def sample_pair():
    from iris_core.io.imaging import read_image, read_labels

    ref = read_image(SAMPLE_DATA / "Colin27.nrrd")
    tgt = read_image(SAMPLE_DATA / "ICBM2009a-moved.nrrd")
    return (ref, read_labels(SAMPLE_DATA / "Colin27.seg.nrrd", ref, "Colin27"),
            tgt, read_labels(SAMPLE_DATA / "ICBM2009a-moved.seg.nrrd", tgt, "ICBM2009a-moved"))


def test_alignment_of_the_shipped_sample_pair_recovers_the_move(sample_pair):
    """The target was moved off MNI space (rotation, 20-40 mm): identity resampling of the reference's brain
    scores ~0.73, the affine alignment brings it over 0.93, the same matrix on every run."""
    ref, ref_lab, tgt, tgt_lab = sample_pair
    truth = sitk.GetArrayFromImage(tgt_lab) > 0
    identity = sitk.GetArrayFromImage(resample_to(ref_lab, tgt, sitk.sitkNearestNeighbor, 0)) > 0
    first = align_affine(tgt, ref)
    again = align_affine(tgt, ref)
    aligned = warped_labels(ref_lab, tgt, first) > 0
    assert dice(identity, truth) < 0.8
    assert dice(aligned, truth) > 0.93
    np.testing.assert_array_equal(first.matrix, again.matrix)
    np.testing.assert_array_equal(first.offset, again.offset)
    report = first.report()
    assert report["seconds"] > 0 and len(report["matrix"]) == 3 and 1.0 <= report["grid_mm"] <= 4.0
    # evaluate's deterministic affine baseline ('align') is this alignment's label map, on the target grid
    from iris_core.commands.evaluate import parse_method
    from iris_core.commands.registration import register_labels

    baseline = register_labels(parse_method("align"), tgt, ref, ref_lab)
    assert baseline.GetSize() == tgt.GetSize() and baseline.GetOrigin() == tgt.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(baseline) > 0, aligned)


def test_alignment_maps_points_as_the_inverse_of_a_known_move():
    """A phantom and a copy of it shifted by (12, -8, 5) mm: reference points land 12, -8, 5 mm away."""
    ref, _ = phantom(size=(64, 64, 48), spacing=(1.5, 1.5, 2.0), seed=3, radius_mm=25.0)
    moved = sitk.Image(ref)
    moved.SetOrigin(tuple(np.array(ref.GetOrigin()) + [12.0, -8.0, 5.0]))
    al = align_affine(moved, ref)
    centre = np.array(ref.TransformContinuousIndexToPhysicalPoint([31.5, 31.5, 23.5]))
    np.testing.assert_allclose(al.apply(centre[None])[0] - centre, [12.0, -8.0, 5.0], atol=1.0)


def test_alignment_refuses_what_it_cannot_align():
    """An image holding one value everywhere has no foreground to register: a clear AlignmentError."""
    flat = sitk.Image([32, 32, 32], sitk.sitkFloat32) + 5.0
    img, _ = phantom()
    with pytest.raises(AlignmentError, match="registration failed|empty|implausible"):
        align_affine(img, flat)
    rgb = sitk.Compose([img, img, img])
    with pytest.raises(AlignmentError, match="multi-component"):
        align_affine(img, rgb)


def position_model(sigma: float = 3.0):
    cfg = dataclasses.replace(PRESETS["iris-tiny"].config, memory_positions=True, position_sigma_mm=sigma)
    torch.manual_seed(0)
    return build_model("iris", cfg).eval()


def twin_blobs():
    """A volume with two identical bright blobs (same features), the mask on the left one only, and each
    voxel's position (mm, 4 mm voxels)."""
    img = torch.zeros(1, 1, 32, 32, 32)
    img[..., 12:20, 12:20, 4:12] = 1.0
    img[..., 12:20, 12:20, 20:28] = 1.0
    img = img + 0.05 * torch.randn(img.shape, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 32, 32, 32)
    mask[..., 12:20, 12:20, 4:12] = 1.0
    zyx = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"))
    pos = (zyx.flip(0) * 4.0)[None]  # x, y, z mm
    return img, mask, pos


def test_position_readout_tells_twin_structures_apart():
    """Two blobs with the same features, the reference mask on one: by features alone the readout finds both;
    with the positions of an aligned reference it finds only the one the reference shows (non-local label
    fusion)."""
    net = position_model()
    img, mask, pos = twin_blobs()
    with torch.inference_mode():
        tokens = net.encode_task(torch.cat([img, pos], 1), mask)
        feats = net.encoder(img)
        half = torch.nn.functional.avg_pool3d(pos, 2)
        blind = net.memory_readout(feats, tokens[-1])[0, 0]
        placed = net.memory_readout(feats, tokens[-1], half)[0, 0]
    assert float(blind[12:20, 12:20, 20:28].mean()) > 0.25  # features alone: the twin reads mask too
    assert float(placed[12:20, 12:20, 4:12].mean()) > 0.9
    assert float(placed[12:20, 12:20, 20:28].mean()) < 0.01


def test_unknown_positions_read_by_features_with_finite_gradients():
    """A batch mixing an aligned and an unaligned reference (NaN positions): the unaligned item reads as the
    blind readout does, and training gets finite gradients (NaN never reaches the backward pass)."""
    net = position_model()
    net.train()
    img, mask, pos = twin_blobs()
    ref = torch.cat([torch.cat([img, pos], 1), torch.cat([img, torch.full_like(pos, float("nan"))], 1)])
    out = net(torch.cat([torch.cat([img, pos], 1)] * 2), ref, torch.cat([mask, mask]))
    out.mean().backward()
    assert bool(torch.isfinite(out).all())
    assert all(bool(torch.isfinite(p.grad).all()) for p in net.parameters() if p.grad is not None)
    assert float(net.memory_log_sigma.grad.abs()) > 0


def test_one_memory_sample_serves_every_class():
    """The K classes of one reference share their memory rows (keys, positions, weights): only the values
    differ, memory_groups finds one group, and one class alone gets the same rows as inside the group."""
    keys = torch.nn.functional.normalize(torch.randn(1, 8, 12, 12, 12), dim=1)
    masks = torch.zeros(1, 3, 12, 12, 12)
    masks[0, 0, 2:5, 2:5, 2:5] = 1
    masks[0, 1, 6:10, 6:10, 6:10] = 1
    masks[0, 2, 1:3, 8:11, 3:9] = 1
    mem = sample_memory(keys, masks, 600)[0]
    assert mem.shape == (3, 600, 8 + 1 + 1)
    for k in (1, 2):
        torch.testing.assert_close(mem[k][:, :8], mem[0][:, :8])
        torch.testing.assert_close(mem[k][:, -1], mem[0][:, -1])
    assert not torch.equal(mem[0][:, 8], mem[1][:, 8])
    assert memory_groups(mem, slice(8, 9)) == [[0, 1, 2]]
    other = sample_memory(keys.flip(2), masks[:, :1], 600)[0]
    assert memory_groups(torch.cat([mem, other]), slice(8, 9)) == [[0, 1, 2], [3]]


def test_joint_readout_equals_one_class_at_a_time_on_shared_rows():
    """One attention for K classes gives each class what a call with that class alone gives on the same rows."""
    net = preset_model("iris-tiny").model
    torch.manual_seed(0)
    ref = torch.randn(1, 1, 32, 32, 32)
    masks = (torch.rand(1, 3, 32, 32, 32) > 0.6).float()
    with torch.inference_mode():
        memory = net.encode_task(ref, masks)[-1]
        feats = net.encoder(torch.randn(1, 1, 32, 32, 32))
        joint = net.memory_readout(feats, memory)
        single = torch.cat([net.memory_readout(feats, memory[:, k : k + 1]) for k in range(3)], 1)
    torch.testing.assert_close(joint, single, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("radius", [1, 3])
def test_box_max_is_max_pooling(radius):
    """The separable box maximum (reference shells, the memory's near stratum) is max_pool3d's, on soft masks
    touching every face of an odd-shaped grid."""
    x = torch.rand(2, 3, 11, 9, 7, generator=torch.Generator().manual_seed(radius))
    x[x < 0.6] = 0
    assert torch.equal(box_max(x, radius), torch.nn.functional.max_pool3d(x, 2 * radius + 1, 1, radius))


def test_grouped_readout_is_the_softmax_over_every_row():
    """The readout by groups of rows (one fused attention per class group, issue [21]) is the plain softmax over
    all rows: rows in no mask, rows on a border between two classes, padding rows that weigh nothing."""
    g = torch.Generator().manual_seed(3)
    n, m, w, k, nv = 300, 90, 12, 4, 8
    query = torch.randn(n, w, generator=g) * 3
    keys = torch.randn(m, w, generator=g)
    logw = torch.randn(m, generator=g)
    logw[80:] = -1e4  # padding
    values = torch.zeros(k, m, nv)
    for c in range(k):  # rows 20c..20c+20 carry class c; each block's last rows share a border with the next class
        values[c, 20 * c : 20 * c + 20] = torch.rand(20, nv, generator=g)
        if c + 1 < k:
            values[c + 1, 20 * c + 17 : 20 * c + 20] = torch.rand(3, nv, generator=g)
    # rows 80..89: background / padding
    attn = torch.softmax(query @ keys.T + logw, dim=-1)
    expected = torch.einsum("nm,kmv->nkv", attn, values).reshape(n, k * nv)
    torch.testing.assert_close(grouped_readout(query, keys, logw, values), expected, atol=1e-5, rtol=1e-4)


def test_many_class_readout_by_groups_equals_one_attention_with_positions():
    """Twelve adjacent parcels and an aligned reference (position term): the inference readout (by groups)
    gives what the training formulation (one attention, every class's values side by side) gives, batch of two."""
    net = position_model()
    img, _, pos = twin_blobs()
    zz = torch.arange(32)[:, None, None].expand(32, 32, 32)
    yy = torch.arange(32)[None, :, None].expand(32, 32, 32)
    parcels = torch.stack([((zz // 8 == i % 4) & (yy // 11 == i // 4) & (yy < 30)).float() for i in range(12)])[None]
    with torch.no_grad():
        tokens = net.encode_task(torch.cat([img, pos], 1), parcels)
        feats = [torch.cat([f, f.flip(-1)]) for f in net.encoder(img)]
        half = torch.nn.functional.avg_pool3d(torch.cat([pos, pos]), 2)
        by_groups = net.memory_readout(feats, tokens[-1], half)
        with torch.enable_grad():  # training's path: one attention
            joint = net.memory_readout(feats, tokens[-1], half).detach()
    assert by_groups.shape == (2, 12, 32, 32, 32)
    torch.testing.assert_close(by_groups, joint, atol=1e-5, rtol=1e-4)
    assert float(by_groups[0].sum(0).max()) < 1.0 + 1e-4  # shares of one softmax


def aligning(model: LoadedModel) -> LoadedModel:
    cfg = dataclasses.replace(model.config, memory_positions=True, position_sigma_mm=4.0)
    net = build_model("iris", cfg).eval()
    net.load_state_dict(model.model.state_dict(), strict=False)
    return dataclasses.replace(model, model=net, config=cfg,
                               preprocessing=dataclasses.replace(model.preprocessing, align="affine"))


def test_pipeline_aligns_each_reference_and_reports_it(tmp_path, phantom_files):
    """A model whose policy aligns: the sidecar records each reference's alignment and its seconds; the model
    file keeps the policy and the position readout through a save and a load."""
    model = aligning(preset_model("iris-tiny"))
    path = save_checkpoint(tmp_path / "m.safetensors", model.model, model.preprocessing, info={"name": "pos"})
    from iris_core.hub.checkpoint import load_checkpoint

    loaded = load_checkpoint(path)
    assert loaded.preprocessing.align == "affine" and loaded.config.memory_positions
    res = segment(str(phantom_files["tgt"]), [(str(phantom_files["ref"]), str(phantom_files["ref_lab"]))],
                  model=loaded, device="cpu")
    report = res.sidecar["details"]["alignment"]["ref.nii.gz"]
    assert len(report["matrix"]) == 3 and report["seconds"] > 0
    assert res.sidecar["timings_s"]["align"] > 0


def test_a_reference_that_cannot_be_aligned_is_segmented_unaligned_and_said(tmp_path, phantom_files, caplog):
    """A reference image that cannot be registered (noise and one bright voxel: its foreground is that voxel,
    no sample of the target lands in it): the run still ends, by features alone, with a warning naming the
    reference and the failure in the sidecar."""
    model = aligning(preset_model("iris-tiny"))
    img, lab = phantom(seed=5)
    arr = np.random.default_rng(0).normal(0, 1, sitk.GetArrayFromImage(img).shape).astype(np.float32)
    arr[0, 0, 0] = 1000.0
    flat = sitk.GetImageFromArray(arr)
    flat.CopyInformation(img)
    target, _ = phantom(seed=6)
    with caplog.at_level("WARNING"):
        res = segment(target, [Reference(flat, lab, "flat-ref")], [ClassSpec("ball", 1)], model=model, device="cpu")
    assert "failed" in res.sidecar["details"]["alignment"]["flat-ref"]
    assert "flat-ref could not be aligned" in caplog.text


def test_embedding_positions_are_mapped_or_made_unknown():
    """TaskEmbedding.with_positions maps the memory rows' positions (and nothing else), or marks them unknown."""
    net = position_model()
    img, mask, pos = twin_blobs()
    with torch.inference_mode():
        tokens = net.encode_task(torch.cat([img, pos], 1), mask)
    emb = TaskEmbedding([t[0] for t in tokens], ["blob"], [1])
    assert emb.has_positions()
    shifted = emb.with_positions(lambda p: p + np.array([10.0, 0.0, -3.0]))
    before, after = emb.tokens[-1], shifted.tokens[-1]
    torch.testing.assert_close(after[..., POSITION_COLUMNS] - before[..., POSITION_COLUMNS],
                               torch.tensor([10.0, 0.0, -3.0]).expand_as(before[..., POSITION_COLUMNS]))
    torch.testing.assert_close(after[..., :-4], before[..., :-4])
    assert not emb.with_positions(None).has_positions()


def test_each_further_target_is_aligned_to_itself(tmp_path, phantom_files):
    """Issue [22]: `segment --target A B` with a model that aligns each reference to its target: B reuses the
    references as encoded (encoded once) and is aligned to B itself (its sidecar reports its own alignment), so its
    labels are voxel for voxel those of segmenting B alone. Before, B reused the embedding computed for A, its
    memory positions mapped into A's space."""
    import json
    import shutil

    from iris_core.commands.cli import main

    model = aligning(preset_model("iris-tiny"))
    path = save_checkpoint(tmp_path / "m.safetensors", model.model, model.preprocessing, info={"name": "pos"})
    moved = sitk.ReadImage(str(phantom_files["ref"]))  # B: the reference image itself, 15 mm away
    moved.SetOrigin(tuple(np.array(moved.GetOrigin()) + [15.0, -10.0, 6.0]))
    (tmp_path / "b").mkdir()
    sitk.WriteImage(moved, str(tmp_path / "b" / "moved.nii.gz"))
    shutil.copy(phantom_files["tgt"], tmp_path / "b" / "first.nii.gz")
    base = ["segment", "--model", str(path), "--device", "cpu", "--quiet", "--reference", str(phantom_files["ref"]),
            str(phantom_files["ref_lab"])]
    assert main([*base, "--target", str(tmp_path / "b" / "first.nii.gz"), str(tmp_path / "b" / "moved.nii.gz"),
                 "--output", str(tmp_path / "segs")]) == 0
    assert main([*base, "--target", str(tmp_path / "b" / "moved.nii.gz"), "--output", str(tmp_path / "alone.nii.gz")]) == 0
    side = json.loads((tmp_path / "segs" / "moved_seg.json").read_text())
    offset = side["details"]["alignment"]["ref.nii.gz"]["offset_mm"]
    np.testing.assert_allclose(offset, [15.0, -10.0, 6.0], atol=2.0)
    together = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "segs" / "moved_seg.nii.gz")))
    alone = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "alone.nii.gz")))
    assert together.any() and np.array_equal(together, alone)


def test_aligned_label_prior_takes_the_labels_where_the_images_agree(sample_pair):
    """Issue [20]'s prior on the shipped pair with an untrained network (its own answer is noise): with a large
    weight the labels are the aligned reference's wherever the images agree; with weight 0 the network's own.
    The sidecar records the weight and the prior's seconds."""
    ref, ref_lab, tgt, tgt_lab = sample_pair
    base = aligning(preset_model("iris-tiny"))
    aligned = sitk.GetArrayFromImage(align_affine(tgt, ref).warp_labels(ref_lab, tgt)) > 0
    truth = sitk.GetArrayFromImage(tgt_lab) > 0
    got = {}
    for weight in (0.0, 1000.0):
        model = dataclasses.replace(base, preprocessing=dataclasses.replace(base.preprocessing, prior_weight=weight))
        res = segment(tgt, [Reference(ref, ref_lab, "Colin27")], [ClassSpec("brain", 1)], model=model, device="cpu")
        got[weight] = sitk.GetArrayFromImage(res.labels) > 0
        assert res.sidecar["prior_weight"] == weight and res.sidecar["align"] == "affine"
        assert ("prior" in res.sidecar["timings_s"]) == (weight > 0)
    # measured: weight 0: 0.826 with the aligned labels (0.829 with the truth); weight 1000: 0.929 (0.899)
    assert dice(got[1000.0], aligned) > 0.9 and dice(got[1000.0], aligned) > dice(got[0.0], aligned) + 0.05
    assert dice(got[1000.0], truth) > 0.85


def test_nearest_prior_labels_are_the_aligned_label_map(sample_pair):
    """prior_labels 'nearest': the prior's shares are the label map the alignment alone gives (0 or 1), where
    'linear' interpolates each label's indicator; with a large weight the pipeline's labels are that map wherever
    the images agree, and the sidecar says which labels the prior used."""
    from iris_core.pipeline.prior import AlignedPrior

    ref, ref_lab, tgt, _ = sample_pair
    alignment = align_affine(tgt, ref)
    warped = sitk.GetArrayFromImage(alignment.warp_labels(ref_lab, tgt))
    nearest = AlignedPrior(tgt, ref, ref_lab, alignment, nearest=True)
    np.testing.assert_array_equal(nearest.share(1), (warped == 1).astype(np.float32))
    linear = AlignedPrior(tgt, ref, ref_lab, alignment).share(1)
    assert ((linear > 0.01) & (linear < 0.99)).sum() > 1000  # a border of fractions
    base = aligning(preset_model("iris-tiny"))
    model = dataclasses.replace(base, preprocessing=dataclasses.replace(
        base.preprocessing, prior_weight=1000.0, prior_power=2.0, prior_labels="nearest"))
    res = segment(tgt, [Reference(ref, ref_lab, "Colin27")], [ClassSpec("brain", 1)], model=model, device="cpu")
    assert (res.sidecar["prior_labels"], res.sidecar["prior_power"]) == ("nearest", 2.0)
    agree = nearest.agreement > 0.2
    got = sitk.GetArrayFromImage(res.labels)
    assert float(((got > 0) == (warped == 1))[agree].mean()) > 0.999


def test_prior_fusion_and_local_agreement():
    """fuse leaves probabilities alone at weight 0 or where the agreement is 0, pulls them to the aligned labels
    where it is 1; an image agrees with itself (1) and not with its negative (0)."""
    from iris_core.pipeline.prior import AlignedPrior, fuse, local_agreement

    img, lab = phantom(seed=3)
    agree = local_agreement(img, img)
    inside = sitk.GetArrayFromImage(lab) > 0
    sure = agree > 0.99  # wherever the window sees any contrast; 0 where the image is flat (no evidence)
    assert np.all(sure | (agree == 0)) and sure[inside].mean() > 0.3 and sure[~inside].mean() > 0.05
    assert local_agreement(img, sitk.Cast(img, sitk.sitkFloat32) * -1.0).max() < 1e-3
    prior = AlignedPrior(img, img, lab, Alignment.identity())
    p = np.full(inside.shape, 0.5, np.float32)
    np.testing.assert_array_equal(fuse(p, [prior], 1, 0.0), p)
    np.testing.assert_array_equal(fuse(p, [], 1, 5.0), p)
    fused = fuse(p, [prior], 1, 5.0)
    share = prior.share(1)
    assert fused[sure & (share > 0.99)].min() > 0.99 and fused[sure & (share < 0.01)].max() < 0.01
    np.testing.assert_allclose(fused[~sure], 0.5, atol=1e-6)
    prior.agreement = np.zeros_like(prior.agreement)
    np.testing.assert_allclose(fuse(p, [prior], 1, 5.0), p, atol=1e-6)


def test_prior_power_keeps_the_weight_where_the_images_match_and_drops_it_where_they_only_resemble():
    """w * s**p: at agreement 1 the power changes nothing, at 0.5 a power of 4 leaves an eighth of the pull of
    p = 1 (the logit moves by w / 16 instead of w / 2); the policy refuses a power <= 0."""
    from iris_core.errors import ConfigError
    from iris_core.pipeline.policy import Preprocessing
    from iris_core.pipeline.prior import AlignedPrior, fuse

    img, lab = phantom(seed=3)
    prior = AlignedPrior(img, img, lab, Alignment.identity())
    share = prior.share(1)
    prior.agreement = np.where(np.arange(share.size).reshape(share.shape) % 2 == 0, 1.0, 0.5).astype(np.float32)
    p = np.full(share.shape, 0.5, np.float32)
    inside, full = share > 0.99, prior.agreement == 1.0

    def logit(x):
        return np.log(x) - np.log1p(-x)

    one, four = fuse(p, [prior], 1, 8.0), fuse(p, [prior], 1, 8.0, power=4)
    np.testing.assert_allclose(four[inside & full], one[inside & full])
    np.testing.assert_allclose(logit(one[inside & ~full]), 4.0, rtol=1e-4)
    np.testing.assert_allclose(logit(four[inside & ~full]), 0.5, rtol=1e-4)
    with pytest.raises(ConfigError, match="prior_power"):
        Preprocessing(align="affine", prior_weight=10, prior_power=0)
