"""The loop every solver runs, and the coefficient maths their plans share.

A solver is a *plan*: per model evaluation, the coefficients of a linear combination of the
state, a kept state and the model outputs (:class:`Plan`), built before the loop in float64
NumPy. :func:`run_plan` runs any plan as one ``jax.lax.scan`` with one ``eps_fn`` call per
iteration, so ``eps_fn`` is traced once whatever the number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]

# ----------------------------------------------------------------------------------------
# Coefficient maths (float64 NumPy scalars).


def phi(k: int, z: float) -> float:
    """``phi_k(z) = sum_{j >= 0} z^j / (j + k)!`` (``phi_1(z) = (e^z - 1) / z``), with its limits.

    ``phi_k(0) = 1 / k!`` and ``phi_k(-inf) = 0``; a series for small ``|z|`` avoids cancellation.
    """
    if z == -math.inf:
        return 0.0
    if abs(z) < 1e-2:
        return sum(z**j / math.factorial(j + k) for j in range(12))
    # e^z - sum_{j<k} z^j/j!  ==  expm1(z) - sum_{1<=j<k} z^j/j!
    rest = math.expm1(z) - sum(z**j / math.factorial(j) for j in range(1, k))
    return rest / z**k


def alpha_s_lambda(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``alpha = 1/sqrt(1 + sigma^2)``, ``s = sigma alpha``, ``lambda = -log sigma`` (float64)."""
    sigma = sigmas.astype(np.float64)
    alpha = 1.0 / np.sqrt(sigma**2 + 1.0)
    with np.errstate(divide="ignore"):
        lam = -np.log(sigma)  # +inf at sigma = 0
    return alpha, sigma * alpha, lam


def conversion(prediction_type: str, target: str, alpha: float, s: float) -> tuple[float, float]:
    """``(a, b)`` such that ``target = a x + b model_output`` at a state ``x`` of level (alpha, s).

    ``target`` is ``"x0"`` (the data prediction) or ``"eps"`` (the noise prediction)::

        epsilon: x0 = (x - s eps) / alpha        sample: eps = (x - alpha x0) / s
        v:       x0 = alpha x - s v,  eps = s x + alpha v
    """
    if target == "x0":
        return {"epsilon": (1 / alpha, -s / alpha), "sample": (0.0, 1.0),
                "v_prediction": (alpha, -s)}[prediction_type]  # fmt: skip
    return {"epsilon": (0.0, 1.0), "sample": (1 / s, -alpha / s),
            "v_prediction": (s, alpha)}[prediction_type]  # fmt: skip


# ----------------------------------------------------------------------------------------
# The loop: one scan over model evaluations, every update a linear combination.


class Plan(NamedTuple):
    """Per-iteration coefficients of the shared loop (NumPy, one row per model evaluation).

    Iteration ``k`` evaluates ``out = eps_fn(x, timesteps[k])`` and, with ``M_0 = m`` and
    ``M_j = hist[j - 1]`` (earlier converted outputs, newest first)::

        m      = in_x x + in_out out                                  (x0 or eps prediction)
        u      = cor_x x + cor_base base + sum_j cor_m[j] M_j         (UniPC's corrector; else u = x)
        x_next = pre_u u + pre_base base + sum_j pre_m[j] M_j + noise z_k
        base   = u              where set_base     (a state kept for later iterations)
        hist   = [m, hist...]   where push
    """

    timesteps: np.ndarray  # [N] int32 or float32
    in_x: np.ndarray  # [N]
    in_out: np.ndarray  # [N]
    cor_x: np.ndarray  # [N]
    cor_base: np.ndarray  # [N]
    cor_m: np.ndarray  # [N, K + 1]
    pre_u: np.ndarray  # [N]
    pre_base: np.ndarray  # [N]
    pre_m: np.ndarray  # [N, K + 1]
    noise: np.ndarray | None  # [N] or None (deterministic)
    set_base: np.ndarray  # [N] bool
    push: np.ndarray  # [N] bool
    state_rows: np.ndarray  # iterations whose x_next are the states after steps 1..n
    init_scale: float  # x = init_scale x_T


def empty_plan(timesteps: np.ndarray, history: int, stochastic: bool = False) -> dict[str, Any]:
    N = len(timesteps)
    return {
        "timesteps": timesteps,
        "in_x": np.zeros(N), "in_out": np.zeros(N),
        "cor_x": np.ones(N), "cor_base": np.zeros(N), "cor_m": np.zeros((N, history + 1)),
        "pre_u": np.zeros(N), "pre_base": np.zeros(N), "pre_m": np.zeros((N, history + 1)),
        "noise": np.zeros(N) if stochastic else None,
        "set_base": np.zeros(N, bool), "push": np.ones(N, bool),
        "state_rows": np.arange(N), "init_scale": 1.0,
    }  # fmt: skip


class LoopStructure(NamedTuple):
    """The static shape of the loop: which carries and terms exist (not the coefficients' values).

    Plans of one family and order share it, so one compiled loop serves them all.
    """

    history: int  # K, the number of earlier outputs kept
    keeps_base: bool  # carries `base`
    corrects: bool  # u differs from x somewhere (UniPC's corrector, PLMS's restart)
    reads_base: bool  # the update reads `base`
    stochastic: bool  # draws noise


def loop_structure(plan: Plan) -> LoopStructure:
    keeps_base = bool(np.any(plan.set_base))
    reads_base = bool(np.any(plan.pre_base != 0))
    corrects = bool(np.any(plan.cor_x != 1) or np.any(plan.cor_base != 0) or np.any(plan.cor_m != 0))
    if (reads_base or np.any(plan.cor_base != 0)) and not keeps_base:
        raise AssertionError("a plan that reads `base` must set it")
    return LoopStructure(plan.pre_m.shape[1] - 1, keeps_base, corrects, reads_base, plan.noise is not None)


def loop_rows(plan: Plan) -> dict[str, np.ndarray]:
    """The plan's arrays, one row per iteration (plus the initial scale and the state rows)."""
    rows = {name: getattr(plan, name) for name in (
        "timesteps", "in_x", "in_out", "cor_x", "cor_base", "cor_m", "pre_u", "pre_base", "pre_m",
        "set_base", "push")}  # fmt: skip
    if plan.noise is not None:
        rows["noise"] = plan.noise
    rows["init_scale"] = np.asarray(plan.init_scale)
    rows["state_rows"] = np.asarray(plan.state_rows, np.int32)
    return rows


def scan_plan(
    eps_fn: EpsFn,
    x_T: jax.Array,
    key: jax.Array,
    rows: dict[str, Any],
    structure: LoopStructure,
    return_trajectory: bool,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The shared loop (see :class:`Plan`): one ``lax.scan``, one ``eps_fn`` call per iteration."""
    batch, dtype = x_T.shape[0], x_T.dtype
    history = structure.history
    coefficient_dtype = jnp.promote_types(dtype, jnp.float32)  # float32, or float64 under x64
    xs = {name: jnp.asarray(rows[name], coefficient_dtype) for name in (
        "in_x", "in_out", "cor_x", "cor_base", "cor_m", "pre_u", "pre_base", "pre_m")}  # fmt: skip
    xs["t"] = jnp.asarray(rows["timesteps"])
    xs["i"] = jnp.arange(xs["t"].shape[0], dtype=jnp.int32)
    xs["set_base"], xs["push"] = jnp.asarray(rows["set_base"]), jnp.asarray(rows["push"])
    if structure.stochastic:
        xs["noise"] = jnp.asarray(rows["noise"], coefficient_dtype)

    def body(carry, row):
        x, base, hist = carry["x"], carry.get("base"), carry.get("hist")
        out = eps_fn(x, jnp.full((batch,), row["t"], row["t"].dtype))  # t: [B]
        m = (row["in_x"] * x + row["in_out"] * out).astype(dtype)  # x0 or eps prediction
        outputs = [m] + [hist[j] for j in range(history)]  # newest first
        u = x
        if structure.corrects:
            u = row["cor_x"] * x + row["cor_base"] * base
            for j, output in enumerate(outputs):
                u = u + row["cor_m"][j] * output
        x_next = row["pre_u"] * u
        if structure.reads_base:
            x_next = x_next + row["pre_base"] * base
        for j, output in enumerate(outputs):
            x_next = x_next + row["pre_m"][j] * output
        if structure.stochastic:
            z = jax.random.normal(jax.random.fold_in(key, row["i"]), x.shape, dtype)
            x_next = x_next + row["noise"] * z
        x_next = x_next.astype(dtype)
        new = {"x": x_next}
        if structure.keeps_base:
            new["base"] = jnp.where(row["set_base"], u.astype(dtype), base)
        if history:
            new["hist"] = jnp.where(row["push"], jnp.concatenate([m[None], hist[:-1]], axis=0), hist)
        return new, (x_next if return_trajectory else None)

    x_init = (x_T * jnp.asarray(rows["init_scale"], coefficient_dtype)).astype(dtype)
    carry = {"x": x_init}
    if structure.keeps_base:
        carry["base"] = x_init
    if history:
        carry["hist"] = jnp.zeros((history,) + x_T.shape, dtype)  # [K, B, ...]
    final, states = jax.lax.scan(body, carry, xs)
    if not return_trajectory:
        return final["x"]
    if rows["state_rows"].shape[0] != xs["t"].shape[0]:
        states = states[jnp.asarray(rows["state_rows"])]
    return final["x"], jnp.concatenate([x_init[None], states], axis=0)


def check_key(key: Any) -> None:
    if not isinstance(key, jax.Array):
        raise TypeError(f"key must be a jax.random key, got {type(key).__name__}")


def run_plan(
    eps_fn: EpsFn, x_T: jax.Array, key: jax.Array, plan: Plan, return_trajectory: bool
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Runs ``plan`` from the unit-variance noise ``x_T``: ``x_0``, or ``(x_0, trajectory)``."""
    check_key(key)
    return scan_plan(eps_fn, x_T, key, loop_rows(plan), loop_structure(plan), return_trajectory)
