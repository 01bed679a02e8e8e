"""Training: a pure, jitted ``train_step`` and the ``train_and_evaluate`` loop around it.

The objective is the DDPM one (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):
draw ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)``, form ``x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps``
and regress the network output on the target of ``config.prediction_type`` ("epsilon": eps,
"v_prediction": v of Salimans & Ho 2022, "sample": x0) with an L1 (the book) or L2 loss.

Data parallelism is ``jax.jit`` over a one-axis device mesh (``"data"``): the batch is sharded
along it, parameters and optimizer state are replicated, and XLA inserts the gradient all-reduce.
The same code runs on one CPU, eight GPUs or several hosts (after
``jax.distributed.initialize()``, enabled by ``config.train.distributed``).

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
import math
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff import checkpoint as ckpt
from jaxdiff import data as data_lib
from jaxdiff import images as images_lib
from jaxdiff import schedules
from jaxdiff.models import UNet

LOSSES = ("l1", "l2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: a pytree, checkpointed whole.

    Attributes:
      step: int32 scalar, number of train steps taken.
      params: model parameters.
      opt_state: optax state.
      ema_params: exponential moving average of ``params`` (``None`` when EMA is off).
      nonfinite_step: number (counting from 1, like checkpoints) of the first step whose loss or
        gradients were not finite; -1 if none. Such a step leaves params untouched; the host
        stops training when it sees this.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    nonfinite_step: jax.Array


# ---------------------------------------------------------------------------------------------
# Builders from a config.
# ---------------------------------------------------------------------------------------------


MODEL_KINDS = ("unet", "diffusers")


def _dtype(config: ml_collections.ConfigDict):
    dtype = config.model.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={dtype!r} is not one of {tuple(DTYPES)}.")
    return DTYPES[dtype]


def build_model(config: ml_collections.ConfigDict):
    """The network a config describes.

    ``config.model.kind == "unet"`` (default): jaxdiff's ``UNet`` with the other
    ``config.model`` fields. ``"diffusers"``: the ``DiffusersUNet2D`` of the diffusers
    checkpoint folder ``config.model.pretrained`` (its ``config.json``; the ``UNet`` fields are
    ignored).
    """
    kind = config.model.get("kind", "unet")
    if kind not in MODEL_KINDS:
        raise ValueError(f"config.model.kind={kind!r} is not one of {MODEL_KINDS}.")
    if kind == "diffusers":
        from jaxdiff import pretrained
        from jaxdiff.models import DiffusersUNet2D

        return DiffusersUNet2D.from_config(
            pretrained.read_unet_config(_pretrained_path(config)),
            dtype=_dtype(config),
            remat=bool(config.model.get("remat", False)),
        )
    kwargs = dict(config.model.to_dict() if hasattr(config.model, "to_dict") else config.model)
    for field in ("kind", "pretrained"):
        kwargs.pop(field, None)
    kwargs.pop("dtype", None)
    num_classes = kwargs.pop("num_classes", 0) or None
    kwargs["attention_impl"] = kwargs.get("attention_impl") or None
    if "hidden_dims" in kwargs:
        kwargs["hidden_dims"] = tuple(kwargs["hidden_dims"])
    channels = config.data.channels
    return UNet(
        in_channels=channels,
        out_channels=channels,
        num_classes=num_classes,
        dtype=_dtype(config),
        **kwargs,
    )


def _pretrained_path(config: ml_collections.ConfigDict) -> str:
    path = config.model.get("pretrained", "")
    if not path:
        raise ValueError(
            "config.model.pretrained is empty: pass the diffusers checkpoint folder with "
            "--config.model.pretrained=PATH (e.g. a local copy of google/ddpm-cat-256)."
        )
    return path


def load_pretrained_params(config: ml_collections.ConfigDict):
    """The pretrained weights a config starts from, or ``None`` to initialise at random."""
    if config.model.get("kind", "unet") != "diffusers":
        return None
    from jaxdiff import pretrained

    _, params, _ = pretrained.load_diffusers(_pretrained_path(config))
    return params


def model_num_classes(model) -> int:
    """Number of classes of a conditional jaxdiff ``UNet`` (0 for unconditional networks)."""
    return int(getattr(model, "num_classes", None) or 0)


def build_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
    """The noise schedule a config names (``config.schedule.name`` and its keyword arguments)."""
    kwargs = dict(config.schedule.to_dict())
    name = kwargs.pop("name")
    if name == "from_pretrained":  # the scheduler config saved beside a diffusers checkpoint
        from jaxdiff import pretrained

        return pretrained.read_scheduler_config(_pretrained_path(config)).schedule()
    return schedules.get(name, **kwargs)


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup and cosine decay to 0 at the last update, built from the config.

    ``optax.warmup_cosine_decay_schedule(0, lr, warmup, num_updates)``: the first update uses
    lr 0, lr rises linearly to its peak over ``warmup_steps`` updates, then follows a half
    cosine to 0 at the last update (the book: AdamW(1e-4, b1 0.95, b2 0.999, wd 1e-5, eps 1e-8),
    300 warmup updates). Optional: global-norm gradient clipping (``grad_clip_norm > 0``) and
    gradient accumulation over ``grad_accum_steps`` micro-batches (``optax.MultiSteps``; the
    schedule then counts optimizer updates, not micro-steps).
    """
    o = config.optim
    accum = int(o.get("grad_accum_steps", 1))
    if accum < 1:
        raise ValueError(f"config.optim.grad_accum_steps={accum} must be >= 1.")
    num_updates = max(1, config.train.num_steps // accum)
    warmup = min(int(o.warmup_steps), num_updates)
    lr = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.learning_rate,
        warmup_steps=warmup,
        decay_steps=num_updates,
        end_value=0.0,
    )
    parts = []
    if o.get("grad_clip_norm", 0.0) > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip_norm))
    parts.append(optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    tx = optax.chain(*parts)
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum)
    return tx, lr


def restore_state(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> tuple[int | None, TrainState | None]:
    """The newest readable ``TrainState`` of a run's workdir (on the default device), or ``(None, None)``.

    For reading a run after (or beside) training, e.g. to sample from it; training itself
    restores with shardings and the data iterator in :func:`train_and_evaluate`.
    """
    model = build_model(config)
    tx, _ = make_optimizer(config)
    abstract = jax.eval_shape(lambda k: init_state(config, model, tx, k), jax.random.key(0))
    manager = ckpt.make_manager(workdir, async_save=False)
    try:
        return ckpt.restore_latest(manager, abstract)
    finally:
        manager.close()


def _dummy_inputs(config: ml_collections.ConfigDict, batch_size: int = 1):
    s, c = config.data.image_size, config.data.channels
    x = jnp.zeros((batch_size, s, s, c), jnp.float32)
    t = jnp.zeros((batch_size,), jnp.int32)
    return x, t


def init_state(
    config: ml_collections.ConfigDict,
    model: UNet,
    tx: optax.GradientTransformation,
    key: jax.Array,
    params: Any = None,
) -> TrainState:
    """A fresh ``TrainState`` (pure; jit it to avoid slow eager initialisation).

    ``params``: start from these weights (fine-tuning) instead of a random initialisation.
    """
    if params is None:
        x, t = _dummy_inputs(config)
        params = model.init(key, x, t)["params"]
    ema = params if config.train.get("ema_decay", 0.0) > 0 else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=ema,
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


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
) -> jax.Array:
    """The denoising loss on one batch (mean over pixels and batch).

    ``label_dropout`` (conditional models only) replaces each example's context by the zero
    "null" context with that probability, so one network learns conditional and unconditional
    predictions for classifier-free guidance (Ho & Salimans 2022).
    """
    if loss_type not in LOSSES:
        raise ValueError(f"config.loss={loss_type!r} is not one of {LOSSES}.")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"config.prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}.")
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
    return jnp.mean(jnp.abs(diff)) if loss_type == "l1" else jnp.mean(jnp.square(diff))


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves of ``tree`` together, in float32.

    Computed over one concatenated vector: one reduction instead of one per leaf (a U-Net has
    ~200 leaves; on CPU the per-leaf reductions cost 1-2% of a small model's train step).
    """
    leaves = [jnp.ravel(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(jnp.concatenate(leaves))))


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
    )
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, step_key)
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        return params, opt_state, ema

    # A conditional rather than a per-leaf select: the skipped branch is the rare one, and a
    # select over every leaf of params and optimizer state cost ~10% of a CPU step.
    params, opt_state, ema = jax.lax.cond(
        finite, update, lambda _: (state.params, state.opt_state, state.ema_params), None
    )
    nonfinite_step = jnp.where(
        (state.nonfinite_step < 0) & ~finite, state.step + 1, state.nonfinite_step
    )
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema_params=ema,
        nonfinite_step=nonfinite_step,
    )
    metrics = {"loss": loss, "grad_norm": grad_norm}
    if lr_schedule is not None:
        metrics["learning_rate"] = lr_schedule(_update_count(state, tx))
    return new_state, metrics


def _update_count(state: TrainState, tx: optax.GradientTransformation) -> jax.Array:
    """Optimizer updates so far (differs from ``state.step`` under gradient accumulation)."""
    if isinstance(state.opt_state, optax.MultiStepsState):
        return state.opt_state.gradient_step
    return state.step


# ---------------------------------------------------------------------------------------------
# Sharding.
# ---------------------------------------------------------------------------------------------


# XLA:CPU can hand dots and convolutions to the YNNPACK library ("YNN fusions"). Which setting is
# fastest depends on the CPU; measured with the small book U-Net (fp32, batch 32, 16x16), jaxlib
# 0.10.2, on two 2-core AMD EPYC virtual machines:
#   the project's first CPU study (CPU features not recorded): jaxlib's default YNN fusions
#     1.6-1.8x slower than none ("off");
#   Zen 5 with AVX-512: forward pass 48 ms "off", 35 ms jaxlib default, 25 ms "dot"; forward +
#     backward within 5% of each other.
# "auto" follows these two data points: "dot" with AVX-512, "off" without. A guess between them
# for other CPUs; JAXDIFF_CPU_FUSION (or the benchmark's --cpu_fusion sweep) settles it.
CPU_FUSION_MODES = {
    "off": "",  # XLA's own kernels (Eigen convolutions and dots)
    "dot": "LIBRARY_FUSION_TYPE_DOT",  # YNNPACK dots/convolutions with their fused operands
    "jax_default": None,  # whatever this jaxlib does by default
}
CPU_FUSION_ENV = "JAXDIFF_CPU_FUSION"


@functools.cache
def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def cpu_fusion_mode(mode: str | None = None) -> str:
    """The XLA:CPU library-fusion mode to compile with: one of :data:`CPU_FUSION_MODES`.

    ``mode`` (or, when ``None``, the environment variable ``JAXDIFF_CPU_FUSION``, default
    ``"auto"``) names it; ``"auto"`` picks ``"dot"`` on CPUs with AVX-512 and ``"off"`` on
    others, after the two machines measured (see the comment above :data:`CPU_FUSION_MODES`).
    The choice changes speed only: the modes compute the same function (tested).

    Example:
      >>> cpu_fusion_mode("off")
      'off'
    """
    mode = os.environ.get(CPU_FUSION_ENV, "auto") if mode is None else mode
    if mode == "auto":
        return "dot" if _cpu_has_avx512() else "off"
    if mode not in CPU_FUSION_MODES:
        raise ValueError(
            f"CPU fusion mode {mode!r} is not one of {('auto', *CPU_FUSION_MODES)}; set "
            f"{CPU_FUSION_ENV} (or pass mode) to one of them."
        )
    return mode


def cpu_compiler_options(mode: str | None = None) -> dict[str, str] | None:
    """Per-function XLA options for the CPU backend (see :func:`cpu_fusion_mode`); ``None`` on
    other backends or where jaxlib's defaults are wanted. No process-wide flags are touched.
    """
    if jax.default_backend() != "cpu":
        return None
    value = CPU_FUSION_MODES[cpu_fusion_mode(mode)]
    return None if value is None else {"xla_cpu_experimental_ynn_fusion_type": value}


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A one-axis mesh named ``data`` over ``devices`` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    # Auto axes: XLA propagates shardings through the network (explicit mode would require
    # sharding annotations on every reshape inside the model).
    return jax.make_mesh(
        (len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def make_train_step(
    config: ml_collections.ConfigDict,
    model: UNet,
    tx: optax.GradientTransformation,
    schedule: schedules.Schedule,
    lr_schedule: optax.Schedule | None,
    mesh: jax.sharding.Mesh,
) -> Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """``train_step`` bound to a config and jitted once over ``mesh``, donating the state."""
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    step = functools.partial(
        train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        lr_schedule=lr_schedule,
        loss_type=config.loss,
        prediction_type=config.prediction_type,
        label_dropout=float(config.train.get("label_dropout", 0.0)),
        ema_decay=float(config.train.get("ema_decay", 0.0)),
    )
    return jax.jit(
        step,
        in_shardings=(replicated, batch_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
        compiler_options=cpu_compiler_options(),
    )


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's part of the batch -> global arrays sharded along ``data``."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


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


def _log(message: str) -> None:
    """A progress message that does not break the progress bar (process 0 only)."""
    if jax.process_index() == 0:
        from tqdm.auto import tqdm

        tqdm.write(f"[jaxdiff] {message}")


def _write_metrics(workdir: Path, record: dict[str, Any]) -> None:
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails early, with the field name, on settings that cannot work."""
    t = config.train
    for name in ("num_steps", "batch_size", "checkpoint_every", "log_every"):
        if int(t[name]) < 1:
            raise ValueError(f"config.train.{name}={t[name]} must be >= 1.")
    n_dev = jax.device_count()
    if t.batch_size % n_dev:
        raise ValueError(
            f"config.train.batch_size={t.batch_size} is not divisible by the {n_dev} devices; "
            f"use a multiple of {n_dev}."
        )
    if config.loss not in LOSSES:
        raise ValueError(f"config.loss={config.loss!r} is not one of {LOSSES}.")
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"config.prediction_type={config.prediction_type!r} is not one of {PREDICTION_TYPES}.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> TrainState:
    """Trains the model a config describes, resuming from ``workdir`` if it holds checkpoints.

    Writes ``workdir/config.json``, ``workdir/checkpoints/<step>/`` (the last
    ``train.keep_checkpoints``), ``workdir/metrics.jsonl`` (loss, grad norm, lr, images/s every
    ``train.log_every`` steps) and ``workdir/samples/step_<n>.png`` (a sample grid every
    ``train.sample_every`` steps and at the end). SIGTERM/SIGINT save a checkpoint and return.

    Returns the final ``TrainState`` (on the host's devices).
    """
    if config.train.get("distributed", False):
        jax.distributed.initialize()
    validate_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        ckpt.write_config(workdir, config)

    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    model = build_model(config)
    schedule = build_schedule(config)
    tx, lr_schedule = make_optimizer(config)
    seed = int(config.train.seed)
    base_key = jax.random.key(seed)
    init_key, train_key, sample_key = (jax.random.fold_in(base_key, i) for i in range(3))

    source = data_lib.build_source(config.data)
    dataset = data_lib.make_dataset(
        source,
        batch_size=config.train.batch_size,
        seed=seed,
        random_flip=bool(config.data.get("random_flip", False)),
        num_threads=int(config.data.get("num_threads", 2)),
        prefetch=int(config.data.get("prefetch", 4)),
    )
    data_iter = iter(dataset)

    create = jax.jit(functools.partial(init_state, config, model, tx), out_shardings=replicated)
    manager = ckpt.make_manager(
        workdir,
        max_to_keep=int(config.train.get("keep_checkpoints", 3)),
        async_save=bool(config.train.get("async_checkpointing", True)),
    )
    abstract = jax.eval_shape(create, init_key)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract
    )
    last_checkpoint, state = ckpt.restore_latest(manager, abstract, data_iter)
    if state is None:
        state = create(init_key, load_pretrained_params(config))
        _log(f"Started a new run in {workdir}.")
    else:
        _log(f"Resumed from checkpoint step {last_checkpoint} in {workdir}.")
    _check_finite(state, last_checkpoint)

    step_fn = make_train_step(config, model, tx, schedule, lr_schedule, mesh)
    sample_fn = None
    if config.train.get("sample_every", 0) or config.sample.get("at_end", True):
        from jaxdiff.sampling import make_sampler  # Local: sampling imports this module.

        sample_fn = make_sampler(config, num_images=int(config.sample.num_images), model=model, schedule=schedule)

    eval_fn = None
    if config.get("eval", {}).get("digits_metrics", False):
        if config.data.name != "digits":
            raise ValueError("config.eval.digits_metrics needs config.data.name='digits'.")
        from jaxdiff.digits_classifier import make_digits_eval

        eval_fn = make_digits_eval()

    def save_samples(step: int, state: TrainState) -> None:
        if sample_fn is None or jax.process_index() != 0:
            return
        params = state.ema_params if state.ema_params is not None else state.params
        images = np.asarray(jax.device_get(sample_fn(params, jax.random.fold_in(sample_key, step))))
        path = images_lib.save_image_grid(images, workdir / "samples" / f"step_{step}.png")
        if eval_fn is not None:
            record = {"step": step, **eval_fn(images)}
            _write_metrics(workdir, record)
            _log(f"step {step}: samples in {path}; " + ", ".join(f"{k}={v:.3g}" for k, v in record.items() if k != "step"))

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
    with _StopOnSignal() as stopper:
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
                record.update(step=step, images_per_sec=steps_since_log * config.train.batch_size / max(dt, 1e-9))
                t_log, steps_since_log = time.perf_counter(), 0
                _check_finite(state, last_checkpoint)
                if jax.process_index() == 0:
                    _write_metrics(workdir, record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_sec']:.1f}")
            if bar is not None:
                bar.update(1)
            if step % ckpt_every == 0 or step == num_steps or stopper.received is not None:
                _check_finite(state, last_checkpoint)
                ckpt.save(manager, step, state, data_iter)
                last_checkpoint = step
            if sample_every and step % sample_every == 0 and step != num_steps:
                save_samples(step, state)
            if stopper.received is not None:
                _log(f"Signal {stopper.received} received: saved checkpoint {step} and stopped.")
                break
    if bar is not None:
        bar.close()
    manager.wait_until_finished()
    if step == num_steps and config.sample.get("at_end", True):
        save_samples(step, state)
    manager.close()
    return state


def steps_for_epochs(num_examples: int, batch_size: int, epochs: int) -> int:
    """Number of updates for ``epochs`` passes with the last partial batch kept (PyTorch's default)."""
    return epochs * math.ceil(num_examples / batch_size)
