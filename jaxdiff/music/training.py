"""The music Transformer as a task of the shared training loop (``config.task = "music"``).

The objective is the book's: next-event cross-entropy over all positions of each window,
averaged over the targets that are not ``pad`` (PyTorch's ``CrossEntropyLoss(ignore_index=389)``
on the flattened batch), with dropout on; ``end`` (388) is an ordinary target.

Evaluation (at ``train.sample_every`` and at the end): the loss per token on the held-out
windows (``val_loss``, nats) beside the loss of the training set's unigram frequencies on the
same targets (``unigram_loss``), and a continuation of a held-out prompt written to
``workdir/samples/step_<n>.mid`` and ``.png`` (piano roll: prompt and continuation in two
colours).

Example::

    from configs import music
    from jaxdiff.train import train_and_evaluate
    train_and_evaluate(music.get_config(), "runs/music")
"""

from __future__ import annotations

import functools
import math
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
from jaxdiff.builders import DTYPES, TrainState, make_optimizer, state_from_params
from jaxdiff.music import data as music_data
from jaxdiff.music.events import PAD_ID, decode_midi, encode_midi
from jaxdiff.music.model import MusicTransformer, generate
from jaxdiff.music.roll import save_piano_roll
from jaxdiff.tasks import Task, apply_gradients, log, shard_batch, update_count

MODEL_FIELDS = ("num_layers", "num_heads", "embed_dim", "vocab_size", "max_len", "dropout_rate", "dtype")


def build_music_model(config: ml_collections.ConfigDict) -> MusicTransformer:
    """The ``MusicTransformer`` of ``config.model`` (dtype by name: "float32", "bfloat16", ...)."""
    m = config.model
    kwargs = {f: m[f] for f in MODEL_FIELDS if f in m and f != "dtype"}
    return MusicTransformer(**kwargs, dtype=DTYPES[m.get("dtype", "float32")])


def music_loss(params: Any, batch: dict[str, jax.Array], key: jax.Array | None, *, model: MusicTransformer,
               train: bool = True) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """``(mean cross-entropy over non-pad targets, number of them)`` of one batch.

    ``train=True`` applies dropout with ``key``.
    """
    rngs = {"dropout": key} if train else None
    logits = model.apply({"params": params}, batch["inputs"], train=train, rngs=rngs)  # [B, T, V]
    targets = batch["targets"]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
    mask = (targets != PAD_ID).astype(jnp.float32)
    count = jnp.sum(mask)
    return jnp.sum(nll * mask) / jnp.maximum(count, 1.0), count


def music_train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    key: jax.Array,
    *,
    model: MusicTransformer,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule | None = None,
    ema_decay: float = 0.0,
    ema_warmup: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch of windows: ``(state, batch, key) -> (state, metrics)``.

    The dropout key is ``fold_in(key, state.step)``; non-finite steps are skipped and recorded
    (:func:`jaxdiff.tasks.apply_gradients`).
    """
    step_key = jax.random.fold_in(key, state.step)
    loss_fn = functools.partial(music_loss, model=model, train=True)
    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_key)
    new_state, grad_norm = apply_gradients(state, loss, grads, tx, ema_decay=ema_decay, ema_warmup=ema_warmup)
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count}
    if lr_schedule is not None:
        metrics["learning_rate"] = lr_schedule(update_count(state))
    return new_state, metrics


def init_music_state(config: ml_collections.ConfigDict, model: MusicTransformer, tx: optax.GradientTransformation,
                     key: jax.Array, params: Any = None) -> TrainState:  # fmt: skip
    """A fresh ``TrainState`` (pure; jit it). ``params``: start from these weights."""
    if params is None:
        params = model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
    return state_from_params(config, tx, params)


def eval_windows(pieces: list[music_data.Piece], seq_len: int, max_windows: int = 0) -> dict[str, np.ndarray]:
    """Non-overlapping windows of the held-out pieces: ``{"inputs", "targets"}: int32 [N, seq_len]``."""
    pairs = [music_data.make_pair(p.ids, o, seq_len)
             for p in pieces for o in music_data.window_offsets(len(p.ids), seq_len, seq_len)]  # fmt: skip
    if max_windows:
        pairs = pairs[:max_windows]
    return {"inputs": np.stack([a for a, _ in pairs]), "targets": np.stack([b for _, b in pairs])}


def held_out_prompt(pieces: list[music_data.Piece], prompt_len: int) -> np.ndarray:
    """The book's prompt: the first ``prompt_len`` events of the first held-out piece, decoded to
    MIDI and encoded again (which drops notes the cut left without a note_off). A cut too short
    to hold a whole note is used as it is."""
    cut = pieces[0].ids[:prompt_len]
    again = encode_midi(decode_midi(cut))
    return again if again.size else np.asarray(cut, np.int32)


def music_task(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Task:
    """The music Transformer a config describes, as a :class:`~jaxdiff.tasks.Task` of the shared loop."""
    model = build_music_model(config)
    tx, lr_schedule = make_optimizer(config)
    seq_len = int(config.data.seq_len)
    batch_size = int(config.train.batch_size)
    step = functools.partial(
        music_train_step, model=model, tx=tx, lr_schedule=lr_schedule,
        ema_decay=float(config.train.get("ema_decay", 0.0)), ema_warmup=bool(config.train.get("ema_warmup", True)),
    )  # fmt: skip

    def dataset(seed: int):
        pieces = music_data.load_pieces(config.data, config.data.get("split", "train"))
        source = music_data.WindowSource(pieces, seq_len, int(config.data.window_stride))
        return data_lib.make_dataset(source, batch_size=batch_size, seed=seed,
                                     num_threads=int(config.data.get("num_threads", 2)),
                                     prefetch=int(config.data.get("prefetch", 4)))  # fmt: skip

    report = make_music_report(config, model, mesh)
    return Task(
        init_state=functools.partial(init_music_state, config, model, tx),
        initial_params=lambda: None,
        train_step=step,
        dataset=dataset,
        rate_name="tokens_per_sec",
        rate_label="tok_s",
        rate_per_step=batch_size * seq_len,
        report=report,
    )


def make_music_report(config: ml_collections.ConfigDict, model: MusicTransformer, mesh: jax.sharding.Mesh):
    """The task's report: validation loss vs the unigram baseline, and a continuation (MIDI, PNG).

    The held-out data are loaded on the first call (not when the task is built).
    """
    seq_len = int(config.data.seq_len)
    n_dev = mesh.devices.size
    eval_batch = max(n_dev, int(config.train.batch_size) // n_dev * n_dev)
    cache: dict[str, Any] = {}

    @functools.partial(jax.jit, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))
    def nll_sum(params, batch):
        loss, count = music_loss(params, batch, None, model=model, train=False)
        return loss * count, count

    def held_out():
        if not cache:
            split = config.data.get("eval_split", "validation")
            pieces = music_data.load_pieces(config.data, split)
            train_pieces = music_data.load_pieces(config.data, config.data.get("split", "train"))
            windows = eval_windows(pieces, seq_len, int(config.eval.get("max_windows", 0)))
            n = len(windows["inputs"])
            padded = math.ceil(n / eval_batch) * eval_batch  # all-pad rows count zero tokens
            for k in windows:
                windows[k] = np.concatenate([windows[k], np.full((padded - n, seq_len), PAD_ID, np.int32)])
            log_p = music_data.unigram_log_probs(train_pieces)
            targets = windows["targets"][windows["targets"] != PAD_ID]
            cache.update(windows=windows, unigram=float(-np.mean(log_p[targets])),
                         prompt=held_out_prompt(pieces, int(config.sample.prompt_len)))  # fmt: skip
        return cache

    def report(workdir: Path, step: int, state: TrainState, key: jax.Array) -> dict[str, Any]:
        data = held_out()
        params = state.ema_params if state.ema_params is not None else state.params
        total, count = 0.0, 0.0
        w = data["windows"]
        for i in range(0, len(w["inputs"]), eval_batch):
            batch = shard_batch({k: v[i : i + eval_batch] for k, v in w.items()}, mesh)
            s, c = jax.device_get(nll_sum(params, batch))
            total, count = total + float(s), count + float(c)
        record = {"step": step, "val_loss": total / max(count, 1.0), "unigram_loss": data["unigram"],
                  "val_tokens": int(count)}  # fmt: skip
        prompt = data["prompt"]
        seq = generate(model, params, prompt[None], key, num_tokens=int(config.sample.num_tokens),
                       temperature=float(config.sample.temperature), greedy=bool(config.sample.get("greedy", False)))
        seq = np.asarray(jax.device_get(seq))[0]
        if jax.process_index() == 0:
            folder = Path(workdir) / "samples"
            folder.mkdir(parents=True, exist_ok=True)
            decode_midi(seq, path=folder / f"step_{step}.mid")
            png = save_piano_roll(seq, folder / f"step_{step}.png", prompt_len=len(prompt))
            log(f"step {step}: val_loss {record['val_loss']:.3f} nats/token (unigram {record['unigram_loss']:.3f}); "
                f"continuation in {png} and .mid")  # fmt: skip
        return record

    return report


def abstract_music_state(config: ml_collections.ConfigDict, sharding: Any = None) -> TrainState:
    """Shapes and dtypes of a music run's ``TrainState``, for restoring a checkpoint."""
    model = build_music_model(config)
    tx, _ = make_optimizer(config)
    shapes = jax.eval_shape(functools.partial(init_music_state, config, model, tx), jax.random.key(0))
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)


def load_music_run(workdir: str, *, ema: bool = True) -> tuple[ml_collections.ConfigDict, MusicTransformer, Any, int]:
    """``(config, model, params, step)`` of the newest checkpoint of a music run's ``workdir``.

    ``ema``: the EMA parameters when the run kept them.
    """
    config = ckpt.read_config(workdir)
    manager = ckpt.make_manager(workdir, async_save=False, create=False)
    try:
        step, state = ckpt.restore_latest(manager, abstract_music_state(config))
    finally:
        manager.close()
    if state is None:
        raise FileNotFoundError(f"no readable checkpoint in {workdir}/{ckpt.CHECKPOINT_DIR}.")
    params = state.ema_params if ema and state.ema_params is not None else state.params
    return config, build_music_model(config), params, step
