"""Bias-field correction: N4 (Tustison et al. 2010) as SimpleITK implements it.

The field is fitted on a copy shrunk by ``SHRINK`` inside the head's Otsu foreground, then
evaluated at full resolution and divided out, the usual way to run N4 on whole heads quickly.
Intensities are kept positive (N4 works on the log image): the scan is shifted to start at 1 and
shifted back afterwards.
"""

from __future__ import annotations

import numpy as np

from neurofm.errors import ConfigError, ScanError
from neurofm.io.nifti import Scan

BIAS_METHODS = ("none", "n4")
SHRINK = 4
ITERATIONS = (50, 50, 30, 20)  # per fitting level (coarse to fine)


def correct_bias(scan: Scan, method: str = "n4") -> Scan:
    """The scan with its bias field removed (a new :class:`Scan`, same grid and path)."""
    if method == "none":
        return scan
    if method != "n4":
        raise ConfigError(f"bias correction should be one of {', '.join(BIAS_METHODS)}, got {method!r}")
    import SimpleITK as sitk

    data = np.nan_to_num(np.asarray(scan.data[0], np.float32))
    low = float(data.min())
    # SimpleITK's arrays are (Z, Y, X); the spacing is what the fit depends on, not the orientation
    img = sitk.GetImageFromArray(np.ascontiguousarray((data - low + 1.0).T))
    img.SetSpacing([float(s) for s in scan.spacing])
    try:
        mask = sitk.OtsuThreshold(img, 0, 1, 200)
        shrink = [max(1, min(SHRINK, s // 16)) for s in img.GetSize()]
        small, small_mask = sitk.Shrink(img, shrink), sitk.Shrink(mask, shrink)
        n4 = sitk.N4BiasFieldCorrectionImageFilter()
        n4.SetMaximumNumberOfIterations(list(ITERATIONS))
        n4.Execute(small, small_mask)
        log_field = n4.GetLogBiasFieldAsImage(img)
    except RuntimeError as e:  # ITK's exceptions arrive as RuntimeError
        raise ScanError(scan.path, f"N4 bias correction failed: {str(e).splitlines()[-1][:200]}") from None
    field = np.exp(sitk.GetArrayFromImage(log_field).T.astype(np.float32))
    corrected = (data - low + 1.0) / field + low - 1.0
    return Scan(corrected[None].astype(np.float32), scan.affine, scan.path)
