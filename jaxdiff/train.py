"""Training: a pure, jitted ``train_step`` and the ``train_and_evaluate`` loop around it.

The loop is shared by every task (``config.task``: "diffusion", the default, or "music"): it
owns checkpoints with the data iterator, exact resume, SIGTERM, the non-finite stop, the
progress bar, ``metrics.jsonl`` and data parallelism; a :class:`jaxdiff.tasks.Task` (from
:data:`TASKS`) gives what differs. This module also holds the diffusion task.

The diffusion objective is the DDPM one (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):
draw ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)``, form ``x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps``
and regress the network output on the target of ``config.prediction_type`` ("epsilon": eps,
"v_prediction": v of Salimans & Ho 2022, "sample": x0) with an L1 (the book) or L2 loss.

Data parallelism is ``jax.jit`` over a one-axis device mesh (``"data"``): the batch is sharded
along it, parameters and optimizer state are replicated, and XLA inserts the gradient all-reduce.
The same code runs on one CPU, eight GPUs or several hosts (one process each, joined by
:func:`jaxdiff.distributed.initialize_from_env` when ``config.train.distributed``; try it on one
machine with ``scripts/launch_local.py``).

Randomness: the step key is ``fold_in(key(seed), step)``, and the data order is a function of the
seed and the position saved in each checkpoint, so a run resumed after a crash reproduces the
uninterrupted run bit for bit.

Example::

    from configs import digits
    from jaxdiff.train import train_and_evaluate
    state = train_and_evaluate(digits.get_config(), "runs/digits")
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff import checkpoint as ckpt
from jaxdiff import data as data_lib
from jaxdiff import distributed
from jaxdiff import images as images_lib
from jaxdiff import schedules
from jaxdiff.builders import (  # noqa: F401  (re-exported: the training API in one place)
    DTYPES,
    LOSS_WEIGHTINGS,
    LOSSES,
    MODEL_KINDS,
    PREDICTION_TYPES,
    TrainState,
    abstract_state,
    build_model,
    build_schedule,
    init_state,
    load_pretrained_params,
    make_optimizer,
    model_num_classes,
    restore_state,
    steps_for_epochs,
    validate_config,
    warmup_updates,
)
from jaxdiff.cpu_options import (  # noqa: F401  (re-exported)
    CPU_FUSION_ENV,
    _cpu_has_avx512,
    CPU_FUSION_MODES,
    cpu_compiler_options,
    cpu_fusion_mode,
)
from jaxdiff.models import UNet
from jaxdiff.music.training import music_task
from jaxdiff.sampling import make_sampler
from jaxdiff.tasks import (  # noqa: F401  (re-exported)
    Task,
    apply_gradients,
    ema_decay_at,
    ema_update,
    global_norm,
    shard_batch,
    update_count,
)
from jaxdiff.tasks import log as _log


# ---------------------------------------------------------------------------------------------
# The loss and the train step: pure functions.
# ---------------------------------------------------------------------------------------------


def diffusion_loss(
    params: Any,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    *,
    model: UNet,
    schedule: schedules.Schedule,
    loss_type: str = "l2",
    prediction_type: str = "epsilon",
    label_dropout: float = 0.0,
    loss_weighting: str = "none",
    min_snr_gamma: float = 5.0,
) -> jax.Array:
    """The denoising loss on one batch (mean over pixels and batch).

    ``loss_weighting="min_snr"`` weights each example by :func:`min_snr_weight`.

    ``label_dropout`` (conditional models only) replaces each example's context by the zero
    "null" context with that probability, so one network learns conditional and unconditional
    predictions for classifier-free guidance (Ho & Salimans 2022).
    """
    if loss_type not in LOSSES:
        raise ValueError(f"config.loss={loss_type!r} is not one of {LOSSES}.")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"config.prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}.")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"config.loss_weighting={loss_weighting!r} is not one of {LOSS_WEIGHTINGS}.")
    x0 = batch["image"]  # [B, H, W, C]
    b = x0.shape[0]
    k_t, k_noise, k_drop = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = schedules.add_noise(schedule, x0, noise, t)
    target = {
        "epsilon": noise,
        "v_prediction": schedules.velocity(schedule, x0, noise, t) if prediction_type == "v_prediction" else None,
        "sample": x0,
    }[prediction_type]
    if model_num_classes(model):
        context = jax.nn.one_hot(batch["label"], model_num_classes(model), dtype=jnp.float32)
        if label_dropout > 0:
            keep = jax.random.bernoulli(k_drop, 1.0 - label_dropout, (b, 1))
            context = context * keep
        pred = model.apply({"params": params}, x_t, t, context)
    else:
        pred = model.apply({"params": params}, x_t, t)
    diff = pred.astype(jnp.float32) - target
    per_example = jnp.abs(diff) if loss_type == "l1" else jnp.square(diff)
    per_example = jnp.mean(per_example.reshape(b, -1), axis=1)  # [B]
    if loss_weighting == "min_snr":
        per_example = per_example * min_snr_weight(schedule, t, prediction_type, min_snr_gamma)
    return jnp.mean(per_example)


def min_snr_weight(
    schedule: schedules.Schedule, t: jax.Array, prediction_type: str, gamma: float = 5.0
) -> jax.Array:
    """Min-SNR-gamma loss weights ``[B]`` (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy", arXiv:2303.09556).

    The x0-space weight ``min(SNR_t, gamma)`` expressed for the network's target: divided by
    ``SNR_t`` for eps prediction and by ``SNR_t + 1`` for v prediction (x0 prediction takes it
    as is). It stops the many low-noise timesteps, whose eps targets are nearly free, from
    dominating the gradient.
    """
    snr = schedules.snr(schedule, t)
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return jnp.minimum(1.0, gamma / snr)  # = min(SNR, gamma) / SNR, also at SNR = 0
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    *,
    model: UNet,
    tx: optax.GradientTransformation,
    schedule: schedules.Schedule,
    lr_schedule: optax.Schedule | None = None,
    loss_type: str = "l2",
    prediction_type: str = "epsilon",
    label_dropout: float = 0.0,
    ema_decay: float = 0.0,
    ema_warmup: bool = True,
    loss_weighting: str = "none",
    min_snr_gamma: float = 5.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step: ``(state, batch, key) -> (state, metrics)``.

    ``key`` is the run's base key; the step's randomness is ``fold_in(key, state.step)``. A step
    whose loss or gradients are not finite leaves params, optimizer state and EMA untouched
    and records its number (``state.step + 1``) in ``state.nonfinite_step``.

    Bind the static arguments and jit once, donating the state::

        step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=s),
                          donate_argnums=0)
        state, metrics = step_fn(state, batch, key)
    """
    step_key = jax.random.fold_in(key, state.step)
    loss_fn = functools.partial(
        diffusion_loss,
        model=model,
        schedule=schedule,
        loss_type=loss_type,
        prediction_type=prediction_type,
        label_dropout=label_dropout,
        loss_weighting=loss_weighting,
        min_snr_gamma=min_snr_gamma,
    )
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, step_key)
    new_state, grad_norm = apply_gradients(state, loss, grads, tx, ema_decay=ema_decay, ema_warmup=ema_warmup)
    metrics = {"loss": loss, "grad_norm": grad_norm}
    if lr_schedule is not None:
        metrics["learning_rate"] = lr_schedule(update_count(state))
    return new_state, metrics


# ---------------------------------------------------------------------------------------------
# Sharding.
# ---------------------------------------------------------------------------------------------


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A one-axis mesh named ``data`` over ``devices`` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    # Auto axes: XLA propagates shardings through the network (explicit mode would require
    # sharding annotations on every reshape inside the model).
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def jit_train_step(step: Callable[..., Any], mesh: jax.sharding.Mesh) -> Callable[..., Any]:
    """A pure ``(state, batch, key) -> (state, metrics)`` jitted once over ``mesh``: state and key
    replicated, batch sharded along ``data``, the state donated."""
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    return jax.jit(
        step,
        in_shardings=(replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
        compiler_options=cpu_compiler_options(),
    )


def _bind_train_step(config, model, tx, schedule, lr_schedule):
    return functools.partial(
        train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        lr_schedule=lr_schedule,
        loss_type=config.loss,
        prediction_type=config.prediction_type,
        label_dropout=float(config.train.get("label_dropout", 0.0)),
        ema_decay=float(config.train.get("ema_decay", 0.0)),
        ema_warmup=bool(config.train.get("ema_warmup", True)),
        loss_weighting=config.get("loss_weighting", "none"),
        min_snr_gamma=float(config.get("min_snr_gamma", 5.0)),
    )


def make_train_step(
    config: ml_collections.ConfigDict,
    model: UNet,
    tx: optax.GradientTransformation,
    schedule: schedules.Schedule,
    lr_schedule: optax.Schedule | None,
    mesh: jax.sharding.Mesh,
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """The diffusion ``train_step`` bound to a config and jitted once over ``mesh``, donating the state."""
    return jit_train_step(_bind_train_step(config, model, tx, schedule, lr_schedule), mesh)


# ---------------------------------------------------------------------------------------------
# The diffusion task.
# ---------------------------------------------------------------------------------------------


def grid_labels(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    """``make_sampler`` arguments for a run's sample grids: conditional models draw every class.

    Labels ``0, 1, ..., K-1, 0, ...`` (one class per column of a K-wide grid) with classifier-free
    guidance at ``config.sample.guidance_scale`` (0 or 1: none); unconditional models: nothing.
    """
    if not num_classes:
        return {}
    scale = float(config.sample.get("guidance_scale", 0.0))
    n = int(config.sample.num_images)
    return {"labels": np.arange(n) % num_classes, "guidance_scale": None if scale in (0.0, 1.0) else scale}


def diffusion_task(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Task:
    """The diffusion model a config describes, as a :class:`Task` of the shared loop.

    Reports: a sample grid ``workdir/samples/step_<n>.png`` from the EMA params (else the
    params), scored with the digits metrics when ``config.eval.digits_metrics``.
    """
    del mesh  # the sampler runs on process 0's devices
    model = build_model(config)
    schedule = build_schedule(config)
    tx, lr_schedule = make_optimizer(config)

    sample_fn = None
    if config.train.get("sample_every", 0) or config.sample.get("at_end", True):
        sample_fn = make_sampler(config, num_images=int(config.sample.num_images), model=model, schedule=schedule,
                                 **grid_labels(config, model_num_classes(model)))  # fmt: skip
    eval_fn = None
    if config.get("eval", {}).get("digits_metrics", False):
        if config.data.name != "digits":
            raise ValueError("config.eval.digits_metrics needs config.data.name='digits'.")
        from jaxdiff.digits_classifier import make_digits_eval

        eval_fn = make_digits_eval()

    def report(workdir: Path, step: int, state: TrainState, key: jax.Array) -> dict[str, Any] | None:
        if sample_fn is None or jax.process_index() != 0:
            return None
        params = state.ema_params if state.ema_params is not None else state.params
        params = distributed.local_replica(params)  # process 0 samples alone, on its own devices
        images = np.asarray(jax.device_get(sample_fn(params, key)))
        ncols = model_num_classes(model) or None  # conditional grids: one class per column
        path = images_lib.save_image_grid(images, workdir / "samples" / f"step_{step}.png", ncols=ncols)
        if eval_fn is None:
            return None
        record = {"step": step, **eval_fn(images)}
        _log(f"step {step}: samples in {path}; " + ", ".join(f"{k}={v:.3g}" for k, v in record.items() if k != "step"))
        return record

    def dataset(seed: int):
        return data_lib.make_dataset(
            data_lib.build_source(config.data),
            batch_size=config.train.batch_size,
            seed=seed,
            random_flip=bool(config.data.get("random_flip", False)),
            num_threads=int(config.data.get("num_threads", 2)),
            prefetch=int(config.data.get("prefetch", 4)),
        )

    return Task(
        init_state=functools.partial(init_state, config, model, tx),
        initial_params=lambda: load_pretrained_params(config),
        train_step=_bind_train_step(config, model, tx, schedule, lr_schedule),
        dataset=dataset,
        rate_name="images_per_sec",
        rate_label="img_s",
        rate_per_step=int(config.train.batch_size),
        report=report,
    )


TASKS: Mapping[str, Callable[[ml_collections.ConfigDict, jax.sharding.Mesh], Task]] = {
    "diffusion": diffusion_task,
    "music": music_task,
}
"""``config.task`` -> the function that builds its :class:`~jaxdiff.tasks.Task` from ``(config, mesh)``."""


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


class _StopOnSignal:
    """Turns SIGTERM (and SIGINT) into a flag the loop checks between steps."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # Not the main thread (e.g. some notebook kernels): no handlers.
            self._previous.clear()
        return self

    def _handle(self, signum, frame):
        del frame
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class NonFiniteLossError(FloatingPointError):
    """Raised when a train step produced a non-finite loss or gradient."""


def _check_finite(state: TrainState, last_checkpoint: int | None) -> None:
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
        kept = f"the last good checkpoint is step {last_checkpoint}" if last_checkpoint is not None else "no checkpoint was written"
        raise NonFiniteLossError(
            f"Non-finite loss or gradients at step {bad}; training stopped and {kept}. Lower "
            "config.optim.learning_rate, enable config.optim.grad_clip_norm, or check the data."
        )


def _write_metrics(workdir: Path, record: dict[str, Any]) -> None:
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def task_name(config: ml_collections.ConfigDict) -> str:
    """``config.task`` ("diffusion" when the field is absent, as in runs made before it existed)."""
    name = config.get("task", "diffusion")
    if name not in TASKS:
        raise ValueError(f"config.task={name!r} is not one of {tuple(TASKS)}.")
    return name


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> TrainState:
    """Trains the model a config describes, resuming from ``workdir`` if it holds checkpoints.

    Writes ``workdir/config.json``, ``workdir/checkpoints/<step>/`` (the last
    ``train.keep_checkpoints``), ``workdir/metrics.jsonl`` (loss, grad norm, lr and throughput
    every ``train.log_every`` steps, plus the task's records) and what the task reports every
    ``train.sample_every`` steps and at the end (diffusion: ``workdir/samples/step_<n>.png``;
    music: validation loss and a continuation as MIDI and piano roll). SIGTERM/SIGINT save a
    checkpoint and return.

    Returns the final ``TrainState`` (on the host's devices).
    """
    if distributed.requested(config):  # config.train.distributed or JAXDIFF_DISTRIBUTED=1
        distributed.initialize_from_env()
    validate_config(config)
    warmup, num_updates = warmup_updates(config)
    if warmup != int(config.optim.warmup_steps):
        _log(
            f"config.optim.warmup_steps={config.optim.warmup_steps} is not shorter than the run's "
            f"{num_updates} updates (config.train.num_steps={config.train.num_steps}); warming up "
            f"over {warmup} updates instead."
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        ckpt.write_config(workdir, config)

    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    task = TASKS[task_name(config)](config, mesh)
    seed = int(config.train.seed)
    base_key = jax.random.key(seed)
    init_key, train_key, sample_key = (jax.random.fold_in(base_key, i) for i in range(3))

    data_iter = iter(task.dataset(seed))

    create = jax.jit(task.init_state, out_shardings=replicated)
    manager = ckpt.make_manager(
        workdir,
        max_to_keep=int(config.train.get("keep_checkpoints", 3)),
        async_save=bool(config.train.get("async_checkpointing", True)),
    )
    abstract = jax.eval_shape(create, init_key, None)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract
    )
    last_checkpoint, state = ckpt.restore_latest(manager, abstract, data_iter)
    if state is None and manager.all_steps():
        steps = sorted(manager.all_steps())
        manager.close()
        raise RuntimeError(
            f"{workdir / ckpt.CHECKPOINT_DIR} holds checkpoints {steps} but none of them can be read "
            "(see the warnings above); a new run there would rotate them away. Fix or move them, "
            "or start over deliberately in a new --workdir."
        )
    if state is None:
        state = create(init_key, task.initial_params())
        _log(f"Started a new run in {workdir}.")
    else:
        _log(f"Resumed from checkpoint step {last_checkpoint} in {workdir}.")
    _check_finite(state, last_checkpoint)

    step_fn = jit_train_step(task.train_step, mesh)

    def report(step: int, state: TrainState) -> None:
        if task.report is None:
            return
        record = task.report(workdir, step, state, jax.random.fold_in(sample_key, step))
        if record is not None and jax.process_index() == 0:
            _write_metrics(workdir, record)

    num_steps = int(config.train.num_steps)
    step = int(jax.device_get(state.step))
    log_every = int(config.train.log_every)
    ckpt_every = int(config.train.checkpoint_every)
    sample_every = int(config.train.get("sample_every", 0))
    kill_at = int(os.environ.get("JAXDIFF_TEST_KILL_AT_STEP", "-1"))  # crash-safety tests only

    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=step, desc="train", unit="step", disable=jax.process_index() != 0)
    except ImportError:  # pragma: no cover
        bar = None

    pending: list[dict[str, jax.Array]] = []
    t_log = time.perf_counter()
    steps_since_log = 0
    with _StopOnSignal() as stopper, distributed.explain_peer_failure(lambda: last_checkpoint):
        while step < num_steps:
            batch = shard_batch(next(data_iter), mesh)
            state, metrics = step_fn(state, batch, train_key)
            step += 1
            steps_since_log += 1
            pending.append(metrics)
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if step % log_every == 0 or step == num_steps:
                fetched = jax.device_get(pending)  # The only host sync of the hot loop.
                pending = []
                dt = time.perf_counter() - t_log
                record = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                record.update({"step": step, task.rate_name: steps_since_log * task.rate_per_step / max(dt, 1e-9)})
                t_log, steps_since_log = time.perf_counter(), 0
                _check_finite(state, last_checkpoint)
                if jax.process_index() == 0:
                    _write_metrics(workdir, record)
                if bar is not None:
                    bar.set_postfix({"loss": f"{record['loss']:.4f}", task.rate_label: f"{record[task.rate_name]:.1f}"})
            if bar is not None:
                bar.update(1)
            stop = distributed.agreed_stop(stopper.received is not None, step, log_every)
            if step % ckpt_every == 0 or step == num_steps or stop:
                _check_finite(state, last_checkpoint)
                ckpt.save(manager, step, state, data_iter)
                last_checkpoint = step
            if sample_every and step % sample_every == 0 and step != num_steps:
                report(step, state)
            if stop:
                _log(f"Signal {stopper.received or '(to another process)'} received: saved checkpoint {step} and stopped.")
                break
    if bar is not None:
        bar.close()
    manager.wait_until_finished()
    if step == num_steps and config.sample.get("at_end", True):
        report(step, state)
    manager.close()
    return state
