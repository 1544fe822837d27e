"""difflab: denoising diffusion models — exact maths, every well-known sampler, training,
fine-tuning and evaluation.  docs/design.md is the map of modules."""

from .diffusion import posterior, q_sample, q_step_sample
from .parametrization import Denoiser
from .schedules import NoiseLevels, NoiseSchedule

__version__ = "0.1.0"

__all__ = [
    "Denoiser",
    "NoiseLevels",
    "NoiseSchedule",
    "__version__",
    "posterior",
    "q_sample",
    "q_step_sample",
]
