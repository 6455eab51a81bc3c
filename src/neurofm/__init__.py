"""neurofm: self-supervised foundation models for 3D multi-contrast brain MRI.

Tensor convention used throughout: a volume is ``(C, X, Y, Z)`` float32 with a 4x4 RAS
affine mapping voxel indices to world millimetres; a batch is ``(B, C, X, Y, Z)``.
"""

__version__ = "0.1.0"
