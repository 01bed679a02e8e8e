"""Euler, Euler ancestral and Heun: the samplers of Karras et al. 2022 ("EDM", arXiv:2206.00364).

As diffusers' ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler`` and
``HeunDiscreteScheduler``. They step in Karras et al.'s units ``x_sigma = x / alpha`` between
fractional timesteps; the plans here write each step in the VP units of :mod:`jaxdiff.solvers`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np

from jaxdiff import schedules as schedules_lib
from jaxdiff.schedules import Schedule
from jaxdiff.solvers._loop import EpsFn, Plan, alpha_s_lambda, conversion, empty_plan, run_plan
from jaxdiff.solvers._tables import check_options, discrete_table, schedule_sigmas


def _initial_scale(sigmas: np.ndarray, spacing: str) -> float:
    """diffusers' ``init_noise_sigma`` for Euler/Heun, divided back to VP units.

    diffusers starts from ``x_T * sigma_max`` ("linspace", "trailing") or
    ``x_T * sqrt(sigma_max^2 + 1)`` ("leading") in Karras units; the VP state is that divided
    by ``sqrt(sigma_0^2 + 1)``: ``x_T sigma_0 / sqrt(1 + sigma_0^2)`` (slightly below unit
    variance) or exactly ``x_T``.
    """
    sigma_max = float(np.max(sigmas))
    init = sigma_max if spacing in ("linspace", "trailing") else math.sqrt(sigma_max**2 + 1)
    return init / math.sqrt(float(sigmas[0]) ** 2 + 1)


def _karras_target(prediction_type: str) -> str:
    """What the Euler/Heun loop stores: the model's own quantity, so no conversion amplifies it.

    An epsilon model's output is the ODE's derivative ``d = (x_sigma - D) / sigma`` itself, and the
    step ``x_sigma + dt eps`` has O(1) coefficients; converting it to ``D = x_sigma - sigma eps``
    would multiply its float32 rounding by ``sigma`` (up to 2e4 with the cosine schedule). For
    "sample" and "v_prediction" models the converse holds, so they store ``D``.
    """
    return "eps" if prediction_type == "epsilon" else "x0"


def _karras_euler(
    alpha: np.ndarray, sigma: np.ndarray, i: int, sigma_to: float, target: str
) -> tuple[float, float]:
    """``(A, C)`` with ``x' = A x + C m`` for the Euler step from ``sigma_i`` to ``sigma_to``, in VP units.

    ``x_sigma' = x_sigma + (sigma_to - sigma_i) d``; with ``x = alpha x_sigma`` (``alpha'`` that of
    ``sigma_{i+1}``) and ``d = eps`` or ``d = (x_sigma - D) / sigma_i``::

        eps:  x' = alpha'/alpha_i x + alpha' (sigma_to - sigma_i) eps
        x0:   x' = alpha' sigma_to / (alpha_i sigma_i) x + alpha' (1 - sigma_to / sigma_i) D
    """
    a_next = alpha[i + 1]
    if target == "eps":
        return a_next / alpha[i], a_next * (sigma_to - sigma[i])
    return a_next * sigma_to / (alpha[i] * sigma[i]), a_next * (1.0 - sigma_to / sigma[i])


class _Levels(NamedTuple):
    """What Euler and Heun step through: timesteps ``[n]`` (float32) and levels ``[n + 1]`` (float64)."""

    timesteps: np.ndarray
    sigma: np.ndarray
    alpha: np.ndarray
    s: np.ndarray
    init_scale: float  # the initial state is init_scale * x_T


def _karras_levels(
    sampler: str,
    schedule: Schedule,
    *,
    num_steps: int,
    use_karras_sigmas: bool,
    spacing: str,
    steps_offset: int,
    prediction_type: str,
) -> _Levels:
    """Checks the arguments Euler and Heun share and builds their timesteps and noise levels."""
    num_steps = check_options(num_steps, spacing, prediction_type=(prediction_type, schedules_lib.PREDICTION_TYPES))
    table = discrete_table(schedule_sigmas(schedule, sampler), num_steps, spacing, steps_offset,
                           use_karras_sigmas, sampler)  # fmt: skip
    alpha, s, _ = alpha_s_lambda(table.sigmas)
    return _Levels(table.timesteps, table.sigmas.astype(np.float64), alpha, s, _initial_scale(table.sigmas, spacing))


def _euler_plan(
    schedule: Schedule,
    *,
    num_steps: int,
    ancestral: bool,
    use_karras_sigmas: bool,
    spacing: str,
    steps_offset: int,
    prediction_type: str,
) -> Plan:
    """The tables of :func:`euler_sample` (validated arguments, static NumPy)."""
    if ancestral and prediction_type == "sample":
        raise ValueError(
            "euler_sample: prediction_type='sample' is not supported with ancestral=True "
            "(diffusers' EulerAncestralDiscreteScheduler raises NotImplementedError)"
        )
    timesteps, sigma, alpha, s, init_scale = _karras_levels(
        "euler_sample", schedule, num_steps=num_steps, use_karras_sigmas=use_karras_sigmas, spacing=spacing,
        steps_offset=steps_offset, prediction_type=prediction_type
    )
    plan = empty_plan(timesteps, history=0, stochastic=ancestral)
    plan["init_scale"] = init_scale
    target = _karras_target(prediction_type)
    for i in range(len(timesteps)):
        plan["in_x"][i], plan["in_out"][i] = conversion(prediction_type, target, alpha[i], s[i])
        sigma_to = sigma[i + 1]
        if ancestral:
            sigma_up = math.sqrt(sigma[i + 1] ** 2 * (sigma[i] ** 2 - sigma[i + 1] ** 2) / sigma[i] ** 2)
            sigma_to = math.sqrt(max(sigma[i + 1] ** 2 - sigma_up**2, 0.0))  # sigma_down
            plan["noise"][i] = alpha[i + 1] * sigma_up
        plan["pre_u"][i], plan["pre_m"][i, 0] = _karras_euler(alpha, sigma, i, sigma_to, target)
    return Plan(**plan)


def euler_sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    num_steps: int = 50,
    ancestral: bool = False,
    use_karras_sigmas: bool = False,
    spacing: str = "linspace",
    steps_offset: int = 0,
    prediction_type: str = "epsilon",
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Euler steps on the probability-flow ODE in Karras et al.'s units (arXiv:2206.00364).

    As diffusers' ``EulerDiscreteScheduler`` (``ancestral=False``) and
    ``EulerAncestralDiscreteScheduler`` (``ancestral=True``). In Karras units
    ``x_sigma = x / alpha`` with denoiser ``D = x0_hat``::

        d = (x_sigma - D) / sigma_i,    x_sigma' = x_sigma + (sigma_{i+1} - sigma_i) d

    (Karras et al. 2022, Alg. 1 without its second-order correction; in VP units this is the
    DDIM step). The ancestral sampler (k-diffusion's "Euler a") steps down to ``sigma_down`` and
    adds fresh noise ``sigma_up z`` (``z`` from ``fold_in(key, i)``)::

        sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2),
        sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)

    Steps (``T`` training steps, ``n = num_steps``; timesteps are float32, not rounded)::

        "linspace":  linspace(0, T - 1, n)[::-1]              (T=1000, n=10: 999, 888, ..., 0;
                                                            n=7: 999, 832.5, ...)
        "leading":   arange(n)[::-1] * (T // n) + steps_offset (980, 960, ..., 0 for n=50)
        "trailing":  round(arange(T, 0, -T / n)) - 1           (999, 899, ..., 99 for n=10)
        sigma_i    = sigma(t_i), linearly interpolated in t between training timesteps; sigma_n = 0
        Karras:    sigma_i = karras_sigmas(sigma_{n-1}, sigma_0, n) of the levels above;
                   t_i = the fractional timestep of sigma_i (interpolating log sigma), unrounded

    The initial state is ``x_T sigma_0 / sqrt(1 + sigma_0^2)`` ("linspace", "trailing") or
    ``x_T`` ("leading"), diffusers' ``init_noise_sigma`` in VP units.

    ``ancestral=True`` with ``use_karras_sigmas=True`` has no diffusers counterpart
    (``EulerAncestralDiscreteScheduler`` has no Karras option): it takes the Karras table of
    ``EulerDiscreteScheduler``. ``ancestral=True`` with ``prediction_type="sample"`` raises
    ValueError, as diffusers does. The "trailing" deviation of :func:`dpm_solver_sample` applies.

    Args:
      eps_fn: ``eps_fn(x, t) -> model_output``, ``x`` the VP state, ``t`` float32 ``[B]``.
      schedule, x_T, key, num_steps, use_karras_sigmas, spacing, steps_offset, prediction_type,
        return_trajectory: as in :func:`dpm_solver_sample` (``key``: ancestral noise only).
      ancestral: the stochastic "Euler a" sampler.

    Returns:
      ``x_0`` or ``(x_0, trajectory)``.

    Example::

        >>> x0 = euler_sample(eps_fn, s, x_T, key, num_steps=30, use_karras_sigmas=True)
        >>> x0 = euler_sample(eps_fn, s, x_T, jax.random.key(3), ancestral=True)
    """
    plan = _euler_plan(
        schedule, num_steps=num_steps, ancestral=ancestral, use_karras_sigmas=use_karras_sigmas,
        spacing=spacing, steps_offset=steps_offset, prediction_type=prediction_type
    )
    return run_plan(eps_fn, x_T, key, plan, return_trajectory)


def _heun_plan(
    schedule: Schedule,
    *,
    num_steps: int,
    use_karras_sigmas: bool,
    spacing: str,
    steps_offset: int,
    prediction_type: str,
) -> Plan:
    """The tables of :func:`heun_sample` (validated arguments, static NumPy)."""
    timesteps, sigma, alpha, s, init_scale = _karras_levels(
        "heun_sample", schedule, num_steps=num_steps, use_karras_sigmas=use_karras_sigmas, spacing=spacing,
        steps_offset=steps_offset, prediction_type=prediction_type
    )
    n = len(timesteps)
    # Evaluation k: first of step k // 2 (k even), second of step k // 2 (k odd).
    level = [k // 2 + (k % 2) for k in range(2 * n - 1)]
    plan = empty_plan(timesteps[level], history=1)
    plan["init_scale"] = init_scale
    plan["state_rows"] = np.array(list(range(1, 2 * n - 2, 2)) + [2 * n - 2])
    target = _karras_target(prediction_type)
    for k in range(2 * n - 1):
        i, j = k // 2, level[k]
        plan["in_x"][k], plan["in_out"][k] = conversion(prediction_type, target, alpha[j], s[j])
        a_next, dt = alpha[i + 1], sigma[i + 1] - sigma[i]
        if k % 2 == 0:  # Euler predictor from sigma_i; keep x_i and its output for the correction
            plan["pre_u"][k], plan["pre_m"][k, 0] = _karras_euler(alpha, sigma, i, sigma[i + 1], target)
            plan["set_base"][k] = True
            continue
        # Correction: x_sigma' = x_sigma + dt (d + d~) / 2 from x_i (base), its output (hist[0])
        # and the output at the predicted point (m); written so the predicted point itself drops out.
        plan["push"][k], plan["pre_u"][k] = False, 0.0
        if target == "eps":  # d = eps:  x' = alpha' (x_i / alpha_i + dt (eps_i + eps~) / 2)
            plan["pre_base"][k] = a_next / alpha[i]
            plan["pre_m"][k] = a_next * dt / 2
        else:  # x_sigma' = sigma'/sigma x_sigma + dt/2 (1/sigma' - 2/sigma) D_i - dt / (2 sigma') D~
            plan["pre_base"][k] = s[i + 1] / s[i]
            plan["pre_m"][k, 1] = a_next * dt / 2 * (1 / sigma[i + 1] - 2 / sigma[i])
            plan["pre_m"][k, 0] = -a_next * dt / (2 * sigma[i + 1])
    return Plan(**plan)


def heun_sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    num_steps: int = 25,
    use_karras_sigmas: bool = False,
    spacing: str = "linspace",
    steps_offset: int = 0,
    prediction_type: str = "epsilon",
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Heun's second-order method (Karras et al. 2022, arXiv:2206.00364, Alg. 1), as diffusers'
    ``HeunDiscreteScheduler``.

    In Karras units (``x_sigma = x / alpha``, denoiser ``D``)::

        d  = (x_sigma - D(x_sigma; sigma_i)) / sigma_i,     x~ = x_sigma + (sigma_{i+1} - sigma_i) d
        d' = (x~ - D(x~; sigma_{i+1})) / sigma_{i+1},
        x_sigma' = x_sigma + (sigma_{i+1} - sigma_i) (d + d') / 2

    The last step, to ``sigma_n = 0``, is a plain Euler step, so ``num_steps`` steps take
    ``2 num_steps - 1`` model evaluations (the loop runs over evaluations, one per iteration).
    Timesteps, noise levels, Karras sigmas and the initial scale follow :func:`euler_sample`;
    the second evaluation of step ``i`` is at ``t_{i+1}``. ``trajectory[i]`` is the state after
    the full step ``i`` (after the correction).

    Args:
      eps_fn: ``eps_fn(x, t) -> model_output``, ``x`` the VP state, ``t`` float32 ``[B]``.
      schedule, x_T, key, num_steps, use_karras_sigmas, spacing, steps_offset, prediction_type,
        return_trajectory: as in :func:`euler_sample` (``key`` unused).

    Returns:
      ``x_0`` or ``(x_0, trajectory)``.

    Example::

        >>> x0 = heun_sample(eps_fn, s, x_T, key, num_steps=15, use_karras_sigmas=True)  # 29 evaluations
    """
    plan = _heun_plan(
        schedule, num_steps=num_steps, use_karras_sigmas=use_karras_sigmas, spacing=spacing,
        steps_offset=steps_offset, prediction_type=prediction_type
    )
    return run_plan(eps_fn, x_T, key, plan, return_trajectory)
