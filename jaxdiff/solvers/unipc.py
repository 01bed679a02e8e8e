"""UniPC (Zhao et al. 2023, arXiv:2302.04867), as diffusers' ``UniPCMultistepScheduler``.

A multistep predictor (UniP) and a corrector (UniC) that reuses the predictor's model
evaluation; the conventions are those of :mod:`jaxdiff.solvers`.
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

UNIPC_SOLVER_TYPES = ("bh1", "bh2")


def _unipc_update(
    alpha: np.ndarray, s: np.ndarray, lam: np.ndarray, sigmas: np.ndarray,
    a: int, order: int, corrector: bool, solver_type: str, predict_x0: bool,
) -> tuple[float, np.ndarray]:
    """One UniPC update from level ``a`` to ``a + 1`` (Zhao et al. 2023, UniP-p and UniC-p).

    Returns ``(A, C)`` with ``x' = A x + sum_j C[j] M_j`` over ``M = (m_new, m_a, m_{a-1}, ...)``
    for the corrector (UniC, ``m_new`` the output at level ``a + 1``) and ``M = (m_a, m_{a-1}, ...)``
    for the predictor (UniP)::

        hh = -h (data prediction) or h (noise prediction),   h = lambda_{a+1} - lambda_a
        r_k = (lambda_{a-k} - lambda_a) / h,   D_k = (m_{a-k} - m_a) / r_k,   k = 1..p-1
        B(h) = hh ("bh1") or e^hh - 1 ("bh2"),   b_j = hh phi_{j+1}(hh) j! / B(h)
        R = [r_1^(j-1), ..., r_{p-1}^(j-1), 1]_{j=1..p}
        UniP: rho = 1/2 (p = 2) or solve(R[:-1, :-1], b[:-1]);  residual = sum_k rho_k D_k
        UniC: rho = 1/2 (p = 1) or solve(R, b);  residual = sum_k rho_k D_k + rho_p (m_new - m_a)
        x0:  x' = (s'/s_a) x - alpha' (e^hh - 1) m_a - alpha' B(h) residual
        eps: x' = (alpha'/alpha_a) x - s' (e^hh - 1) m_a - s' B(h) residual
    """
    b_ = a + 1
    size = order + 1 if corrector else order
    M = np.eye(max(size, 1))
    m_a = M[1] if corrector else M[0]
    if sigmas[b_] == sigmas[a]:  # zero-length step: the identity (its limit)
        return 1.0, np.zeros(size)
    if sigmas[b_] == 0.0:  # to sigma = 0: the first-order limit, x0 (reached only with p = 1)
        if predict_x0:
            return 0.0, m_a
        return 1.0 / alpha[a], -(s[a] / alpha[a]) * m_a
    h = lam[b_] - lam[a]
    hh = -h if predict_x0 else h
    h_phi_1 = math.expm1(hh)
    B_h = hh if solver_type == "bh1" else math.expm1(hh)
    rks = [(lam[a - k] - lam[a]) / h for k in range(1, order)] + [1.0]
    D = [(M[(1 if corrector else 0) + k] - m_a) / rks[k - 1] for k in range(1, order)]
    b = np.array([hh * phi(j + 1, hh) * math.factorial(j) / B_h for j in range(1, order + 1)])
    R = np.array([[r ** (j - 1) for r in rks] for j in range(1, order + 1)])
    residual = np.zeros(size)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
        residual = sum((rho * d for rho, d in zip(rhos[:-1], D)), residual)
        residual = residual + rhos[-1] * (M[0] - m_a)
    elif order >= 2:
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        residual = sum((rho * d for rho, d in zip(rhos, D)), residual)
    if predict_x0:
        A, scale = s[b_] / s[a], alpha[b_]
    else:
        A, scale = alpha[b_] / alpha[a], s[b_]
    return A, -scale * h_phi_1 * m_a - scale * B_h * residual


def _unipc_plan(
    schedule: Schedule,
    *,
    num_steps: int,
    order: int,
    solver_type: str,
    predict_x0: bool,
    lower_order_final: bool,
    use_karras_sigmas: bool,
    spacing: str,
    steps_offset: int,
    prediction_type: str,
    final_sigmas_type: str,
) -> Plan:
    """The tables of :func:`unipc_sample` (validated arguments, static NumPy)."""
    name = "unipc_sample"
    n = check_options(
        num_steps, spacing, order=(order, SOLVER_ORDERS), solver_type=(solver_type, UNIPC_SOLVER_TYPES),
        final_sigmas_type=(final_sigmas_type, FINAL_SIGMAS_TYPES),
        prediction_type=(prediction_type, schedules_lib.PREDICTION_TYPES),
    )  # fmt: skip
    orders = [min(order, i + 1, n - i if lower_order_final else order) for i in range(n)]
    if final_sigmas_type == "zero" and orders[-1] > 1:
        raise ValueError(
            f"unipc_sample: lower_order_final=False with final_sigmas_type='zero' makes the last "
            f"step a predictor of order {orders[-1]} that extrapolates to sigma = 0 and diverges "
            "(diffusers returns inf/NaN); use lower_order_final=True or final_sigmas_type='sigma_min'"
        )
    table = multistep_table(schedule_sigmas(schedule, name), n, spacing, steps_offset, use_karras_sigmas,
                            final_sigmas_type, name, karras_final_from_table=True)  # fmt: skip
    alpha, s, lam = alpha_s_lambda(table.sigmas)
    plan = empty_plan(table.timesteps, history=order)
    plan["set_base"][:] = True  # base: the corrected state, the next corrector's starting point
    target = "x0" if predict_x0 else "eps"
    for i in range(n):
        plan["in_x"][i], plan["in_out"][i] = conversion(prediction_type, target, alpha[i], s[i])
        if i > 0:
            A, C = _unipc_update(alpha, s, lam, table.sigmas, i - 1, orders[i - 1], True,
                                 solver_type, predict_x0)  # fmt: skip
            plan["cor_x"][i], plan["cor_base"][i] = 0.0, A
            plan["cor_m"][i, : len(C)] = C
        A, C = _unipc_update(alpha, s, lam, table.sigmas, i, orders[i], False, solver_type,
                             predict_x0)  # fmt: skip
        plan["pre_u"][i] = A
        plan["pre_m"][i, : len(C)] = C
    return Plan(**plan)


def unipc_sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    num_steps: int = 20,
    order: int = 2,
    solver_type: str = "bh2",
    predict_x0: bool = True,
    lower_order_final: bool = True,
    use_karras_sigmas: bool = False,
    spacing: str = "linspace",
    steps_offset: int = 0,
    prediction_type: str = "epsilon",
    final_sigmas_type: str = "zero",
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """UniPC (Zhao et al. 2023, arXiv:2302.04867), as diffusers' ``UniPCMultistepScheduler``.

    A multistep predictor (UniP, order ``p``) followed, once the model has been evaluated at its
    result, by a corrector (UniC, order ``p + 1``) that reuses that same evaluation, so the
    corrector costs no extra model call. Both are written in :func:`_unipc_update`; with
    ``predict_x0`` the solver works with the data prediction (as DPM-Solver++), otherwise with
    the noise prediction; ``solver_type`` picks ``B(h) = h`` ("bh1") or ``e^h - 1`` ("bh2").

    Step ``i``: evaluate the model at the predictor's output ``x_i``, correct ``x_i`` with UniC
    (from step 1 on), then predict ``x_{i+1}`` with UniP of order
    ``min(order, i + 1, n - i if lower_order_final)``; the corrector of step ``i`` has the order
    of the predictor of step ``i - 1``. Timesteps and noise levels follow the same rules as
    :func:`dpm_solver_sample` (diffusers' ``set_timesteps`` is the same), except that the
    Karras table's final "sigma_min" level is its own last entry (equal to ``sigma(t=0)`` up
    to rounding). The trajectory holds the predictor's outputs, the states diffusers returns
    (each is corrected inside the next step); ``x_0`` is the last prediction.

    Where diffusers returns NaN (``solver_type="bh1"`` or ``predict_x0=False`` with
    ``final_sigmas_type="zero"``: 0 * inf in its last step) jaxdiff returns the limit
    ``sigma -> 0``, the model's ``x0`` prediction at the last step. With
    ``lower_order_final=False``, ``final_sigmas_type="zero"`` and ``order >= 2`` the last
    predictor extrapolates to ``lambda = inf`` and diverges (diffusers returns inf or NaN):
    ValueError. The "trailing" deviation of :func:`dpm_solver_sample` applies here too.

    Args:
      eps_fn: ``eps_fn(x, t) -> model_output``, ``x`` the VP state, ``t`` int32 ``[B]``.
      schedule, x_T, key, num_steps, use_karras_sigmas, spacing, steps_offset, prediction_type,
        final_sigmas_type, return_trajectory: as in :func:`dpm_solver_sample` (``key`` unused).
      order: 1, 2 or 3 (diffusers' ``solver_order``; the predictor's order).
      solver_type: "bh1" or "bh2".
      predict_x0: data prediction (True) or noise prediction (False).
      lower_order_final: lower the order over the last steps (see above).

    Returns:
      ``x_0`` or ``(x_0, trajectory)``.

    Example::

        >>> x0 = unipc_sample(eps_fn, schedules.scaled_linear(1000), x_T, key, num_steps=10)
    """
    plan = _unipc_plan(
        schedule, num_steps=num_steps, order=order, solver_type=solver_type, predict_x0=predict_x0,
        lower_order_final=lower_order_final, use_karras_sigmas=use_karras_sigmas, spacing=spacing,
        steps_offset=steps_offset, prediction_type=prediction_type,
        final_sigmas_type=final_sigmas_type
    )
    return run_plan(eps_fn, x_T, key, plan, return_trajectory)
