"""Tests of jaxdiff.schedules: the book's reference data, diffusers' formulas, properties."""

from __future__ import annotations

import math

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from conftest import reference_file

from jaxdiff import schedules



@pytest.fixture(scope="module")
def ref():
    return dict(np.load(reference_file("book_reference_small.npz")))


# --------------------------------------------------------------------------- book reference


def test_book_cosine_matches_reference(ref):
    s = schedules.book_cosine(1000)
    np.testing.assert_allclose(np.asarray(s.betas), ref["betas"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref["alphas_cumprod"], rtol=0, atol=1e-5)
    # Values BOOK_SPEC quotes, and the clipping counts it reports.
    np.testing.assert_allclose(
        np.asarray(s.alphas_cumprod)[[0, 499, 980, 999]],
        [0.99989998, 0.49365413, 0.0046897824, 0.0031948339],
        rtol=1e-5,
    )
    betas = np.asarray(s.betas)
    assert int(np.sum(betas == np.float32(1e-4))) == 13
    assert int(np.sum(betas == np.float32(0.02))) == 98


def test_add_noise_matches_reference(ref):
    s = schedules.book_cosine(1000)
    out = schedules.add_noise(
        s, jnp.asarray(ref["addnoise_x0"]), jnp.asarray(ref["addnoise_noise"]), ref["addnoise_t"]
    )
    np.testing.assert_allclose(np.asarray(out), ref["addnoise_out"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- diffusers formulas (float64)


def _cumprod64(betas):
    out, acc = [], 1.0
    for b in betas:
        acc *= 1.0 - b
        out.append(acc)
    return np.array(out)


def _linear64(T, b0, b1):
    return np.array([b0 + (b1 - b0) * i / (T - 1) for i in range(T)])


def _scaled_linear64(T, b0, b1):
    r0, r1 = math.sqrt(b0), math.sqrt(b1)
    return np.array([(r0 + (r1 - r0) * i / (T - 1)) ** 2 for i in range(T)])


def _squaredcos64(T, max_beta=0.999):
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)])


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: schedules.linear(1000, 1e-4, 0.02), lambda: _linear64(1000, 1e-4, 0.02)),
        (lambda: schedules.linear(50, 1e-3, 0.2), lambda: _linear64(50, 1e-3, 0.2)),
        (
            lambda: schedules.scaled_linear(1000, beta_start=0.00085, beta_end=0.012),
            lambda: _scaled_linear64(1000, 0.00085, 0.012),
        ),
        (lambda: schedules.cosine(1000), lambda: _squaredcos64(1000)),
        (lambda: schedules.cosine(10), lambda: _squaredcos64(10)),
    ],
    ids=["linear", "linear-short", "scaled_linear", "squaredcos_cap_v2", "squaredcos-short"],
)
def test_schedules_match_diffusers_formulas(build, expected):
    s = build()
    betas = expected()
    chex.assert_type([s.betas, s.alphas, s.alphas_cumprod], jnp.float32)
    chex.assert_shape([s.betas, s.alphas, s.alphas_cumprod], betas.shape)
    assert s.num_train_timesteps == betas.shape[0]
    np.testing.assert_allclose(np.asarray(s.betas), betas, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(s.alphas), 1 - betas, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), _cumprod64(betas), rtol=0, atol=1e-5)


def test_cosine_caps_beta_at_max_beta():
    s = schedules.cosine(1000)
    assert float(s.betas[-1]) == pytest.approx(0.999)
    assert float(schedules.cosine(1000, max_beta=0.5).betas[-1]) == pytest.approx(0.5)


def _zero_snr64(betas):
    """Lin et al. 2023, Algorithm 1, in float64."""
    sqrt_abar = np.sqrt(_cumprod64(betas))
    s0, sT = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - sT) * s0 / (s0 - sT)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@pytest.mark.parametrize("base", [schedules.linear, schedules.scaled_linear])
def test_rescale_zero_terminal_snr(base):
    s0 = base(1000)
    s = schedules.rescale_zero_terminal_snr(s0)
    expected_betas = _zero_snr64(_linear64(1000, 1e-4, 0.02) if base is schedules.linear
                                 else _scaled_linear64(1000, 0.00085, 0.012))
    np.testing.assert_allclose(np.asarray(s.betas), expected_betas, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(s.alphas_cumprod), _cumprod64(expected_betas), rtol=0, atol=1e-5
    )
    assert float(s.alphas_cumprod[-1]) == 0.0  # zero terminal SNR
    assert float(s.betas[-1]) == 1.0
    np.testing.assert_allclose(float(s.alphas_cumprod[0]), float(s0.alphas_cumprod[0]), atol=1e-7)
    assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)
    # It is a pure array function: the same under jit.
    s_jit = jax.jit(schedules.rescale_zero_terminal_snr)(s0)
    np.testing.assert_allclose(np.asarray(s_jit.alphas_cumprod), np.asarray(s.alphas_cumprod), atol=1e-7)


def test_zero_snr_v_prediction_recovers_x0_at_last_timestep():
    s = schedules.rescale_zero_terminal_snr(schedules.linear(1000))
    x0 = jnp.linspace(-1, 1, 12).reshape(1, 2, 2, 3)
    noise = jnp.cos(jnp.arange(12.0)).reshape(1, 2, 2, 3)
    t = jnp.array([999])
    x_t = schedules.add_noise(s, x0, noise, t)
    np.testing.assert_allclose(np.asarray(x_t), np.asarray(noise), atol=1e-6)  # pure noise
    v = schedules.velocity(s, x0, noise, t)
    x0_hat, eps_hat = schedules.to_x0_and_eps(s, v, x_t, t, "v_prediction")
    np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(noise), atol=1e-6)


def test_get_and_from_diffusers_config():
    for name, ref_fn in [("linear", schedules.linear), ("scaled_linear", schedules.scaled_linear),
                         ("squaredcos_cap_v2", schedules.cosine), ("book_cosine", schedules.book_cosine)]:
        np.testing.assert_array_equal(
            np.asarray(schedules.get(name, 100).alphas_cumprod), np.asarray(ref_fn(100).alphas_cumprod)
        )
    # google/ddpm-cat-256-style DDPM config
    s = schedules.from_diffusers_config(
        {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001,
         "beta_end": 0.02, "num_train_timesteps": 1000, "trained_betas": None,
         "clip_sample": True, "variance_type": "fixed_small"}
    )
    np.testing.assert_allclose(np.asarray(s.betas), _linear64(1000, 1e-4, 0.02), atol=1e-7)
    # Stable-diffusion-style config with zero-SNR rescaling
    s = schedules.from_diffusers_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "num_train_timesteps": 1000, "rescale_betas_zero_snr": True}
    )
    np.testing.assert_allclose(
        np.asarray(s.betas), _zero_snr64(_scaled_linear64(1000, 0.00085, 0.012)), atol=1e-5
    )
    s = schedules.from_diffusers_config({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 20})
    np.testing.assert_allclose(np.asarray(s.betas), _squaredcos64(20), atol=1e-7)
    s = schedules.from_diffusers_config({"trained_betas": [0.1, 0.2, 0.3]})
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), [0.9, 0.72, 0.504], atol=1e-7)


def test_schedule_is_a_pytree_usable_in_jit():
    s = schedules.linear(100)
    leaves = jax.tree.leaves(s)
    assert len(leaves) == 4  # betas, alphas, alphas_cumprod, one_minus_alphas_cumprod
    f = jax.jit(lambda s, x0, n, t: schedules.add_noise(s, x0, n, t))
    x0, n = jnp.ones((2, 3)), jnp.zeros((2, 3))
    out = f(s, x0, n, jnp.array([0, 99]))
    np.testing.assert_allclose(np.asarray(out[:, 0]), np.sqrt(np.asarray(s.alphas_cumprod)[[0, 99]]), atol=1e-7)
    doubled = jax.tree.map(lambda a: 2 * a, s)
    assert isinstance(doubled, schedules.Schedule)
    assert jax.jit(lambda s: s.num_train_timesteps * jnp.ones(()))(s) == 100


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: schedules.linear(1000, 0.02, 1e-4), "beta_start"),
        (lambda: schedules.linear(1000, 0.02, 0.02), "beta_start"),
        (lambda: schedules.linear(0), "num_train_timesteps"),
        (lambda: schedules.scaled_linear(-5), "num_train_timesteps"),
        (lambda: schedules.linear(10.5), "num_train_timesteps"),
        (lambda: schedules.cosine(0), "num_train_timesteps"),
        (lambda: schedules.cosine(100, max_beta=1.5), "max_beta"),
        (lambda: schedules.book_cosine(0), "num_train_timesteps"),
        (lambda: schedules.get("quadratic", 100), "linear"),
        (lambda: schedules.from_diffusers_config({"beta_schedule": "sigmoid"}), "sigmoid"),
        (lambda: schedules.from_betas(np.array([0.1, -0.1])), "betas"),
        (lambda: schedules.to_x0_and_eps(schedules.linear(10), jnp.ones(2), jnp.ones(2), 1, "score"),
         "epsilon"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- properties

schedule_strategy = st.one_of(
    st.builds(
        lambda T, b0, r: schedules.linear(T, b0, b0 * r),
        st.integers(2, 1000), st.floats(1e-5, 1e-3), st.floats(1.5, 50.0),
    ),
    st.builds(
        lambda T, b0, r: schedules.scaled_linear(T, b0, b0 * r),
        st.integers(2, 1000), st.floats(1e-5, 1e-3), st.floats(1.5, 50.0),
    ),
    st.builds(schedules.cosine, st.integers(2, 1000)),
    st.builds(schedules.book_cosine, st.integers(2, 1000)),
)


@given(schedule_strategy)
def test_schedules_monotone_and_in_unit_interval(s):
    abar = np.asarray(s.alphas_cumprod, np.float64)
    betas = np.asarray(s.betas, np.float64)
    assert np.all((betas > 0) & (betas < 1))
    assert np.all((abar > 0) & (abar < 1))
    assert np.all(np.diff(abar) < 0)
    np.testing.assert_allclose(np.asarray(s.alphas), 1 - betas, atol=1e-7)


_T = 1000
_SCHEDULE = schedules.cosine(_T)


@jax.jit
def _all_conversions(t, x0, eps):
    s = _SCHEDULE
    x_t = schedules.add_noise(s, x0, eps, t)
    v = schedules.velocity(s, x0, eps, t)
    out = {
        "x_t": x_t,
        "v": v,
        "x0_from_eps": schedules.x0_from_eps(s, x_t, eps, t),
        "eps_from_x0": schedules.eps_from_x0(s, x_t, x0, t),
        "x0_from_v": schedules.x0_from_v(s, x_t, v, t),
        "eps_from_v": schedules.eps_from_v(s, x_t, v, t),
        "v_from_eps": schedules.v_from_eps(s, x_t, eps, t),
        "v_from_x0": schedules.v_from_x0(s, x_t, x0, t),
    }
    for kind, pred in [("epsilon", eps), ("sample", x0), ("v_prediction", v)]:
        out[kind] = schedules.to_x0_and_eps(s, pred, x_t, t, kind)
    return out


@given(st.lists(st.integers(0, 998), min_size=4, max_size=4), st.integers(0, 2**31 - 1))
def test_conversions_round_trip(ts, seed):
    t = jnp.asarray(ts, jnp.int32)
    k0, k1 = jax.random.split(jax.random.key(seed))
    x0 = jax.random.uniform(k0, (4, 4, 4, 3), minval=-1, maxval=1)
    eps = jax.random.normal(k1, x0.shape)
    out = _all_conversions(t, x0, eps)
    x0, eps, v = np.asarray(x0), np.asarray(eps), np.asarray(out["v"])
    abar = np.asarray(_SCHEDULE.alphas_cumprod, np.float64)[ts][:, None, None, None]
    one_minus = np.asarray(_SCHEDULE.one_minus_alphas_cumprod, np.float64)[ts][:, None, None, None]
    np.testing.assert_allclose(one_minus, 1 - abar, atol=1e-7)  # the same quantity, more digits
    np.testing.assert_allclose(np.asarray(out["x_t"]), np.sqrt(abar) * x0 + np.sqrt(one_minus) * eps, atol=1e-6)
    np.testing.assert_allclose(v, np.sqrt(abar) * eps - np.sqrt(one_minus) * x0, atol=1e-6)

    tol = dict(atol=2e-3, rtol=0)  # x0 from eps divides by sqrt(abar_t) >= 0.02 at t <= 998
    np.testing.assert_allclose(np.asarray(out["x0_from_eps"]), x0, **tol)
    np.testing.assert_allclose(np.asarray(out["eps_from_x0"]), eps, **tol)
    np.testing.assert_allclose(np.asarray(out["x0_from_v"]), x0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["eps_from_v"]), eps, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["v_from_eps"]), v, **tol)
    np.testing.assert_allclose(np.asarray(out["v_from_x0"]), v, **tol)
    for kind in schedules.PREDICTION_TYPES:
        x0_hat, eps_hat = out[kind]
        chex.assert_equal_shape([x0_hat, eps_hat, out["x_t"]])
        chex.assert_type([x0_hat, eps_hat], jnp.float32)
        np.testing.assert_allclose(np.asarray(x0_hat), x0, **tol)
        np.testing.assert_allclose(np.asarray(eps_hat), eps, **tol)


def test_conversions_keep_low_precision_dtype():
    s = _SCHEDULE
    t = jnp.array([3, 500])
    x0 = jnp.full((2, 2, 2, 3), 0.5, jnp.bfloat16)
    eps = jnp.full((2, 2, 2, 3), -1.0, jnp.bfloat16)
    x_t = schedules.add_noise(s, x0, eps, t)
    chex.assert_type(x_t, jnp.bfloat16)
    for fn, arg in [(schedules.x0_from_eps, eps), (schedules.eps_from_x0, x0), (schedules.x0_from_v, eps),
                    (schedules.eps_from_v, eps), (schedules.v_from_eps, eps), (schedules.v_from_x0, x0)]:
        chex.assert_type(fn(s, x_t, arg, t), jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(schedules.x0_from_eps(s, x_t, eps, t), np.float32), 0.5, atol=0.05)


@given(st.integers(0, 999), st.integers(1, 3))
def test_add_noise_per_sample_broadcast(t0, batch):
    s = schedules.book_cosine(1000)
    t = (jnp.arange(batch) * 137 + t0) % 1000
    x0 = jnp.ones((batch, 2, 3, 3))
    noise = -jnp.ones((batch, 2, 3, 3))
    out = schedules.add_noise(s, x0, noise, t)
    chex.assert_shape(out, x0.shape)
    abar = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(t)]
    expected = np.sqrt(abar) - np.sqrt(1 - abar)
    np.testing.assert_allclose(np.asarray(out), np.broadcast_to(expected[:, None, None, None], x0.shape), atol=1e-6)
    # scalar t broadcasts over the whole batch
    out_scalar = schedules.add_noise(s, x0, noise, t0)
    np.testing.assert_allclose(np.asarray(out_scalar)[0], np.asarray(schedules.add_noise(s, x0, noise, jnp.full(batch, t0)))[0])


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_one_minus_alphas_cumprod_keeps_float32_relative_precision(name):
    """1 - abar_t is formed in float64 before the cast: relative error ~1e-7 even where abar_t ~ 1."""
    s = schedules.get(name, 1000)
    expected = 1.0 - np.cumprod(1.0 - np.asarray(s.betas, np.float64))  # the float32 betas, in float64
    ours = np.asarray(s.one_minus_alphas_cumprod, np.float64)
    np.testing.assert_allclose(ours[:4], expected[:4], rtol=2e-6)
    naive = 1.0 - np.asarray(s.alphas_cumprod, np.float64)  # from the float32 abar: few digits at t ~ 0
    assert np.max(np.abs(naive[:4] / expected[:4] - 1)) > 10 * np.max(np.abs(ours[:4] / expected[:4] - 1))


@given(schedule_strategy, st.floats(0.05, 20.0))
def test_scale_snr_multiplies_the_snr_at_every_timestep(s, scale):
    """Hoogeboom et al.'s shifted schedule: SNR x scale everywhere, still a valid schedule."""
    shifted = schedules.scale_snr(s, scale)
    snr = lambda x: np.asarray(x.alphas_cumprod, np.float64) / np.asarray(x.one_minus_alphas_cumprod, np.float64)  # noqa: E731
    np.testing.assert_allclose(snr(shifted) / snr(s), scale, rtol=2e-5)
    abar = np.asarray(shifted.alphas_cumprod, np.float64)
    assert np.all(np.diff(abar) < 0) and np.all((abar > 0) & (abar < 1))
    np.testing.assert_allclose(np.asarray(shifted.alphas), 1 - np.asarray(shifted.betas, np.float64), atol=1e-7)
    assert (abar[len(abar) // 2] > float(s.alphas_cumprod[len(abar) // 2])) == (scale > 1)


def test_scale_snr_through_get_and_config_names_the_bad_value():
    from jaxdiff.builders import build_schedule
    from conftest import load_config

    assert schedules.scale_snr(_SCHEDULE, 1.0) is _SCHEDULE
    s4 = schedules.get("cosine", 1000, snr_scale=4.0)
    np.testing.assert_allclose(float(schedules.snr(s4, 500)), 4 * float(schedules.snr(_SCHEDULE, 500)), rtol=1e-5)
    config = load_config("digits", "smoke")
    config.schedule.snr_scale = 4.0
    np.testing.assert_array_equal(np.asarray(build_schedule(config).alphas_cumprod), np.asarray(s4.alphas_cumprod))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        config.schedule.snr_scale = bad
        with pytest.raises(ValueError, match="snr_scale"):
            build_schedule(config)
