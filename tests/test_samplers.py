"""Tests of jaxdiff.samplers against the book's reference data, diffusers' documented numbers,
float64 re-implementations of the papers' equations, and properties."""

from __future__ import annotations

import functools

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from conftest import reference_file

from jaxdiff import samplers, schedules



@pytest.fixture(scope="module")
def ref():
    return dict(np.load(reference_file("book_reference_small.npz")))


def dummy_eps(x, t):
    """diffusers' scheduler-test model ``eps(x, t) = x * t / (t + 1)``, t int [B]."""
    t = t.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return x * t / (t + 1)


def dummy_sample_deter():
    """diffusers' deterministic sample: arange(768) / 768 (sum|x| does not depend on layout)."""
    return jnp.arange(4 * 8 * 8 * 3, dtype=jnp.float32).reshape(4, 8, 8, 3) / (4 * 8 * 8 * 3)


# ----------------------------------------------------------------------- float64 references


def linear_abar64(T=1000, b0=1e-4, b1=0.02):
    betas = np.array([b0 + (b1 - b0) * i / (T - 1) for i in range(T)])
    return np.cumprod(1 - betas)


def ddim_step64(abar, out, t, tp, x, *, eta=0.0, noise=None, clip=False, clip_range=1.0,
                use_clipped=False, ptype="epsilon", final=1.0):
    """Song et al. 2021 eq. 12, written out in float64 (t, tp scalars)."""
    x, out = np.asarray(x, np.float64), np.asarray(out, np.float64)
    at = abar[t]
    ap = abar[tp] if tp >= 0 else final
    if ptype == "epsilon":
        x0, eps = (x - np.sqrt(1 - at) * out) / np.sqrt(at), out
    elif ptype == "sample":
        x0, eps = out, (x - np.sqrt(at) * out) / np.sqrt(1 - at)
    else:
        x0 = np.sqrt(at) * x - np.sqrt(1 - at) * out
        eps = np.sqrt(at) * out + np.sqrt(1 - at) * x
    if clip:
        x0 = np.clip(x0, -clip_range, clip_range)
    if use_clipped:
        eps = (x - np.sqrt(at) * x0) / np.sqrt(1 - at)
    sigma = eta * np.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
    x_prev = np.sqrt(ap) * x0 + np.sqrt(max(1 - ap - sigma**2, 0.0)) * eps
    if noise is not None:
        x_prev = x_prev + sigma * np.asarray(noise, np.float64)
    return x_prev, x0


def ddpm_step64(abar, out, t, tp, x, noise, *, variance_type="fixed_small", clip=False):
    """Ho et al. 2020 posterior between t and tp (strided), float64."""
    x, out = np.asarray(x, np.float64), np.asarray(out, np.float64)
    at = abar[t]
    ap = abar[tp] if tp >= 0 else 1.0
    beta = 1 - at / ap
    x0 = (x - np.sqrt(1 - at) * out) / np.sqrt(at)
    if clip:
        x0 = np.clip(x0, -1, 1)
    mean = np.sqrt(ap) * beta / (1 - at) * x0 + np.sqrt(1 - beta) * (1 - ap) / (1 - at) * x
    var = (1 - ap) / (1 - at) * beta if variance_type == "fixed_small" else beta
    if t > 0:
        mean = mean + np.sqrt(var) * np.asarray(noise, np.float64)
    return mean, x0


# ----------------------------------------------------------------------- book reference


def test_book_timesteps_and_settings(ref):
    ts = samplers.inference_timesteps(1000, 50)
    np.testing.assert_array_equal(ts, ref["timesteps50"])
    assert ts.dtype == np.int32
    kw = samplers.book_ddim_kwargs()
    assert kw["eta"] == 1.0 and kw["clip_sample"] and kw["use_clipped_model_output"]
    kw["eta"] = 0.0  # a copy: the constant is unchanged
    assert samplers.BOOK_DDIM_KWARGS["eta"] == 1.0


@pytest.mark.parametrize("t", [980, 500, 20, 0])
def test_book_ddim_eta0_steps_match_reference(ref, t):
    s = schedules.book_cosine(1000)
    x_t, eps = jnp.asarray(ref["step_xt"]), jnp.asarray(ref["step_eps"])
    t_prev = t - 20 if t > 0 else -1
    kw = {k: v for k, v in samplers.book_ddim_kwargs().items() if k in
          ("clip_sample", "clip_sample_range", "use_clipped_model_output", "final_alpha_cumprod")}
    x_prev, x0 = samplers.ddim_step(s, eps, t, t_prev, x_t, eta=0.0, **kw)
    np.testing.assert_allclose(np.asarray(x_prev), ref[f"step_eta0_t{t}"], rtol=0, atol=1e-5)
    if t == 0:  # the last step returns the clipped x0 prediction
        np.testing.assert_allclose(np.asarray(x_prev), np.asarray(x0), atol=1e-6)
        assert float(jnp.max(jnp.abs(x0))) <= 1.0
    # The reference does clip and re-derive eps: without them it is far off.
    unclipped, _ = samplers.ddim_step(s, eps, t, t_prev, x_t, eta=0.0)
    assert np.max(np.abs(np.asarray(unclipped) - ref[f"step_eta0_t{t}"])) > 1e-2


# ----------------------------------------------------------------------- timesteps


def test_inference_timesteps_documented_values():
    # Lin et al. 2023, Table 2 (T = 1000, 10 steps), and diffusers' steps_offset test.
    np.testing.assert_array_equal(samplers.inference_timesteps(1000, 10, "leading"),
                                  [900, 800, 700, 600, 500, 400, 300, 200, 100, 0])
    np.testing.assert_array_equal(samplers.inference_timesteps(1000, 10, "leading", steps_offset=1),
                                  [901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
    np.testing.assert_array_equal(samplers.inference_timesteps(1000, 10, "linspace"),
                                  [999, 888, 777, 666, 555, 444, 333, 222, 111, 0])
    np.testing.assert_array_equal(samplers.inference_timesteps(1000, 10, "trailing"),
                                  [999, 899, 799, 699, 599, 499, 399, 299, 199, 99])
    np.testing.assert_array_equal(samplers.inference_timesteps(1000, 5, steps_offset=1),
                                  [801, 601, 401, 201, 1])
    np.testing.assert_array_equal(samplers.inference_timesteps(1000, 3, "trailing"), [999, 666, 332])
    np.testing.assert_array_equal(samplers.inference_timesteps(1000, 3, "linspace"), [999, 500, 0])
    np.testing.assert_array_equal(samplers.inference_timesteps(1000, 3, "leading"), [666, 333, 0])
    np.testing.assert_array_equal(samplers.inference_timesteps(4, 4, "trailing"), [3, 2, 1, 0])


@given(st.integers(1, 1000), st.data(), st.sampled_from(samplers.SPACINGS))
def test_inference_timesteps_properties(T, data, spacing):
    n = data.draw(st.integers(1, T))
    ts = samplers.inference_timesteps(T, n, spacing)
    assert ts.shape == (n,) and ts.dtype == np.int32
    assert np.all(np.diff(ts) < 0), ts
    assert ts.min() >= 0 and ts.max() < T


# ----------------------------------------------------------------------- diffusers' documented numbers


@pytest.mark.parametrize(
    "config, expected_sum, expected_mean",
    [
        ({}, 172.0067, 0.223967),
        ({"prediction_type": "v_prediction"}, 52.5302, 0.0684),
        ({"beta_start": 0.01, "set_alpha_to_one": True}, 149.8295, 0.1951),
        ({"beta_start": 0.01, "set_alpha_to_one": False}, 149.0784, 0.1941),
    ],
)
def test_ddim_full_loop_matches_diffusers_tests(config, expected_sum, expected_mean):
    """diffusers' DDIMSchedulerTest.full_loop: linear betas, clip_sample=True, 10 steps, eta 0."""
    cfg = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
           "beta_schedule": "linear", "clip_sample": True, **config}
    s = schedules.from_diffusers_config(cfg)
    kwargs = samplers.kwargs_from_diffusers_config(cfg, s)
    out = samplers.ddim_sample(dummy_eps, s, dummy_sample_deter(), jax.random.key(0), num_steps=10, **kwargs)
    assert abs(float(jnp.sum(jnp.abs(out))) - expected_sum) < 1e-2
    assert abs(float(jnp.mean(jnp.abs(out))) - expected_mean) < 1e-3


@pytest.mark.parametrize("t, t_prev, expected", [(0, 0, 0.0), (420, 400, 0.14771), (980, 960, 0.32460),
                                                 (487, 486, 0.00979), (999, 998, 0.02)])
def test_ddim_variance_matches_diffusers_tests(t, t_prev, expected):
    # x_t = 0 and a predicted x0 of 0 leave only sigma * noise, with eta = 1 and noise = 1.
    s = schedules.linear(1000)
    x = jnp.zeros((1, 1))
    x_prev, _ = samplers.ddim_step(s, x, t, t_prev, x, eta=1.0, noise=jnp.ones((1, 1)),
                                   prediction_type="sample")
    assert abs(float(x_prev[0, 0]) ** 2 - expected) < 1e-5


# ----------------------------------------------------------------------- float64 step references


STEP_CASES = [
    dict(),
    dict(ptype="v_prediction"),
    dict(ptype="sample"),
    dict(clip=True),
    dict(clip=True, use_clipped=True, clip_range=0.5),
    dict(eta=0.5),
    dict(eta=1.0, clip=True, use_clipped=True),
    dict(final="abar0"),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=[str(c) for c in STEP_CASES])
@pytest.mark.parametrize("t, t_prev", [(999, 899), (500, 480), (33, 0), (20, -1), (0, -1)])
def test_ddim_step_matches_float64(case, t, t_prev):
    abar64 = linear_abar64()
    s = schedules.linear(1000)
    case = dict(case)
    if case.get("final") == "abar0":
        case["final"] = abar64[0]
    k1, k2, k3 = jax.random.split(jax.random.key(t), 3)
    x = jax.random.normal(k1, (2, 4, 4, 3))
    out = jax.random.normal(k2, x.shape) * 1.5
    noise = jax.random.normal(k3, x.shape) if case.get("eta", 0.0) > 0 else None
    expected, expected_x0 = ddim_step64(abar64, out, t, t_prev, x, noise=noise, **case)
    x_prev, x0 = samplers.ddim_step(
        s, out, t, t_prev, x, eta=case.get("eta", 0.0), noise=noise,
        clip_sample=case.get("clip", False), clip_sample_range=case.get("clip_range", 1.0),
        use_clipped_model_output=case.get("use_clipped", False),
        prediction_type=case.get("ptype", "epsilon"), final_alpha_cumprod=case.get("final", 1.0),
    )
    chex.assert_type([x_prev, x0], jnp.float32)
    chex.assert_shape([x_prev, x0], x.shape)
    tol = 1e-5 * max(1.0, float(np.max(np.abs(expected_x0))))  # x0 from eps amplifies by 1/sqrt(abar)
    np.testing.assert_allclose(np.asarray(x0), expected_x0, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(np.asarray(x_prev), expected, rtol=1e-5, atol=tol)


@pytest.mark.parametrize("variance_type", samplers.VARIANCE_TYPES)
@pytest.mark.parametrize("t, t_prev", [(999, 979), (500, 480), (20, 0), (1, 0), (19, -1), (0, -1)])
def test_ddpm_step_strided_posterior_matches_float64(variance_type, t, t_prev):
    abar64 = linear_abar64()
    s = schedules.linear(1000)
    k1, k2, k3 = jax.random.split(jax.random.key(t + 7), 3)
    x = jax.random.normal(k1, (2, 4, 4, 3))
    out = jax.random.normal(k2, x.shape)
    noise = jax.random.normal(k3, x.shape)
    expected, expected_x0 = ddpm_step64(abar64, out, t, t_prev, x, noise, variance_type=variance_type)
    x_prev, x0 = samplers.ddpm_step(s, out, t, x, t_prev=t_prev, noise=noise, variance_type=variance_type)
    tol = 1e-5 * max(1.0, float(np.max(np.abs(expected_x0))))
    if (t, t_prev) == (1, 0):
        # beta' = 1 - abar_1 / abar_0 ~ 1.2e-4 is a float32 difference of two numbers near 1
        # (diffusers computes it the same way): only ~4 significant digits survive.
        tol = 1e-3
    np.testing.assert_allclose(np.asarray(x_prev), expected, rtol=1e-5, atol=tol)
    np.testing.assert_allclose(np.asarray(x0), expected_x0, rtol=1e-5, atol=tol)
    if t - t_prev > 1 and t > 0:
        # The old bug: the adjacent-step posterior (betas[t], abar[t-1]) is not this step.
        buggy, _ = ddpm_step64(abar64, out, t, t - 1, x, noise, variance_type=variance_type)
        assert np.max(np.abs(buggy - np.asarray(x_prev))) > 1e-2


def test_ddpm_step_default_t_prev_is_adjacent():
    s = schedules.linear(1000)
    x = jnp.linspace(-1, 1, 24).reshape(2, 4, 3)
    out, noise = jnp.cos(x), jnp.sin(3 * x)
    a, _ = samplers.ddpm_step(s, out, 500, x, noise=noise)
    b, _ = samplers.ddpm_step(s, out, 500, x, t_prev=499, noise=noise)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # t == 0 needs no noise and adds none
    c, x0 = samplers.ddpm_step(s, out, 0, x)
    np.testing.assert_allclose(np.asarray(c), np.asarray(x0), atol=1e-6)


def test_per_sample_timesteps_equal_separate_steps():
    s = schedules.cosine(1000)
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k1, (3, 4, 4, 2))
    out = jax.random.normal(k2, x.shape)
    noise = jax.random.normal(k3, x.shape)
    t, tp = jnp.array([900, 400, 10]), jnp.array([800, 350, -1])
    batched, _ = samplers.ddim_step(s, out, t, tp, x, eta=0.7, noise=noise, clip_sample=True)
    batched_ddpm, _ = samplers.ddpm_step(s, out, t, x, t_prev=tp, noise=noise)
    for i in range(3):
        one, _ = samplers.ddim_step(s, out[i:i + 1], int(t[i]), int(tp[i]), x[i:i + 1], eta=0.7,
                                    noise=noise[i:i + 1], clip_sample=True)
        np.testing.assert_allclose(np.asarray(batched[i:i + 1]), np.asarray(one), atol=1e-6)
        one, _ = samplers.ddpm_step(s, out[i:i + 1], int(t[i]), x[i:i + 1], t_prev=int(tp[i]),
                                    noise=noise[i:i + 1])
        np.testing.assert_allclose(np.asarray(batched_ddpm[i:i + 1]), np.asarray(one), atol=1e-6)


# ----------------------------------------------------------------------- full loops


LOOP_CASES = [
    dict(spacing="leading"),
    dict(spacing="trailing", prediction_type="v_prediction"),
    dict(spacing="linspace", clip_sample=True),
    dict(spacing="leading", steps_offset=1, clip_sample=True, use_clipped_model_output=True),
]


@pytest.mark.parametrize("case", LOOP_CASES, ids=[str(c) for c in LOOP_CASES])
def test_ddim_loop_matches_float64_loop(case):
    """Every spacing: the loop visits inference_timesteps and steps to the next one (last: -1)."""
    abar64 = linear_abar64()
    s = schedules.linear(1000)
    x = dummy_sample_deter()
    n = 7  # divides neither 1000 nor the trailing stride: exercises rounding
    out = samplers.ddim_sample(dummy_eps, s, x, jax.random.key(0), num_steps=n, **case)
    ts = samplers.inference_timesteps(1000, n, case["spacing"], case.get("steps_offset", 0))
    xe = np.asarray(x, np.float64)
    for i, t in enumerate(ts):
        tp = int(ts[i + 1]) if i + 1 < n else -1
        model_out = xe * t / (t + 1)
        xe, _ = ddim_step64(abar64, model_out, int(t), tp, xe, clip=case.get("clip_sample", False),
                            use_clipped=case.get("use_clipped_model_output", False),
                            ptype=case.get("prediction_type", "epsilon"))
    np.testing.assert_allclose(np.asarray(out), xe, rtol=1e-5, atol=1e-5)


def _python_loop(step, eps_fn, x, key, ts, draw_noise=True):
    for i, t in enumerate(ts):
        tp = int(ts[i + 1]) if i + 1 < len(ts) else -1
        tb = jnp.full((x.shape[0],), t, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) if draw_noise else None
        x, _ = step(eps_fn(x, tb), tb, jnp.full((x.shape[0],), tp, jnp.int32), x, noise)
    return x


def test_scan_samplers_equal_python_loops():
    s = schedules.book_cosine(1000)
    key = jax.random.key(42)
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    kw = samplers.book_ddim_kwargs()
    kw.pop("num_steps")
    n = 8
    scan = samplers.ddim_sample(dummy_eps, s, x, key, num_steps=n, **kw)
    ts = samplers.inference_timesteps(1000, n)
    loop = _python_loop(
        lambda o, t, tp, x, z: samplers.ddim_step(
            s, o, t, tp, x, eta=1.0, noise=z, clip_sample=True, use_clipped_model_output=True), dummy_eps, x, key, ts)
    np.testing.assert_allclose(np.asarray(scan), np.asarray(loop), atol=1e-6)

    s = schedules.linear(1000)
    scan = samplers.ddpm_sample(dummy_eps, s, x, key, num_steps=8, variance_type="fixed_large")
    ts = samplers.inference_timesteps(1000, 8)
    loop = _python_loop(
        lambda o, t, tp, x, z: samplers.ddpm_step(s, o, t, x, t_prev=tp, noise=z, variance_type="fixed_large"),
        dummy_eps, x, key, ts)
    np.testing.assert_allclose(np.asarray(scan), np.asarray(loop), atol=1e-6)


def test_ddpm_full_schedule_default_uses_every_timestep():
    s = schedules.linear(20, 1e-3, 0.2)
    x = jax.random.normal(jax.random.key(1), (2, 3))
    key = jax.random.key(5)
    out, traj = samplers.ddpm_sample(dummy_eps, s, x, key, return_trajectory=True)
    chex.assert_shape(traj, (21, 2, 3))  # x_T and the state after each of the 20 steps
    np.testing.assert_array_equal(np.asarray(traj[0]), np.asarray(x))
    loop = _python_loop(lambda o, t, tp, x, z: samplers.ddpm_step(s, o, t, x, noise=z), dummy_eps, x, key,
                        np.arange(19, -1, -1))
    np.testing.assert_allclose(np.asarray(out), np.asarray(loop), atol=1e-6)


def test_sampler_traced_once_and_jittable_with_params_as_arguments():
    s = schedules.linear(1000)
    traces = []

    def run(params, x, key, num_steps):
        def eps_fn(x, t):
            traces.append(1)
            return params["w"] * x + 0.0 * t[:, None, None, None]
        return samplers.ddim_sample(eps_fn, s, x, key, num_steps=num_steps, eta=0.5)

    x = jnp.ones((2, 4, 4, 3))
    for num_steps in (1, 50):
        traces.clear()
        f = jax.jit(run, static_argnums=3)
        a = f({"w": jnp.float32(1.0)}, x, jax.random.key(0), num_steps)
        b = f({"w": jnp.float32(0.5)}, x, jax.random.key(0), num_steps)  # new params: no retrace
        assert len(traces) == 1, (num_steps, len(traces))
        assert not np.allclose(np.asarray(a), np.asarray(b))


def test_ddim_eta0_deterministic_and_key_independent():
    s = schedules.cosine(1000)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    sample = jax.jit(lambda k: samplers.ddim_sample(dummy_eps, s, x, k, num_steps=10))
    a, b, c = sample(jax.random.key(1)), sample(jax.random.key(2)), sample(jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_ddim_eta_positive_adds_noise():
    s = schedules.cosine(1000)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    sample = jax.jit(lambda k, eta: samplers.ddim_sample(dummy_eps, s, x, k, num_steps=10, eta=eta),
                     static_argnums=1)
    det = sample(jax.random.key(1), 0.0)
    a = sample(jax.random.key(1), 1.0)
    b = sample(jax.random.key(2), 1.0)
    a2 = sample(jax.random.key(1), 1.0)
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-2
    assert np.max(np.abs(np.asarray(a) - np.asarray(det))) > 1e-2
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
    # A traced eta also draws noise, and eta = 0 traced equals the deterministic sampler.
    f = jax.jit(lambda eta, k: samplers.ddim_sample(dummy_eps, s, x, k, num_steps=10, eta=eta))
    np.testing.assert_allclose(np.asarray(f(1.0, jax.random.key(1))), np.asarray(a), atol=1e-5)
    np.testing.assert_allclose(np.asarray(f(0.0, jax.random.key(1))), np.asarray(det), atol=1e-5)


def test_trajectory_and_book_intermediates():
    s = schedules.book_cosine(1000)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    kw = samplers.book_ddim_kwargs()
    x0, traj = samplers.ddim_sample(dummy_eps, s, x, jax.random.key(1), return_trajectory=True, **kw)
    chex.assert_shape(traj, (51, 2, 4, 4, 3))
    np.testing.assert_array_equal(np.asarray(traj[0]), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(traj[-1]), np.asarray(x0))
    ts = samplers.inference_timesteps(1000, kw["num_steps"])
    picks = [int(np.flatnonzero(ts == t)[0]) for t in (800, 600, 400, 200, 0)]
    assert picks == [9, 19, 29, 39, 49]
    # Deterministically (eta 0), traj[i] is the state at ts[i]: one step from it gives traj[i + 1].
    kw0 = dict(kw, eta=0.0)
    _, traj0 = samplers.ddim_sample(dummy_eps, s, x, jax.random.key(1), return_trajectory=True, **kw0)
    step_kw = {k: kw0[k] for k in ("eta", "clip_sample", "use_clipped_model_output", "final_alpha_cumprod")}
    for i in (0, 9, 49):
        t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        nxt, _ = samplers.ddim_step(s, dummy_eps(traj0[i], jnp.full((2,), ts[i])), int(ts[i]), t_prev,
                                    traj0[i], **step_kw)
        np.testing.assert_allclose(np.asarray(nxt), np.asarray(traj0[i + 1]), atol=1e-5)


def test_samples_do_not_depend_on_sharding():
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs several (simulated) devices")
    mesh = jax.make_mesh((len(devices),), ("data",))
    s = schedules.linear(1000)
    x = jax.random.normal(jax.random.key(0), (len(devices), 4, 4, 3))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    f = jax.jit(lambda x, k: samplers.ddim_sample(dummy_eps, s, x, k, num_steps=5, eta=1.0))
    np.testing.assert_allclose(np.asarray(f(sharded, jax.random.key(3))),
                               np.asarray(f(x, jax.random.key(3))), atol=1e-6)


# ----------------------------------------------------------------------- properties


@functools.partial(jax.jit, static_argnums=3)
def _true_noise_step(t, x0, eps, prediction_type):
    s = schedules.linear(1000)
    x_t = schedules.add_noise(s, x0, eps, t)
    out = {"epsilon": eps, "sample": x0, "v_prediction": schedules.velocity(s, x0, eps, t)}[prediction_type]
    t_prev = jnp.maximum(t - 37, -1)
    x_prev, x0_pred = samplers.ddim_step(s, out, t, t_prev, x_t, prediction_type=prediction_type)
    abar_prev = jnp.where(t_prev >= 0, s.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)[:, None, None, None]
    return x_prev, x0_pred, jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1 - abar_prev) * eps, x_t


@given(st.lists(st.integers(1, 999), min_size=3, max_size=3), st.integers(0, 2**31 - 1),
       st.sampled_from(schedules.PREDICTION_TYPES))
def test_ddim_step_with_true_noise_recovers_x0(ts, seed, prediction_type):
    k0, k1 = jax.random.split(jax.random.key(seed))
    x0 = jax.random.uniform(k0, (3, 3, 3, 2), minval=-1, maxval=1)
    eps = jax.random.normal(k1, x0.shape)
    x_prev, x0_pred, expected, x_t = _true_noise_step(jnp.asarray(ts, jnp.int32), x0, eps, prediction_type)
    chex.assert_equal_shape([x_prev, x0_pred, x_t])
    chex.assert_type([x_prev, x0_pred], jnp.float32)
    np.testing.assert_allclose(np.asarray(x0_pred), np.asarray(x0), atol=2e-4)
    # Deterministic DDIM moves along the same (x0, eps) line: x_prev = add_noise(x0, eps, t_prev).
    np.testing.assert_allclose(np.asarray(x_prev), np.asarray(expected), atol=2e-4)


@pytest.mark.parametrize("dtype, shape", [(jnp.float32, (2, 3)), (jnp.bfloat16, (1, 4, 4, 3))])
def test_samplers_preserve_shape_and_dtype(dtype, shape):
    s = schedules.linear(100)
    x = jnp.ones(shape, dtype)
    out = samplers.ddim_sample(dummy_eps, s, x, jax.random.key(0), num_steps=3, eta=1.0)
    chex.assert_shape(out, shape)
    chex.assert_type(out, dtype)
    out = samplers.ddpm_sample(dummy_eps, s, x, jax.random.key(0), num_steps=3)
    chex.assert_shape(out, shape)
    chex.assert_type(out, dtype)
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


# ----------------------------------------------------------------------- bad input


def _s():
    return schedules.linear(100)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: samplers.inference_timesteps(100, 101), "num_steps"),
        (lambda: samplers.inference_timesteps(100, 0), "num_steps"),
        (lambda: samplers.inference_timesteps(100, 10, "uniform"), "leading"),
        (lambda: samplers.inference_timesteps(100, 10, "leading", steps_offset=20), "steps_offset"),
        (lambda: samplers.ddim_sample(dummy_eps, _s(), jnp.ones((1, 2)), jax.random.key(0), num_steps=101),
         "num_steps"),
        (lambda: samplers.ddim_sample(dummy_eps, _s(), jnp.ones((1, 2)), jax.random.key(0), spacing="cosine"),
         "trailing"),
        (lambda: samplers.ddim_sample(dummy_eps, _s(), jnp.ones((1, 2)), jax.random.key(0), num_steps=5,
                                      prediction_type="eps"), "v_prediction"),
        (lambda: samplers.ddpm_sample(dummy_eps, _s(), jnp.ones((1, 2)), jax.random.key(0),
                                      variance_type="learned"), "fixed_small"),
        (lambda: samplers.ddim_step(_s(), jnp.ones(2), 50, 40, jnp.ones(2), eta=0.5), "noise"),
        (lambda: jax.jit(lambda e: samplers.ddim_step(_s(), jnp.ones(2), 50, 40, jnp.ones(2), eta=e))(0.0),
         "noise"),
        (lambda: samplers.ddpm_step(_s(), jnp.ones(2), 50, jnp.ones(2)), "noise"),
        (lambda: jax.jit(lambda t: samplers.ddpm_step(_s(), jnp.ones(2), t, jnp.ones(2)))(0), "noise"),
        (lambda: samplers.ddim_step(_s(), jnp.ones(2), 50, 40, jnp.ones(2), prediction_type="x0"), "epsilon"),
        (lambda: samplers.ddpm_step(_s(), jnp.ones(2), 0, jnp.ones(2), variance_type="big"), "fixed_large"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_key_is_required():
    with pytest.raises(TypeError):
        samplers.ddim_sample(dummy_eps, _s(), jnp.ones((1, 2)))  # noqa
    with pytest.raises(TypeError):
        samplers.ddim_sample(dummy_eps, _s(), jnp.ones((1, 2)), None, num_steps=5)


def test_diffusers_config_kwargs_fit_each_sampler():
    cfg = {"variance_type": "fixed_small", "set_alpha_to_one": False, "clip_sample": False}
    s = schedules.linear(1000)
    ddim = samplers.kwargs_from_diffusers_config(cfg, s)
    ddpm = samplers.kwargs_from_diffusers_config(cfg, s, sampler="ddpm")
    assert "variance_type" not in ddim and ddim["final_alpha_cumprod"] == float(s.alphas_cumprod[0])
    assert ddpm["variance_type"] == "fixed_small" and "final_alpha_cumprod" not in ddpm
    x = jnp.ones((1, 2))
    samplers.ddim_sample(dummy_eps, s, x, jax.random.key(0), num_steps=2, **ddim)
    samplers.ddpm_sample(dummy_eps, s, x, jax.random.key(0), num_steps=2, **ddpm)
    with pytest.raises(ValueError, match="sampler"):
        samplers.kwargs_from_diffusers_config(cfg, s, sampler="lms")


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_step_matches_float64_near_t0(variance_type):
    """The posterior in float32 stays within 1e-6 of float64 at t = 1, 2, 3 (and elsewhere).

    Forming 1 - abar_t from a float32 abar_t (0.9997 at t = 1) cost 1.7e-4 here; diffusers'
    float32 scheduler is 5.5e-5 off.
    """
    s = schedules.linear(1000)
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    rng = np.random.default_rng(0)
    x, eps, z = (rng.standard_normal((3, 8, 8, 1)) for _ in range(3))
    for t in (1, 2, 3, 500, 999):
        a_t, a_p = abar[t], abar[t - 1]
        beta = 1.0 - a_t / a_p
        x0 = np.clip((x - np.sqrt(1.0 - a_t) * eps) / np.sqrt(a_t), -1.0, 1.0)
        mean = np.sqrt(a_p) * beta / (1.0 - a_t) * x0 + np.sqrt(1.0 - beta) * (1.0 - a_p) / (1.0 - a_t) * x
        var = (1.0 - a_p) / (1.0 - a_t) * beta if variance_type == "fixed_small" else beta
        expected = mean + np.sqrt(var) * z
        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        ours, _ = samplers.ddpm_step(s, f32(eps), t, f32(x), clip_sample=True, noise=f32(z),
                                     variance_type=variance_type)
        np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-6, rtol=2e-5 if t > 3 else 0, err_msg=f"t={t}")
