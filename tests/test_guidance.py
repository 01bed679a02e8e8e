"""Tests of jaxdiff.guidance with hand-written networks whose guided outputs are known."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import guidance, samplers, schedules

S = schedules.linear(1000)


def _abar(t):
    return np.asarray(S.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]


def _inputs(batch=2, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (batch, 4, 4, 3))
    target = jax.random.uniform(k2, (batch, 4, 4, 3), minval=-1, maxval=1)
    return x, target


# ----------------------------------------------------------------------- classifier-free guidance


def test_classifier_free_scales_and_single_batched_call():
    calls = []

    def net(x, t, c):  # [2B, ...], [2B], [2B, D]
        calls.append((x.shape, t.shape, c.shape))
        tt = t.astype(x.dtype)[:, None, None, None]
        return x * tt / (tt + 1) + jnp.sum(c, axis=-1)[:, None, None, None]

    x, _ = _inputs(batch=3)
    t = jnp.array([10, 500, 999], jnp.int32)
    c = jnp.array([[1.0, 2.0], [0.5, -0.5], [-3.0, 0.25]])
    eps_c, eps_u = net(x, t, c), net(x, t, jnp.zeros_like(c))
    calls.clear()
    for scale, expected in [(0.0, eps_u), (1.0, eps_c), (3.0, eps_u + 3.0 * (eps_c - eps_u))]:
        out = guidance.classifier_free(net, c, scale)(x, t)
        chex.assert_shape(out, x.shape)
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-6)
    assert calls == [((6, 4, 4, 3), (6,), (6, 2))] * 3  # one network call per guided call
    # A custom null condition
    null = jnp.array([1.0, 1.0])
    out = guidance.classifier_free(net, c, 0.0, uncond_context=null)(x, t)
    np.testing.assert_allclose(np.asarray(out), np.asarray(net(x, t, jnp.broadcast_to(null, c.shape))),
                               atol=1e-6)


# ----------------------------------------------------------------------- gradient guidance


C = 0.3


def linear_eps(x, t):
    """eps(x, t) = C x: its x0 prediction is linear in x, so guided answers are known exactly."""
    del t
    return C * x


def quadratic_loss(target):
    """0.5 |x0 - target|^2 with a per-sample target [B, ...] (so: per_sample=False)."""
    return lambda x0: 0.5 * jnp.sum((x0 - target) ** 2)


def gradient_guidance(*args, **kwargs):
    return guidance.gradient_guidance(*args, per_sample=False, **kwargs)


@pytest.mark.parametrize("form", guidance.GRADIENT_GUIDANCE_FORMS)
def test_gradient_guidance_zero_scale_is_a_no_op(form):
    x, target = _inputs()
    t = jnp.array([100, 900])
    guided = gradient_guidance(linear_eps, quadratic_loss(target), 0.0, S, form=form)
    if form == "score":
        np.testing.assert_array_equal(np.asarray(guided(x, t)), np.asarray(linear_eps(x, t)))
    else:
        x_moved, out = guided(x, t)
        np.testing.assert_array_equal(np.asarray(x_moved), np.asarray(x))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(linear_eps(x, t)))


@pytest.mark.parametrize("through_model", [True, False])
@pytest.mark.parametrize("scale", [0.05, 0.4])
def test_score_form_moves_x0_toward_target_by_known_amount(through_model, scale):
    x, target = _inputs()
    t = jnp.array([50, 250])
    a, b = np.sqrt(_abar(t)), np.sqrt(1 - _abar(t))
    x64, target64 = np.asarray(x, np.float64), np.asarray(target, np.float64)
    x0 = x64 * (1 - b * C) / a
    jac = (1 - b * C) / a if through_model else 1 / a  # d x0_hat / d x_t
    grad = jac * (x0 - target64)
    expected_eps = C * x64 + b * scale * grad

    guided = gradient_guidance(linear_eps, quadratic_loss(target), scale, S,
                                        through_model=through_model)
    eps = guided(x, t)
    np.testing.assert_allclose(np.asarray(eps), expected_eps, rtol=1e-5, atol=1e-5)
    # x0_hat moves towards the target by the factor 1 - scale (1 - abar) jac / a.
    x0_guided = np.asarray(schedules.x0_from_eps(S, x, eps, t), np.float64)
    factor = 1 - scale * (1 - _abar(t)) * jac / a
    np.testing.assert_allclose(x0_guided - target64, factor * (x0 - target64), rtol=1e-4, atol=1e-4)
    assert np.all(np.abs(factor) < 1)  # closer to the target, for these scales
    assert np.linalg.norm(x0_guided - target64) < np.linalg.norm(x0 - target64)


def test_notebook_form_moves_x_t_by_scaled_gradient():
    x, target = _inputs()
    t = jnp.array([50, 250])
    scale = 0.1
    a, b = np.sqrt(_abar(t)), np.sqrt(1 - _abar(t))
    x64, target64 = np.asarray(x, np.float64), np.asarray(target, np.float64)
    x0 = x64 * (1 - b * C) / a
    grad = (1 - b * C) / a * (x0 - target64)

    guide = gradient_guidance(linear_eps, quadratic_loss(target), scale, S, form="notebook")
    x_moved, out = guide(x, t)
    np.testing.assert_allclose(np.asarray(x_moved), x64 - scale * grad, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out), C * x64, rtol=1e-6)  # network output at the unmoved x
    # The scheduler's x0 from the moved x and the unchanged eps: x0 - scale g / sqrt(abar).
    x0_step = np.asarray(schedules.x0_from_eps(S, x_moved, out, t), np.float64)
    np.testing.assert_allclose(x0_step, x0 - scale * grad / a, rtol=1e-4, atol=1e-4)
    assert np.linalg.norm(x0_step - target64) < np.linalg.norm(x0 - target64)


def test_notebook_form_in_ddim_sample_equals_hand_written_loop():
    x, target = _inputs()
    key = jax.random.key(3)
    loss = quadratic_loss(target)
    guide = gradient_guidance(linear_eps, loss, 0.02, S, form="notebook")
    got = samplers.ddim_sample(linear_eps, S, x, key, num_steps=5, eta=1.0, guide_x_fn=guide)

    # The hands-on notebook's loop, written out.
    ts = samplers.inference_timesteps(1000, 5)
    xe = x
    for i, t in enumerate(ts):
        tb = jnp.full((2,), t, jnp.int32)

        def loss_of_x(x_in, tb=tb):
            return loss(schedules.x0_from_eps(S, x_in, linear_eps(x_in, tb), tb))

        noise_pred = linear_eps(xe, tb)
        xe = xe - 0.02 * jax.grad(loss_of_x)(xe)
        tp = int(ts[i + 1]) if i + 1 < len(ts) else -1
        noise = jax.random.normal(jax.random.fold_in(key, i), xe.shape)
        xe, _ = samplers.ddim_step(S, noise_pred, tb, jnp.full((2,), tp), xe, eta=1.0, noise=noise)
    np.testing.assert_allclose(np.asarray(got), np.asarray(xe), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_guidance_keeps_the_parametrisation(prediction_type):
    """Guiding a v- (or x0-) network gives the same eps as guiding its eps-equivalent."""
    x, target = _inputs()
    t = jnp.array([300, 800])
    to_out = {"sample": schedules.x0_from_eps, "v_prediction": schedules.v_from_eps}[prediction_type]
    net = lambda x, t: to_out(S, x, linear_eps(x, t), t)  # noqa: E731
    guided = gradient_guidance(net, quadratic_loss(target), 0.2, S, prediction_type=prediction_type)
    _, eps = schedules.to_x0_and_eps(S, guided(x, t), x, t, prediction_type)
    reference = gradient_guidance(linear_eps, quadratic_loss(target), 0.2, S)(x, t)
    np.testing.assert_allclose(np.asarray(eps), np.asarray(reference), rtol=1e-4, atol=1e-4)


def test_per_sample_loss_makes_guidance_batch_independent():
    loss = guidance.color_loss((0.1, 0.9, 0.5))
    x, _ = _inputs(batch=4)
    t = jnp.array([100, 300, 500, 700])
    g_all = guidance.gradient_guidance(linear_eps, loss, 5.0, S)(x, t)
    g_two = guidance.gradient_guidance(linear_eps, loss, 5.0, S)(x[:2], t[:2])
    np.testing.assert_allclose(np.asarray(g_all[:2]), np.asarray(g_two), atol=1e-6)
    # The notebook's batch-mean loss instead scales each sample's gradient by 1 / B.
    n_all = guidance.gradient_guidance(linear_eps, loss, 5.0, S, per_sample=False)(x, t)
    n_two = guidance.gradient_guidance(linear_eps, loss, 5.0, S, per_sample=False)(x[:2], t[:2])
    shift_all, shift_two = n_all[:2] - linear_eps(x[:2], t), n_two - linear_eps(x[:2], t)
    np.testing.assert_allclose(np.asarray(shift_all) * 2, np.asarray(shift_two), rtol=1e-4, atol=1e-7)
    assert float(jnp.max(jnp.abs(shift_two))) > 1e-4


# ----------------------------------------------------------------------- classifier guidance


def test_classifier_guidance_known_gradient():
    def logits_fn(x, t):  # [B, 2]: logits (S, -S), S = sum of pixels
        s = jnp.sum(x, axis=(1, 2, 3))
        return jnp.stack([s, -s], axis=-1)

    x, _ = _inputs()
    x = 0.05 * x
    t = jnp.array([150, 650])
    labels = jnp.array([0, 1])
    ssum = np.asarray(jnp.sum(x, axis=(1, 2, 3)), np.float64)
    # d log p(y=0) / dx = 1 - tanh(S); d log p(y=1) / dx = -(1 + tanh(S)), for every pixel.
    dlogp = np.where(np.asarray(labels) == 0, 1 - np.tanh(ssum), -(1 + np.tanh(ssum)))[:, None, None, None]
    b = np.sqrt(1 - _abar(t))
    for scale in (0.0, 2.0):
        eps = guidance.classifier_guidance(linear_eps, logits_fn, labels, scale, S)(x, t)
        expected = C * np.asarray(x, np.float64) - b * scale * dlogp
        np.testing.assert_allclose(np.asarray(eps), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- colour loss and sampling


def test_color_loss_value():
    loss = guidance.color_loss((0.1, 0.9, 0.5))
    # mean(|0 - (-0.8)|, |0 - 0.8|, |0 - 0|) in [-1, 1] units, as the notebook computes it
    assert float(loss(jnp.zeros((2, 3, 3, 3)))) == pytest.approx(1.6 / 3, abs=1e-6)
    img = jnp.broadcast_to(jnp.array([-0.8, 0.8, 0.0]), (1, 2, 2, 3))
    assert float(loss(img)) == pytest.approx(0.0, abs=1e-6)


SIGMA = 0.5


def gaussian_eps(params, x, t):
    """The exact eps-predictor for data ~ N(params["mean"], SIGMA^2 I)."""
    abar = S.alphas_cumprod[t][:, None, None, None]
    a, b = jnp.sqrt(abar), jnp.sqrt(1 - abar)
    return b * (x - a * params["mean"]) / (abar * SIGMA**2 + 1 - abar)


def test_guided_sampling_lowers_colour_loss_inside_one_jit():
    loss = guidance.color_loss((0.1, 0.9, 0.5))
    traces = []

    def traced_eps(params, x, t):
        traces.append(1)
        return gaussian_eps(params, x, t)

    @functools.partial(jax.jit, static_argnames="mode")
    def sample(params, x_T, key, mode):
        eps_fn = functools.partial(traced_eps, params)
        kwargs = {}
        if mode == "score":
            eps_fn = guidance.gradient_guidance(eps_fn, loss, 60.0, S)
        elif mode == "notebook":
            kwargs["guide_x_fn"] = guidance.gradient_guidance(eps_fn, loss, 10.0, S, form="notebook")
        x0 = samplers.ddim_sample(eps_fn, S, x_T, key, num_steps=20, eta=1.0, **kwargs)
        return jax.vmap(lambda xi: loss(xi[None]))(x0)

    params = {"mean": jnp.zeros((8, 8, 3))}
    x_T = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    key = jax.random.key(1)
    base = np.asarray(sample(params, x_T, key, "none"))
    for mode in ("score", "notebook"):
        traces.clear()
        guided = np.asarray(sample(params, x_T, key, mode))
        assert len(traces) == 1  # the network is traced once inside the scan (and its gradient)
        assert np.all(guided < base - 0.05), (mode, guided, base)


def test_classifier_free_inside_jit_with_ddim_sample():
    def net(params, x, t, c):
        return gaussian_eps({"mean": params["mean"] + c[:, None, None, :]}, x, t)

    @jax.jit
    def sample(params, c, x_T, key):
        eps_fn = guidance.classifier_free(functools.partial(net, params), c, 2.0)
        return samplers.ddim_sample(eps_fn, S, x_T, key, num_steps=10)

    params = {"mean": jnp.zeros((8, 8, 3))}
    c = jnp.broadcast_to(jnp.array([0.3, -0.3, 0.0]), (2, 3))
    x0 = sample(params, c, jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), jax.random.key(1))
    chex.assert_shape(x0, (2, 8, 8, 3))
    # With scale 2 the conditional shift of the mean is doubled: channel means near (0.6, -0.6, 0).
    np.testing.assert_allclose(np.asarray(jnp.mean(x0, axis=(0, 1, 2))), [0.6, -0.6, 0.0], atol=0.15)


def test_bad_form_raises():
    with pytest.raises(ValueError, match="notebook"):
        guidance.gradient_guidance(linear_eps, lambda x0: jnp.sum(x0), 1.0, S, form="x0")
    with pytest.raises(ValueError, match="v_prediction"):
        guidance.gradient_guidance(linear_eps, lambda x0: jnp.sum(x0), 1.0, S, prediction_type="v")
