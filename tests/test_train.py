"""Training: pure train step, data parallel equality, exact resume after a kill, safety nets."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import hypothesis.strategies as st
import optax
import pytest
from conftest import REPO, load_config
from hypothesis import given, settings
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiff import checkpoint as ckpt
from jaxdiff import data as data_lib
from jaxdiff import train as train_lib


def _smoke(variant: str = "smoke", **overrides):
    config = load_config("digits", variant)
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _fixed_batches(config, n: int):
    source = data_lib.DigitsSource(config.data.image_size)
    b = config.train.batch_size
    return [
        {"image": source.images[i * b : (i + 1) * b], "label": source.labels[i * b : (i + 1) * b]}
        for i in range(n)
    ]


def _run_steps(config, devices, batches):
    mesh = train_lib.make_mesh(devices)
    model = train_lib.build_model(config)
    schedule = train_lib.build_schedule(config)
    tx, lr = train_lib.make_optimizer(config)
    replicated = NamedSharding(mesh, P())
    create = jax.jit(functools.partial(train_lib.init_state, config, model, tx), out_shardings=replicated)
    state = create(jax.random.key(0))
    step_fn = train_lib.make_train_step(config, model, tx, schedule, lr, mesh)
    losses = []
    for batch in batches:
        state, metrics = step_fn(state, train_lib.shard_batch(batch, mesh), jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state)


def test_eight_devices_equal_one_device():
    assert jax.device_count() == 8, "conftest should give 8 simulated CPU devices"
    config = _smoke("conditional,smoke")  # conditional: exercises label dropout randomness too
    batches = _fixed_batches(config, 3)
    losses1, state1 = _run_steps(config, jax.devices()[:1], batches)
    losses8, state8 = _run_steps(config, jax.devices(), batches)
    np.testing.assert_allclose(losses8, losses1, atol=1e-5, rtol=0)
    assert losses1[0] != losses1[1]  # the steps really changed something
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_train_step_is_pure_and_traced_once():
    config = _smoke()
    model = train_lib.build_model(config)
    schedule = train_lib.build_schedule(config)
    tx, lr = train_lib.make_optimizer(config)
    state = jax.jit(functools.partial(train_lib.init_state, config, model, tx))(jax.random.key(0))
    traces = []

    def counted(*args, **kwargs):
        traces.append(1)
        return train_lib.train_step(*args, **kwargs)

    step = jax.jit(functools.partial(counted, model=model, tx=tx, schedule=schedule, lr_schedule=lr))
    batch = jax.tree.map(jnp.asarray, _fixed_batches(config, 1)[0])
    s1, m1 = step(state, batch, jax.random.key(3))
    s1b, m1b = step(state, batch, jax.random.key(3))
    s2, _ = step(s1, batch, jax.random.key(3))
    assert len(traces) == 1
    assert float(m1["loss"]) == float(m1b["loss"])  # same inputs, same result
    assert int(s2.step) == 2
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(s2.params))]
    assert all(changed)
    # EMA follows ema = d_n * ema + (1 - d_n) * params, d_n = min(d, (1 + n) / (10 + n)): 0.1 at n = 0.
    d = config.train.ema_decay
    s1_ema = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx, schedule=schedule, ema_decay=d))(
        state, batch, jax.random.key(3)
    )[0]
    leaf0 = lambda t: jax.tree.leaves(t)[0]  # noqa: E731
    np.testing.assert_allclose(
        leaf0(s1_ema.ema_params), 0.1 * leaf0(state.params) + 0.9 * leaf0(s1_ema.params), atol=1e-6
    )


@given(st.floats(0.5, 0.99999), st.integers(11, 20000))
@settings(max_examples=30)
def test_ema_forgets_the_initial_weights(decay, n):
    """After n >= 11 updates at most 1e-5 of the random initial weights is left in the EMA (warm-up on).

    With a constant decay d the share is d^n: 0.999^3000 = 5%, which brightened and blurred every
    digits sample of a 3000-step run.
    """
    init, target = {"w": jnp.ones((), jnp.float32)}, {"w": jnp.zeros((), jnp.float32)}
    update = jax.jit(lambda e, i: train_lib.ema_update(e, target, i, decay))
    ema = jax.lax.fori_loop(0, n, lambda i, e: update(e, i), init)
    share = float(ema["w"])  # what is left of the initial 1.0 after n updates towards 0
    assert share <= 1e-5
    expected = float(np.prod([min(decay, (1 + k) / (10 + k)) for k in range(n)]))
    assert share == pytest.approx(expected, rel=1e-3, abs=1e-30)
    constant = jax.lax.fori_loop(0, n, lambda i, e: train_lib.ema_update(e, target, i, decay, warmup=False), init)
    assert float(constant["w"]) == pytest.approx(decay**n, rel=1e-3, abs=1e-30)  # the old behaviour
    # The decay reaches d: long runs average over ~1 / (1 - d) updates as configured.
    assert float(train_lib.ema_decay_at(10**9, decay)) == pytest.approx(decay)


def test_nonfinite_step_leaves_params_untouched():
    config = _smoke()
    model = train_lib.build_model(config)
    schedule = train_lib.build_schedule(config)
    tx, _ = train_lib.make_optimizer(config)
    state = jax.jit(functools.partial(train_lib.init_state, config, model, tx))(jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, _fixed_batches(config, 1)[0])
    bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
    step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx, schedule=schedule))
    s1, m = step(state, bad, jax.random.key(0))
    assert not np.isfinite(float(m["loss"]))
    assert int(s1.nonfinite_step) == 1
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(s1.params)):
        np.testing.assert_array_equal(a, b)
    s2, _ = step(s1, batch, jax.random.key(0))
    assert int(s2.nonfinite_step) == 1  # the first bad step is remembered


def test_optimizer_is_the_books_warmup_cosine():
    config = load_config("flowers")
    tx, lr = train_lib.make_optimizer(config)
    total = config.train.num_steps
    assert total == 204_800
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(150)), 0.5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(300)), 1e-4, rtol=1e-6)
    mid = 300 + (total - 300) // 2
    np.testing.assert_allclose(float(lr(mid)), 0.5e-4, rtol=1e-4)
    assert float(lr(total)) == pytest.approx(0.0, abs=1e-12)
    # AdamW hyper-parameters reach optax: one update on a known gradient.
    params = {"w": jnp.ones((3,))}
    state = tx.init(params)
    for _ in range(301):
        updates, state = tx.update({"w": jnp.ones((3,))}, state, params)
    mu = optax.tree_utils.tree_get(state, "mu")
    np.testing.assert_allclose(mu["w"], 1 - 0.95**301, rtol=1e-5)  # b1 = 0.95


def test_gradient_accumulation_counts_updates():
    config = _smoke(**{"optim.grad_accum_steps": 2, "train.num_steps": 8})
    tx, lr = train_lib.make_optimizer(config)
    assert isinstance(tx, optax.MultiSteps)
    params = {"w": jnp.ones(())}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones(())}, state, params)
    assert int(state.gradient_step) == 0  # one micro-step: no update yet
    _, state = tx.update({"w": jnp.ones(())}, state, params)
    assert int(state.gradient_step) == 1


_restore = train_lib.restore_state


def _cli(workdir, *overrides, env=None, variant="smoke"):
    return [
        sys.executable,
        str(REPO / "scripts" / "train.py"),
        f"--config={REPO / 'configs' / 'digits.py'}:{variant}",
        f"--workdir={workdir}",
        *overrides,
    ]


def test_killed_run_resumes_bit_identical(tmp_path):
    """A run SIGKILLed mid-way and resumed ends with exactly the uninterrupted run's state."""
    n, overrides = 8, {"train.num_steps": 8, "train.checkpoint_every": 3, "sample.at_end": False}
    config = _smoke(**overrides)
    cli_overrides = [f"--config.{k}={v}" for k, v in overrides.items()]

    train_lib.train_and_evaluate(config, tmp_path / "straight")

    killed = tmp_path / "killed"
    env = dict(os.environ, JAXDIFF_TEST_KILL_AT_STEP="5")
    proc = subprocess.run(_cli(killed, *cli_overrides), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    step_at_kill, _ = _restore(killed, config)
    assert step_at_kill == 3  # checkpoint 3 survived; steps 4-5 were lost with the process

    train_lib.train_and_evaluate(config, killed)  # resume in a new "process" (fresh objects)

    step_a, state_a = _restore(tmp_path / "straight", config)
    step_b, state_b = _restore(killed, config)
    assert step_a == step_b == n
    leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
    assert len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        _cli(workdir, "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000",
             "--config.train.log_every=1", "--config.sample.at_end=False"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    config = _smoke()
    step, state = _restore(workdir, config)
    assert step is not None and 2 <= step < 100000
    assert int(state.step) == step


def test_unreadable_checkpoints_stop_training_instead_of_starting_over(tmp_path):
    config = _smoke(**{"sample.at_end": False})
    train_lib.train_and_evaluate(config, tmp_path)
    for f in (tmp_path / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * f.stat().st_size)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    config.train.num_steps = 9
    with pytest.raises(RuntimeError, match="none of them can be read"):
        train_lib.train_and_evaluate(config, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # nothing rotated away


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, caplog):
    config = _smoke(**{"sample.at_end": False})  # checkpoints at 3 and 6
    train_lib.train_and_evaluate(config, tmp_path)
    latest = tmp_path / "checkpoints" / "6" / "state"
    for f in latest.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with caplog.at_level("WARNING"):
        step, state = _restore(tmp_path, config)
    assert step == 3
    assert int(state.step) == 3
    assert "step 6" in caplog.text and "corrupt" in caplog.text


def test_nonfinite_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    config = _smoke(**{"train.num_steps": 10, "train.checkpoint_every": 2, "train.log_every": 1,
                       "sample.at_end": False})  # fmt: skip
    good = _fixed_batches(config, 1)[0]

    def fake_make_dataset(source, *, batch_size, seed, **kwargs):
        def batch_for(i):
            image = good["image"] if i < 4 else np.full_like(good["image"], np.nan)
            return {"image": image, "label": good["label"]}

        return grain.MapDataset.range(1000).map(batch_for).to_iter_dataset()

    monkeypatch.setattr(data_lib, "make_dataset", fake_make_dataset)
    with pytest.raises(train_lib.NonFiniteLossError, match="step 5") as info:
        train_lib.train_and_evaluate(config, tmp_path)
    assert "checkpoint is step 4" in str(info.value)
    step, state = _restore(tmp_path, config)
    assert step == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_end_to_end_smoke_writes_metrics_samples_and_config(tmp_path):
    config = _smoke()
    train_lib.train_and_evaluate(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and r["images_per_sec"] > 0 for r in train_records)
    # The digits config scores each sample grid with the shipped classifier.
    (quality,) = [r for r in records if "digits_fd" in r]
    assert quality["step"] == 6 and quality["num_images"] == config.sample.num_images
    assert np.isfinite(quality["digits_fd"]) and 0 < quality["classifier_confidence"] <= 1
    png = tmp_path / "samples" / "step_6.png"
    assert png.exists()
    from PIL import Image

    assert Image.open(png).size[0] >= 64
    saved = ckpt.read_config(tmp_path)
    assert tuple(saved.model.hidden_dims) == tuple(config.model.hidden_dims)
    # Running again with the same num_steps is a no-op resume.
    state = train_lib.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 6


def test_bad_config_is_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="train.batch_size"):
        train_lib.validate_config(_smoke(**{"train.batch_size": 12}))  # not divisible by 8 devices
    with pytest.raises(ValueError, match="config.loss"):
        train_lib.validate_config(_smoke(**{"loss": "l3"}))
    with pytest.raises(ValueError, match="model.dtype"):
        train_lib.build_model(_smoke(**{"model.dtype": "float8"}))


def test_cpu_fusion_mode_choice_and_errors(monkeypatch):
    monkeypatch.delenv(train_lib.CPU_FUSION_ENV, raising=False)
    auto = train_lib.cpu_fusion_mode()
    assert auto == ("dot" if train_lib._cpu_has_avx512() else "off")
    monkeypatch.setenv(train_lib.CPU_FUSION_ENV, "off")
    assert train_lib.cpu_fusion_mode() == "off"
    assert train_lib.cpu_compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": ""}
    assert train_lib.cpu_compiler_options("jax_default") is None  # an explicit mode wins
    monkeypatch.setenv(train_lib.CPU_FUSION_ENV, "fast")
    with pytest.raises(ValueError, match=r"'fast' is not one of .*JAXDIFF_CPU_FUSION"):
        train_lib.cpu_fusion_mode()


@pytest.mark.parametrize("mode", ["off", "dot", "dot_conv"])
def test_cpu_fusion_modes_compute_the_same_gradients(mode):
    from jaxdiff.models import UNet

    model = UNet(in_channels=1, hidden_dims=(8, 16), heads=2, head_dim=8)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    t = jnp.array([3, 500])
    params = jax.jit(model.init)(jax.random.key(1), x, t)["params"]
    loss = lambda p: jnp.mean(jnp.abs(model.apply({"params": p}, x, t) - x))  # noqa: E731
    base = jax.jit(jax.grad(loss), compiler_options=train_lib.cpu_compiler_options("jax_default"))(params)
    other = jax.jit(jax.grad(loss), compiler_options=train_lib.cpu_compiler_options(mode))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), other, base)
