"""DDPM and DDIM sampling: single steps as pure functions, full loops as one ``lax.scan``.

* DDPM (Ho et al. 2020, arXiv:2006.11239): ancestral sampling from the Gaussian posterior
  ``q(x_{t'} | x_t, x_0)``. With fewer steps than training steps the posterior is the *strided*
  one, between ``t`` and the previous *visited* timestep ``t'``::

      beta'_t = 1 - abar_t / abar_{t'}
      mean    = sqrt(abar_{t'}) beta'_t / (1 - abar_t) x_0 + sqrt(1 - beta'_t) (1 - abar_{t'}) / (1 - abar_t) x_t
      var     = (1 - abar_{t'}) / (1 - abar_t) beta'_t           ("fixed_small")
                beta'_t                                            ("fixed_large")

* DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", arXiv:2010.02502, eq. 12)::

      x_{t'} = sqrt(abar_{t'}) x0_hat + sqrt(1 - abar_{t'} - sigma^2) eps_hat + sigma z
      sigma  = eta sqrt((1 - abar_{t'}) / (1 - abar_t) (1 - abar_t / abar_{t'}))

  ``eta = 0`` is deterministic; ``eta = 1`` has the DDPM ("fixed_small") variance.

Both steps follow diffusers' ``DDPMScheduler.step`` / ``DDIMScheduler.step`` (``clip_sample``,
``use_clipped_model_output``, ``set_alpha_to_one`` via ``final_alpha_cumprod``, the three
prediction types). Networks are plain functions ``eps_fn(x, t) -> model_output`` with ``t`` an
int32 array ``[B]``; randomness is explicit (``noise`` for a step, a required ``key`` for a
loop, per-step keys ``jax.random.fold_in(key, i)``).

The book's sampler ("Learn Generative AI with PyTorch", ch. 15) is
``ddim_sample(eps_fn, book_cosine(1000), x_T, key, **book_ddim_kwargs())``.

Example::

    >>> s = schedules.linear(1000)
    >>> sample = jax.jit(lambda p, x, k: ddim_sample(lambda x, t: net.apply(p, x, t), s, x, k,
    ...                                                num_steps=50))(params, x_T, key)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import schedules as schedules_lib
from jaxdiff.schedules import Schedule
from jaxdiff.solvers import (
    dpm_solver_sample,
    euler_sample,
    heun_sample,
    pndm_sample,
    solver_timesteps,
    unipc_sample,
)

SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
GuideXFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

__all__ = [
    "BOOK_DDIM_KWARGS",
    "SAMPLE_FUNCTIONS",
    "SCHEDULER_CLASSES",
    "SPACINGS",
    "VARIANCE_TYPES",
    "book_ddim_kwargs",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "dpm_solver_sample",
    "euler_sample",
    "heun_sample",
    "inference_timesteps",
    "kwargs_from_diffusers_config",
    "pndm_sample",
    "sampler_for_scheduler_class",
    "solver_timesteps",
    "unipc_sample",
]

BOOK_DDIM_KWARGS: Mapping[str, Any] = {
    "num_steps": 50,
    "eta": 1.0,
    "spacing": "leading",
    "steps_offset": 0,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "use_clipped_model_output": True,
    "prediction_type": "epsilon",
    "final_alpha_cumprod": 1.0,
}
"""The book's DDIM settings (use with ``schedules.book_cosine(1000)``); see :func:`book_ddim_kwargs`."""


def book_ddim_kwargs() -> dict[str, Any]:
    """A fresh copy of :data:`BOOK_DDIM_KWARGS`: 50 leading steps, eta 1, clipped x0 and eps.

    Example::

        >>> x0 = ddim_sample(eps_fn, schedules.book_cosine(1000), x_T, key, **book_ddim_kwargs())
    """
    return dict(BOOK_DDIM_KWARGS)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")


def inference_timesteps(
    num_train_timesteps: int,
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> np.ndarray:
    """The timesteps a sampler visits, int32 ``[num_steps]``, descending.

    As diffusers' ``DDIMScheduler.set_timesteps`` / ``DDPMScheduler.set_timesteps`` define them
    (see Lin et al. 2023, Table 2)::

        "leading":  arange(0, n) * (T // n) + steps_offset, reversed     (T=1000, n=50: 980, ..., 0)
        "trailing": round(arange(T, 0, -T / n)) - 1                      (999, 979, ..., 19)
        "linspace": round(linspace(0, T - 1, n)), reversed               (999, 978.6 -> 979, ..., 0)

    ``steps_offset`` only applies to ``"leading"`` (as in diffusers). For ``"trailing"``, when
    floating point rounding makes ``arange`` yield ``n + 1`` values (e.g. T=100, n=29: the extra
    one would be -1) only the first ``n`` are kept. Returns a concrete NumPy array (static).

    Example::

        >>> inference_timesteps(1000, 50)[:3]   # array([980, 960, 940], dtype=int32)
    """
    num_train_timesteps = schedules_lib._check_num_timesteps(num_train_timesteps)
    _check_choice("spacing", spacing, SPACINGS)
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(
            f"num_steps must be an int in [1, num_train_timesteps={num_train_timesteps}], "
            f"got {num_steps!r}"
        )
    n, total = int(num_steps), num_train_timesteps
    if spacing == "leading":
        steps = (np.arange(0, n) * (total // n)).round()[::-1] + int(steps_offset)
    elif spacing == "trailing":
        steps = (np.round(np.arange(total, 0, -total / n)) - 1)[:n]
    else:
        steps = np.linspace(0, total - 1, n).round()[::-1]
    steps = steps.astype(np.int32)
    if steps.min() < 0 or steps.max() >= total:
        raise ValueError(
            f"timesteps {steps.min()}..{steps.max()} fall outside [0, {total}); "
            f"check steps_offset={steps_offset!r}"
        )
    return steps


SCHEDULER_CLASSES: Mapping[str, str] = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "dpm_solver",
    "UniPCMultistepScheduler": "unipc",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "PNDMScheduler": "pndm",
}
"""diffusers scheduler ``_class_name`` -> the jaxdiff sampler name (a key of :data:`SAMPLE_FUNCTIONS`)."""


def sampler_for_scheduler_class(class_name: str) -> str:
    """The jaxdiff sampler that reproduces the diffusers scheduler ``class_name``.

    Raises ValueError naming the class and listing the supported ones otherwise.

    Example::

        >>> sampler_for_scheduler_class(cfg["_class_name"])   # "DPMSolverMultistepScheduler" -> "dpm_solver"
    """
    if class_name not in SCHEDULER_CLASSES:
        raise ValueError(
            f"diffusers scheduler class {class_name!r} is not supported yet; supported: "
            f"{sorted(SCHEDULER_CLASSES)}"
        )
    return SCHEDULER_CLASSES[class_name]


def _config_value(config: Mapping[str, Any], key: str, default: Any) -> Any:
    """``config[key]``, or diffusers' default when the key is missing or null."""
    value = config.get(key)
    return default if value is None else value


def _solver_kwargs_from_diffusers_config(config: Mapping[str, Any], sampler: str) -> dict[str, Any]:
    """:func:`kwargs_from_diffusers_config` for the samplers of :mod:`jaxdiff.solvers`."""
    class_name = config.get("_class_name", "the scheduler config")
    function = SAMPLE_FUNCTIONS[sampler].__name__

    def get(key: str, default: Any) -> Any:
        return _config_value(config, key, default)

    def require_default(key: str, default: Any) -> None:
        value = get(key, default)
        if value != default and not (isinstance(default, list) and list(value) == default):
            raise ValueError(
                f"{class_name}: {key}={value!r} is not supported by samplers.{function} "
                f"(only {default!r})"
            )

    kwargs: dict[str, Any] = {
        "spacing": get("timestep_spacing", "leading" if sampler == "pndm" else "linspace"),
        "steps_offset": int(get("steps_offset", 0)),
        "prediction_type": get("prediction_type", "epsilon"),
    }
    if sampler in ("dpm_solver", "unipc", "euler", "heun"):
        for key in ("use_exponential_sigmas", "use_beta_sigmas"):
            require_default(key, False)
        kwargs["use_karras_sigmas"] = bool(get("use_karras_sigmas", False))
    if sampler in ("dpm_solver", "unipc"):
        for key in ("thresholding", "use_flow_sigmas", "use_dynamic_shifting"):
            require_default(key, False)
        kwargs["order"] = int(get("solver_order", 2))
        kwargs["lower_order_final"] = bool(get("lower_order_final", True))
        kwargs["final_sigmas_type"] = get("final_sigmas_type", "zero")
    if sampler == "dpm_solver":
        for key in ("euler_at_final", "use_lu_lambdas"):
            require_default(key, False)
        require_default("lambda_min_clipped", -float("inf"))
        require_default("variance_type", None)
        algorithm_type = get("algorithm_type", "dpmsolver++")
        if algorithm_type == "sde-dpmsolver":
            raise ValueError(
                f"{class_name}: algorithm_type='sde-dpmsolver' is not supported by "
                "samplers.dpm_solver_sample (supported: 'dpmsolver++', 'dpmsolver', 'sde-dpmsolver++')"
            )
        # diffusers' own aliases: DEIS configs run as DPM-Solver++, UniPC's solver types as midpoint.
        kwargs["algorithm_type"] = "dpmsolver++" if algorithm_type == "deis" else algorithm_type
        solver_type = get("solver_type", "midpoint")
        kwargs["solver_type"] = "midpoint" if solver_type in ("logrho", "bh1", "bh2") else solver_type
    elif sampler == "unipc":
        for key in ("sigma_min", "sigma_max", "solver_p", "shift_terminal"):
            require_default(key, None)
        require_default("disable_corrector", [])
        solver_type = get("solver_type", "bh2")
        kwargs["solver_type"] = "bh2" if solver_type in ("midpoint", "heun", "logrho") else solver_type
        kwargs["predict_x0"] = bool(get("predict_x0", True))
    elif sampler == "euler":
        for key in ("sigma_min", "sigma_max"):
            require_default(key, None)
        require_default("interpolation_type", "linear")
        require_default("timestep_type", "discrete")
        require_default("final_sigmas_type", "zero")
        kwargs["ancestral"] = False
    elif sampler == "euler_ancestral":
        kwargs["ancestral"] = True
    elif sampler == "heun":
        require_default("clip_sample", False)
    elif sampler == "pndm":
        # skip_prk_steps=False (PNDMScheduler's default) is sampled with the PLMS start too.
        kwargs["final_alpha_cumprod"] = 1.0 if get("set_alpha_to_one", False) else None
    return kwargs


def kwargs_from_diffusers_config(
    config: Mapping[str, Any], schedule: Schedule | None = None, *, sampler: str = "ddim"
) -> dict[str, Any]:
    """Sampler keyword arguments read from a diffusers scheduler config dict.

    ``sampler`` names the jaxdiff sampler (a key of :data:`SAMPLE_FUNCTIONS`; for a config's own
    class use ``sampler_for_scheduler_class(config["_class_name"])``). Missing (or null) keys take
    the defaults of that sampler's diffusers scheduler class.

    * ``"ddim"``, ``"ddpm"``: ``prediction_type``, ``clip_sample``, ``clip_sample_range``,
      ``timestep_spacing`` -> ``spacing``, ``steps_offset`` and (DDIM) ``set_alpha_to_one`` ->
      ``final_alpha_cumprod`` (1.0, or ``schedule.alphas_cumprod[0]`` when False; then
      ``schedule`` is required); DDPM takes ``variance_type`` instead of ``final_alpha_cumprod``.
    * ``"dpm_solver"``, ``"unipc"``, ``"euler"``, ``"euler_ancestral"``, ``"heun"``, ``"pndm"``:
      ``timestep_spacing``, ``steps_offset``, ``prediction_type``, ``use_karras_sigmas``,
      ``solver_order`` -> ``order``, ``algorithm_type``, ``solver_type``, ``lower_order_final``,
      ``final_sigmas_type``, ``predict_x0``; ``"euler"`` / ``"euler_ancestral"`` set ``ancestral``;
      PNDM's ``set_alpha_to_one`` -> ``final_alpha_cumprod`` (1.0 or ``None`` = ``abar_0``).
      diffusers' aliases are honoured (``algorithm_type="deis"`` runs DPM-Solver++; DPM-Solver's
      ``solver_type`` "logrho"/"bh1"/"bh2" is "midpoint", UniPC's "midpoint"/"heun"/"logrho" is
      "bh2"). Settings that change the maths and that jaxdiff does not implement
      (``thresholding``, exponential/beta/flow/Lu sigmas, ``euler_at_final``, a finite
      ``lambda_min_clipped``, learned variances, ``disable_corrector``, ``sigma_min``/``sigma_max``
      overrides, Heun's ``clip_sample``, ``algorithm_type="sde-dpmsolver"``, ...) raise
      ValueError. PNDM configs with ``skip_prk_steps=False`` are sampled with the PLMS start
      (see ``pndm_sample``), so they differ from diffusers' Runge-Kutta warm-up.

    ``rescale_betas_zero_snr`` and the betas belong to ``schedules.from_diffusers_config``.

    Example::

        >>> cfg = json.load(open("scheduler_config.json"))
        >>> s = schedules.from_diffusers_config(cfg)
        >>> x0 = ddim_sample(eps_fn, s, x_T, key, num_steps=50, **kwargs_from_diffusers_config(cfg, s))
        >>> name = sampler_for_scheduler_class(cfg["_class_name"])       # e.g. "dpm_solver"
        >>> x0 = SAMPLE_FUNCTIONS[name](eps_fn, s, x_T, key, num_steps=20,
        ...                             **kwargs_from_diffusers_config(cfg, s, sampler=name))
    """
    _check_choice("sampler", sampler, tuple(SAMPLE_FUNCTIONS))
    if sampler not in ("ddim", "ddpm"):
        return _solver_kwargs_from_diffusers_config(config, sampler)
    kwargs: dict[str, Any] = {
        "prediction_type": config.get("prediction_type", "epsilon"),
        "clip_sample": bool(config.get("clip_sample", True)),
        "clip_sample_range": float(config.get("clip_sample_range", 1.0)),
        "spacing": config.get("timestep_spacing", "leading"),
        "steps_offset": int(config.get("steps_offset", 0)),
    }
    if sampler == "ddpm":
        if "variance_type" in config:
            kwargs["variance_type"] = config["variance_type"]
    elif not config.get("set_alpha_to_one", True):
        if schedule is None:
            raise ValueError("set_alpha_to_one=False needs the schedule to read alphas_cumprod[0]")
        kwargs["final_alpha_cumprod"] = float(schedule.alphas_cumprod[0])
    return kwargs


def _static_float(value: Any) -> float | None:
    """``float(value)`` if ``value`` is a concrete scalar, ``None`` if it is traced."""
    try:
        return float(value)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
        return None


def _abar_pair(
    schedule: Schedule, t: jax.Array, t_prev: jax.Array, final_alpha_cumprod: jax.typing.ArrayLike, ndim: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(abar_t, 1 - abar_t, abar_{t'}, 1 - abar_{t'})`` broadcastable over ``ndim`` dims.

    The ``1 - abar`` terms come from :attr:`Schedule.one_minus_alphas_cumprod` (formed in
    float64), not from the float32 ``abar``: near ``t = 0`` that keeps the posterior's
    coefficients at float32 precision.
    """
    expand = functools.partial(schedules_lib._expand_to, ndim=ndim)
    final = jnp.asarray(final_alpha_cumprod, schedule.alphas_cumprod.dtype)
    prev = jnp.maximum(t_prev, 0)
    abar_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[prev], final)
    one_minus_prev = jnp.where(t_prev >= 0, schedule.one_minus_alphas_cumprod[prev], 1.0 - final)
    return (expand(schedule.alphas_cumprod[t]), expand(schedule.one_minus_alphas_cumprod[t]),
            expand(abar_prev), expand(one_minus_prev))  # fmt: skip


def _strided_beta(abar_t: jax.Array, om_t: jax.Array, abar_prev: jax.Array, om_prev: jax.Array) -> jax.Array:
    """``beta'_t = 1 - abar_t / abar_{t'}``, in whichever form keeps float32 precision.

    ``((1 - abar_t) - (1 - abar_{t'})) / abar_{t'}`` while ``abar_{t'} >= 1/2`` (near t = 0 the
    ratio is within 1e-4 of 1 and ``1 - ratio`` loses digits), the ratio itself below (near
    t = T the ``1 - abar`` values are within ``abar`` of 1 and their difference loses digits).
    """
    return jnp.where(abar_prev >= 0.5, (om_t - om_prev) / abar_prev, 1.0 - abar_t / abar_prev)


def ddim_step(
    schedule: Schedule,
    model_output: jax.Array,
    t: jax.typing.ArrayLike,
    t_prev: jax.typing.ArrayLike,
    x_t: jax.Array,
    *,
    eta: jax.typing.ArrayLike = 0.0,
    noise: jax.Array | None = None,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    use_clipped_model_output: bool = False,
    prediction_type: str = "epsilon",
    final_alpha_cumprod: jax.typing.ArrayLike = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM step from ``t`` to ``t_prev`` (Song et al. 2021, eq. 12), as diffusers does it.

    ::

        x0_hat, eps_hat = to_x0_and_eps(model_output)         # then clip x0_hat if clip_sample
        eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)   if use_clipped_model_output
        sigma   = eta sqrt((1 - abar_{t'}) / (1 - abar_t) (1 - abar_t / abar_{t'}))
        x_{t'}  = sqrt(abar_{t'}) x0_hat + sqrt(1 - abar_{t'} - sigma^2) eps_hat + sigma noise

    ``abar_{t'} = final_alpha_cumprod`` where ``t_prev < 0`` (1.0, or ``abar_0`` for diffusers'
    ``set_alpha_to_one=False``). ``t`` and ``t_prev`` are scalars or int arrays ``[B]`` broadcast
    over the trailing dims of ``x_t``.

    Args:
      noise: the standard normal draw ``z`` (shape of ``x_t``). Required when ``eta`` is a
        Python number > 0 or a traced value; a ValueError otherwise.

    Returns:
      ``(x_prev, x0_pred)``, both with the shape and dtype of ``x_t``.

    Example::

        >>> x_prev, x0 = ddim_step(s, eps_fn(x, t), t, t - 20, x)            # eta = 0
        >>> x_prev, x0 = ddim_step(s, eps, t, t - 20, x, eta=1.0, noise=jax.random.normal(k, x.shape))
    """
    schedules_lib.check_prediction_type(prediction_type)
    eta_value = _static_float(eta)
    if noise is None and (eta_value is None or eta_value > 0):
        raise ValueError(
            f"ddim_step with eta={eta!r} needs an explicit `noise` draw "
            "(e.g. jax.random.normal(key, x_t.shape)); only eta=0 is deterministic"
        )
    if eta_value is not None and eta_value < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    ndim = jnp.ndim(x_t)
    t = jnp.asarray(t)
    t_prev = jnp.asarray(t_prev)
    abar_t, om_t, abar_prev, om_prev = _abar_pair(schedule, t, t_prev, final_alpha_cumprod, ndim)

    x0_pred, eps_pred = schedules_lib.x0_and_eps_from_abar(
        abar_t, model_output, x_t, prediction_type, om_t
    )
    if clip_sample:
        x0_pred = jnp.clip(x0_pred, -clip_sample_range, clip_sample_range)
    if use_clipped_model_output:
        eps_pred = (x_t - jnp.sqrt(abar_t) * x0_pred) / jnp.sqrt(om_t)

    variance = om_prev / om_t * _strided_beta(abar_t, om_t, abar_prev, om_prev)
    sigma = jnp.asarray(eta, abar_t.dtype) * jnp.sqrt(jnp.maximum(variance, 0.0))
    # Clamped: rounding can make the (mathematically >= 0) radicand slightly negative.
    direction = jnp.sqrt(jnp.maximum(om_prev - sigma**2, 0.0)) * eps_pred
    x_prev = jnp.sqrt(abar_prev) * x0_pred + direction
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev.astype(x_t.dtype), x0_pred.astype(x_t.dtype)


def ddpm_step(
    schedule: Schedule,
    model_output: jax.Array,
    t: jax.typing.ArrayLike,
    x_t: jax.Array,
    *,
    t_prev: jax.typing.ArrayLike | None = None,
    noise: jax.Array | None = None,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
) -> tuple[jax.Array, jax.Array]:
    """One ancestral DDPM step from ``t`` to ``t_prev`` (Ho et al. 2020, eqs. 6-7), strided.

    ::

        abar_{t'} = alphas_cumprod[t_prev]  (1 where t_prev < 0),  beta'_t = 1 - abar_t / abar_{t'}
        mean = sqrt(abar_{t'}) beta'_t / (1 - abar_t) x0_hat + sqrt(1 - beta'_t) (1 - abar_{t'}) / (1 - abar_t) x_t
        var  = max((1 - abar_{t'}) / (1 - abar_t) beta'_t, 1e-20)   "fixed_small"  (posterior)
               beta'_t                                               "fixed_large"
        x_{t'} = mean + sqrt(var) noise   where t > 0;  mean where t == 0

    Everything is derived from ``alphas_cumprod`` (as diffusers does), so the coefficients stay
    consistent near ``t = 0``, where ``1 - abar_t`` in float32 keeps only a few digits.

    With ``t_prev = t - 1`` (the default) this is the 1000-step DDPM; the loops pass the next
    visited timestep, so a 50-step DDPM uses the strided posterior ``beta'_t``, *not*
    ``betas[t]``. As in diffusers, noise is added wherever ``t > 0`` (so "trailing" spacing with
    ``"fixed_large"`` adds noise of variance ``beta'_t`` even on its last step, t=19 -> -1).

    Args:
      noise: the standard normal draw (shape of ``x_t``). Required unless ``t`` is a concrete
        value that is 0 everywhere; a ValueError otherwise.

    Returns:
      ``(x_prev, x0_pred)``, both with the shape and dtype of ``x_t``.

    Example::

        >>> x_prev, x0 = ddpm_step(s, eps_fn(x, t), t, x, noise=jax.random.normal(k, x.shape))
    """
    schedules_lib.check_prediction_type(prediction_type)
    _check_choice("variance_type", variance_type, VARIANCE_TYPES)
    if noise is None:
        try:
            all_zero = bool(np.all(np.asarray(t) == 0))
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            all_zero = False
        if not all_zero:
            raise ValueError(
                "ddpm_step needs an explicit `noise` draw (e.g. jax.random.normal(key, x_t.shape)) "
                f"unless t is a concrete 0; got t={t!r}"
            )
    ndim = jnp.ndim(x_t)
    t = jnp.asarray(t)
    t_prev = t - 1 if t_prev is None else jnp.asarray(t_prev)
    abar_t, om_t, abar_prev, om_prev = _abar_pair(schedule, t, t_prev, 1.0, ndim)
    beta_t = _strided_beta(abar_t, om_t, abar_prev, om_prev)
    alpha_t = 1.0 - beta_t

    x0_pred, _ = schedules_lib.x0_and_eps_from_abar(abar_t, model_output, x_t, prediction_type, om_t)
    if clip_sample:
        x0_pred = jnp.clip(x0_pred, -clip_sample_range, clip_sample_range)

    x0_coeff = jnp.sqrt(abar_prev) * beta_t / om_t
    xt_coeff = jnp.sqrt(alpha_t) * om_prev / om_t
    x_prev = x0_coeff * x0_pred + xt_coeff * x_t
    if noise is not None:
        if variance_type == "fixed_small":
            variance = jnp.maximum(om_prev / om_t * beta_t, 1e-20)
        else:
            variance = beta_t
        std = jnp.where(schedules_lib._expand_to(t, ndim) > 0, jnp.sqrt(variance), 0.0)
        x_prev = x_prev + std * noise
    return x_prev.astype(x_t.dtype), x0_pred.astype(x_t.dtype)


def _sample_loop(
    step_fn: Callable[..., tuple[jax.Array, jax.Array]],
    eps_fn: EpsFn,
    x_T: jax.Array,
    key: jax.Array,
    timesteps: np.ndarray,
    draw_noise: bool,
    return_trajectory: bool,
    guide_x_fn: GuideXFn | None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Shared scan: step ``i`` goes from ``timesteps[i]`` to ``timesteps[i + 1]`` (last: -1)."""
    if not isinstance(key, jax.Array):
        raise TypeError(f"key must be a jax.random key, got {type(key).__name__}")
    batch = x_T.shape[0]
    ts = jnp.asarray(timesteps, jnp.int32)
    ts_prev = jnp.concatenate([ts[1:], jnp.full((1,), -1, jnp.int32)])
    steps = jnp.arange(len(timesteps), dtype=jnp.int32)

    def body(x, inputs):
        i, t, t_prev = inputs
        t_batch = jnp.full((batch,), t, jnp.int32)  # [B]
        if guide_x_fn is None:
            model_output = eps_fn(x, t_batch)
        else:
            x, model_output = guide_x_fn(x, t_batch)
        # One key per step for the whole batch: identical numbers whatever the device count.
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) if draw_noise else None
        x_prev, _ = step_fn(model_output, t_batch, jnp.full((batch,), t_prev, jnp.int32), x, noise)
        return x_prev, (x_prev if return_trajectory else None)

    x_0, trajectory = jax.lax.scan(body, x_T, (steps, ts, ts_prev))
    if not return_trajectory:
        return x_0
    return x_0, jnp.concatenate([x_T[None].astype(trajectory.dtype), trajectory], axis=0)


def ddim_sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    num_steps: int = 50,
    eta: jax.typing.ArrayLike = 0.0,
    spacing: str = "leading",
    steps_offset: int = 0,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    use_clipped_model_output: bool = False,
    prediction_type: str = "epsilon",
    final_alpha_cumprod: jax.typing.ArrayLike = 1.0,
    return_trajectory: bool = False,
    guide_x_fn: GuideXFn | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """DDIM sampling (Song et al. 2021) from ``x_T`` as one ``lax.scan`` over :func:`ddim_step`.

    The loop visits ``inference_timesteps(T, num_steps, spacing, steps_offset)`` and steps from
    each to the *next one in that list* (the last to ``t_prev = -1``, i.e. to
    ``final_alpha_cumprod``). For "leading" spacing this is diffusers' ``t - T // num_steps``;
    for "linspace", and for "trailing" when ``num_steps`` does not divide ``T``, diffusers'
    ``DDIMScheduler.step`` still goes to ``t - T // num_steps``, which is not the next listed
    timestep (e.g. linspace, T=1000, n=10: 999 -> 899 although the next model call is at 888),
    so its trajectory differs from this one; jaxdiff does not copy that.

    Args:
      eps_fn: ``eps_fn(x, t) -> model_output`` with ``t`` int32 ``[B]``; the output's
        parametrisation is ``prediction_type``. Traced once, whatever ``num_steps``.
      schedule: the training schedule.
      x_T: the initial noise ``[B, ...]``.
      key: a required ``jax.random.key``; step ``i`` draws its noise (only when ``eta`` is not a
        Python 0) from ``fold_in(key, i)`` for the whole batch.
      num_steps: static Python int in ``[1, T]``.
      eta, clip_sample, clip_sample_range, use_clipped_model_output, prediction_type,
        final_alpha_cumprod: as in :func:`ddim_step`.
      return_trajectory: also return the states from ``x_T`` to ``x_0``, ``[num_steps + 1, B, ...]``:
        ``trajectory[0] == x_T``, ``trajectory[i + 1]`` is the result of the step from
        ``timesteps[i]`` (get ``timesteps`` from :func:`inference_timesteps` with the same
        arguments) and ``trajectory[-1] == x_0``.
      guide_x_fn: optional ``(x_t, t) -> (x_t_guided, model_output)`` called *instead of*
        ``eps_fn``; the step then starts from ``x_t_guided`` (see
        ``guidance.gradient_guidance(form="notebook")``).

    Returns:
      ``x_0`` or ``(x_0, trajectory)``.

    Example::

        >>> x0 = jax.jit(lambda p, x, k: ddim_sample(partial(apply, p), s, x, k, num_steps=20))(
        ...     params, jax.random.normal(k0, (8, 64, 64, 3)), jax.random.key(1))
    """
    timesteps = inference_timesteps(schedule.num_train_timesteps, num_steps, spacing, steps_offset)
    schedules_lib.check_prediction_type(prediction_type)
    eta_value = _static_float(eta)
    draw_noise = eta_value is None or eta_value > 0

    def step(model_output, t, t_prev, x, noise):
        return ddim_step(
            schedule, model_output, t, t_prev, x,
            eta=eta, noise=noise, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
            use_clipped_model_output=use_clipped_model_output, prediction_type=prediction_type,
            final_alpha_cumprod=final_alpha_cumprod,
        )  # fmt: skip

    return _sample_loop(
        step, eps_fn, x_T, key, timesteps, draw_noise, return_trajectory, guide_x_fn
    )


def ddpm_sample(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array,
    *,
    num_steps: int | None = None,
    spacing: str = "leading",
    steps_offset: int = 0,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    return_trajectory: bool = False,
    guide_x_fn: GuideXFn | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Ancestral DDPM sampling (Ho et al. 2020) as one ``lax.scan`` over :func:`ddpm_step`.

    ``num_steps`` defaults to ``T`` (every timestep). With fewer steps the loop visits
    ``inference_timesteps(T, num_steps, spacing, steps_offset)`` and uses the strided posterior
    between consecutive visited timesteps (the last goes to ``-1``, ``abar = 1``). Step ``i``
    draws noise from ``fold_in(key, i)``. Other arguments are as in :func:`ddim_sample` and
    :func:`ddpm_step`.

    Example::

        >>> x0 = ddpm_sample(eps_fn, schedules.linear(1000), x_T, jax.random.key(0), num_steps=100)
    """
    num_steps = schedule.num_train_timesteps if num_steps is None else num_steps
    timesteps = inference_timesteps(schedule.num_train_timesteps, num_steps, spacing, steps_offset)
    schedules_lib.check_prediction_type(prediction_type)
    _check_choice("variance_type", variance_type, VARIANCE_TYPES)

    def step(model_output, t, t_prev, x, noise):
        return ddpm_step(
            schedule, model_output, t, x,
            t_prev=t_prev, noise=noise, clip_sample=clip_sample,
            clip_sample_range=clip_sample_range, prediction_type=prediction_type,
            variance_type=variance_type,
        )  # fmt: skip

    return _sample_loop(step, eps_fn, x_T, key, timesteps, True, return_trajectory, guide_x_fn)


SAMPLE_FUNCTIONS: Mapping[str, Callable[..., Any]] = {
    "ddim": ddim_sample,
    "ddpm": ddpm_sample,
    "dpm_solver": dpm_solver_sample,
    "unipc": unipc_sample,
    "euler": euler_sample,
    "euler_ancestral": euler_sample,  # with ancestral=True (kwargs_from_diffusers_config sets it)
    "heun": heun_sample,
    "pndm": pndm_sample,
}
"""Sampler name -> sampling function, all called as ``f(eps_fn, schedule, x_T, key, **kwargs)``."""
