"""Diffusion library: schedules, the denoiser interface and its adapters, pure samplers, wrappers (guidance,
conditioning, coordinates, sliding windows, inpainting, data consistency for inverse problems with their
measurement operators), inversion/SDEdit, structured noise, and the training objective."""

from .conditioning import AppendCoordinates, ConcatConditioning, CoordinateChannels, broadcast_channels
from .data_consistency import DataConsistency
from .denoisers import (
    PREDICTION_TYPES,
    EpsilonDenoiser,
    FlowDenoiser,
    GaussianDenoiser,
    GaussianMixtureDenoiser,
    VDenoiser,
    X0Denoiser,
    eps_from_x0,
    make_denoiser,
)
from .distillation import (
    DISTILLATION_SAMPLER,
    DistillationObjective,
    ddim_target,
    distillation_grid,
    distillation_spacing,
    truncated_snr_weight,
)
from .guidance import ClassifierFreeGuidance, null_conditioning
from .inpainting import Inpainting, sample_repaint
from .inversion import ddim_invert, noise_to, sdedit
from .measurements import Downsample, KSpaceSampling, MaskOperator, cartesian_mask, fft2c, ifft2c
from .noise import gaussian_noise, simplex_noise
from .objectives import DiffusionObjective, min_snr_weight, prediction_target
from .samplers import (
    SAMPLERS,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_euler,
    sample_heun,
    sample_unipc,
)
from .sampling import (
    FLOW_TIMESTEP_SPACING,
    MONAI_SPACING,
    TIMESTEP_SPACING,
    default_spacing,
    initial_noise,
    sample,
    sampling_timesteps,
)
from .schedules import FlowSchedule, NoiseSchedule, schedule_from_dict
from .sliding_window import SlidingWindowNetwork
from .tensor_utils import append_dims

__all__ = [
    "AppendCoordinates", "ConcatConditioning", "CoordinateChannels", "broadcast_channels",
    "PREDICTION_TYPES", "EpsilonDenoiser", "FlowDenoiser", "GaussianDenoiser", "GaussianMixtureDenoiser", "VDenoiser", "X0Denoiser",
    "eps_from_x0", "make_denoiser",
    "DISTILLATION_SAMPLER", "DistillationObjective", "ddim_target", "distillation_grid", "distillation_spacing",
    "truncated_snr_weight",
    "ClassifierFreeGuidance", "null_conditioning",
    "Inpainting", "sample_repaint",
    "DataConsistency", "Downsample", "KSpaceSampling", "MaskOperator", "cartesian_mask", "fft2c", "ifft2c",
    "ddim_invert", "noise_to", "sdedit",
    "gaussian_noise", "simplex_noise",
    "DiffusionObjective", "min_snr_weight", "prediction_target",
    "SAMPLERS", "get_sampler", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_euler", "sample_heun",
    "sample_dpmpp_3m", "sample_unipc",
    "FLOW_TIMESTEP_SPACING", "MONAI_SPACING", "TIMESTEP_SPACING", "default_spacing", "initial_noise", "sample",
    "sampling_timesteps",
    "FlowSchedule", "NoiseSchedule", "schedule_from_dict",
    "SlidingWindowNetwork",
    "append_dims",
]
