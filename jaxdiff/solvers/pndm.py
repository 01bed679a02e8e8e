"""PLMS, the pseudo linear multistep sampler of PNDM (Liu et al. 2022, arXiv:2202.09778).

As diffusers' ``PNDMScheduler(skip_prk_steps=True)``; the conventions are those of
:mod:`jaxdiff.solvers`.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from jaxdiff.schedules import Schedule
from jaxdiff.solvers._loop import EpsFn, Plan, empty_plan, run_plan
from jaxdiff.solvers._tables import check_options, concrete_alphas_cumprod, pndm_timesteps

_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _pndm_plan(
    schedule: Schedule,
    *,
    num_steps: int,
    spacing: str,
    steps_offset: int,
    prediction_type: str,
    final_alpha_cumprod: float | None,
) -> Plan:
    """The tables of :func:`pndm_sample` (validated arguments, static NumPy)."""
    n = check_options(num_steps, spacing, prediction_type=(prediction_type, ("epsilon", "v_prediction")))
    abar = concrete_alphas_cumprod(schedule, "pndm_sample").astype(np.float64)
    listed = pndm_timesteps(len(abar), n, spacing, steps_offset)
    final = abar[0] if final_alpha_cumprod is None else float(final_alpha_cumprod)
    abar_at = lambda t: abar[t] if t >= 0 else final  # noqa: E731
    # Evaluation k -> (model timestep, transfer start index, transfer end index).
    if n == 1:
        evals = [(listed[0], 0, 1)]
    else:
        evals = [(listed[0], 0, 1), (listed[1], 0, 1)] + [(listed[i], i, i + 1) for i in range(1, n)]
    steps = list(listed) + [-1]
    plan = empty_plan(np.array([e[0] for e in evals], np.int32), history=3)
    plan["in_out"][:] = 1.0  # the history holds raw model outputs
    plan["set_base"][0] = True  # x_{t_0}, the improved Euler step's start
    plan["state_rows"] = np.arange(1, len(evals)) if n > 1 else np.arange(1)
    pushed = 0
    for k, (_, start, end) in enumerate(evals):
        a_t, a_prev = abar_at(steps[start]), abar_at(steps[end])
        coeff = math.sqrt(a_prev / a_t)
        kappa = (a_prev - a_t) / (a_t * math.sqrt(1 - a_prev) + math.sqrt(a_t * (1 - a_t) * a_prev))
        if k == 1:  # redo the first step from x_{t_0} with the mean of both outputs
            combo, plan["push"][k] = np.array([0.5, 0.5, 0.0, 0.0]), False
            plan["cor_x"][k], plan["cor_base"][k] = 0.0, 1.0
        else:
            pushed += 1
            combo = np.zeros(4)
            combo[: min(pushed, 4)] = _ADAMS_BASHFORTH[min(pushed, 4)]
        if prediction_type == "v_prediction":  # e = sqrt(abar_t) v + sqrt(1 - abar_t) x_t
            coeff -= kappa * math.sqrt(1 - a_t)
            combo = combo * math.sqrt(a_t)
        plan["pre_u"][k] = coeff
        plan["pre_m"][k] = -kappa * combo
    return Plan(**plan)


def pndm_sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    num_steps: int = 50,
    spacing: str = "leading",
    steps_offset: int = 0,
    prediction_type: str = "epsilon",
    final_alpha_cumprod: float | None = None,
    return_trajectory: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """PLMS, the pseudo linear multistep sampler of PNDM (Liu et al. 2022, arXiv:2202.09778).

    As diffusers' ``PNDMScheduler`` with ``skip_prk_steps=True`` (Stable Diffusion's setting).
    Each step applies PNDM's transfer part (DDIM's update written in ``abar``)::

        x_{t'} = sqrt(abar_{t'} / abar_t) x_t - (abar_{t'} - abar_t) / d e,
        d = abar_t sqrt(1 - abar_{t'}) + sqrt(abar_t (1 - abar_t) abar_{t'})

    with ``e`` a linear multistep (Adams-Bashforth) combination of the model outputs:
    ``(55 e_i - 59 e_{i-1} + 37 e_{i-2} - 9 e_{i-3}) / 24`` once four are known, the 3-, 2- and
    1-output formulas before. The first step is a pseudo improved Euler step: the model is
    evaluated at ``x_{t_0}`` and again at the transferred point, and the step is redone from
    ``x_{t_0}`` with the mean of both outputs; so ``num_steps`` steps take ``num_steps + 1``
    evaluations (``num_steps = 1``: one plain transfer).

    The Runge-Kutta warm-up of the paper (diffusers' default ``skip_prk_steps=False``: three
    4-stage steps, 12 evaluations at half-step timesteps) is not implemented; this improved
    Euler start replaces it.

    Timesteps are DDIM's (``samplers.inference_timesteps``); each step goes to the next listed
    timestep, the last to ``final_alpha_cumprod``. For "leading" (the default) and for "trailing"
    with ``num_steps`` dividing ``T`` this is diffusers' ``t - T // num_steps``; otherwise diffusers
    transfers to ``t - T // num_steps`` although the next model call is elsewhere, and jaxdiff
    does not copy that (as ``ddim_sample``). As in diffusers, with ``"v_prediction"`` the raw
    outputs are combined first and converted to ``e = sqrt(abar_t) v + sqrt(1 - abar_t) x_t`` at
    the step's start.

    Args:
      eps_fn: ``eps_fn(x, t) -> model_output``, ``x`` the VP state, ``t`` int32 ``[B]``.
      schedule, x_T, key, num_steps, spacing, steps_offset, return_trajectory: as in
        ``ddim_sample`` (``key`` unused; ``trajectory[i]`` the state after step ``i``).
      prediction_type: "epsilon" or "v_prediction" ("sample" raises ValueError, as in diffusers).
      final_alpha_cumprod: ``abar`` after the last step; ``None`` (default) is ``abar_0``,
        diffusers' ``set_alpha_to_one=False`` (PNDMScheduler's default); 1.0 for ``True``.

    Returns:
      ``x_0`` or ``(x_0, trajectory)``.

    Example::

        >>> x0 = pndm_sample(eps_fn, schedules.scaled_linear(1000), x_T, key, num_steps=50, steps_offset=1)
    """
    plan = _pndm_plan(
        schedule, num_steps=num_steps, spacing=spacing, steps_offset=steps_offset,
        prediction_type=prediction_type, final_alpha_cumprod=final_alpha_cumprod
    )
    return run_plan(eps_fn, x_T, key, plan, return_trajectory)
