"""Timestep and noise-level tables of the solvers (static NumPy), and the checks they share.

Each diffusers scheduler chooses its timesteps by its own rule; the functions here reproduce
them exactly (the rules are written out in each sampler's docstring) and give the noise levels
``sigma = sqrt((1 - abar) / abar)`` the samplers step between.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from jaxdiff.schedules import Schedule

SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
SOLVER_ORDERS = (1, 2, 3)
KARRAS_RHO = 7.0
"""``rho`` of the Karras et al. (2022, eq. 5) noise levels, as in the paper and diffusers."""

# diffusers replaces a zero terminal alphas_cumprod (rescale_zero_terminal_snr) by this value in
# the DPM-Solver, UniPC and Euler schedulers, so that sigma stays finite.
ZERO_SNR_ALPHAS_CUMPROD = 2.0**-24

# ----------------------------------------------------------------------------------------
# Checks.


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")


def check_num_steps(num_steps: Any) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    return int(num_steps)


def check_options(num_steps: Any, spacing: str, **choices: tuple[Any, tuple[Any, ...]]) -> int:
    """Checks ``num_steps``, ``spacing`` and each ``name=(value, allowed)``; returns ``num_steps`` as an int."""
    num_steps = check_num_steps(num_steps)
    check_choice("spacing", spacing, SPACINGS)
    for name, (value, allowed) in choices.items():
        check_choice(name, value, allowed)
    return num_steps


def concrete_alphas_cumprod(schedule: Schedule, sampler: str) -> np.ndarray:
    """``alphas_cumprod`` as a float32 NumPy array; a clear error if the schedule is traced."""
    try:
        return np.array(schedule.alphas_cumprod, dtype=np.float32)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as err:
        raise ValueError(
            f"{sampler} builds its timestep and coefficient tables before the loop and needs a "
            "concrete schedule: close over the schedule instead of passing it to jax.jit as an argument"
        ) from err


def schedule_sigmas(schedule: Schedule, sampler: str) -> np.ndarray:
    """``sigma_t = sqrt((1 - abar_t) / abar_t)`` for every training timestep, float32 ``[T]``.

    Computed in float32 as diffusers does. A zero terminal ``abar`` (a zero-terminal-SNR schedule)
    is replaced by ``2**-24`` as in diffusers, so that the largest sigma (4096) stays finite.
    """
    abar = concrete_alphas_cumprod(schedule, sampler)
    if abar[-1] == 0.0:
        abar[-1] = ZERO_SNR_ALPHAS_CUMPROD
    return np.sqrt((1.0 - abar) / abar)


# ----------------------------------------------------------------------------------------
# Timestep and noise-level tables (static NumPy).


def spaced_timesteps(
    num_train_timesteps: int,
    num_steps: int,
    spacing: str,
    steps_offset: int,
    *,
    grid_of_n_plus_1: bool,
    round_linspace: bool,
) -> np.ndarray:
    """Descending timesteps (float64 ``[num_steps]``) of one of diffusers' three spacings.

    ``grid_of_n_plus_1`` selects the multistep schedulers' rules (a grid of ``n + 1`` points whose
    last point, 0, is dropped); ``round_linspace`` rounds the "linspace" points (all but Euler/Heun).
    """
    T, n = num_train_timesteps, num_steps
    if spacing == "trailing":
        # Rounding in arange can yield n + 1 points (T=1000, n=61: the extra one becomes -1);
        # diffusers then runs n + 1 steps, the last at timestep -1; we keep the n listed ones.
        return (np.round(np.arange(T, 0, -T / n)) - 1)[:n]
    if grid_of_n_plus_1:
        if spacing == "linspace":
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        return (np.arange(0, n + 1) * (T // (n + 1)))[::-1][:-1].astype(np.float64) + steps_offset
    if spacing == "linspace":
        steps = np.linspace(0, T - 1, n, dtype=np.float32 if not round_linspace else np.float64)
        return (steps.round() if round_linspace else steps)[::-1].astype(np.float64)
    return (np.arange(0, n) * (T // n))[::-1].astype(np.float64) + steps_offset


def check_timesteps(timesteps: np.ndarray, num_train_timesteps: int, sampler: str, num_steps: int,
                    steps_offset: int) -> None:
    if timesteps.min() < 0 or timesteps.max() > num_train_timesteps - 1:
        raise ValueError(
            f"{sampler}: timesteps {timesteps.min():g}..{timesteps.max():g} fall outside "
            f"[0, {num_train_timesteps - 1}]; check steps_offset={steps_offset!r}"
        )
    if np.any(np.diff(timesteps) >= 0):
        raise ValueError(
            f"{sampler}: num_steps={num_steps} gives repeated timesteps (zero-length steps) for "
            f"num_train_timesteps={num_train_timesteps}; use fewer steps"
        )


def karras_sigmas(
    sigma_min: float, sigma_max: float, num_steps: int, rho: float = KARRAS_RHO
) -> np.ndarray:
    """The noise levels of Karras et al. 2022 (arXiv:2206.00364, eq. 5), float64 ``[num_steps]``.

    ::

        sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

    (``n = 1`` gives ``[sigma_max]``). The samplers append the final noise level themselves.

    Example::

        >>> karras_sigmas(0.01, 157.4, 3)   # array([157.4, 5.9109, 0.01])
    """
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_timestep(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timesteps whose noise level is ``sigmas``: linear interpolation in log sigma.

    ``t = i + w`` with ``log sigma_train[i] <= log sigma < log sigma_train[i + 1]`` and ``w`` the
    interpolation weight clipped to [0, 1] (diffusers' ``_sigma_to_t``; the table is in float32
    as there). The training sigmas increase with ``t``.
    """
    log_table = np.log(train_sigmas)  # float32, increasing
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(log_table) - 2)
    high = low + 1
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[high]), 0, 1)
    return (1 - w) * low + w * high


class StepTable(NamedTuple):
    timesteps: np.ndarray  # [n] the model's timestep at each step (int32 or float32)
    sigmas: np.ndarray  # [n + 1] float32 noise levels; sigmas[n] is the final one


def multistep_table(
    train_sigmas: np.ndarray,
    num_steps: int,
    spacing: str,
    steps_offset: int,
    use_karras_sigmas: bool,
    final_sigmas_type: str,
    sampler: str,
    *,
    karras_final_from_table: bool,
) -> StepTable:
    """DPMSolverMultistepScheduler / UniPCMultistepScheduler ``set_timesteps``.

    ``final_sigmas_type="sigma_min"`` is ``sigma(t=0)``; with ``karras_final_from_table`` (UniPC)
    the Karras branch takes the table's own last entry instead (the same value up to rounding).
    """
    T = len(train_sigmas)
    if use_karras_sigmas:
        sigmas = karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), num_steps)
        timesteps = np.round(sigma_to_timestep(sigmas, train_sigmas))
    else:
        timesteps = spaced_timesteps(
            T, num_steps, spacing, steps_offset, grid_of_n_plus_1=True, round_linspace=True
        )
        check_timesteps(timesteps, T, sampler, num_steps, steps_offset)
        sigmas = train_sigmas[timesteps.astype(np.int64)].astype(np.float64)
    final = 0.0 if final_sigmas_type == "zero" else (
        sigmas[-1] if use_karras_sigmas and karras_final_from_table else float(train_sigmas[0])
    )
    return StepTable(timesteps.astype(np.int32), np.append(sigmas, final).astype(np.float32))


def discrete_table(
    train_sigmas: np.ndarray,
    num_steps: int,
    spacing: str,
    steps_offset: int,
    use_karras_sigmas: bool,
    sampler: str,
) -> StepTable:
    """EulerDiscreteScheduler / EulerAncestralDiscreteScheduler / HeunDiscreteScheduler."""
    T = len(train_sigmas)
    timesteps = spaced_timesteps(
        T, num_steps, spacing, steps_offset, grid_of_n_plus_1=False, round_linspace=False
    ).astype(np.float32)
    check_timesteps(timesteps, T, sampler, num_steps, steps_offset)
    sigmas = np.interp(timesteps, np.arange(T), train_sigmas)
    if use_karras_sigmas:
        sigmas = karras_sigmas(sigmas[-1], sigmas[0], num_steps)
        timesteps = sigma_to_timestep(sigmas, train_sigmas).astype(np.float32)
    return StepTable(timesteps, np.append(sigmas, 0.0).astype(np.float32))


def pndm_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int
) -> np.ndarray:
    """PNDMScheduler's (and DDIM's) timesteps, int32 descending."""
    timesteps = spaced_timesteps(num_train_timesteps, num_steps, spacing, steps_offset,
                                 grid_of_n_plus_1=False, round_linspace=True)  # fmt: skip
    check_timesteps(timesteps, num_train_timesteps, "pndm_sample", num_steps, steps_offset)
    return timesteps.astype(np.int32)


def solver_timesteps(
    sampler: str,
    schedule: Schedule,
    num_steps: int,
    *,
    use_karras_sigmas: bool = False,
    spacing: str | None = None,
    steps_offset: int = 0,
    final_sigmas_type: str = "zero",
) -> tuple[np.ndarray, np.ndarray]:
    """The timesteps and noise levels a sampler of :mod:`jaxdiff.solvers` visits (static NumPy).

    Args:
      sampler: ``"dpm_solver"``, ``"unipc"``, ``"euler"`` (also ancestral), ``"heun"`` or ``"pndm"``.
      schedule, num_steps, use_karras_sigmas, spacing, steps_offset, final_sigmas_type: as for the
        sampler (``spacing=None``: its default, "linspace", or "leading" for ``"pndm"``;
        ``final_sigmas_type`` only matters for ``"dpm_solver"`` and ``"unipc"``).

    Returns:
      ``(timesteps, sigmas)``: ``timesteps[i]`` (int32, or float32 for Euler/Heun) is the model's
      timestep at step ``i`` (Heun: its first evaluation; its second is at ``timesteps[i + 1]``),
      ``sigmas`` (float32 ``[num_steps + 1]``) the noise level ``sqrt((1 - abar) / abar)`` of
      ``trajectory[i]``, ``sigmas[-1]`` the final one. For ``"pndm"``, ``sigmas[-1]`` is the
      noise level of ``final_alpha_cumprod = abar_0`` (its default).

    Example::

        >>> t, sigma = solver_timesteps("dpm_solver", schedules.linear(1000), 20)
        >>> t[:3], sigma[-1]                      # (array([999, 949, 899]), 0.0)
    """
    check_choice("sampler", sampler, ("dpm_solver", "unipc", "euler", "heun", "pndm"))
    check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    if spacing is None:
        spacing = "leading" if sampler == "pndm" else "linspace"
    num_steps = check_options(num_steps, spacing)
    if sampler == "pndm":
        abar = concrete_alphas_cumprod(schedule, "pndm_sample").astype(np.float64)
        timesteps = pndm_timesteps(len(abar), num_steps, spacing, steps_offset)
        abars = np.append(abar[timesteps], abar[0])
        return timesteps, np.sqrt((1 - abars) / abars).astype(np.float32)
    name = f"{sampler}_sample"
    train_sigmas = schedule_sigmas(schedule, name)
    if sampler in ("dpm_solver", "unipc"):
        table = multistep_table(train_sigmas, num_steps, spacing, steps_offset, use_karras_sigmas,
                                final_sigmas_type, name, karras_final_from_table=sampler == "unipc")
        return tuple(table)
    return tuple(discrete_table(train_sigmas, num_steps, spacing, steps_offset,
                                use_karras_sigmas, name))  # fmt: skip
