"""Noise schedules, the forward process and conversions between model parametrisations.

A :class:`Schedule` holds the per-timestep variances of the forward (noising) process of a
denoising diffusion model (Ho et al. 2020, "Denoising Diffusion Probabilistic Models",
arXiv:2006.11239)::

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),    abar_t = prod_{s <= t} (1 - beta_s)

Timesteps are 0-based, as in diffusers: ``alphas_cumprod[0] = 1 - betas[0]``.

Three parametrisations of the network output are supported and converted into one another
with the small functions below (``x_t = a x_0 + b eps`` with ``a = sqrt(abar_t)``,
``b = sqrt(1 - abar_t)``, so ``a^2 + b^2 = 1``):

* ``"epsilon"``: the noise ``eps`` (Ho et al. 2020);
* ``"sample"``: the clean sample ``x_0``;
* ``"v_prediction"``: the velocity ``v = a eps - b x_0`` (Salimans & Ho 2022, "Progressive
  Distillation for Fast Sampling of Diffusion Models", arXiv:2202.00512).

Schedules are built in NumPy (float64 unless a reference fixes float32) and stored as float32
``jax.Array``; a schedule is a pytree, so it can be passed to, and closed over by, jitted code.

Example::

    >>> s = linear(1000)
    >>> x_t = add_noise(s, x0, noise, jnp.array([10, 500]))
    >>> x0_hat = x0_from_eps(s, x_t, noise, jnp.array([10, 500]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

__all__ = [
    "PREDICTION_TYPES",
    "SCHEDULES",
    "Schedule",
    "add_noise",
    "book_cosine",
    "check_prediction_type",
    "cosine",
    "eps_from_v",
    "eps_from_x0",
    "from_betas",
    "from_diffusers_config",
    "get",
    "linear",
    "rescale_zero_terminal_snr",
    "scale_snr",
    "scaled_linear",
    "snr",
    "to_x0_and_eps",
    "v_from_eps",
    "v_from_x0",
    "velocity",
    "x0_from_eps",
    "x0_and_eps_from_abar",
    "x0_from_v",
]


@flax.struct.dataclass
class Schedule:
    """Variances of the forward process, float32 arrays of shape ``[T]``.

    Attributes:
      betas: ``beta_t``, the variance added at step ``t``.
      alphas: ``1 - beta_t``.
      alphas_cumprod: ``abar_t = prod_{s<=t} alphas_s``.
      one_minus_alphas_cumprod: ``1 - abar_t``, computed before the float32 cast (in float64
        unless a reference fixes float32): near ``t = 0``, ``1 - abar_t`` formed from a float32
        ``abar_t`` keeps only about four digits (``abar_1 = 0.9997``), which moved a DDPM step at
        t = 1 by 1.7e-4 from its float64 value.
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    one_minus_alphas_cumprod: jax.Array

    @property
    def num_train_timesteps(self) -> int:
        """``T``, a static Python int read from the array shape (usable under ``jit``)."""
        return int(self.betas.shape[0])


def _check_num_timesteps(num_train_timesteps: int) -> int:
    if not isinstance(num_train_timesteps, (int, np.integer)) or num_train_timesteps <= 0:
        raise ValueError(
            f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}"
        )
    return int(num_train_timesteps)


def _check_beta_range(beta_start: float, beta_end: float) -> None:
    if not (0.0 < beta_start < beta_end < 1.0):
        raise ValueError(
            "need 0 < beta_start < beta_end < 1, got "
            f"beta_start={beta_start!r}, beta_end={beta_end!r}"
        )


def from_betas(betas: Any, *, cumprod_dtype: Any = np.float64) -> Schedule:
    """Builds a :class:`Schedule` from ``betas`` (``alphas = 1 - betas``, ``abar = cumprod``).

    Args:
      betas: ``[T]`` values in ``(0, 1]``.
      cumprod_dtype: NumPy dtype in which ``alphas`` and their cumulative product are computed
        before the float32 cast (float64 by default; the book's schedule uses float32).

    Example::

        >>> s = from_betas(np.full(10, 0.01))
        >>> s.alphas_cumprod[-1]  # 0.99 ** 10
    """
    betas = np.asarray(betas)
    if betas.ndim != 1 or betas.shape[0] == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas > 1):
        raise ValueError("betas must be finite and in (0, 1]")
    betas_c = betas.astype(cumprod_dtype)
    alphas = (1 - betas_c).astype(cumprod_dtype)
    alphas_cumprod = np.cumprod(alphas, dtype=cumprod_dtype)
    return Schedule(
        betas=jnp.asarray(betas.astype(np.float32)),
        alphas=jnp.asarray(alphas.astype(np.float32)),
        alphas_cumprod=jnp.asarray(alphas_cumprod.astype(np.float32)),
        one_minus_alphas_cumprod=jnp.asarray((1 - alphas_cumprod).astype(cumprod_dtype).astype(np.float32)),
    )


def linear(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Schedule:
    """Linear betas of Ho et al. 2020: ``beta_t = linspace(beta_start, beta_end, T)[t]``.

    diffusers' ``beta_schedule="linear"``.

    Example::

        >>> s = linear(1000)       # the DDPM CIFAR-10 / ddpm-cat-256 schedule
    """
    num_train_timesteps = _check_num_timesteps(num_train_timesteps)
    _check_beta_range(beta_start, beta_end)
    return from_betas(np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64))


def scaled_linear(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Schedule:
    """Latent-diffusion schedule: ``beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)[t]^2``.

    diffusers' ``beta_schedule="scaled_linear"`` (Rombach et al. 2022).

    Example::

        >>> s = scaled_linear(1000, beta_start=0.00085, beta_end=0.012)
    """
    num_train_timesteps = _check_num_timesteps(num_train_timesteps)
    _check_beta_range(beta_start, beta_end)
    roots = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64)
    return from_betas(roots**2)


def _cosine_alpha_bar(t: np.ndarray, s: float) -> np.ndarray:
    return np.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine(num_train_timesteps: int = 1000, max_beta: float = 0.999, s: float = 0.008) -> Schedule:
    """Cosine schedule of Nichol & Dhariwal 2021 ("Improved DDPM", arXiv:2102.09672, eq. 17).

    ``f(u) = cos((u + s)/(1 + s) * pi/2)^2``,
    ``beta_t = min(1 - f((t+1)/T) / f(t/T), max_beta)`` in float64;
    diffusers' ``beta_schedule="squaredcos_cap_v2"``.

    Example::

        >>> s = cosine(1000)
    """
    num_train_timesteps = _check_num_timesteps(num_train_timesteps)
    if not 0.0 < max_beta <= 1.0:
        raise ValueError(f"max_beta must be in (0, 1], got {max_beta!r}")
    if not s >= 0.0:
        raise ValueError(f"s must be >= 0, got {s!r}")
    steps = np.arange(num_train_timesteps, dtype=np.float64)
    t1 = steps / num_train_timesteps
    t2 = (steps + 1) / num_train_timesteps
    betas = np.minimum(1 - _cosine_alpha_bar(t2, s) / _cosine_alpha_bar(t1, s), max_beta)
    return from_betas(betas)


def book_cosine(
    num_train_timesteps: int = 1000,
    s: float = 0.008,
    beta_min: float = 1e-4,
    beta_max: float = 0.02,
) -> Schedule:
    """The book's schedule: cosine (Nichol & Dhariwal 2021) with betas clipped, all in float32.

    ``abar(x) = cos(((x/T) + s)/(1 + s) * pi/2)^2 / abar(0)`` for ``x = 0..T``,
    ``beta_t = clip(1 - abar(t+1)/abar(t), beta_min, beta_max)``,
    ``alphas_cumprod = cumprod(1 - beta)``, every operation in float32 as the book's PyTorch
    code does (its ``DDIMScheduler`` defaults; at T=1000, 13 betas are clipped up and 98 down,
    and ``abar_999 = 0.0031948``).

    Example::

        >>> s = book_cosine(1000)
        >>> float(s.alphas_cumprod[999])  # 0.0031948339
    """
    num_train_timesteps = _check_num_timesteps(num_train_timesteps)
    _check_beta_range(beta_min, beta_max)
    f32 = np.float32
    x = np.linspace(0, num_train_timesteps, num_train_timesteps + 1, dtype=f32)
    abar = np.cos(((x / f32(num_train_timesteps)) + f32(s)) / f32(1 + s) * f32(math.pi) * f32(0.5))
    abar = (abar**2).astype(f32)
    abar = abar / abar[0]
    betas = np.clip(1 - abar[1:] / abar[:-1], f32(beta_min), f32(beta_max)).astype(f32)
    return from_betas(betas, cumprod_dtype=f32)


def rescale_zero_terminal_snr(schedule: Schedule) -> Schedule:
    """Rescales a schedule to zero terminal SNR (Lin et al. 2023, arXiv:2305.08891, Alg. 1).

    ``sqrt(abar)`` is shifted so that its last value is 0 and scaled so that its first value
    is unchanged; betas are re-derived from the new ``abar`` (``beta_0 = 1 - abar_0``) and
    ``alphas_cumprod`` is recomputed from them, exactly as diffusers'
    ``rescale_zero_terminal_snr`` with ``rescale_betas_zero_snr=True`` does. The last
    ``abar`` is then exactly 0, so the model must predict ``v`` (or ``x_0``): ``x_0`` cannot be
    recovered from ``eps`` at the last timestep. Works on concrete and traced schedules.

    Example::

        >>> s = rescale_zero_terminal_snr(scaled_linear(1000))
        >>> float(s.alphas_cumprod[-1])  # 0.0
    """
    alphas_cumprod = jnp.cumprod(1.0 - schedule.betas.astype(jnp.float32))
    sqrt_abar = jnp.sqrt(alphas_cumprod)
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = jnp.concatenate([abar[:1], abar[1:] / abar[:-1]])
    betas = 1.0 - alphas
    alphas = 1.0 - betas
    abar = jnp.cumprod(alphas)
    return Schedule(betas=betas, alphas=alphas, alphas_cumprod=abar, one_minus_alphas_cumprod=1.0 - abar)


def scale_snr(schedule: Schedule, snr_scale: float) -> Schedule:
    """The schedule with its signal-to-noise ratio multiplied by ``snr_scale`` at every timestep.

    ``SNR_t = abar_t / (1 - abar_t)`` becomes ``snr_scale * SNR_t``, i.e. ``log SNR`` is shifted
    by ``log(snr_scale)``: ``abar'_t = s abar_t / (1 + (s - 1) abar_t)``, betas re-derived as
    ``1 - abar'_t / abar'_{t-1}`` in float64. The "shifted" schedules of Hoogeboom et al. 2023
    ("simple diffusion", arXiv:2301.11093, sec. 3.1), who shift the cosine schedule's log SNR
    by ``2 log(64 / d)`` for ``d x d`` images: fewer pixels need less noise to hide the same
    image (``snr_scale > 1``), more pixels more (``< 1``). ``snr_scale = 1`` returns the
    schedule unchanged. Concrete schedules only (the tables are NumPy).

    Example::

        >>> s = scale_snr(cosine(1000), 4.0)       # e.g. 8x8 images, 4x the SNR of cosine's
        >>> float(snr(s, 500) / snr(cosine(1000), 500))  # 4.0
    """
    if not (isinstance(snr_scale, (int, float, np.floating)) and math.isfinite(snr_scale) and snr_scale > 0):
        raise ValueError(f"snr_scale must be a finite number > 0 (1 = unchanged), got {snr_scale!r}")
    if snr_scale == 1:
        return schedule
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    one_minus = np.asarray(schedule.one_minus_alphas_cumprod, np.float64)
    denom = one_minus + snr_scale * abar  # 1 + (s - 1) abar, without cancelling where abar ~ 1
    new = snr_scale * abar / denom
    betas = np.concatenate([one_minus[:1] / denom[:1], 1.0 - new[1:] / new[:-1]])  # beta_0 = 1 - abar'_0, exactly
    return from_betas(np.clip(betas, np.finfo(np.float64).tiny, 1.0))


SCHEDULES: Mapping[str, Callable[..., Schedule]] = {
    "linear": linear,
    "scaled_linear": scaled_linear,
    "squaredcos_cap_v2": cosine,
    "cosine": cosine,
    "book_cosine": book_cosine,
}
"""Schedule names (diffusers' ``beta_schedule`` values plus ``"book_cosine"``) -> builders."""


def get(name: str, num_train_timesteps: int = 1000, *, snr_scale: float = 1.0, **kwargs: Any) -> Schedule:
    """Builds the schedule called ``name`` (a key of :data:`SCHEDULES`), its SNR times ``snr_scale``
    (:func:`scale_snr`; 1 = as published).

    Example::

        >>> s = get("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
        >>> s8 = get("cosine", 1000, snr_scale=4.0)   # cosine shifted for small images
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    return scale_snr(SCHEDULES[name](num_train_timesteps, **kwargs), snr_scale)


def from_diffusers_config(config: Mapping[str, Any]) -> Schedule:
    """Builds the schedule a diffusers ``scheduler_config.json`` (as a dict) describes.

    Reads ``num_train_timesteps`` (default 1000), ``beta_schedule`` (default ``"linear"``),
    ``beta_start`` / ``beta_end`` (defaults 1e-4 / 0.02, ignored by the cosine schedule),
    ``trained_betas`` (used as is when not null) and ``rescale_betas_zero_snr``. Sampler
    settings of the same config are read by ``samplers.kwargs_from_diffusers_config``.

    Example::

        >>> s = from_diffusers_config(json.load(open("scheduler_config.json")))
    """
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    trained_betas = config.get("trained_betas")
    if trained_betas is not None:
        schedule = from_betas(np.asarray(trained_betas, dtype=np.float64))
    else:
        name = config.get("beta_schedule", "linear")
        if name in ("linear", "scaled_linear"):
            kwargs = {
                "beta_start": float(config.get("beta_start", 1e-4)),
                "beta_end": float(config.get("beta_end", 0.02)),
            }
        else:
            kwargs = {}
        schedule = get(name, num_train_timesteps, **kwargs)
    if config.get("rescale_betas_zero_snr", False):
        schedule = rescale_zero_terminal_snr(schedule)
    return schedule


# ----------------------------------------------------------------------------------------
# Forward process and parametrisation conversions.


def _coefficients(
    schedule: Schedule, t: jax.typing.ArrayLike, ndim: int
) -> tuple[jax.Array, jax.Array]:
    """``(sqrt(abar_t), sqrt(1 - abar_t))`` shaped to broadcast over an ``ndim``-D array."""
    t = jnp.asarray(t)
    abar = _expand_to(schedule.alphas_cumprod[t], ndim)
    one_minus = _expand_to(schedule.one_minus_alphas_cumprod[t], ndim)
    return jnp.sqrt(abar), jnp.sqrt(one_minus)


def _expand_to(values: jax.Array, ndim: int) -> jax.Array:
    """Appends unit axes so that per-sample ``values`` [B] broadcast over trailing dims."""
    values = jnp.asarray(values)
    if values.ndim > ndim:
        raise ValueError(f"timesteps of shape {values.shape} do not fit an array of rank {ndim}")
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _cast(x: jax.Array, like: jax.Array) -> jax.Array:
    return x.astype(jnp.result_type(like))


def snr(schedule: Schedule, t: jax.typing.ArrayLike) -> jax.Array:
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` (Kingma et al. 2021, VDM)."""
    t = jnp.asarray(t)
    return schedule.alphas_cumprod[t] / schedule.one_minus_alphas_cumprod[t]


def add_noise(
    schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.typing.ArrayLike
) -> jax.Array:
    """Samples ``q(x_t | x_0)``: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.

    ``t`` is a scalar or an int array ``[B]`` (broadcast over the trailing dims of ``x0``).
    The result has the dtype of ``x0``.

    Example::

        >>> x_t = add_noise(s, x0, jax.random.normal(key, x0.shape), jnp.array([3, 977]))
    """
    a, b = _coefficients(schedule, t, jnp.ndim(x0))
    return _cast(a * x0 + b * noise, x0)


def velocity(
    schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.typing.ArrayLike
) -> jax.Array:
    """The v-prediction target ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (Salimans & Ho 2022)."""
    a, b = _coefficients(schedule, t, jnp.ndim(x0))
    return _cast(a * noise - b * x0, x0)


def x0_from_eps(
    schedule: Schedule, x_t: jax.Array, eps: jax.Array, t: jax.typing.ArrayLike
) -> jax.Array:
    """``x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
    a, b = _coefficients(schedule, t, jnp.ndim(x_t))
    return _cast((x_t - b * eps) / a, x_t)


def eps_from_x0(
    schedule: Schedule, x_t: jax.Array, x0: jax.Array, t: jax.typing.ArrayLike
) -> jax.Array:
    """``eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)``."""
    a, b = _coefficients(schedule, t, jnp.ndim(x_t))
    return _cast((x_t - a * x0) / b, x_t)


def x0_from_v(
    schedule: Schedule, x_t: jax.Array, v: jax.Array, t: jax.typing.ArrayLike
) -> jax.Array:
    """``x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v``."""
    a, b = _coefficients(schedule, t, jnp.ndim(x_t))
    return _cast(a * x_t - b * v, x_t)


def eps_from_v(
    schedule: Schedule, x_t: jax.Array, v: jax.Array, t: jax.typing.ArrayLike
) -> jax.Array:
    """``eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v``."""
    a, b = _coefficients(schedule, t, jnp.ndim(x_t))
    return _cast(b * x_t + a * v, x_t)


def v_from_eps(
    schedule: Schedule, x_t: jax.Array, eps: jax.Array, t: jax.typing.ArrayLike
) -> jax.Array:
    """``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 = (eps - sqrt(1 - abar_t) x_t) / sqrt(abar_t)``."""
    a, b = _coefficients(schedule, t, jnp.ndim(x_t))
    return _cast((eps - b * x_t) / a, x_t)


def v_from_x0(
    schedule: Schedule, x_t: jax.Array, x0: jax.Array, t: jax.typing.ArrayLike
) -> jax.Array:
    """``v = (sqrt(abar_t) x_t - x_0) / sqrt(1 - abar_t)``."""
    a, b = _coefficients(schedule, t, jnp.ndim(x_t))
    return _cast((a * x_t - x0) / b, x_t)


def check_prediction_type(prediction_type: str) -> str:
    """Raises ValueError unless ``prediction_type`` is one of :data:`PREDICTION_TYPES`."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected one of {list(PREDICTION_TYPES)}"
        )
    return prediction_type


def x0_and_eps_from_abar(
    abar_t: jax.Array,
    model_output: jax.Array,
    x_t: jax.Array,
    prediction_type: str,
    one_minus_abar_t: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`to_x0_and_eps` with ``abar_t`` given directly (already broadcastable to ``x_t``).

    ``one_minus_abar_t``: ``1 - abar_t`` where it is known more precisely than from ``abar_t``
    (:attr:`Schedule.one_minus_alphas_cumprod`).
    """
    check_prediction_type(prediction_type)
    one_minus = 1.0 - abar_t if one_minus_abar_t is None else one_minus_abar_t
    a, b = jnp.sqrt(abar_t), jnp.sqrt(one_minus)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - b * eps) / a
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - a * x0) / b
    else:  # v_prediction
        x0 = a * x_t - b * model_output
        eps = b * x_t + a * model_output
    return _cast(x0, x_t), _cast(eps, x_t)


def to_x0_and_eps(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.typing.ArrayLike,
    prediction_type: str = "epsilon",
) -> tuple[jax.Array, jax.Array]:
    """Converts a network output of any parametrisation to ``(x0_pred, eps_pred)``.

    ``prediction_type`` is ``"epsilon"``, ``"sample"`` or ``"v_prediction"`` (see the module
    docstring for the equations). ``t`` is a scalar or an int array ``[B]``.

    Example::

        >>> x0, eps = to_x0_and_eps(s, v_pred, x_t, t, "v_prediction")
    """
    check_prediction_type(prediction_type)
    t = jnp.asarray(t)
    abar = _expand_to(schedule.alphas_cumprod[t], jnp.ndim(x_t))
    one_minus = _expand_to(schedule.one_minus_alphas_cumprod[t], jnp.ndim(x_t))
    return x0_and_eps_from_abar(abar, model_output, x_t, prediction_type, one_minus)
