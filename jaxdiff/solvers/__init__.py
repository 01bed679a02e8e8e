"""Fast samplers: DPM-Solver(++), UniPC, Euler (ancestral), Heun and PLMS, each one ``lax.scan``.

Each sampler reproduces one diffusers 0.42.1 scheduler (its timestep rules included) as a pure
function of ``(eps_fn, schedule, x_T, key)``:

* ``dpm_solver_sample``: ``DPMSolverMultistepScheduler``; DPM-Solver (Lu et al. 2022,
  arXiv:2206.00927) and DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095).
* ``unipc_sample``: ``UniPCMultistepScheduler``; UniPC (Zhao et al. 2023, arXiv:2302.04867).
* ``euler_sample``: ``EulerDiscreteScheduler`` and ``EulerAncestralDiscreteScheduler``; the Euler
  step of Karras et al. 2022 ("EDM", arXiv:2206.00364), deterministic or ancestral.
* ``heun_sample``: ``HeunDiscreteScheduler``; Karras et al. 2022, Alg. 1.
* ``pndm_sample``: ``PNDMScheduler(skip_prk_steps=True)``; PLMS of PNDM (Liu et al. 2022,
  arXiv:2202.09778).

Conventions shared by every sampler here:

* ``x_T`` is unit-variance noise; the sampler applies its own initial scale. ``eps_fn(x, t)``
  always receives the variance-preserving (VP) state ``x = sqrt(abar) x0 + sqrt(1 - abar) eps``
  (what a network trained with :func:`jaxdiff.schedules.add_noise` expects) and ``t`` as an array
  ``[B]``: int32 for DPM-Solver, UniPC and PLMS, float32 for Euler and Heun, whose timesteps are
  fractional. Its output is read as ``prediction_type`` (``"epsilon"``, ``"sample"``,
  ``"v_prediction"``).
* Noise levels are written as in the papers, with ``sigma = sqrt((1 - abar) / abar)`` (the
  "variance-exploding" noise level of Karras et al.), ``alpha = 1 / sqrt(1 + sigma^2) = sqrt(abar)``,
  ``s = sigma alpha = sqrt(1 - abar)`` and the log-SNR ``lambda = log(alpha / s) = -log(sigma)``.
  The VP state relates to Karras et al.'s ``x_sigma = x0 + sigma eps`` by ``x = alpha x_sigma``.
* The sampler is one ``jax.lax.scan`` with one model evaluation per iteration, so ``eps_fn`` is
  traced once whatever ``num_steps`` is. The timestep and noise-level tables, and every
  coefficient of the updates, are computed before the loop in float64 NumPy (the schedule must
  therefore be concrete: close over it rather than passing it through ``jax.jit`` as an argument);
  the loop only forms linear combinations of the state, the model outputs and the noise.
* Stochastic samplers (``algorithm_type="sde-dpmsolver++"``, ``euler_sample(ancestral=True)``)
  draw the noise of step ``i`` from ``jax.random.fold_in(key, i)`` for the whole batch, so the
  same key gives the same images on any device count. Deterministic samplers ignore ``key``
  (it is still required, as for ``ddim_sample``).
* ``return_trajectory=True`` returns ``(x_0, trajectory)`` with ``trajectory`` of shape
  ``[num_steps + 1, B, ...]``: ``trajectory[0]`` is the initial state and ``trajectory[i]`` the
  state after step ``i``, all as VP states (comparable across samplers); ``trajectory[-1] == x_0``.

The package's modules: ``_tables`` (timestep and noise-level tables, :func:`karras_sigmas`),
``_loop`` (the shared plan and its ``lax.scan``), ``dpm``, ``unipc``, ``karras`` (Euler, Heun)
and ``pndm``; import the samplers from here (or from :mod:`jaxdiff.samplers`).

Example::

    >>> s = schedules.linear(1000)
    >>> sample = jax.jit(lambda p, x, k: dpm_solver_sample(lambda x, t: net.apply(p, x, t), s, x, k,
    ...                                                      num_steps=20))
    >>> x0 = sample(params, jax.random.normal(k0, (8, 32, 32, 3)), jax.random.key(1))
"""

from jaxdiff.solvers._tables import FINAL_SIGMAS_TYPES, KARRAS_RHO, SOLVER_ORDERS, karras_sigmas, solver_timesteps
from jaxdiff.solvers.dpm import DPM_ALGORITHM_TYPES, DPM_SOLVER_TYPES, dpm_solver_sample
from jaxdiff.solvers.karras import euler_sample, heun_sample
from jaxdiff.solvers.pndm import pndm_sample
from jaxdiff.solvers.unipc import UNIPC_SOLVER_TYPES, unipc_sample

__all__ = [
    "DPM_ALGORITHM_TYPES",
    "DPM_SOLVER_TYPES",
    "FINAL_SIGMAS_TYPES",
    "KARRAS_RHO",
    "SOLVER_ORDERS",
    "UNIPC_SOLVER_TYPES",
    "dpm_solver_sample",
    "euler_sample",
    "heun_sample",
    "karras_sigmas",
    "pndm_sample",
    "solver_timesteps",
    "unipc_sample",
]
