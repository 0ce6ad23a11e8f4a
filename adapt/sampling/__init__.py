"""Diffusion decoding. The implementation lives in `adapt/model/sampling_masked_diffusion.py` because it ships
inside every checkpoint as remote code; this module is its public name in the package."""

from ..model.sampling_masked_diffusion import (  # noqa: F401
    KV_CACHES,
    REMASKING,
    SCHEDULES,
    SCORES,
    Denoiser,
    FunctionDenoiser,
    SamplingError,
    SamplingOutput,
    check_sampling_options,
    commit_schedule,
    diffusion_sample,
)
