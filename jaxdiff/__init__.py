"""jaxdiff: a pure-functional JAX library for denoising diffusion models.

Maths (``schedules``, ``samplers``, ``guidance``) are plain functions of arrays; networks live in
``models``; ``train_and_evaluate`` trains from a config; ``make_sampler`` / ``load_sampler`` give
``sample(params, key) -> images``.

Example::

    import jax, jaxdiff
    sample, params = jaxdiff.load_sampler("runs/digits", num_images=64, num_steps=50)
    images = sample(params, jax.random.key(0))    # float32 [64, 16, 16, 1] in [0, 1]
"""

from jaxdiff import guidance, models, samplers, schedules
from jaxdiff.sampling import load_params, load_sampler, make_sampler
from jaxdiff.train import train_and_evaluate

__version__ = "0.1.0"

__all__ = [
    "guidance",
    "load_params",
    "load_sampler",
    "make_sampler",
    "models",
    "samplers",
    "schedules",
    "train_and_evaluate",
]
