"""CLIP guidance loss: spherical distance between random crops of ``x0_pred`` and a text prompt.

This is the loss of the hands-on guided-diffusion notebook (after Katherine Crowson's CLIP-guided
diffusion; CLIP: Radford et al., 2021, https://arxiv.org/abs/2103.00020): ``n_cuts`` random
resized crops (and horizontal flips) of the predicted clean image are embedded by CLIP's image
tower and compared with the prompt's text embedding by the squared great-circle distance
``2 * arcsin(||u - v|| / 2) ** 2`` of the unit vectors ``u``, ``v``, averaged over cuts (and
prompts). Crops are differentiable (``jax.image.scale_and_translate``), so the gradient flows
back to ``x0_pred``.

Unlike the notebook, which normalises ``x0`` in [-1, 1] as if it were in [0, 1], the image is
mapped to [0, 1] before CLIP's mean/std normalisation, which is what CLIP was trained on. The
notebook's small random affine skew is not reproduced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .model import CLIP, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from .tokenizer import Tokenizer

__all__ = ["clip_loss", "make_cutouts", "normalize_images", "spherical_distance"]


def spherical_distance(x: jax.Array, y: jax.Array) -> jax.Array:
    """Squared great-circle distance ``2 arcsin(||x/|x| - y/|y||| / 2)^2`` along the last axis.

    Equals ``arccos(cos_sim)^2 / 2`` but stays finite-gradient near zero distance.

    Example:
        >>> float(spherical_distance(jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0])))  # (pi/2)^2/2
        1.2337...
    """
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    y = y / jnp.linalg.norm(y, axis=-1, keepdims=True)
    chord = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x - y), axis=-1), 1e-20))
    return 2.0 * jnp.square(jnp.arcsin(jnp.clip(chord / 2.0, 0.0, 1.0)))


def normalize_images(images: jax.Array) -> jax.Array:
    """Map NHWC images from [-1, 1] to CLIP's input normalisation (mean/std of its data)."""
    mean = jnp.asarray(OPENAI_DATASET_MEAN, images.dtype)
    std = jnp.asarray(OPENAI_DATASET_STD, images.dtype)
    return ((images + 1.0) / 2.0 - mean) / std


def make_cutouts(
    images: jax.Array,
    key: jax.Array,
    *,
    n_cuts: int,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    flip: bool = True,
) -> jax.Array:
    """Differentiable random resized crops, like torchvision's ``RandomResizedCrop`` + flip.

    Each of the ``n_cuts`` crops per image covers a random fraction ``scale`` of its area with
    aspect ratio in ``ratio`` (log-uniform; clipped to the image), at a uniformly random
    position, and is resampled to ``size x size`` with antialiased bilinear interpolation; with
    ``flip`` half of them are mirrored. ``scale=(1, 1)``, ``flip=False`` is a plain resize.

    Args:
        images: ``[B, H, W, C]``.
        key: PRNG key.
        n_cuts: crops per image.
        size: output side length.
        scale: range of the crop's area fraction.
        ratio: range of the crop's width / height.
        flip: random horizontal flips.

    Returns:
        ``[n_cuts * B, size, size, C]``, cut-major (all images' first cut, then the second...).

    Example:
        >>> cuts = make_cutouts(jnp.zeros((2, 64, 64, 3)), jax.random.key(0), n_cuts=4, size=32)
        >>> cuts.shape
        (8, 32, 32, 3)
    """
    b, h, w, c = images.shape
    n = n_cuts * b
    k_area, k_ratio, k_y, k_x, k_flip = jax.random.split(key, 5)
    area = jax.random.uniform(k_area, (n,), minval=scale[0], maxval=scale[1]) * (h * w)
    log_r = jax.random.uniform(
        k_ratio, (n,), minval=float(np.log(ratio[0])), maxval=float(np.log(ratio[1]))
    )
    r = jnp.exp(log_r)
    cw = jnp.clip(jnp.sqrt(area * r), 1.0, float(w))
    ch = jnp.clip(jnp.sqrt(area / r), 1.0, float(h))
    y0 = jax.random.uniform(k_y, (n,)) * (h - ch)
    x0 = jax.random.uniform(k_x, (n,)) * (w - cw)
    tiled = jnp.tile(images, (n_cuts, 1, 1, 1))

    def crop(img: jax.Array, y: jax.Array, x: jax.Array, hh: jax.Array, ww: jax.Array) -> jax.Array:
        s = jnp.stack([size / hh, size / ww]).astype(img.dtype)
        t = jnp.stack([-y * size / hh, -x * size / ww]).astype(img.dtype)
        return jax.image.scale_and_translate(
            img, (size, size, c), (0, 1), s, t, method="linear", antialias=True
        )

    cuts = jax.vmap(crop)(tiled, y0, x0, ch, cw)
    if flip:
        do_flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
        cuts = jnp.where(do_flip, cuts[:, :, ::-1, :], cuts)
    return cuts


def clip_loss(
    model: CLIP,
    params: Any,
    text: str | Sequence[str] | jax.Array | np.ndarray,
    *,
    key: jax.Array,
    n_cuts: int = 4,
    tokenizer: Tokenizer | None = None,
    cut_scale: tuple[float, float] = (0.08, 1.0),
    cut_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    flip: bool = True,
    fresh_cuts_per_call: bool = True,
) -> Callable[..., jax.Array]:
    """Build the CLIP guidance loss ``loss_fn(x0_pred) -> scalar`` for a text prompt.

    ``x0_pred`` is NHWC in [-1, 1] (any size; crops are resampled to CLIP's input size). The
    loss is the spherical distance (see :func:`spherical_distance`) between CLIP's embedding of
    each of ``n_cuts`` random crops of every image and the embedding of every prompt, averaged.
    Plug it into :func:`jaxdiff.guidance.gradient_guidance`.

    Args:
        model: a :class:`CLIP` module (e.g. from :func:`jaxdiff.clip.load_open_clip`).
        params: its parameters.
        text: prompt(s) as strings, token ids ``[T, context_length]`` (int), or precomputed
            text features ``[T, embed_dim]`` (float).
        key: PRNG key for the crops (required: guidance randomness is always explicit).
        n_cuts: crops per image; the loss is their mean.
        tokenizer: used for string prompts; defaults to the bundled CLIP tokenizer.
        cut_scale: area-fraction range of the crops (torchvision ``RandomResizedCrop``'s).
        cut_ratio: aspect-ratio range of the crops.
        flip: random horizontal flips of the crops.
        fresh_cuts_per_call: fold a fingerprint of ``x0_pred`` into ``key`` so each guidance
            step (each new ``x0_pred``) gets new crops while staying reproducible; ``False``
            uses the same crops at every call. ``loss_fn(x0, key=k)`` overrides both.

    Returns:
        ``loss_fn(x0_pred, key=None) -> scalar``, differentiable in ``x0_pred`` and jittable.

    Example:
        >>> model, params, tok = load_open_clip("clip.safetensors", "ViT-B-32")  # doctest: +SKIP
        >>> loss_fn = clip_loss(model, params, "a cat on the grass", key=jax.random.key(0))  # doctest: +SKIP
        >>> guided = gradient_guidance(eps_fn, loss_fn, 10.0, schedule)  # doctest: +SKIP
    """
    if n_cuts < 1:
        raise ValueError(f"n_cuts must be >= 1, got {n_cuts}")
    text_features = _text_features(model, params, text, tokenizer)
    text_features = jax.lax.stop_gradient(text_features)
    size = model.image_size
    base_key = key

    def loss_fn(x0_pred: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if key is None:
            key = base_key
            if fresh_cuts_per_call:
                fingerprint = jax.lax.bitcast_convert_type(
                    jax.lax.stop_gradient(jnp.sum(x0_pred.astype(jnp.float32))), jnp.uint32
                )
                key = jax.random.fold_in(key, fingerprint)
        cuts = make_cutouts(
            x0_pred, key, n_cuts=n_cuts, size=size, scale=cut_scale, ratio=cut_ratio, flip=flip
        )
        feats = model.apply({"params": params}, normalize_images(cuts), method=CLIP.encode_image)
        dists = spherical_distance(feats[:, None, :], text_features[None, :, :].astype(feats.dtype))
        return jnp.mean(dists)

    return loss_fn


def _text_features(
    model: CLIP, params: Any, text: Any, tokenizer: Tokenizer | None
) -> jax.Array:
    if isinstance(text, str) or (
        isinstance(text, Sequence) and text and all(isinstance(t, str) for t in text)
    ):
        tokenizer = tokenizer or Tokenizer(context_length=model.context_length)
        text = tokenizer(text, context_length=model.context_length)
    text = jnp.asarray(text)
    if jnp.issubdtype(text.dtype, jnp.floating):
        if text.ndim != 2 or text.shape[-1] != model.embed_dim:
            raise ValueError(
                f"text features must be [T, {model.embed_dim}], got shape {tuple(text.shape)}"
            )
        return text
    if text.ndim == 1:
        text = text[None]
    return model.apply({"params": params}, text, method=CLIP.encode_text)
