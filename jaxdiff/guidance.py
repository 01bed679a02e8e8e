"""Guidance: pure functions that turn one noise-prediction function into another.

Every sampler in :mod:`jaxdiff.samplers` takes ``eps_fn(x, t) -> model_output``; guidance wraps
it, so guided sampling is ``ddim_sample(classifier_free(net, c, 7.5), s, x_T, key)`` and guides
compose (``gradient_guidance(classifier_free(...), loss, ...)``).

* :func:`classifier_free`: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"
  (arXiv:2207.12598): ``eps = eps_u + w (eps_c - eps_u)``.
* :func:`classifier_guidance`: Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
  Synthesis" (arXiv:2105.05233, Alg. 2): ``eps = eps - sqrt(1 - abar_t) s grad log p(y | x_t)``.
* :func:`gradient_guidance`: steer with the gradient of any differentiable loss of the predicted
  ``x_0``, either in score form (Bansal et al. 2023, "Universal Guidance for Diffusion Models",
  arXiv:2302.07121, forward guidance) or as the hands-on notebook does it (move ``x_t`` before
  the scheduler step).
* :func:`color_loss`: the hands-on notebook's colour loss.

All wrappers keep the parametrisation of the wrapped network (``prediction_type``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxdiff import schedules as schedules_lib
from jaxdiff.schedules import Schedule

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
LossFn = Callable[[jax.Array], jax.Array]
GuideXFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

GRADIENT_GUIDANCE_FORMS = ("score", "notebook")

__all__ = [
    "GRADIENT_GUIDANCE_FORMS",
    "classifier_free",
    "classifier_guidance",
    "color_loss",
    "gradient_guidance",
]


def classifier_free(
    eps_fn_cond: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    context: jax.Array,
    scale: jax.typing.ArrayLike,
    uncond_context: jax.Array | None = None,
) -> EpsFn:
    """Classifier-free guidance (Ho & Salimans 2022) in one batched network call.

    ::

        eps(x, t) = eps_u + scale (eps_c - eps_u),   eps_c = net(x, t, c),  eps_u = net(x, t, 0)

    The network sees ``[x, x]``, ``[t, t]`` and ``[c, c_u]`` concatenated on the batch axis
    (``c_u = zeros_like(c)`` unless ``uncond_context`` is given), so one call yields both halves.
    ``scale = 0`` is unconditional, ``1`` conditional, ``> 1`` extrapolates past the condition.

    Args:
      eps_fn_cond: ``net(x, t, c) -> model_output``, batch-first in all three.
      context: the condition ``c``, ``[B, ...]`` (the batch of ``x``).
      scale: the guidance weight ``w`` (may be traced).
      uncond_context: the null condition, broadcastable to ``context``; zeros by default.

    Example::

        >>> eps_fn = classifier_free(lambda x, t, c: net.apply(p, x, t, c), labels_onehot, 3.0)
        >>> x0 = ddim_sample(eps_fn, s, x_T, key)
    """
    null = jnp.zeros_like(context) if uncond_context is None else jnp.broadcast_to(
        jnp.asarray(uncond_context, context.dtype), context.shape
    )

    def guided_eps_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        out = eps_fn_cond(
            jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([context, null])
        )  # [2B, ...]
        eps_cond, eps_uncond = out[:batch], out[batch:]
        return (eps_uncond + scale * (eps_cond - eps_uncond)).astype(out.dtype)

    return guided_eps_fn


def color_loss(target_rgb: Sequence[float] | jax.Array) -> LossFn:
    """The hands-on notebook's colour loss: ``mean |x0 - (2 target - 1)|``.

    ``target_rgb`` is a colour in ``[0, 1]``; images are in ``[-1, 1]`` with channels last
    (``[B, H, W, 3]``), so the target is mapped to ``[-1, 1]`` before the mean absolute
    difference, exactly as the notebook does (its loss is therefore twice the distance measured
    in ``[0, 1]`` units). Any channel count works: a 1-tuple targets the brightness of grey
    images.

    Example::

        >>> loss_fn = color_loss((0.1, 0.9, 0.5))          # light teal
        >>> loss_fn(jnp.zeros((1, 8, 8, 3)))               # mean(|0 - (-0.8, 0.8, 0)|)
    """
    target = jnp.asarray(target_rgb, jnp.float32) * 2.0 - 1.0  # [C], broadcast over channels

    def loss_fn(images: jax.Array) -> jax.Array:
        return jnp.mean(jnp.abs(images - target.astype(images.dtype)))

    return loss_fn


def _output_from_eps(
    eps: jax.Array, x_t: jax.Array, abar_t: jax.Array, prediction_type: str
) -> jax.Array:
    """The network output of type ``prediction_type`` that corresponds to ``eps`` at ``x_t``."""
    a, b = jnp.sqrt(abar_t), jnp.sqrt(1.0 - abar_t)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return (x_t - b * eps) / a
    return (eps - b * x_t) / a  # v_prediction


def _summed_loss(loss_fn: LossFn, per_sample: bool) -> LossFn:
    if not per_sample:
        return loss_fn
    # Sum of per-sample losses: each sample's gradient is independent of the batch (and of how
    # the batch is split across devices).
    return lambda x0: jnp.sum(jax.vmap(lambda xi: loss_fn(xi[None]))(x0))


def gradient_guidance(
    eps_fn: EpsFn,
    loss_fn: LossFn,
    scale: jax.typing.ArrayLike,
    schedule: Schedule,
    *,
    form: str = "score",
    prediction_type: str = "epsilon",
    per_sample: bool = True,
    through_model: bool = True,
) -> EpsFn | GuideXFn:
    """Guidance by the gradient of a differentiable ``loss_fn(x0_pred) -> scalar``.

    With ``x0_hat(x_t)`` the network's prediction of ``x_0`` and ``g = grad_{x_t} L(x0_hat(x_t))``
    (differentiated through the network unless ``through_model=False``, then only through
    the conversion ``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``):

    * ``form="score"`` returns an ``eps_fn`` (Bansal et al. 2023; Dhariwal & Nichol 2021 with
      ``-log p(y|x)`` as the loss)::

          eps'(x_t, t) = eps(x_t, t) + sqrt(1 - abar_t) * scale * g

      i.e. the score ``-eps / sqrt(1 - abar_t)`` gains ``-scale * g``. Usable with any sampler.
    * ``form="notebook"`` returns a ``guide_x_fn(x_t, t) -> (x_t - scale * g, model_output)`` for
      ``samplers.ddim_sample(..., guide_x_fn=...)`` / ``ddpm_sample``: the hands-on notebook's
      loop, where ``x_t`` is moved by ``-scale * g`` and the scheduler step then uses the
      *unchanged* ``model_output`` (computed at the unmoved ``x_t``) from the moved ``x_t``.
      The notebook multiplies the loss by ``guidance_loss_scale``, the same as ``scale`` here.

    How they relate: with eps held fixed, the notebook form moves ``x0_hat`` by
    ``-scale * g / sqrt(abar_t)``; the score form moves it by
    ``-scale * g (1 - abar_t) / sqrt(abar_t)`` (and, unlike the notebook form, also moves the
    re-noising direction). So the notebook's ``scale`` equals a score-form scale of
    ``scale / (1 - abar_t)``: about the same at high noise, far stronger near ``t = 0``. Scale 0
    is a no-op in both; a larger scale pulls the sample harder towards low loss, at the cost of
    realism (e.g. ~30-40 for the colour loss in the notebook with its batch-mean loss).

    Args:
      eps_fn: the network, ``eps_fn(x, t) -> model_output`` (``prediction_type``).
      loss_fn: differentiable ``loss(x0) -> scalar``.
      scale: guidance strength (may be traced).
      schedule: the training schedule.
      form: ``"score"`` or ``"notebook"``.
      prediction_type: what ``eps_fn`` predicts; the guided ``eps_fn`` predicts the same.
      per_sample: apply ``loss_fn`` to each sample (``x0[i:i+1]``) and sum, so that guidance of
        a sample does not depend on the batch; ``loss_fn`` must then be a function of one
        sample (a loss that holds per-sample targets ``[B, ...]`` needs ``False``). ``False``
        applies it to the whole batch as the notebook does (its batch-mean loss scales each
        sample's gradient by ``1/B``).
      through_model: differentiate through ``eps_fn`` (as the notebook and universal guidance
        do); ``False`` treats the network output as a constant (cheaper: no backward pass
        through the network).

    Example::

        >>> guided = gradient_guidance(eps_fn, color_loss((0.1, 0.9, 0.5)), 10.0, s)
        >>> x0 = ddim_sample(guided, s, x_T, key, num_steps=40)
        >>> guide = gradient_guidance(eps_fn, color_loss((0.1, 0.9, 0.5)), 40.0, s, form="notebook")
        >>> x0 = ddim_sample(eps_fn, s, x_T, key, num_steps=40, guide_x_fn=guide)
    """
    if form not in GRADIENT_GUIDANCE_FORMS:
        raise ValueError(f"unknown form {form!r}; expected one of {list(GRADIENT_GUIDANCE_FORMS)}")
    schedules_lib.check_prediction_type(prediction_type)
    total_loss = _summed_loss(loss_fn, per_sample)

    def output_and_grad(x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        abar = schedules_lib._expand_to(schedule.alphas_cumprod[jnp.asarray(t)], x.ndim)

        def loss_of_x(x_in: jax.Array) -> tuple[jax.Array, jax.Array]:
            out = eps_fn(x_in, t)
            used = out if through_model else jax.lax.stop_gradient(out)
            x0, _ = schedules_lib.x0_and_eps_from_abar(abar, used, x_in, prediction_type)
            return total_loss(x0), out

        grad, out = jax.grad(loss_of_x, has_aux=True)(x)
        return out, grad, abar

    if form == "notebook":

        def guide_x_fn(x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
            out, grad, _ = output_and_grad(x, t)
            return (x - scale * grad).astype(x.dtype), out

        return guide_x_fn

    def guided_eps_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        out, grad, abar = output_and_grad(x, t)
        _, eps = schedules_lib.x0_and_eps_from_abar(abar, out, x, prediction_type)
        eps = eps + jnp.sqrt(1.0 - abar) * scale * grad
        return _output_from_eps(eps, x, abar, prediction_type).astype(out.dtype)

    return guided_eps_fn


def classifier_guidance(
    eps_fn: EpsFn,
    logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
    labels: jax.Array,
    scale: jax.typing.ArrayLike,
    schedule: Schedule,
    *,
    prediction_type: str = "epsilon",
) -> EpsFn:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2) with a noisy classifier.

    ::

        eps'(x_t, t) = eps(x_t, t) - sqrt(1 - abar_t) * scale * grad_{x_t} log softmax(logits_fn(x_t, t))[y]

    The log-probabilities of the samples are summed, so each sample is guided by its own
    gradient. ``scale`` is the paper's ``s`` (0 = no guidance).

    Args:
      eps_fn: the network, ``eps_fn(x, t) -> model_output``.
      logits_fn: any classifier of noisy inputs, ``(x_t, t) -> logits [B, K]``.
      labels: int ``[B]`` target classes.
      scale: guidance strength (may be traced).
      schedule: the training schedule.
      prediction_type: what ``eps_fn`` predicts; the result predicts the same.

    Example::

        >>> eps_fn = classifier_guidance(eps_fn, partial(clf.apply, cp), jnp.full((8,), 3), 2.0, s)
    """
    schedules_lib.check_prediction_type(prediction_type)

    def log_prob(x: jax.Array, t: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(logits_fn(x, t), axis=-1)  # [B, K]
        return jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=-1))

    def guided_eps_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        abar = schedules_lib._expand_to(schedule.alphas_cumprod[jnp.asarray(t)], x.ndim)
        out = eps_fn(x, t)
        _, eps = schedules_lib.x0_and_eps_from_abar(abar, out, x, prediction_type)
        grad = jax.grad(log_prob)(x, t)
        eps = eps - jnp.sqrt(1.0 - abar) * scale * grad
        return _output_from_eps(eps, x, abar, prediction_type).astype(out.dtype)

    return guided_eps_fn


def clip_loss(model: Any, params: Any, text: Any, **kwargs: Any) -> LossFn:
    """CLIP guidance loss ``loss_fn(x0_pred)`` for :func:`gradient_guidance`.

    The spherical distance between CLIP embeddings of random cut-outs of the predicted image
    and the prompt's embedding, averaged over cuts (the hands-on notebook's CLIP guidance;
    Radford et al. 2021). Implemented in :func:`jaxdiff.clip.clip_loss` (imported lazily, so
    ``jaxdiff.guidance`` does not load the tokenizer); keyword arguments (``key``, ``n_cuts``,
    ``tokenizer``, ...) are passed through.

    Example::

        model, params, tokenizer = jaxdiff.clip.load_open_clip("ViT-B-32.safetensors", "ViT-B-32")
        loss_fn = guidance.clip_loss(model, params, "a red flower", key=jax.random.key(0))
        eps_fn = guidance.gradient_guidance(eps_fn, loss_fn, 50.0, schedule)
    """
    from jaxdiff.clip import clip_loss as _clip_loss

    return _clip_loss(model, params, text, **kwargs)
