"""From a config to the objects a run is made of: model, schedule, optimizer, the run's state.

Training (:mod:`jaxdiff.train`) and sampling (:mod:`jaxdiff.sampling`) both build from a config;
the builders they share live here, so neither imports the other's internals. One function
checks a whole config before anything is compiled: :func:`validate_config` raises a
``ValueError`` that names the field (``config.train.batch_size=...``) and says what to change,
never an exception from optax, Flax, orbax or XLA.

Example::

    from configs import digits
    config = digits.get_config()
    validate_config(config)
    model, schedule = build_model(config), build_schedule(config)
    tx, lr_schedule = make_optimizer(config)
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxdiff import checkpoint as ckpt
from jaxdiff import samplers, schedules, solvers
from jaxdiff.config_defaults import base_config
from jaxdiff.data import DATASETS, DIGITS_SPLITS
from jaxdiff.models import UNet
from jaxdiff.models.unet import ATTENTION_IMPLS

LOSSES = ("l1", "l2")
LOSS_WEIGHTINGS = ("none", "min_snr")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MODEL_KINDS = ("unet", "diffusers")
TASKS = ("diffusion", "music")  # config.task (jaxdiff.train.TASKS builds each)
LR_SCHEDULES = ("warmup_cosine", "constant")  # config.optim.schedule


class SamplerSpec(NamedTuple):
    """What a ``config.sample.sampler`` name runs: a sampling function, its preset and its fields."""

    function: str  # a key of samplers.SAMPLE_FUNCTIONS
    preset: Mapping[str, Any]  # keyword arguments the name sets (a field set explicitly overrides them)
    fields: tuple[str, ...]  # the config.sample fields passed on (as the argument of the same name, but
    #                          see SAMPLE_FIELD_ARGUMENTS)
    evaluations: Callable[[int], int] = lambda num_steps: num_steps  # eps_fn calls of num_steps steps


_SOLVER_FIELDS = ("spacing", "steps_offset", "use_karras_sigmas")
_MULTISTEP_FIELDS = _SOLVER_FIELDS + ("solver_order", "lower_order_final", "final_sigmas_type")
_DPM_FIELDS = _MULTISTEP_FIELDS + ("dpm_algorithm_type", "dpm_solver_type")

SAMPLERS: Mapping[str, SamplerSpec] = {
    "ddim": SamplerSpec("ddim", {}, ("spacing", "steps_offset", "eta", "clip_sample", "use_clipped_model_output",
                                     "final_alpha_cumprod")),
    "ddpm": SamplerSpec("ddpm", {}, ("spacing", "steps_offset", "clip_sample")),
    "dpm++2m": SamplerSpec("dpm_solver", {"order": 2}, _DPM_FIELDS),
    "dpm++3m": SamplerSpec("dpm_solver", {"order": 3}, _DPM_FIELDS),
    "dpm++sde": SamplerSpec("dpm_solver", {"algorithm_type": "sde-dpmsolver++"}, _DPM_FIELDS),
    "unipc": SamplerSpec("unipc", {}, _MULTISTEP_FIELDS + ("unipc_solver_type", "unipc_predict_x0")),
    "euler": SamplerSpec("euler", {"ancestral": False}, _SOLVER_FIELDS),
    "euler_a": SamplerSpec("euler", {"ancestral": True}, _SOLVER_FIELDS),
    "heun": SamplerSpec("heun", {}, _SOLVER_FIELDS, lambda n: 2 * n - 1),  # the last step is an Euler step
    "pndm": SamplerSpec("pndm", {}, ("spacing", "steps_offset", "final_alpha_cumprod"),
                        lambda n: n + 1 if n > 1 else 1),  # the first step evaluates twice
}  # fmt: skip
"""``config.sample.sampler`` / ``make_sampler(sampler=...)`` names -> how they sample (fixed order).

``dpm++2m``, ``dpm++3m``: DPM-Solver++ 2M / 3M; ``dpm++sde``: its SDE solver; ``euler_a``:
ancestral Euler; ``pndm``: PLMS (see :mod:`jaxdiff.solvers`). Each runs
``samplers.SAMPLE_FUNCTIONS[function]`` with ``preset`` and the listed ``config.sample`` fields.
"""

SAMPLE_FIELD_ARGUMENTS: Mapping[str, str] = {
    "solver_order": "order",
    "dpm_algorithm_type": "algorithm_type",
    "dpm_solver_type": "solver_type",
    "unipc_solver_type": "solver_type",
    "unipc_predict_x0": "predict_x0",
}
"""The ``config.sample`` fields whose sampler argument has another name (the rest keep theirs)."""

# Field values that mean "the sampler's own default": the field is not passed on.
_SAMPLER_DEFAULT = {"spacing": "", "solver_order": 0, "dpm_algorithm_type": "", "final_alpha_cumprod": 0.0}
# Fields of config.model that are not UNet attributes.
_MODEL_META_FIELDS = ("kind", "pretrained", "dtype", "num_classes")


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
# Validation.
# ---------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _int_field(config, field: str, *, low: int, high: int | None = None, hint: str = "") -> int:
    node, name = _lookup(config, field)
    value = node.get(name)
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise ValueError(f"config.{field}={value!r} must be an int {bounds}.{' ' + hint if hint else ''}")
    return int(value)


def _real_field(config, field: str, *, low: float, high: float | None = None, low_open: bool = False,
                high_open: bool = False, hint: str = "") -> float:  # fmt: skip
    node, name = _lookup(config, field)
    value = node.get(name)
    ok = _is_real(value)
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (
            high is None or (v < high if high_open else v <= high)
        )
    if not ok:
        lo = f"({low}" if low_open else f"[{low}"
        hi = "inf)" if high is None else (f"{high})" if high_open else f"{high}]")
        raise ValueError(f"config.{field}={value!r} must be a finite number in {lo}, {hi}.{' ' + hint if hint else ''}")
    return float(value)


def _choice_field(config, field: str, allowed) -> Any:
    node, name = _lookup(config, field)
    value = node.get(name)
    if value not in tuple(allowed):
        raise ValueError(f"config.{field}={value!r} is not one of {tuple(allowed)}.")
    return value


def _bool_field(config, field: str) -> bool:
    node, name = _lookup(config, field)
    value = node.get(name, False)
    if not isinstance(value, bool):
        raise ValueError(f"config.{field}={value!r} must be True or False.")
    return value


def _lookup(config, field: str):
    *parents, name = field.split(".")
    node = config
    for p in parents:
        node = node.get(p) if hasattr(node, "get") else None
        if node is None:
            raise ValueError(f"config.{field} is missing: the config has no section {p!r}.")
    return node, name


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
    """Checks every field a training run and its sampler read; fails early, naming the field.

    Called by ``train_and_evaluate`` before anything is built, and by :func:`jaxdiff.make_sampler`
    (for the ``data``, ``model``, ``schedule`` and ``sample`` fields). Everything the checks let
    through builds a train step and a sampler (a property test draws overrides of every numeric
    and choice field of every config in ``configs/`` to hold this).

    Args:
      config: a training config (``configs/*.py``).
      num_devices: devices the batch is split over (default ``jax.device_count()``).

    Raises:
      ValueError: naming the first bad field, its value and what to change.

    Example:
      >>> c = digits.get_config(); c.train.batch_size = 0
      >>> validate_config(c)
      Traceback (most recent call last):
      ValueError: config.train.batch_size=0 must be an int >= 1.
    """
    task = _choice_field(config, "task", TASKS) if "task" in config else "diffusion"
    if task == "music":
        from jaxdiff.music.validation import validate_music_config  # the music package builds on this module

        validate_music_config(config)
    else:
        validate_model_config(config)
    t = config.train
    num_steps = _int_field(config, "train.num_steps", low=1)
    batch = _int_field(config, "train.batch_size", low=1)
    for name in ("checkpoint_every", "log_every", "keep_checkpoints"):
        _int_field(config, f"train.{name}", low=1)
    _int_field(config, "train.sample_every", low=0, hint="0 samples only at the end.")
    if not _is_int(t.get("seed", 0)):
        raise ValueError(f"config.train.seed={t.get('seed')!r} must be an int.")
    _real_field(config, "train.ema_decay", low=0.0, high=1.0, high_open=True,
                hint="0 turns EMA off; 0.999 averages over ~1000 steps.")  # fmt: skip
    dropout = _real_field(config, "train.label_dropout", low=0.0, high=1.0, high_open=True)
    if dropout > 0 and not int(config.model.get("num_classes", 0) or 0) and config.model.get("kind", "unet") == "unet":
        raise ValueError(
            f"config.train.label_dropout={dropout} needs a conditional model: set "
            "config.model.num_classes (e.g. configs/digits.py:conditional) or label_dropout=0."
        )
    for name in ("async_checkpointing", "distributed"):
        _bool_field(config, f"train.{name}")
    n_dev = jax.device_count() if num_devices is None else int(num_devices)
    if batch % n_dev:
        raise ValueError(
            f"config.train.batch_size={batch} is not divisible by the {n_dev} devices; "
            f"use a multiple of {n_dev}."
        )

    o = config.optim
    _real_field(config, "optim.learning_rate", low=0.0, low_open=True)
    _real_field(config, "optim.b1", low=0.0, high=1.0, high_open=True)
    _real_field(config, "optim.b2", low=0.0, high=1.0, high_open=True)
    _real_field(config, "optim.eps", low=0.0, low_open=True)
    _real_field(config, "optim.weight_decay", low=0.0)
    _real_field(config, "optim.grad_clip_norm", low=0.0, hint="0 turns clipping off.")
    _int_field(config, "optim.warmup_steps", low=0)
    accum = _int_field(config, "optim.grad_accum_steps", low=1)
    if accum > num_steps:
        raise ValueError(
            f"config.optim.grad_accum_steps={accum} exceeds config.train.num_steps={num_steps}: "
            "the run would never update the weights; lower grad_accum_steps or train longer."
        )
    if "schedule" in o:
        _choice_field(config, "optim.schedule", LR_SCHEDULES)
    del o
    if task != "diffusion":
        return

    _choice_field(config, "loss", LOSSES)
    if "loss_weighting" in config:
        _choice_field(config, "loss_weighting", LOSS_WEIGHTINGS)
        _real_field(config, "min_snr_gamma", low=0.0, low_open=True)
    data = config.data
    if bool(config.get("eval", {}).get("digits_metrics", False)) and data.name != "digits":
        raise ValueError(
            f"config.eval.digits_metrics=True needs config.data.name='digits' (got "
            f"{data.name!r}); set config.eval.digits_metrics=False."
        )
    _int_field(config, "data.num_threads", low=0)
    _int_field(config, "data.prefetch", low=0)
    _bool_field(config, "data.random_flip")


def validate_model_config(config: ml_collections.ConfigDict) -> None:
    """The part of :func:`validate_config` a sampler needs: data shape, model, schedule, sample."""
    data = config.data
    name = _choice_field(config, "data.name", DATASETS)
    size = _int_field(config, "data.image_size", low=1)
    channels = _choice_field(config, "data.channels", (1, 3))
    if name == "digits":
        if channels != 1:
            raise ValueError(f"config.data.channels={channels}: the digits are grey; use 1.")
        split = data.get("split", "train+test")
        if split not in DIGITS_SPLITS + ("train+validation+test",):
            raise ValueError(f"config.data.split={split!r} is not a digits split; use one of {DIGITS_SPLITS}.")

    m = config.model
    kind = _choice_field(config, "model.kind", MODEL_KINDS)
    _choice_field(config, "model.dtype", tuple(DTYPES))
    if kind == "unet":
        fields = set(UNet.__dataclass_fields__) - {"parent", "name", "in_channels", "out_channels", "param_dtype"}
        unknown = sorted(set(m.keys()) - fields - set(_MODEL_META_FIELDS))
        if unknown:
            raise ValueError(f"config.model has fields UNet does not take: {unknown}; known: {sorted(fields)}.")
        dims = m.get("hidden_dims", ())
        if not isinstance(dims, (tuple, list)) or len(dims) < 2 or not all(_is_int(d) and d >= 1 for d in dims):
            raise ValueError(
                f"config.model.hidden_dims={dims!r} must be a tuple of at least 2 positive ints, "
                "e.g. (16, 32, 64)."
            )
        groups = _int_field(config, "model.norm_groups", low=1)
        bad = [d for d in dims if d % groups]
        if bad:
            raise ValueError(
                f"config.model.hidden_dims={tuple(dims)}: widths {bad} are not divisible by "
                f"config.model.norm_groups={groups}; use multiples of {groups} or change norm_groups."
            )
        _int_field(config, "model.heads", low=1)
        _int_field(config, "model.head_dim", low=1)
        _int_field(config, "model.num_classes", low=0, hint="0 is unconditional.")
        impl = m.get("attention_impl", "") or None
        if impl is not None and impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"config.model.attention_impl={impl!r} is not one of {ATTENTION_IMPLS} or '' (by backend)."
            )
        _bool_field(config, "model.remat")
        factor = 2 ** max(len(dims) - 2, 0)
        if size % factor:
            raise ValueError(
                f"config.data.image_size={size} cannot be halved {len(dims) - 2} times for "
                f"config.model.hidden_dims={tuple(dims)}: use a multiple of {factor} or fewer hidden_dims."
            )
        for field in ("attention_stages", "up_attention_stages"):
            stages = m.get(field, None)
            if stages is not None and (
                not isinstance(stages, (tuple, list))
                or any(not _is_int(i) or not 0 <= i <= len(dims) - 2 for i in stages)
            ):
                raise ValueError(
                    f"config.model.{field}={stages!r} must list stage indices in 0..{len(dims) - 2}."
                )
        temb = m.get("time_emb_dim", None)
        if temb is not None and (not _is_int(temb) or temb < 4 or temb % 2):
            raise ValueError(f"config.model.time_emb_dim={temb!r} must be an even int >= 4 (or None).")
    elif not m.get("pretrained", ""):
        _pretrained_path(config)  # raises the message that says what to pass

    schedule = build_schedule(config)
    _choice_field(config, "prediction_type", PREDICTION_TYPES)
    validate_sample_config(config, schedule)


def validate_sample_config(config: ml_collections.ConfigDict, schedule: schedules.Schedule) -> None:
    """Checks ``config.sample`` against the schedule, naming the field.

    Fields added after a run was trained may be missing from its ``config.json``: they take
    their defaults (:func:`jaxdiff.config_defaults.base_config`). Besides each field's own
    range, the sampler is built once abstractly, so combinations it rejects (too many steps for
    its timestep rule, ``steps_offset`` out of range, an option pair diffusers cannot run) fail
    here too.
    """
    T = schedule.num_train_timesteps
    sampler = _choice_field(config, "sample.sampler", tuple(SAMPLERS))
    _int_field(config, "sample.num_images", low=1)
    num_steps = _int_field(config, "sample.num_steps", low=1, high=T,
                           hint=f"The schedule has T={T} timesteps (config.schedule.num_train_timesteps).")  # fmt: skip
    _real_field(config, "sample.eta", low=0.0, hint="0 is deterministic DDIM, 1 DDPM-like.")
    for name in ("clip_sample", "use_clipped_model_output", "at_end", "use_karras_sigmas", "unipc_predict_x0",
                 "lower_order_final"):
        _bool_field(config, f"sample.{name}")
    present = config.sample.keys()
    choices = {"spacing": ("",) + samplers.SPACINGS, "dpm_algorithm_type": ("",) + solvers.DPM_ALGORITHM_TYPES,
               "dpm_solver_type": solvers.DPM_SOLVER_TYPES, "unipc_solver_type": solvers.UNIPC_SOLVER_TYPES,
               "final_sigmas_type": solvers.FINAL_SIGMAS_TYPES}  # fmt: skip
    for name, allowed in choices.items():
        if name in present:
            _choice_field(config, f"sample.{name}", allowed)
    if "steps_offset" in present:
        _int_field(config, "sample.steps_offset", low=0)
    if "solver_order" in present:
        _int_field(config, "sample.solver_order", low=0, high=max(solvers.SOLVER_ORDERS),
                   hint="0 is the sampler's own order.")  # fmt: skip
    if "final_alpha_cumprod" in present:
        _real_field(config, "sample.final_alpha_cumprod", low=0.0, high=1.0, hint="0 is the sampler's own.")
    check_sampler(config, schedule, sampler, num_steps)


def sampler_arguments(config: ml_collections.ConfigDict, sampler: str,
                      overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The keyword arguments ``sampler`` (a :data:`SAMPLERS` name) takes from ``config.sample``.

    Its preset, then each of its fields (``overrides[field]`` where given) that is not at "the
    sampler's own" value (``""`` or 0); fields it does not read are ignored, except
    ``use_karras_sigmas=True``, which only the samplers with Karras noise levels accept. The
    caller adds ``num_steps`` and ``prediction_type``.

    Example::

        >>> sampler_arguments(config, "dpm++2m")   # {"order": 2, "spacing": "linspace", ...}
    """
    spec, defaults = SAMPLERS[sampler], base_config().sample
    sample = {**{f: config.sample.get(f, defaults[f]) for f in defaults}, **(overrides or {})}
    if sample["use_karras_sigmas"] and "use_karras_sigmas" not in spec.fields:
        with_karras = [name for name, s in SAMPLERS.items() if "use_karras_sigmas" in s.fields]
        raise ValueError(
            f"config.sample.use_karras_sigmas=True does not apply to the sampler {sampler!r} "
            f"(config.sample.sampler): use one of {with_karras} or set use_karras_sigmas=False."
        )
    kwargs = dict(spec.preset)
    for field in spec.fields:
        value = sample[field]
        if field not in _SAMPLER_DEFAULT or value != _SAMPLER_DEFAULT[field]:
            kwargs[SAMPLE_FIELD_ARGUMENTS.get(field, field)] = value
    return kwargs


def check_sampler(config: ml_collections.ConfigDict, schedule: schedules.Schedule, sampler: str, num_steps: int,
                  kwargs: Mapping[str, Any] | None = None) -> None:  # fmt: skip
    """Builds ``sampler``'s loop abstractly (``jax.eval_shape``, a stand-in network): its tables
    and checks run, so what the sampler rejects is a ValueError naming the ``config`` fields.

    ``kwargs``: the sampler's arguments (default :func:`sampler_arguments`).
    """
    kwargs = sampler_arguments(config, sampler) if kwargs is None else dict(kwargs)
    sample_fn = samplers.SAMPLE_FUNCTIONS[SAMPLERS[sampler].function]
    prediction_type = config.get("prediction_type", "epsilon")

    def run(x):
        return sample_fn(lambda x, t: x, schedule, x, jax.random.key(0), num_steps=num_steps,
                         prediction_type=prediction_type, **kwargs)  # fmt: skip

    try:
        jax.eval_shape(run, jax.ShapeDtypeStruct((1, 1), jnp.float32))
    except ValueError as e:
        fields = [f"config.sample.{f}={kwargs.get(SAMPLE_FIELD_ARGUMENTS.get(f, f), config.sample.get(f))!r}"
                  for f in SAMPLERS[sampler].fields]  # the values the sampler ran with
        raise ValueError(
            f"config.sample.sampler={sampler!r} cannot run config.sample.num_steps={num_steps} with "
            f"config.prediction_type={prediction_type!r}, config.schedule.name={config.schedule.get('name')!r}, "
            f"config.schedule.num_train_timesteps={schedule.num_train_timesteps} and "
            f"{', '.join(fields)}: {e}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Builders.
# ---------------------------------------------------------------------------------------------


def model_dtype(config: ml_collections.ConfigDict):
    """The computation dtype ``config.model.dtype`` names."""
    return DTYPES[_choice_field(config, "model.dtype", tuple(DTYPES))]


def build_model(config: ml_collections.ConfigDict):
    """The network a config describes.

    ``config.model.kind == "unet"`` (default): jaxdiff's ``UNet`` with the other
    ``config.model`` fields. ``"diffusers"``: the ``DiffusersUNet2D`` of the diffusers
    checkpoint folder ``config.model.pretrained`` (its ``config.json``; the ``UNet`` fields are
    ignored).
    """
    kind = _choice_field(config, "model.kind", MODEL_KINDS)
    if kind == "diffusers":
        from jaxdiff import pretrained
        from jaxdiff.models import DiffusersUNet2D

        return DiffusersUNet2D.from_config(
            pretrained.read_unet_config(_pretrained_path(config)),
            dtype=model_dtype(config),
            remat=bool(config.model.get("remat", False)),
        )
    kwargs = dict(config.model.to_dict() if hasattr(config.model, "to_dict") else config.model)
    for field in _MODEL_META_FIELDS:
        kwargs.pop(field, None)
    num_classes = int(config.model.get("num_classes", 0) or 0) or None
    kwargs["attention_impl"] = kwargs.get("attention_impl") or None
    if "hidden_dims" in kwargs:
        kwargs["hidden_dims"] = tuple(kwargs["hidden_dims"])
    channels = config.data.channels
    return UNet(
        in_channels=channels,
        out_channels=channels,
        num_classes=num_classes,
        dtype=model_dtype(config),
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
    """The noise schedule a config names (``config.schedule.name`` and its keyword arguments).

    ``config.schedule.snr_scale`` (default 1) multiplies its SNR at every timestep
    (:func:`jaxdiff.schedules.scale_snr`), a pretrained model's schedule too.
    A bad name, length or keyword is a ``ValueError`` naming ``config.schedule``.
    """
    kwargs = dict(config.schedule.to_dict())
    name = kwargs.pop("name", None)
    snr_scale = kwargs.pop("snr_scale", 1.0)
    if not (_is_real(snr_scale) and snr_scale > 0):
        raise ValueError(f"config.schedule.snr_scale={snr_scale!r} must be a finite number > 0 (1 = the schedule as published).")
    if name == "from_pretrained":  # the scheduler config saved beside a diffusers checkpoint
        from jaxdiff import pretrained

        return schedules.scale_snr(pretrained.read_scheduler_config(_pretrained_path(config)).schedule(), snr_scale)
    if name not in schedules.SCHEDULES:
        raise ValueError(
            f"config.schedule.name={name!r} is not one of {sorted(schedules.SCHEDULES) + ['from_pretrained']}."
        )
    steps = kwargs.get("num_train_timesteps", 1000)
    if not _is_int(steps) or steps < 2:
        raise ValueError(f"config.schedule.num_train_timesteps={steps!r} must be an int >= 2.")
    try:
        return schedules.get(name, snr_scale=snr_scale, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.schedule ({name!r} with {kwargs}): {e}") from e


def warmup_updates(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """``(warmup, num_updates)``: the learning-rate warmup the run uses, and its update count.

    A warmup as long as the run (or longer) would leave no updates for the cosine decay;
    such a warmup is clamped to a tenth of the run (logged once by ``train_and_evaluate``),
    so ``--config.train.num_steps=10`` is a valid quick try of any config.
    """
    accum = max(1, int(config.optim.get("grad_accum_steps", 1)))
    num_updates = max(1, int(config.train.num_steps) // accum)
    warmup = max(0, int(config.optim.warmup_steps))
    if warmup >= num_updates:
        warmup = num_updates // 10
    return warmup, num_updates


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup and cosine decay to 0 at the last update, built from the config.

    ``optax.warmup_cosine_decay_schedule(0, lr, warmup, num_updates)``: the first update uses
    lr 0, lr rises linearly to its peak over ``warmup_steps`` updates, then follows a half
    cosine to 0 at the last update (the book: AdamW(1e-4, b1 0.95, b2 0.999, wd 1e-5, eps 1e-8),
    300 warmup updates). ``optim.schedule="constant"``: the warmup, then ``lr`` throughout. A warmup not shorter than the run is clamped (:func:`warmup_updates`).
    Optional: global-norm gradient clipping (``grad_clip_norm > 0``) and gradient accumulation
    over ``grad_accum_steps`` micro-batches (``optax.MultiSteps``; the schedule then counts
    optimizer updates, not micro-steps).
    """
    o = config.optim
    accum = int(o.get("grad_accum_steps", 1))
    if accum < 1:
        raise ValueError(f"config.optim.grad_accum_steps={accum} must be >= 1.")
    warmup, num_updates = warmup_updates(config)
    if o.get("schedule", "warmup_cosine") == "constant":  # the book's music training: Adam at a fixed lr
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, o.learning_rate, warmup), optax.constant_schedule(o.learning_rate)], [warmup]
        ) if warmup else optax.constant_schedule(o.learning_rate)  # fmt: skip
    else:
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


def steps_for_epochs(num_examples: int, batch_size: int, epochs: int) -> int:
    """Number of updates for ``epochs`` passes with the last partial batch kept (PyTorch's default)."""
    return epochs * math.ceil(num_examples / batch_size)


# ---------------------------------------------------------------------------------------------
# The run's state.
# ---------------------------------------------------------------------------------------------


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
    return state_from_params(config, tx, params)


def state_from_params(config: ml_collections.ConfigDict, tx: optax.GradientTransformation, params: Any) -> TrainState:
    """The ``TrainState`` at step 0 for ``params`` (any task): fresh optimizer state, EMA = params
    when ``config.train.ema_decay > 0``."""
    ema = params if config.train.get("ema_decay", 0.0) > 0 else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=ema,
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def abstract_state(config: ml_collections.ConfigDict, sharding: Any = None) -> TrainState:
    """Shapes and dtypes of a config's ``TrainState`` (``jax.ShapeDtypeStruct`` leaves), for restoring.

    ``sharding``: the sharding every leaf is restored to (default: the first local device), so
    a checkpoint written on any number of devices reads back on this process's devices.
    """
    model = build_model(config)
    tx, _ = make_optimizer(config)
    shapes = jax.eval_shape(lambda k: init_state(config, model, tx, k), jax.random.key(0))
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)


def restore_state(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> tuple[int | None, TrainState | None]:
    """The newest readable ``TrainState`` of a run's workdir (on one local device), or ``(None, None)``.

    For reading a run after (or beside) training, e.g. to sample from it; training itself
    restores with shardings and the data iterator in ``train_and_evaluate``. A checkpoint
    written on another number of devices restores here (each leaf is read onto this device).
    """
    manager = ckpt.make_manager(workdir, async_save=False, create=False)
    try:
        return ckpt.restore_latest(manager, abstract_state(config))
    finally:
        manager.close()
