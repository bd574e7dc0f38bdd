"""The registration baselines of ``evaluate`` and the demo: the reference registered to the target (antspyx, or
itk-elastix) and its labels warped with it."""

from __future__ import annotations

import os
import tempfile

import SimpleITK as sitk

from iris_core.errors import InputError
from iris_core.io.resample import resample_to


def register_labels(method, target: sitk.Image, ref: sitk.Image, ref_labels: sitk.Image) -> sitk.Image:
    """Register the reference image to the target and warp its labels (generic-label interpolation); method
    ``align``: the pipeline's own deterministic affine alignment (iris_core.pipeline.align), labels nearest
    neighbour."""
    if method.kind == "align":
        from iris_core.pipeline.align import AlignmentError, align_affine

        try:
            return align_affine(target, ref).warp_labels(ref_labels, target)
        except AlignmentError as exc:
            raise RuntimeError(f"alignment failed: {exc}") from exc  # evaluate reports it per case, as ANTs'
    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for name, img in (("fixed", target), ("moving", ref), ("labels", ref_labels)):
            paths[name] = os.path.join(d, f"{name}.nii.gz")
            sitk.WriteImage(sitk.Cast(img, sitk.sitkFloat32) if name != "labels" else img, paths[name])
        if method.kind == "ants":
            try:
                import ants
            except ImportError:
                raise InputError("method ants needs antspyx: pip install antspyx") from None
            fixed, moving = ants.image_read(paths["fixed"]), ants.image_read(paths["moving"])
            # ANTs samples its metric at random: pass a fixed --random-seed (without the package's
            # "deterministic" mode, which would also force one thread and reseed numpy globally)
            ants.config.set_ants_deterministic(on=False, seed_value=0)
            # outprefix inside our temporary folder: by default antspyx writes its transforms (a SyN warp
            # field is tens of MB) to tempfile.mktemp() names in the system temp folder and never deletes
            # them (ants/registration/registration.py: `if outprefix == "": outprefix = mktemp()`)
            reg = ants.registration(fixed=fixed, moving=moving, type_of_transform=method.option or "SyN",
                                    outprefix=os.path.join(d, "ants_"))
            warped = ants.apply_transforms(fixed=fixed, moving=ants.image_read(paths["labels"]),
                                           transformlist=reg["fwdtransforms"], interpolator="genericLabel")
            out_path = os.path.join(d, "warped.nii.gz")
            ants.image_write(warped, out_path)
            out = sitk.ReadImage(out_path)
        else:
            try:
                import itk
            except ImportError:
                raise InputError("method elastix needs itk-elastix: pip install itk-elastix") from None
            fixed = itk.imread(paths["fixed"], itk.F)
            moving = itk.imread(paths["moving"], itk.F)
            params = itk.ParameterObject.New()
            params.AddParameterMap(params.GetDefaultParameterMap("affine"))
            params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
            _, tparams = itk.elastix_registration_method(fixed, moving, parameter_object=params,
                                                         log_to_console=False)
            for i in range(tparams.GetNumberOfParameterMaps()):
                tparams.SetParameter(i, "FinalBSplineInterpolationOrder", "0")
            lab = itk.imread(paths["labels"], itk.F)
            warped = itk.transformix_filter(lab, tparams)
            out_path = os.path.join(d, "warped.nii.gz")
            itk.imwrite(warped, out_path)
            out = sitk.ReadImage(out_path)
    out = sitk.Cast(sitk.Round(sitk.Cast(out, sitk.sitkFloat32)), sitk.sitkInt32)
    out = resample_to(out, target, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)  # exact target grid
    return out
