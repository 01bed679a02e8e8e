"""Sampling for users: ``sample(params, key) -> images`` from a config or a training run.

``make_sampler`` binds everything static (network, schedule, sampler settings, labels,
guidance) and returns one jitted pure function of ``(params, key)``; ``load_sampler`` does the
same from a ``scripts/train.py`` workdir and also returns the trained params (the EMA params
when the run kept them).

Example::

    import jax, jaxdiff
    sample, params = jaxdiff.load_sampler("runs/digits", num_images=64, num_steps=50, eta=0.0)
    images = sample(params, jax.random.key(0))   # float32 [64, H, W, C] in [0, 1]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import guidance as guidance_lib
from jaxdiff import samplers, schedules

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
SAMPLERS = ("ddim", "ddpm")


def labels_to_context(labels: Any, num_images: int, num_classes: int) -> jax.Array:
    """Labels -> context vectors ``[num_images, num_classes]``.

    ``labels`` is an int, a sequence of ints (class per image; repeated cyclically to
    ``num_images``), or a float array ``[num_images, num_classes]`` of context vectors (any mix
    of classes, as the course mixes sprite categories).
    """
    arr = np.asarray(labels)
    if arr.ndim == 2:
        if arr.shape != (num_images, num_classes):
            raise ValueError(
                f"A context array must have shape [num_images, num_classes] = "
                f"[{num_images}, {num_classes}], got {list(arr.shape)}."
            )
        return jnp.asarray(arr, jnp.float32)
    arr = np.atleast_1d(arr).astype(np.int64)
    if arr.size == 0:
        raise ValueError("labels is empty; pass at least one class index.")
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        raise ValueError(f"labels {bad.tolist()} are outside [0, {num_classes - 1}].")
    arr = np.resize(arr, num_images)  # cyclic repeat
    return jax.nn.one_hot(jnp.asarray(arr), num_classes, dtype=jnp.float32)


def make_sampler(
    config: ml_collections.ConfigDict,
    *,
    num_images: int | None = None,
    sampler: str | None = None,
    num_steps: int | None = None,
    eta: float | None = None,
    labels: Any = None,
    guidance_scale: float | None = None,
    guidance_fn: Callable[[EpsFn], EpsFn] | None = None,
    return_trajectory: bool = False,
    model: Any = None,
    schedule: schedules.Schedule | None = None,
    progress: bool = False,
) -> Callable[..., Any]:
    """Builds ``sample(params, key)`` for the model a config describes.

    Args:
      config: a training config (``configs/*.py``); ``config.sample`` gives the defaults.
      num_images, sampler ("ddim" / "ddpm"), num_steps, eta: override ``config.sample``.
      labels: for class-conditional models: class indices or context vectors (see
        :func:`labels_to_context`). ``None`` samples unconditionally (the zero context).
      guidance_scale: classifier-free guidance ``eps_u + w (eps_c - eps_u)`` (needs labels).
      guidance_fn: any ``eps_fn -> eps_fn`` wrapper applied last, e.g.
        ``lambda f: guidance.gradient_guidance(f, guidance.color_loss((0.9, 0.1, 0.1)), 30., s)``.
      return_trajectory: also return the states after every step and their timesteps.
      model, schedule: reuse already built objects (default: built from the config).
      progress: show a progress bar over the sampling steps (a host callback per step; the
        loop stays one compiled program).

    Returns:
      ``sample(params, key) -> images`` float32 ``[N, H, W, C]`` in [0, 1] (with
      ``return_trajectory``: ``(images, trajectory [S, N, H, W, C] in [0, 1], timesteps [S])``,
      where ``trajectory[i]`` is the state after the step from ``timesteps[i]``). Jitted: the
      same key gives the same images, and other params of the same shapes do not recompile.
    """
    from jaxdiff.train import (  # Local: train imports this module.
        build_model,
        build_schedule,
        cpu_compiler_options,
        model_num_classes,
    )

    model = build_model(config) if model is None else model
    schedule = build_schedule(config) if schedule is None else schedule
    sc = config.sample
    num_images = int(sc.num_images if num_images is None else num_images)
    sampler = sc.get("sampler", "ddim") if sampler is None else sampler
    num_steps = int(sc.num_steps if num_steps is None else num_steps)
    eta = float(sc.get("eta", 0.0) if eta is None else eta)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}.")
    if num_images < 1:
        raise ValueError(f"num_images={num_images} must be >= 1.")

    num_classes = model_num_classes(model)
    context = None
    if labels is not None:
        if not num_classes:
            raise ValueError(
                "labels were given but this model is unconditional (config.model.num_classes=0); "
                "train with configs/digits.py:conditional or drop labels."
            )
        context = labels_to_context(labels, num_images, num_classes)
    if guidance_scale is not None and context is None:
        raise ValueError("guidance_scale needs labels (classifier-free guidance steers toward a class).")

    size, channels = config.data.image_size, config.data.channels
    sampler_kwargs = dict(
        num_steps=num_steps,
        prediction_type=config.prediction_type,
        clip_sample=bool(sc.get("clip_sample", True)),
        return_trajectory=return_trajectory,
    )
    if sampler == "ddim":
        sampler_kwargs.update(eta=eta, use_clipped_model_output=bool(sc.get("use_clipped_model_output", True)))
        loop = samplers.ddim_sample
    else:
        loop = samplers.ddpm_sample
    timesteps = samplers.inference_timesteps(schedule.num_train_timesteps, num_steps)

    def sample(params, key):
        if num_classes:
            def eps_cond(x, t, c):
                return model.apply({"params": params}, x, t, c)

            if context is None:
                eps_fn = lambda x, t: eps_cond(x, t, jnp.zeros((x.shape[0], num_classes), jnp.float32))  # noqa: E731
            elif guidance_scale is not None:
                eps_fn = guidance_lib.classifier_free(eps_cond, context, guidance_scale)
            else:
                eps_fn = lambda x, t: eps_cond(x, t, context)  # noqa: E731
        else:
            eps_fn = lambda x, t: model.apply({"params": params}, x, t)  # noqa: E731
        if guidance_fn is not None:
            eps_fn = guidance_fn(eps_fn)
        if progress:
            eps_fn = _with_progress(eps_fn, num_steps)
        k_init, k_loop = jax.random.split(key)
        x_T = jax.random.normal(k_init, (num_images, size, size, channels), jnp.float32)
        out = loop(eps_fn, schedule, x_T, k_loop, **sampler_kwargs)
        to_image = lambda x: jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)  # noqa: E731
        if return_trajectory:
            x0, trajectory = out
            return to_image(x0), to_image(trajectory), jnp.asarray(timesteps)
        return to_image(out)

    return jax.jit(sample, compiler_options=cpu_compiler_options())


class _StepBar:
    """A tqdm bar advanced from inside the compiled loop; starts over after ``total`` steps."""

    def __init__(self, total: int):
        self.total, self.bar = total, None

    def __call__(self, t) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.total, desc="sample", unit="step")
        self.bar.update(1)
        self.bar.set_postfix(t=int(np.asarray(t)))
        if self.bar.n >= self.total:
            self.bar.close()
            self.bar = None


def _with_progress(eps_fn, num_steps: int):
    tick = _StepBar(num_steps)

    def wrapped(x, t):
        jax.debug.callback(tick, t[0])
        return eps_fn(x, t)

    return wrapped


def load_params(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *, use_ema: bool = True):
    """The latest params of a training run (EMA params when the run kept them and ``use_ema``)."""
    from jaxdiff import checkpoint as ckpt
    from jaxdiff import train as train_lib

    config = ckpt.read_config(workdir) if config is None else config
    step, state = train_lib.restore_state(workdir, config)
    if state is None:
        raise FileNotFoundError(
            f"No readable checkpoint in {os.fspath(workdir)!r}/checkpoints. Train first: "
            f"python scripts/train.py --config=... --workdir={os.fspath(workdir)}"
        )
    params = state.ema_params if (use_ema and state.ema_params is not None) else state.params
    return params, step


def load_sampler(workdir: str | os.PathLike, **kwargs: Any) -> tuple[Callable[..., Any], Any]:
    """``(sample, params)`` for the newest checkpoint of a ``scripts/train.py`` run.

    Keyword arguments are those of :func:`make_sampler` (num_images, num_steps, eta, labels,
    guidance_scale, ...). Example::

        sample, params = load_sampler("runs/digits", num_images=64, num_steps=50, eta=0.0)
        images = sample(params, jax.random.key(0))
    """
    from jaxdiff import checkpoint as ckpt

    config = ckpt.read_config(workdir)
    params, _ = load_params(workdir, config)
    return make_sampler(config, **kwargs), params

