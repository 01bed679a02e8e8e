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
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdiff import guidance as guidance_lib
from jaxdiff import samplers, schedules
from jaxdiff.builders import (
    SAMPLERS,
    build_model,
    build_schedule,
    check_sampler,
    model_num_classes,
    sampler_arguments,
    validate_model_config,
)
from jaxdiff.cpu_options import cpu_compiler_options

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


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
    arr = np.atleast_1d(arr)
    try:
        whole = np.issubdtype(arr.dtype, np.integer) or bool(np.all(np.mod(arr.astype(np.float64), 1) == 0))
    except (TypeError, ValueError):
        whole = False
    if not whole or arr.ndim != 1:
        raise ValueError(f"labels {arr.tolist()} must be class indices (ints) or a [num_images, num_classes] array.")
    arr = arr.astype(np.int64)
    if arr.size == 0:
        raise ValueError("labels is empty; pass at least one class index.")
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        raise ValueError(f"labels {bad.tolist()} are outside [0, {num_classes - 1}].")
    arr = np.resize(arr, num_images)  # cyclic repeat
    return jax.nn.one_hot(jnp.asarray(arr), num_classes, dtype=jnp.float32)


def _context_fn(labels: Any, num_images: int, num_classes: int) -> jax.Array | None:
    """The context a ``labels`` argument stands for (``None`` -> the zero, null context)."""
    if labels is None:
        return jnp.zeros((num_images, num_classes), jnp.float32) if num_classes else None
    if not num_classes:
        raise ValueError(
            "labels were given but this model is unconditional (config.model.num_classes=0); "
            "train with configs/digits.py:conditional or drop labels."
        )
    return labels_to_context(labels, num_images, num_classes)


def _check_guidance_scale(guidance_scale: Any, labels: Any) -> float | None:
    if guidance_scale is None:
        return None
    if labels is None:
        raise ValueError(
            "guidance_scale needs labels (classifier-free guidance steers toward a class); pass "
            "labels=[...] too, or leave guidance_scale out."
        )
    try:
        scale = float(guidance_scale)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_scale={guidance_scale!r} must be a number (e.g. 2.0).") from None
    if not np.isfinite(scale):
        raise ValueError(f"guidance_scale={guidance_scale!r} must be finite.")
    return scale


MAX_FIRST_SIGMA = 1e3  # sqrt((1 - abar) / abar) of the first state beyond which solvers lose the image


def _warn_if_first_step_unstable(function: str, name: str, schedule, num_steps: int, options: dict[str, Any]) -> None:
    """Warn when a sigma-space solver starts where ``abar`` is almost 0 (e.g. ``cosine`` at t = T - 1).

    DPM-Solver, UniPC, Euler and Heun turn the network's eps into ``x0 = (x - sigma eps) / alpha``
    or move ``x`` by ``sigma``-sized steps: at ``abar = 2.4e-9`` (the cosine schedule's last
    timestep) the network's error is multiplied by ~2e4 and the samples are lost, as in
    diffusers (whose ``lambda_min_clipped`` exists for this). DDIM clips its ``x0`` and, with its
    default "leading" spacing, never visits t = T - 1.
    """
    if function not in ("dpm_solver", "unipc", "euler", "heun"):
        return
    _, sigmas = samplers.solver_timesteps(
        function, schedule, num_steps, use_karras_sigmas=bool(options.get("use_karras_sigmas", False)),
        spacing=options.get("spacing") or None, steps_offset=int(options.get("steps_offset", 0)),
    )  # fmt: skip
    if float(sigmas[0]) > MAX_FIRST_SIGMA:
        karras = options.get("use_karras_sigmas", False)
        warnings.warn(
            f"sampler={name!r} starts at noise level sigma={float(sigmas[0]):.3g} (alpha_bar "
            f"{1 / (1 + float(sigmas[0]) ** 2):.2g}), where its steps multiply the network's error by about "
            f"sigma: expect broken samples. Use config.sample.spacing='leading' (the first timestep then "
            f"is T - T // num_steps){' without Karras sigmas' if karras else ''}, or a schedule whose "
            f"last alpha_bar is not ~0.",
            stacklevel=3,
        )


def make_sampler(
    config: ml_collections.ConfigDict,
    *,
    num_images: int | None = None,
    sampler: str | None = None,
    num_steps: int | None = None,
    eta: float | None = None,
    use_karras_sigmas: bool | None = None,
    labels: Any = None,
    guidance_scale: float | None = None,
    guidance_fn: Callable[[EpsFn], EpsFn] | None = None,
    return_trajectory: bool = False,
    model: Any = None,
    schedule: schedules.Schedule | None = None,
    progress: bool = False,
) -> Callable[..., Any]:
    """Builds ``sample(params, key, *, labels=None, guidance_scale=None)`` for a config's model.

    Args:
      config: a training config (``configs/*.py``); ``config.sample`` gives the defaults.
      num_images, sampler (one of :data:`SAMPLERS`: ``"ddim"``, ``"ddpm"``, ``"dpm++2m"``,
        ``"dpm++3m"``, ``"dpm++sde"``, ``"unipc"``, ``"euler"``, ``"euler_a"``, ``"heun"``,
        ``"pndm"``), num_steps (in ``[1, T]``), eta (>= 0, DDIM only): override ``config.sample``.
      use_karras_sigmas: Karras et al. (2022) noise levels (samplers other than ddim, ddpm and
        pndm); overrides ``config.sample.use_karras_sigmas``. The sampler's other options come
        from ``config.sample`` (``spacing``, ``solver_order``, ...; see
        :func:`jaxdiff.builders.sampler_arguments`).
      labels: for class-conditional models: class indices or context vectors (see
        :func:`labels_to_context`). ``None`` samples unconditionally (the zero context). The
        default for every call; a call may pass its own.
      guidance_scale: classifier-free guidance ``eps_u + w (eps_c - eps_u)`` (needs labels).
        The default for every call; a call may pass its own.
      guidance_fn: any ``eps_fn -> eps_fn`` wrapper applied last, e.g.
        ``lambda f: guidance.gradient_guidance(f, guidance.color_loss((0.9, 0.1, 0.1)), 30., s)``.
      return_trajectory: also return the states from ``x_T`` to the sample and their timesteps.
      model, schedule: reuse already built objects (default: built from the config).
      progress: show a progress bar over the network evaluations (a host callback per call of
        the network: ``num_steps`` of them, ``2 num_steps - 1`` for Heun, ``num_steps + 1`` for
        PNDM; the loop stays one compiled program).

    Returns:
      ``sample(params, key, *, labels=None, guidance_scale=None) -> images`` float32
      ``[N, H, W, C]`` in [0, 1] (with ``return_trajectory``: ``(images, trajectory
      [S + 1, N, H, W, C] in [0, 1], timesteps [S + 1])``: ``trajectory[0]`` is the initial
      noise and ``trajectory[i]`` the state after ``i`` steps, at ``timesteps[i]``; the last, at
      ``-1``, is the sample; see :func:`state_timesteps`).
      Labels and guidance scale given at call time override the defaults above without
      recompiling: the context and the scale are inputs of one compiled program (one for
      unguided calls, one for guided ones). The same key gives the same images, and other
      params of the same shapes do not recompile.

    Raises:
      ValueError: for a bad sampler name, step count, eta, use_karras_sigmas, label or guidance
        scale, naming it, or sampler settings the sampler cannot run (naming the fields).

    Example::

        sample = make_sampler(config, num_images=10, labels=list(range(10)))
        for w in (1.0, 2.0, 4.0):                   # one compiled program for the sweep
            images = sample(params, jax.random.key(0), guidance_scale=w)
    """
    if model is None:
        validate_model_config(config)
    model = build_model(config) if model is None else model
    schedule = build_schedule(config) if schedule is None else schedule
    sc = config.sample
    num_images = sc.num_images if num_images is None else num_images
    sampler = sc.get("sampler", "ddim") if sampler is None else sampler
    num_steps = sc.num_steps if num_steps is None else num_steps
    eta = sc.get("eta", 0.0) if eta is None else eta
    use_karras_sigmas = sc.get("use_karras_sigmas", False) if use_karras_sigmas is None else use_karras_sigmas
    T = schedule.num_train_timesteps
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {tuple(SAMPLERS)}.")
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be an int >= 1.")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps={num_steps!r} must be an int in [1, {T}] (the schedule's T={T} timesteps).")
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"eta={eta!r} must be a number >= 0.") from None
    if not (np.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta={eta!r} must be a finite number >= 0 (0: deterministic DDIM).")
    if not isinstance(use_karras_sigmas, (bool, np.bool_)):
        raise ValueError(f"use_karras_sigmas={use_karras_sigmas!r} must be True or False.")
    num_images, num_steps = int(num_images), int(num_steps)

    num_classes = model_num_classes(model)
    default_context = _context_fn(labels, num_images, num_classes)
    default_scale = _check_guidance_scale(guidance_scale, labels)

    size, channels = config.data.image_size, config.data.channels
    options = sampler_arguments(config, sampler, {"eta": eta, "use_karras_sigmas": bool(use_karras_sigmas)})
    check_sampler(config, schedule, sampler, num_steps, options)
    spec = SAMPLERS[sampler]
    _warn_if_first_step_unstable(spec.function, sampler, schedule, num_steps, options)
    loop = samplers.SAMPLE_FUNCTIONS[spec.function]
    sampler_kwargs = dict(options, num_steps=num_steps, prediction_type=config.prediction_type,
                          return_trajectory=return_trajectory)  # fmt: skip
    timesteps = state_timesteps(spec.function, schedule, num_steps, options)

    def run(params, key, context, scale):
        if num_classes:
            def eps_cond(x, t, c):
                return model.apply({"params": params}, x, t, c)

            if scale is not None:
                eps_fn = guidance_lib.classifier_free(eps_cond, context, scale)
            else:
                eps_fn = lambda x, t: eps_cond(x, t, context)  # noqa: E731
        else:
            eps_fn = lambda x, t: model.apply({"params": params}, x, t)  # noqa: E731
        if guidance_fn is not None:
            eps_fn = guidance_fn(eps_fn)
        if progress:
            eps_fn = _with_progress(eps_fn, spec.evaluations(num_steps))
        k_init, k_loop = jax.random.split(key)
        x_T = jax.random.normal(k_init, (num_images, size, size, channels), jnp.float32)
        out = loop(eps_fn, schedule, x_T, k_loop, **sampler_kwargs)
        to_image = lambda x: jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)  # noqa: E731
        if return_trajectory:
            x0, trajectory = out
            return to_image(x0), to_image(trajectory), jnp.asarray(timesteps)
        return to_image(out)

    compiled = jax.jit(run, compiler_options=cpu_compiler_options())

    default_labels = labels

    def inputs(labels=None, guidance_scale=None):
        if labels is None:
            labels, context = default_labels, default_context
        else:
            context = _context_fn(labels, num_images, num_classes)
        scale = default_scale if guidance_scale is None else _check_guidance_scale(guidance_scale, labels)
        return context, None if scale is None else jnp.float32(scale)

    def sample(params, key, *, labels=None, guidance_scale=None):
        return compiled(params, key, *inputs(labels, guidance_scale))

    # The compiled program's trace and lowering for the same arguments (inspection: shapes,
    # HLO, memory), e.g. sample.trace(params, key).out_info.
    sample.trace = lambda params, key, **kw: compiled.trace(params, key, *inputs(**kw))
    sample.lower = lambda params, key, **kw: compiled.lower(params, key, *inputs(**kw))
    sample.compiled = compiled

    def compile_for(params, key, *, compiler_options=None, **kw):
        """Compile ahead of time (e.g. with other XLA options) for these arguments' shapes:
        returns ``run(params, key)`` sampling with the ``labels`` / ``guidance_scale`` given here
        (``run.executable``: the compiled program, e.g. for its ``memory_analysis()``)."""
        args = inputs(**kw)
        executable = compiled.lower(params, key, *args).compile(compiler_options=compiler_options)

        def run(params, key):
            return executable(params, key, *args)

        run.executable = executable
        return run

    sample.compile = compile_for
    return sample


def state_timesteps(
    function: str, schedule: schedules.Schedule, num_steps: int, options: dict[str, Any]
) -> np.ndarray:
    """The timestep of each state of a trajectory, ``[num_steps + 1]``; the last, the sample, is -1.

    ``function`` is a key of ``samplers.SAMPLE_FUNCTIONS`` and ``options`` its keyword arguments.
    ``timesteps[i]`` is the model timestep at which the sampler evaluates ``trajectory[i]``, the
    state after ``i`` steps: ``samplers.inference_timesteps`` for DDIM and DDPM (int32),
    ``samplers.solver_timesteps`` for the others (int32, or float32 for Euler and Heun, whose
    timesteps are fractional; Heun evaluates each state twice, at ``timesteps[i]`` and, after its
    Euler predictor, at ``timesteps[i + 1]``). The final state is marked -1 whatever its noise
    level (0, or ``sigma(t=0)`` with ``final_sigmas_type="sigma_min"``).

    Example::

        >>> state_timesteps("dpm_solver", schedules.linear(1000), 4, {})   # [999, 749, 500, 250, -1]
    """
    spacing, steps_offset = options.get("spacing"), options.get("steps_offset", 0)
    if function in ("ddim", "ddpm"):
        T = schedule.num_train_timesteps
        visited = samplers.inference_timesteps(T, num_steps, spacing or "leading", steps_offset)
    else:
        table = {k: options[k] for k in ("use_karras_sigmas", "final_sigmas_type") if k in options}
        visited, _ = samplers.solver_timesteps(function.removesuffix("_ancestral"), schedule, num_steps,
                                               spacing=spacing, steps_offset=steps_offset, **table)  # fmt: skip
    return np.append(visited, -1).astype(visited.dtype)


class _StepBar:
    """A tqdm bar advanced from inside the compiled loop; starts over after ``total`` network calls."""

    def __init__(self, total: int):
        self.total, self.bar = total, None

    def __call__(self, t) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.total, desc="sample", unit="eval")
        self.bar.update(1)
        self.bar.set_postfix(t=f"{float(np.asarray(t)):g}")  # Euler and Heun timesteps are fractional
        if self.bar.n >= self.total:
            self.bar.close()
            self.bar = None


def _with_progress(eps_fn, num_evaluations: int):
    tick = _StepBar(num_evaluations)

    def wrapped(x, t):
        jax.debug.callback(tick, t[0])
        return eps_fn(x, t)

    return wrapped


def load_params(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None, *, use_ema: bool = True):
    """``(params, step)``: the newest checkpoint's params of a ``scripts/train.py`` run.

    The EMA params when the run kept them and ``use_ema`` (else the raw ones). A run trained on
    any number of devices loads onto this process's first device.

    Raises:
      FileNotFoundError: ``workdir`` holds no ``config.json`` or no checkpoint (train first).
      ValueError: its ``config.json`` or every checkpoint is unreadable (says which).

    Example::

        params, step = jaxdiff.load_params("runs/digits")               # EMA weights
        raw, _ = jaxdiff.load_params("runs/digits", use_ema=False)
    """
    from jaxdiff import checkpoint as ckpt
    from jaxdiff.builders import restore_state

    config = ckpt.read_config(workdir) if config is None else config
    where = os.fspath(workdir)
    saved = ckpt.saved_steps(workdir)
    if not saved:
        raise FileNotFoundError(
            f"No checkpoint in {where!r}/{ckpt.CHECKPOINT_DIR}. Train first: "
            f"python scripts/train.py --config=... --workdir={where}"
        )
    step, state = restore_state(workdir, config)
    if state is None:
        raise ValueError(
            f"None of the checkpoints {saved} in {where!r}/{ckpt.CHECKPOINT_DIR} can be read "
            "(the warnings above say why): they are corrupt or from another config."
        )
    params = state.ema_params if (use_ema and state.ema_params is not None) else state.params
    return params, step


def load_sampler(workdir: str | os.PathLike, *, use_ema: bool = True, **kwargs: Any) -> tuple[Callable[..., Any], Any]:
    """``(sample, params)`` for the newest checkpoint of a ``scripts/train.py`` run.

    Keyword arguments are those of :func:`make_sampler` (num_images, num_steps, eta, labels,
    guidance_scale, ...), checked before the checkpoint is read; ``use_ema=False`` samples
    from the raw params. Example::

        sample, params = load_sampler("runs/digits", num_images=64, num_steps=50, eta=0.0)
        images = sample(params, jax.random.key(0))
    """
    from jaxdiff import checkpoint as ckpt

    config = ckpt.read_config(workdir)
    sample = make_sampler(config, **kwargs)
    params, _ = load_params(workdir, config, use_ema=use_ema)
    return sample, params
