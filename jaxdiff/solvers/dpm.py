"""Multistep DPM-Solver and DPM-Solver++ (Lu et al. 2022), as diffusers' ``DPMSolverMultistepScheduler``.

DPM-Solver: arXiv:2206.00927; DPM-Solver++ (and its SDE solver): arXiv:2211.01095. The
conventions (VP states, noise levels, the plan and its loop) are those of :mod:`jaxdiff.solvers`.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from jaxdiff import schedules as schedules_lib
from jaxdiff.schedules import Schedule
from jaxdiff.solvers._loop import EpsFn, Plan, alpha_s_lambda, conversion, empty_plan, phi, run_plan
from jaxdiff.solvers._tables import (
    FINAL_SIGMAS_TYPES,
    SOLVER_ORDERS,
    check_options,
    multistep_table,
    schedule_sigmas,
)

DPM_ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")
DPM_SOLVER_TYPES = ("midpoint", "heun")


def _dpm_orders(num_steps: int, order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """The order diffusers uses at each step: warm-up, then ``order``, lower again at the end."""
    n, orders = num_steps, []
    for i in range(n):
        last = i == n - 1 and ((lower_order_final and n < 15) or final_zero)
        second_last = i == n - 2 and lower_order_final and n < 15
        if order == 1 or i < 1 or last:
            orders.append(1)
        elif order == 2 or i < 2 or second_last:
            orders.append(2)
        else:
            orders.append(3)
    return orders


def _dpm_step_coefficients(
    sigmas: np.ndarray, i: int, order: int, algorithm_type: str, solver_type: str
) -> tuple[float, np.ndarray, float]:
    """``(A, C, N)`` of step ``i``: ``x' = A x + sum_j C[j] m_{i-j} + N z`` (``C``: [3]).

    ``m`` is the data prediction ``x0`` (DPM-Solver++, Lu et al. 2022b: its 2M and 3M multistep
    solvers and the SDE solver of its appendix) or the noise prediction ``eps`` (the multistep
    DPM-Solver of Lu et al. 2022a), with ``h = lambda_{i+1} - lambda_i``, ``r_0 = h_0 / h``
    (``h_0 = lambda_i - lambda_{i-1}``, ``r_1 = h_1 / h`` likewise)::

        DPM-Solver++ 1:  x' = (s_t/s_s) x + alpha_t (1 - e^-h) m_i
                     2M: ... with m_i + D1 / 2 ("midpoint")   or  + alpha_t h phi_2(-h) D1 ("heun")
                     3M: + alpha_t h phi_2(-h) D1' - alpha_t (phi_2(-h) - 1/2) D2
        D1 = (m_i - m_{i-1}) / r_0;   3M: D1' = D1_0 + r_0/(r_0 + r_1) (D1_0 - D1_1),
                                          D2  = (D1_0 - D1_1) / (r_0 + r_1)
        DPM-Solver 1:    x' = (alpha_t/alpha_s) x - s_t (e^h - 1) eps_i
                         (heun/3M: - s_t h phi_2(h) D1 (or D1'), 3M: - s_t (phi_2(h) - 1/2) D2)
        SDE-DPM-Solver++ 1:  x' = (s_t/s_s) e^-h x + alpha_t (1 - e^-2h) m_i + s_t sqrt(1 - e^-2h) z
                         2:  m_i + D1/2 ("midpoint") or + alpha_t 2h phi_2(-2h) D1 ("heun")
                         3:  + alpha_t 2h phi_2(-2h) D1' - alpha_t (phi_2(-2h) + 1/2) D2

    (``phi_2(z) = (e^z - 1 - z) / z^2``; ``e^-h = sigma_t / sigma_s``.) The SDE third-order
    coefficients are diffusers'. A step of zero length (``sigma_t == sigma_s``, the last step of
    Karras sigmas with ``final_sigmas_type="sigma_min"``, where diffusers' heun and third-order
    updates give 0/0 = NaN) is the identity, their limit.
    """
    sigmas = sigmas.astype(np.float64)
    alpha, s, lam = alpha_s_lambda(sigmas)
    if sigmas[i + 1] == sigmas[i]:
        return 1.0, np.zeros(3), 0.0
    h = lam[i + 1] - lam[i]
    m0, m1, m2 = np.eye(3)  # basis: coefficients of (m_i, m_{i-1}, m_{i-2})
    D1 = D2 = np.zeros(3)
    if order >= 2:
        h0 = lam[i] - lam[i - 1]
        D1_0 = (h / h0) * (m0 - m1)
        D1 = D1_0
    if order == 3:
        h1 = lam[i - 1] - lam[i - 2]
        D1_1 = (h / h1) * (m1 - m2)
        D1 = D1_0 + h0 / (h0 + h1) * (D1_0 - D1_1)
        D2 = h / (h0 + h1) * (D1_0 - D1_1)
    a_t, s_t = alpha[i + 1], s[i + 1]
    ratio = sigmas[i + 1] / sigmas[i]  # e^{-h}
    noise = 0.0
    # x' = A x + c m_i + g1 D1 + g2 D2  ("midpoint" second order: g1 = c / 2)
    if algorithm_type == "dpmsolver++":
        A, c = s_t / s[i], a_t * (1.0 - ratio)
        g1 = a_t * h * phi(2, -h) if order > 1 else 0.0
        g2 = -a_t * (phi(2, -h) - 0.5) if order == 3 else 0.0
    elif algorithm_type == "sde-dpmsolver++":
        A, c = s_t / s[i] * ratio, a_t * (1.0 - ratio**2)
        noise = s_t * math.sqrt(1.0 - ratio**2)
        g1 = a_t * 2 * h * phi(2, -2 * h) if order > 1 else 0.0
        g2 = -a_t * (phi(2, -2 * h) + 0.5) if order == 3 else 0.0
    else:  # "dpmsolver": noise prediction (sigma_t > 0 here)
        A, c = a_t / alpha[i], -s_t * math.expm1(h)
        g1 = -s_t * h * phi(2, h) if order > 1 else 0.0
        g2 = -s_t * (phi(2, h) - 0.5) if order == 3 else 0.0
    if order == 2 and solver_type == "midpoint":
        g1 = 0.5 * c
    return A, c * m0 + g1 * D1 + g2 * D2, noise


def _dpm_solver_plan(
    schedule: Schedule,
    *,
    num_steps: int,
    order: int,
    algorithm_type: str,
    solver_type: str,
    lower_order_final: bool,
    use_karras_sigmas: bool,
    spacing: str,
    steps_offset: int,
    prediction_type: str,
    final_sigmas_type: str,
) -> Plan:
    """The tables of :func:`dpm_solver_sample` (validated arguments, static NumPy)."""
    name = "dpm_solver_sample"
    num_steps = check_options(
        num_steps, spacing, order=(order, SOLVER_ORDERS), algorithm_type=(algorithm_type, DPM_ALGORITHM_TYPES),
        solver_type=(solver_type, DPM_SOLVER_TYPES), final_sigmas_type=(final_sigmas_type, FINAL_SIGMAS_TYPES),
        prediction_type=(prediction_type, schedules_lib.PREDICTION_TYPES),
    )  # fmt: skip
    if algorithm_type == "dpmsolver" and final_sigmas_type == "zero":
        raise ValueError(
            "dpm_solver_sample: final_sigmas_type='zero' is not supported with "
            "algorithm_type='dpmsolver' (as in diffusers); use final_sigmas_type='sigma_min' or "
            "algorithm_type='dpmsolver++'"
        )
    table = multistep_table(schedule_sigmas(schedule, name), num_steps, spacing, steps_offset,
                            use_karras_sigmas, final_sigmas_type, name, karras_final_from_table=False)  # fmt: skip
    orders = _dpm_orders(num_steps, order, lower_order_final, final_sigmas_type == "zero")
    stochastic = algorithm_type == "sde-dpmsolver++"
    plan = empty_plan(table.timesteps, history=order - 1, stochastic=stochastic)
    alpha, s, _ = alpha_s_lambda(table.sigmas)
    target = "eps" if algorithm_type == "dpmsolver" else "x0"
    for i in range(num_steps):
        plan["in_x"][i], plan["in_out"][i] = conversion(prediction_type, target, alpha[i], s[i])
        A, C, N = _dpm_step_coefficients(table.sigmas, i, orders[i], algorithm_type, solver_type)
        plan["pre_u"][i], plan["pre_m"][i] = A, C[:order]
        if stochastic:
            plan["noise"][i] = N
    return Plan(**plan)


def dpm_solver_sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    num_steps: int = 20,
    order: int = 2,
    algorithm_type: str = "dpmsolver++",
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    use_karras_sigmas: bool = False,
    spacing: str = "linspace",
    steps_offset: int = 0,
    prediction_type: str = "epsilon",
    final_sigmas_type: str = "zero",
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Multistep DPM-Solver / DPM-Solver++ (Lu et al. 2022), as diffusers' ``DPMSolverMultistepScheduler``.

    DPM-Solver (arXiv:2206.00927) and DPM-Solver++ (arXiv:2211.01095) integrate the diffusion ODE
    exactly in its linear part and approximate the model output by a polynomial in the log-SNR
    ``lambda``: with ``h = lambda_{i+1} - lambda_i`` the first-order DPM-Solver++ step is DDIM::

        x_{i+1} = (s_{i+1} / s_i) x_i + alpha_{i+1} (1 - e^{-h}) x0_i

    and the multistep versions add the finite differences of earlier outputs ("2M", "3M"; the
    coefficients are written in :func:`_dpm_step_coefficients`). ``algorithm_type``:
    ``"dpmsolver++"`` (data prediction, the default), ``"dpmsolver"`` (noise prediction) or
    ``"sde-dpmsolver++"`` (the SDE solver of DPM-Solver++, which adds fresh noise
    ``s_{i+1} sqrt(1 - e^{-2h}) z`` at every step; ``z`` from ``fold_in(key, i)``).

    Steps (diffusers' ``set_timesteps``; ``T`` training steps, ``n = num_steps``)::

        "linspace":  round(linspace(0, T - 1, n + 1))[::-1][:-1]          (T=1000, n=20: 999, 949, ..., 50)
        "leading":   arange(n + 1)[::-1][:-1] * (T // (n + 1)) + steps_offset   (940, 893, ..., 47)
        "trailing":  round(arange(T, 0, -T / n)) - 1                       (999, 949, ..., 49)
        sigma_i   = sqrt((1 - abar) / abar) at those timesteps;
        sigma_n   = 0 ("zero") or sigma(t=0) ("sigma_min")
        Karras:    sigma_i = karras_sigmas(sigma(t=0), sigma(t=T-1), n) over the whole training range
                   (spacing and steps_offset unused); t_i = round(the fractional timestep of sigma_i,
                   interpolating log sigma linearly between training timesteps)

    The order at step ``i`` is ``min(order, i + 1)`` (warm-up); with ``lower_order_final`` and
    ``n < 15`` the last step is first order and the one before at most second order; with
    ``final_sigmas_type="zero"`` the last step is always first order (its result is then the
    model's ``x0`` prediction).

    Deviations from diffusers, all at its edges:
      * Karras sigmas with the cosine (``squaredcos_cap_v2``) schedule: diffusers skips the rounding
        of ``t_i`` for that ``beta_schedule`` and its int64 cast then truncates; jaxdiff rounds for
        every schedule (as UniPC, Euler and Heun do), so the model may see ``t`` one higher at
        some steps. The noise levels, hence the updates, are the same. (The first timesteps
        repeat there, e.g. 998, 998, 998, which sends diffusers' step-index lookup to the second
        one: its own loop fails with an IndexError unless ``set_begin_index(0)`` is called.
        UniPC's loop fails likewise.)
      * Karras + ``final_sigmas_type="sigma_min"``: the last step has zero length and, with
        ``num_steps >= 15``, diffusers' ``solver_type="heun"`` and third-order updates return NaN;
        jaxdiff returns the limit, the identity (so ``x_0`` is the state before that step).
      * "trailing" spacing where ``arange`` yields ``n + 1`` points (T=1000: n = 61, 103, ...):
        diffusers runs an extra step at timestep -1; jaxdiff runs the ``n`` listed steps.

    Raises ValueError where diffusers fails: ``algorithm_type="dpmsolver"`` with
    ``final_sigmas_type="zero"`` (the noise-prediction update is 0 * inf there; use "sigma_min"),
    and timesteps that repeat or leave ``[0, T)`` (``num_steps`` too large, ``steps_offset``).

    Args:
      eps_fn: ``eps_fn(x, t) -> model_output``, ``x`` the VP state, ``t`` int32 ``[B]``.
      schedule: the training schedule (concrete).
      x_T: unit-variance noise ``[B, ...]`` (the initial state; no scaling is needed here).
      key: a ``jax.random.key``; used by ``"sde-dpmsolver++"`` only.
      num_steps: number of model evaluations (static int).
      order: 1, 2 or 3 (diffusers' ``solver_order``).
      algorithm_type, solver_type ("midpoint" or "heun", for orders 2 and 3), lower_order_final,
        use_karras_sigmas, spacing, steps_offset, prediction_type, final_sigmas_type: as in diffusers.
      return_trajectory: also return the VP states ``[num_steps + 1, B, ...]`` (module docstring).

    Returns:
      ``x_0`` or ``(x_0, trajectory)``.

    Example::

        >>> x0 = dpm_solver_sample(eps_fn, schedules.linear(1000), x_T, key, num_steps=20)  # DPM++ 2M
        >>> x0 = dpm_solver_sample(eps_fn, s, x_T, key, num_steps=20, use_karras_sigmas=True)
        >>> x0 = dpm_solver_sample(eps_fn, s, x_T, key, algorithm_type="sde-dpmsolver++")   # DPM++ SDE
    """
    plan = _dpm_solver_plan(
        schedule, num_steps=num_steps, order=order, algorithm_type=algorithm_type,
        solver_type=solver_type, lower_order_final=lower_order_final,
        use_karras_sigmas=use_karras_sigmas, spacing=spacing, steps_offset=steps_offset,
        prediction_type=prediction_type, final_sigmas_type=final_sigmas_type
    )
    return run_plan(eps_fn, x_T, key, plan, return_trajectory)
