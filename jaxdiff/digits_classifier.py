"""A pinned feature extractor for the digits data set: a tiny CNN classifier trained by jaxdiff.

FID needs a fixed feature network; Inception weights are not available offline and mean little
on 16x16 grey digits. This module ships a small classifier trained on the embedded digits
(``scripts/train_digits_classifier.py``, weights in ``jaxdiff/assets/digits_classifier.npz``)
and uses its penultimate 64-d pre-activations as FD features ("digits FD"), and its softmax for
the confidence and class-coverage numbers of generated digits (the "Inception score" idea of
Salimans et al. 2016: good samples are confidently classified and cover all classes).

Conventions (pinned; change them and the numbers are no longer comparable):
  * input images ``[N, 16, 16, 1]`` float in [0, 1], background 0 and ink 1, as
    ``DigitsSource(16)`` gives after ``(x + 1) / 2`` and as :func:`jaxdiff.make_sampler`
    returns for ``configs/digits.py``. Other sizes are resized bilinearly to 16x16, RGB is
    averaged to grey.
  * reference statistics: all 1,797 images of ``DigitsSource(16)``.
  * features float32 computed in batches of 256, statistics and FD in float64
    (:mod:`jaxdiff.metrics`).

Example::

    from jaxdiff import digits_classifier
    labels, confidence = digits_classifier.classify(images)      # images [N, 16, 16, 1] in [0, 1]
    fd = digits_classifier.digits_fd(images)   # real digits: ~100 at N=256; noise: thousands
    evaluate = digits_classifier.make_digits_eval()
    metrics = evaluate(images)    # {"digits_fd": ..., "classifier_confidence": ..., ...}
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from jaxdiff.metrics import FeatureStats, frechet_distance

IMAGE_SIZE = 16
NUM_CLASSES = 10
FEATURE_DIM = 64
CONFIDENT = 0.9  # a prediction counts towards ``classes_present`` above this probability
_BATCH = 256

ImagesFn = Callable[[npt.ArrayLike], jax.Array]


class DigitsCNN(nn.Module):
    """``conv16 x2 -> pool -> conv32 x2 -> pool -> Dense(64) -> Dense(10)``, ReLU, ~50k params.

    ``__call__(x) -> (logits [N, 10], features [N, 64])`` for ``x`` ``[N, 16, 16, 1]`` in [0, 1];
    the features are the pre-activations of the penultimate layer (before its ReLU: the
    classifier is trained to silence its ReLU units on non-digits, and features that are all
    zero for every bad image could not tell bad from worse).
    """

    features: int = FEATURE_DIM

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = x * 2.0 - 1.0  # centre the input
        for width in (16, 32):
            h = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(h))
            h = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(h))
            h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        h = h.reshape(h.shape[0], -1)  # [N, 4 * 4 * 32]
        feats = nn.Dense(self.features)(h)
        return nn.Dense(NUM_CLASSES)(nn.relu(feats)), feats


def preprocess(images: npt.ArrayLike) -> jax.Array:
    """Images ``[N, H, W, C]`` in [0, 1] -> float32 ``[N, 16, 16, 1]`` (grey, bilinear resize)."""
    x = jnp.asarray(images, jnp.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C] in [0, 1], got shape {x.shape}.")
    if x.shape[-1] != 1:
        x = jnp.mean(x, axis=-1, keepdims=True)
    if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        x = jax.image.resize(x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1), "bilinear")
    return x


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: DigitsCNN, params: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return model.apply({"params": params}, x)


# ---------------------------------------------------------------------------------------------
# Weights on disk: a flat .npz of "/"-joined parameter paths.
# ---------------------------------------------------------------------------------------------


def default_weights_path() -> os.PathLike:
    """``jaxdiff/assets/digits_classifier.npz`` inside the installed package."""
    return importlib.resources.files("jaxdiff") / "assets" / "digits_classifier.npz"


def save_params(path: str | os.PathLike, params: Any, **metadata: float) -> None:
    """Writes params (float32) and scalar metadata (e.g. accuracy) to a compressed ``.npz``."""
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path_keys): np.asarray(leaf, np.float32)
        for path_keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    flat.update({f"meta:{k}": np.asarray(v) for k, v in metadata.items()})
    with open(path, "wb") as f:
        np.savez_compressed(f, **flat)


def load_params(path: str | os.PathLike | None = None) -> tuple[Any, dict[str, float]]:
    """``(params, metadata)`` from :func:`save_params`'s file (default: the shipped weights)."""
    path = default_weights_path() if path is None else path
    # A str/PathLike, or an importlib.resources Traversable (which has .open but no fspath).
    with (path.open("rb") if hasattr(path, "open") else open(path, "rb")) as f, np.load(f) as data:
        items = {k: data[k] for k in data.files}
    params: dict[str, Any] = {}
    meta = {}
    for name, value in items.items():
        if name.startswith("meta:"):
            meta[name[5:]] = value.item()
            continue
        node = params
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return params, meta


@functools.lru_cache(maxsize=4)
def load(path: str | None = None) -> tuple[ImagesFn, ImagesFn]:
    """``(logits_fn, features_fn)``: pure jitted functions of images ``[N, H, W, C]`` in [0, 1].

    ``logits_fn(images) -> [N, 10]``, ``features_fn(images) -> [N, 64]`` (float32). The params
    are an argument of the jitted network, not baked into it; loaded once per process.

    Example::

        logits_fn, features_fn = load()
        probs = jax.nn.softmax(logits_fn(images))
    """
    params, _ = load_params(path)
    model = DigitsCNN()

    def logits_fn(images):
        return _apply(model, params, preprocess(images))[0]

    def features_fn(images):
        return _apply(model, params, preprocess(images))[1]

    return logits_fn, features_fn


def _batched(fn: ImagesFn, images: npt.ArrayLike) -> np.ndarray:
    """``fn`` over batches of 256, the last one zero-padded: one compiled shape for any N."""
    images = np.asarray(images, np.float32)
    outs = []
    for i in range(0, len(images), _BATCH):
        chunk = images[i : i + _BATCH]
        padded = np.concatenate([chunk, np.zeros((_BATCH - len(chunk), *chunk.shape[1:]), np.float32)])
        outs.append(np.asarray(fn(padded))[: len(chunk)])
    return np.concatenate(outs, axis=0)


def classify(images: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(labels [N] int, confidence [N] = max softmax probability)`` for images in [0, 1]."""
    logits_fn, _ = load()
    probs = jax.nn.softmax(jnp.asarray(_batched(logits_fn, images)), axis=-1)
    return np.asarray(jnp.argmax(probs, axis=-1)), np.asarray(jnp.max(probs, axis=-1))


def features(images: npt.ArrayLike) -> np.ndarray:
    """The 64-d FD features ``[N, 64]`` of images in [0, 1] (in batches of 256)."""
    _, features_fn = load()
    return _batched(features_fn, images)


@functools.lru_cache(maxsize=1)
def digits_reference_stats() -> FeatureStats:
    """Feature statistics of all 1,797 ``DigitsSource(16)`` images (computed once per process)."""
    from jaxdiff.data import DigitsSource

    images = (DigitsSource(IMAGE_SIZE).images + 1.0) / 2.0  # [-1, 1] -> [0, 1]
    return FeatureStats.from_features(features(images))


def digits_fd(images: npt.ArrayLike, reference_stats: FeatureStats | None = None) -> float:
    """Frechet distance between the features of ``images`` and of the digits data set.

    ``images``: ``[N, H, W, C]`` in [0, 1], N >= 2 (use a few hundred or more: FD is biased
    upwards for small N, so compare only numbers with the same N). ``reference_stats``:
    statistics to compare with (default :func:`digits_reference_stats`, cached in-process).
    """
    reference = digits_reference_stats() if reference_stats is None else reference_stats
    stats = FeatureStats.from_features(features(images))
    return frechet_distance(*stats.mean_cov(), *reference.mean_cov())


def make_digits_eval(num_images: int | None = None) -> Callable[[npt.ArrayLike], dict[str, float]]:
    """``eval_fn(images) -> metrics`` for generated digits (images ``[N, H, W, C]`` in [0, 1]).

    Metrics:
      * ``digits_fd``: :func:`digits_fd` against the whole data set (lower is better). FD is
        biased upwards for few samples: real digits give ~150 at N=64, ~105 at N=256 and 0 for
        the whole set; blurred digits ~400, uniform noise ~7,700 at N=256.
      * ``classifier_confidence``: mean max softmax probability (real digits ~0.99).
      * ``confident_fraction``: fraction of images classified with probability > 0.9.
      * ``classes_present``: number of distinct classes among those confident predictions
        (10 when every digit is produced).
      * ``num_images``: N.

    Args:
      num_images: if set, use only the first ``num_images`` images and fail if fewer are given
        (so that numbers logged across a run use the same N).

    Example::

        eval_fn = make_digits_eval()
        metrics = eval_fn(np.asarray(sample(params, key)))   # log to metrics.jsonl
    """
    reference = digits_reference_stats()

    def eval_fn(images: npt.ArrayLike) -> dict[str, float]:
        images = np.asarray(images, np.float32)
        if num_images is not None:
            if len(images) < num_images:
                raise ValueError(f"eval_fn needs {num_images} images, got {len(images)}.")
            images = images[:num_images]
        labels, confidence = classify(images)
        confident = confidence > CONFIDENT
        return {
            "digits_fd": digits_fd(images, reference),
            "classifier_confidence": float(np.mean(confidence)),
            "confident_fraction": float(np.mean(confident)),
            "classes_present": int(np.unique(labels[confident]).size),
            "num_images": len(images),
        }

    return eval_fn
