"""What a kind of model gives the shared training loop, and the update every train step ends with.

:func:`jaxdiff.train.train_and_evaluate` is one loop for every task: checkpoints with the data
iterator (exact resume), SIGTERM save, the non-finite stop, the progress bar, ``metrics.jsonl``
and data parallelism over a ``data`` mesh axis. A :class:`Task` is what differs: how the state
is initialised, the pure train step, the data, the throughput unit, and what is written at
``train.sample_every`` and at the end. ``config.task`` names the task ("diffusion" or "music";
the table is ``jaxdiff.train.TASKS``).

Every task's train step ends with :func:`apply_gradients`, so the optimizer update, the EMA and
the non-finite guard are the same code for all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff.builders import TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Task:
    """The per-task parts of a training run (everything else is the loop's).

    Attributes:
      init_state: ``(key, params_or_None) -> TrainState``, pure; the loop jits it (replicated
        output) and also traces it for the checkpoint's abstract state.
      initial_params: ``() -> params or None``: pretrained weights to start from (None: random).
      train_step: ``(state, batch, key) -> (state, metrics)``, pure, ``metrics`` holding at least
        ``"loss"``; the loop jits it over the mesh (batch sharded on ``data``), donating the state.
      dataset: ``seed -> grain.IterDataset`` of this process's host batches (numpy dicts); its
        iterator state is saved in every checkpoint.
      rate_name, rate_label, rate_per_step: throughput logged as ``rate_name`` (e.g.
        ``"images_per_sec"``) = ``rate_per_step`` x steps / seconds, shown as ``rate_label``.
      report: ``(workdir, step, state, key) -> record or None``, host side, at
        ``train.sample_every`` and at the end (``config.sample.at_end``): writes samples and
        returns a record for ``metrics.jsonl`` (or None). Called on every process.
    """

    init_state: Callable[[jax.Array, Any], TrainState]
    initial_params: Callable[[], Any]
    train_step: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]
    dataset: Callable[[int], Any]
    rate_name: str
    rate_label: str
    rate_per_step: int
    report: Callable[[Path, int, TrainState, jax.Array], dict[str, Any] | None] | None = None


def log(message: str) -> None:
    """A progress message that does not break the progress bar (process 0 only)."""
    if jax.process_index() == 0:
        from tqdm.auto import tqdm

        tqdm.write(f"[jaxdiff] {message}")


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's part of the batch -> global arrays sharded along ``data``."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def ema_decay_at(step: jax.typing.ArrayLike, max_decay: float, warmup: bool = True) -> jax.Array:
    """The EMA decay of update number ``step`` (0 for the first): ``min(d, (1 + n) / (10 + n))``.

    An EMA that starts at the random initial weights and decays at a constant ``d`` keeps
    ``d^n`` of them after ``n`` updates (``0.999^3000 = 5%``): every run shorter than a few
    times ``1 / (1 - d)`` samples from a blurred model. The warm-up ramps the decay from 0.1 up
    to ``d`` (TensorFlow's ``ExponentialMovingAverage(num_updates=...)``, also used by latent
    diffusion's EMA): the average then covers roughly the last ``n / 9`` updates until that
    reaches ``1 / (1 - d)``, and the initial weights' share after ``n`` updates is at most
    ``prod_{k<n} (1 + k) / (10 + k) = 9! n! / (n + 9)!`` (1e-5 after 10 updates, 2e-13 after 100)
    whatever ``d``. ``warmup=False`` gives the constant decay.

    Example:
      >>> float(ema_decay_at(0, 0.999)), float(ema_decay_at(90, 0.999)), float(ema_decay_at(10**6, 0.999))
      (0.1, 0.91, 0.999)
    """
    d = jnp.asarray(max_decay, jnp.float32)
    if not warmup:
        return d
    n = jnp.asarray(step, jnp.float32)
    return jnp.minimum(d, (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, step: jax.typing.ArrayLike, max_decay: float, *, warmup: bool = True) -> Any:
    """``ema <- decay * ema + (1 - decay) * params`` with ``decay = ema_decay_at(step, max_decay)``."""
    decay = ema_decay_at(step, max_decay, warmup)
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves of ``tree`` together, in float32.

    Computed over one concatenated vector: one reduction instead of one per leaf (a U-Net has
    ~200 leaves; on CPU the per-leaf reductions cost 1-2% of a small model's train step).
    """
    leaves = [jnp.ravel(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(tree)]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(jnp.concatenate(leaves))))


def apply_gradients(
    state: TrainState,
    loss: jax.Array,
    grads: Any,
    tx: optax.GradientTransformation,
    *,
    ema_decay: float = 0.0,
    ema_warmup: bool = True,
) -> tuple[TrainState, jax.Array]:
    """One optimizer update (and EMA update) from ``grads``; returns ``(state, grad_norm)``.

    A step whose loss or gradients are not finite leaves params, optimizer state and EMA
    untouched and records its number (``state.step + 1``) in ``state.nonfinite_step``; the loop
    stops the run when it sees it.
    """
    grad_norm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = ema_update(ema, params, state.step, ema_decay, warmup=ema_warmup)
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
    return new_state, grad_norm


def update_count(state: TrainState) -> jax.Array:
    """Optimizer updates so far (differs from ``state.step`` under gradient accumulation)."""
    if isinstance(state.opt_state, optax.MultiStepsState):
        return state.opt_state.gradient_step
    return state.step
