"""meddiff3d: 3D diffusion models for medical volumes, built on MONAI and shipped as MONAI bundles."""

__version__ = "0.1.0"
