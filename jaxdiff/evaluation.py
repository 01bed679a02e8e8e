"""Sample quality of a trained run, the way ``scripts/evaluate.py`` reports it.

For digits runs everything is measured with the shipped classifier
(:mod:`jaxdiff.digits_classifier`) against the digits the run trained on:

* ``fd_balanced``: Frechet distance between the features of a *class-balanced* set of samples
  (the first ``m`` samples the classifier assigns to each digit, ``m`` = the smallest class
  count, at most 50) and of the training images; ``fd_balanced_real``: the same for ``m`` of
  each digit of the 500 *held-out* real digits (``data.split="test"``, never trained on), what
  a model that draws new digits from the data's distribution scores. ``fd_ratio =
  fd_balanced / fd_balanced_real``: 1.0 is indistinguishable from real data, at this N, for
  this extractor; the number to compare runs by. NaN when a digit is (nearly) missing (fewer
  than 5 samples): see ``class_fractions``. FD is biased upwards at small N by an amount
  common to both sides, which pulls the ratio towards 1 as ``m`` shrinks, so
  :func:`evaluate_run` draws extra samples (``pool``) until every digit has 50 and both sides
  hold 500 images: the held-out set's own N.
* ``fd``: the plain FD of the first N (at most 500) samples, whatever their classes. Dominated
  by how many of each digit N i.i.d. samples happen to hold: 500 random real training digits
  score 20.8 +- 6.2 over 20 draws, where the class-balanced held-out set scores 10.8 +- 2.1
  (``fd_real``, biased low against any i.i.d. sample). Compare ``fd`` only as a mean over
  seeds (``num_seeds``), never with ``fd_real``.
* ``confidence``: the classifier's mean max probability (real held-out digits: ``confidence_real``);
  ``class_fractions``: the share of samples classified as each digit.
* ``mean_pixel`` / ``ink_fraction`` (pixels above 0.5), samples and real: brightness errors
  show here first (an EMA that still holds its random start brightens every digit).
* ``near_copy_fraction``: samples closer to a training image (L2 in pixel space, [0, 1]) than
  all but 1% of held-out real digits are to their nearest training image; real held-out digits
  score ~0.01 by construction. A model that memorises its data scores high here and low on FD.
* ``label_accuracy`` (conditional runs): the share of samples classified as the label asked for.

Any other data set: :func:`frechet_to_data` with any feature extractor (e.g. CLIP image
features) against images of the run's own data source.

Example::

    from jaxdiff import evaluation
    report = evaluation.evaluate_run("runs/digits", num_images=500)
    print(report["ema"]["fd"], report["ema"]["fd_real"], report["ema"]["fd_ratio"])
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import numpy.typing as npt

from jaxdiff import checkpoint as ckpt
from jaxdiff import data as data_lib
from jaxdiff import digits_classifier as dc
from jaxdiff.metrics import FeatureStats, frechet_distance
from jaxdiff.sampling import load_params, make_sampler

NEAR_COPY_PERCENTILE = 1.0  # % of held-out real digits that count as "near copies" of training data
BALANCED_MAX_PER_CLASS = 50  # the held-out set's images per digit
BALANCED_MIN_PER_CLASS = 5  # fewer samples of some digit: no class-balanced FD (NaN)


def _to_unit(images: np.ndarray) -> np.ndarray:
    return (np.asarray(images, np.float32) + 1.0) / 2.0  # source range [-1, 1] -> [0, 1]


@functools.lru_cache(maxsize=4)
def digits_reference(image_size: int = 16, split: str = "train") -> dict[str, Any]:
    """What generated digits are compared with: the ``split`` images, the held-out ones, their statistics.

    Returns a dict with ``train`` (images ``[N, S, S, 1]`` in [0, 1] of ``split``), ``train_stats``
    (their classifier features' :class:`FeatureStats`), ``heldout`` and ``heldout_labels`` (the
    500 test digits; empty when ``split`` already includes them) and ``copy_threshold`` (the
    near-copy distance, see the module docstring); with held-out digits also their classifier
    output (``heldout_predicted``, ``heldout_confidence``, ``heldout_features``) and
    ``heldout_near_copy_fraction``, computed once for every score.
    """
    train = _to_unit(data_lib.DigitsSource(image_size, split=split).images)
    if split == "train":
        test_source = data_lib.DigitsSource(image_size, split="test")
        heldout, heldout_labels = _to_unit(test_source.images), test_source.labels
    else:  # the model saw every digit: no held-out images exist
        heldout, heldout_labels = train[:0], np.zeros((0,), np.int32)
    ref = {
        "train": train,
        "train_stats": FeatureStats.from_features(dc.features(train)),
        "heldout": heldout,
        "heldout_labels": heldout_labels,
    }
    if len(heldout):  # what every score compares with, computed once per reference
        heldout_distance = nearest_distance(heldout, train)
        ref["copy_threshold"] = float(np.percentile(heldout_distance, NEAR_COPY_PERCENTILE))
        ref["heldout_near_copy_fraction"] = float(np.mean(heldout_distance < ref["copy_threshold"]))
        ref["heldout_predicted"], ref["heldout_confidence"] = dc.classify(heldout)
        ref["heldout_features"] = dc.features(heldout)
    else:
        ref["copy_threshold"] = float("nan")
    return ref


def nearest_distance(images: npt.ArrayLike, pool: npt.ArrayLike) -> np.ndarray:
    """L2 distance from each image to its nearest neighbour in ``pool`` (flattened pixels), ``[N]``."""
    a = np.asarray(images, np.float64).reshape(len(images), -1)
    b = np.asarray(pool, np.float64).reshape(len(pool), -1)
    d2 = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0))


def balanced_indices(predicted: npt.ArrayLike, per_class: int, num_classes: int) -> np.ndarray:
    """Indices of the first ``per_class`` images of each class (in class order), ``[per_class * num_classes]``."""
    predicted = np.asarray(predicted)
    picks = [np.flatnonzero(predicted == c)[:per_class] for c in range(num_classes)]
    if min(len(p) for p in picks) < per_class:
        raise ValueError(f"per_class={per_class} exceeds the smallest class count {min(len(p) for p in picks)}.")
    return np.concatenate(picks)


def _fd_to(features: np.ndarray, stats: FeatureStats) -> float:
    return frechet_distance(*FeatureStats.from_features(features).mean_cov(), *stats.mean_cov())


def digits_quality(
    images: npt.ArrayLike,
    labels: npt.ArrayLike | None = None,
    *,
    image_size: int = 16,
    split: str = "train",
    pool: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """The quality numbers of generated digits (module docstring), images ``[N, H, W, 1]`` in [0, 1].

    ``labels``: the class each image was asked for (conditional sampling), for ``label_accuracy``.
    FD numbers use at most 500 images (the held-out set's size) so that ``fd`` and ``fd_real``
    have the same N; the other numbers use all images. ``pool``: more samples of the same model
    that only the class-balanced FD may pick from (after ``images``), so that it can reach 50 of
    each digit (``balanced_pool`` reports how many images it picked from).
    """
    images = np.asarray(images, np.float32)
    ref = digits_reference(image_size, split)
    predicted, confidence = dc.classify(images)
    features = dc.features(images)
    balanced_predicted, balanced_features = predicted, features
    if pool is not None and len(pool):
        pool = np.asarray(pool, np.float32)
        balanced_predicted = np.concatenate([predicted, dc.classify(pool)[0]])
        balanced_features = np.concatenate([features, dc.features(pool)])
    n_fd = min(len(images), len(ref["heldout"])) if len(ref["heldout"]) else len(images)
    out: dict[str, Any] = {"num_images": len(images), "fd_num_images": n_fd}
    out["fd"] = _fd_to(features[:n_fd], ref["train_stats"])
    counts = np.bincount(predicted, minlength=dc.NUM_CLASSES)
    out.update(
        confidence=float(np.mean(confidence)),
        class_fractions=[float(c) for c in counts / len(images)],
        mean_pixel=float(np.mean(images)),
        ink_fraction=float(np.mean(images > 0.5)),
    )
    if labels is not None:
        labels = np.resize(np.asarray(labels), len(images))
        out["label_accuracy"] = float(np.mean(predicted == labels))
    heldout = ref["heldout"]
    balanced_counts = np.bincount(balanced_predicted, minlength=dc.NUM_CLASSES)
    per_class = min(int(balanced_counts.min()), BALANCED_MAX_PER_CLASS)
    if len(heldout):
        real_pred, real_conf, real_features = ref["heldout_predicted"], ref["heldout_confidence"], ref["heldout_features"]
        per_class = min(per_class, int(np.bincount(real_pred, minlength=dc.NUM_CLASSES).min()))
    out["balanced_per_class"] = per_class
    out["balanced_pool"] = len(balanced_predicted)
    enough = per_class >= BALANCED_MIN_PER_CLASS
    pick = balanced_indices(balanced_predicted, per_class, dc.NUM_CLASSES) if enough else None
    out["fd_balanced"] = _fd_to(balanced_features[pick], ref["train_stats"]) if enough else float("nan")
    if len(heldout):
        real_pick = balanced_indices(real_pred, per_class, dc.NUM_CLASSES) if enough else None
        out["fd_balanced_real"] = _fd_to(real_features[real_pick], ref["train_stats"]) if enough else float("nan")
        out["fd_ratio"] = out["fd_balanced"] / out["fd_balanced_real"] if enough else float("nan")
        out["fd_real"] = _fd_to(real_features[:n_fd], ref["train_stats"])
        out["confidence_real"] = float(np.mean(real_conf[:n_fd]))
        out["mean_pixel_real"] = float(np.mean(heldout))
        out["ink_fraction_real"] = float(np.mean(heldout > 0.5))
        out["near_copy_fraction"] = float(np.mean(nearest_distance(images, ref["train"]) < ref["copy_threshold"]))
        out["near_copy_fraction_real"] = ref["heldout_near_copy_fraction"]
    return out


def frechet_to_data(
    images: npt.ArrayLike,
    source: Any,
    features_fn: Callable[[np.ndarray], np.ndarray],
    *,
    num_real: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """FD between ``features_fn`` of generated images and of real images of a data ``source``.

    ``source``: a random-access source of :mod:`jaxdiff.data` (``{"image": [-1, 1]}``);
    ``num_real`` images (default: as many as generated) are drawn from it without replacement
    (seeded). ``features_fn(images [n, H, W, C] in [0, 1]) -> [n, D]`` runs in batches.
    Returns ``{"fd": ..., "num_images": ..., "num_real": ...}``.
    """
    images = np.asarray(images, np.float32)
    n_real = len(images) if num_real is None else int(num_real)
    if n_real > len(source):
        raise ValueError(f"num_real={n_real} exceeds the {len(source)} images of the data source.")
    pick = np.random.default_rng(seed).permutation(len(source))[:n_real]

    def stats_of(batches):
        stats = None
        for batch in batches:
            f = np.asarray(features_fn(batch))
            stats = FeatureStats(dim=f.shape[-1]) if stats is None else stats
            stats.update(f)
        return stats

    fake = stats_of(images[i : i + batch_size] for i in range(0, len(images), batch_size))
    real = stats_of(
        np.stack([_to_unit(source[int(j)]["image"]) for j in pick[i : i + batch_size]])
        for i in range(0, n_real, batch_size)
    )
    return {"fd": frechet_distance(*fake.mean_cov(), *real.mean_cov()), "num_images": len(images), "num_real": n_real}


def evaluation_labels(num_images: int, num_classes: int) -> np.ndarray | None:
    """Labels for evaluating a conditional model: every class equally often (``0, 1, ..., K-1, 0, ...``)."""
    return np.arange(num_images) % num_classes if num_classes else None


def evaluation_guidance(config: Any, labels: np.ndarray | None, guidance_scale: float | None = None) -> float | None:
    """The classifier-free guidance scale evaluation samples with, or ``None`` for plain sampling.

    ``guidance_scale`` (default ``config.sample.guidance_scale``) for conditional runs (``labels``
    given); 0 and 1 are plain conditional sampling, so ``None``.
    """
    if guidance_scale is None:
        guidance_scale = float(config.sample.get("guidance_scale", 0.0))
    return guidance_scale if (labels is not None and guidance_scale not in (0.0, 1.0)) else None


def draw_samples(
    sample: Callable[..., Any],
    params: Any,
    num_images: int,
    batch_size: int,
    *,
    labels: np.ndarray | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    first_batch: int = 0,
) -> np.ndarray:
    """``num_images`` images from ``sample`` (a :func:`make_sampler` of ``batch_size`` images).

    Batch ``i`` uses the key ``fold_in(key(seed), i)`` and the labels from ``labels[i * batch_size]``
    on (cyclically): the same seed gives the same images. ``first_batch``: start at batch ``i``
    (to draw more of the same stream: batches ``0..k-1`` then ``k..`` equal batches ``0..``).
    """
    chunks = []
    for i in range(first_batch, first_batch + -(-num_images // batch_size)):
        chunk_labels = None if labels is None else np.resize(np.roll(labels, -i * batch_size), batch_size)
        kwargs = {} if labels is None else {"labels": chunk_labels, "guidance_scale": guidance_scale}
        images = sample(params, jax.random.fold_in(jax.random.key(seed), i), **kwargs)
        chunks.append(np.asarray(jax.device_get(images)))
    return np.concatenate(chunks)[:num_images]


def draw_balanced_pool(
    sample: Callable[..., Any],
    params: Any,
    images: np.ndarray,
    batch_size: int,
    *,
    labels: np.ndarray | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    max_images: int | None = None,
) -> np.ndarray:
    """Digits drawn after ``images`` (what :func:`draw_samples` gave with the same arguments: the
    pool continues its stream) until the classifier finds ``BALANCED_MAX_PER_CLASS`` (50) of every
    digit among all of them, or ``max_images`` (default ``4 * len(images)``) are drawn in all;
    ``[M, H, W, 1]``, empty when ``images`` already hold enough.

    What lets the class-balanced FD compare 500 samples with the 500 held-out digits.
    """
    max_images = 4 * len(images) if max_images is None else max_images
    batch = -(-len(images) // batch_size)  # the stream's next batch
    counts = np.bincount(dc.classify(images)[0], minlength=dc.NUM_CLASSES)
    chunks, drawn = [], batch * batch_size
    while counts.min() < BALANCED_MAX_PER_CLASS and drawn + batch_size <= max_images:
        more = draw_samples(sample, params, batch_size, batch_size, labels=labels, guidance_scale=guidance_scale,
                            seed=seed, first_batch=batch)  # fmt: skip
        counts += np.bincount(dc.classify(more)[0], minlength=dc.NUM_CLASSES)
        chunks.append(more)
        batch, drawn = batch + 1, drawn + batch_size
    return np.concatenate(chunks) if chunks else images[:0]


def score_samples(
    config: Any,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    features_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    pool: np.ndarray | None = None,
) -> dict[str, Any]:
    """The quality numbers of a run's samples: :func:`digits_quality` for digits runs (``pool``:
    its extra samples for the class-balanced FD), else the sample statistics and (with
    ``features_fn``) :func:`frechet_to_data`."""
    if config.data.name == "digits":
        split = config.data.get("split", "train+test")
        split = "train" if split == "train" else "train+test"
        return digits_quality(images, labels, image_size=int(config.data.image_size), split=split, pool=pool)
    stats = {"num_images": len(images), "mean_pixel": float(np.mean(images))}
    if features_fn is not None:
        stats.update(frechet_to_data(images, data_lib.build_source(config.data), features_fn))
    return stats


def evaluate_run(
    workdir: str | os.PathLike,
    *,
    num_images: int = 500,
    guidance_scale: float | None = None,
    num_steps: int | None = None,
    sampler: str | None = None,
    eta: float | None = None,
    use_karras_sigmas: bool | None = None,
    batch_size: int = 500,
    seed: int = 0,
    num_seeds: int = 1,
    which: tuple[str, ...] = ("ema", "raw"),
    features_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Samples ``num_images`` from a run's newest checkpoint (EMA and raw params) and measures them.

    Conditional runs sample every class equally often, with classifier-free guidance at
    ``guidance_scale`` (default: ``config.sample.guidance_scale``; 0 or 1: plain conditional).
    Digits runs get :func:`digits_quality`, with more samples drawn (:func:`draw_balanced_pool`,
    at most 3x ``num_images`` more) until the class-balanced FD finds 50 of every digit; other
    runs get :func:`frechet_to_data` when a ``features_fn`` is given (else only the sample
    statistics). ``sampler``, ``num_steps``,
    ``eta`` and ``use_karras_sigmas`` override the run's ``config.sample``. With ``num_seeds > 1``
    the sampling repeats with seeds ``seed, seed + 1, ...`` and each number is the mean over
    them, with ``<name>_std`` (sample standard deviation) next to the FD numbers. Returns
    ``{"step": ..., "ema": {...}, "raw": {...}, "settings": {...}}`` (``ema`` only when the run
    kept EMA).
    """
    if num_seeds < 1:
        raise ValueError(f"num_seeds={num_seeds} must be >= 1 (how many sampling seeds to average over).")
    config = ckpt.read_config(workdir)
    from jaxdiff.builders import build_model, model_num_classes

    num_classes = model_num_classes(build_model(config))
    labels = evaluation_labels(num_images, num_classes)
    scale = evaluation_guidance(config, labels, guidance_scale)
    batch_size = min(batch_size, num_images)
    sample = make_sampler(config, num_images=batch_size, num_steps=num_steps, sampler=sampler, eta=eta,
                          use_karras_sigmas=use_karras_sigmas)  # fmt: skip
    settings = {
        "num_images": num_images,
        "sampler": sampler or config.sample.get("sampler", "ddim"),
        "num_steps": num_steps or int(config.sample.num_steps),
        "eta": float(config.sample.get("eta", 0.0) if eta is None else eta),
        "use_karras_sigmas": bool(config.sample.get("use_karras_sigmas", False)
                                  if use_karras_sigmas is None else use_karras_sigmas),
        "guidance_scale": scale,
        "seed": seed,
        "num_seeds": num_seeds,
    }  # fmt: skip

    report: dict[str, Any] = {"settings": settings}
    digits = config.data.name == "digits"
    for name in which:
        if name == "ema" and config.train.get("ema_decay", 0.0) <= 0:
            continue  # the run kept no EMA
        params, step = load_params(workdir, config, use_ema=(name == "ema"))
        report["step"] = step
        scores = []
        for s in range(seed, seed + num_seeds):
            draw = {"labels": labels, "guidance_scale": scale, "seed": s}
            images = draw_samples(sample, params, num_images, batch_size, **draw)
            pool = draw_balanced_pool(sample, params, images, batch_size, **draw) if digits else None
            scores.append(score_samples(config, images, labels, features_fn, pool=pool))
        report[name] = mean_over_seeds(scores)
    return report


def mean_over_seeds(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """One score dict from several seeds' (:func:`score_samples`): numbers and lists averaged.

    With several seeds every FD number gets ``<name>_std`` (the sample standard deviation over
    seeds) and ``fd_ratio`` also ``fd_ratio_sem``, the standard error of its mean (std /
    sqrt(seeds)): at N = 500 one seed's ratio moves by about +-0.2, so a claim like "within 5%
    of real" needs ``fd_ratio_sem`` well below 0.05 (12 seeds: ~0.06).
    """
    out: dict[str, Any] = {}
    for key, first in scores[0].items():
        values = [sc[key] for sc in scores]
        if isinstance(first, list):
            out[key] = [float(v) for v in np.mean(np.asarray(values, np.float64), axis=0)]
        elif isinstance(first, float):
            out[key] = float(np.mean(values))
            if len(scores) > 1 and key.startswith("fd"):
                out[f"{key}_std"] = float(np.std(values, ddof=1))
                if key == "fd_ratio":
                    out["fd_ratio_sem"] = out["fd_ratio_std"] / np.sqrt(len(values))
        else:
            out[key] = first
    return out


def format_report(report: dict[str, Any]) -> str:
    """A readable table of :func:`evaluate_run`'s report (what ``scripts/evaluate.py`` prints)."""
    lines = [f"step {report.get('step')}; " + ", ".join(f"{k}={v}" for k, v in report["settings"].items())]
    names = [n for n in ("ema", "raw") if n in report]
    keys: list[str] = []
    for n in names:
        keys += [k for k in report[n] if k not in keys]
    lines.append(f"{'':28s}" + "".join(f"{n:>14s}" for n in names))
    for k in keys:
        cells = []
        for n in names:
            v = report[n].get(k)
            if isinstance(v, list):
                cells.append(f"{min(v):.3f}-{max(v):.3f}")
            elif isinstance(v, float):
                cells.append(f"{v:.4g}")
            else:
                cells.append(str(v))
        label = f"{k} (min-max)" if any(isinstance(report[n].get(k), list) for n in names) else k
        lines.append(f"{label:28s}" + "".join(f"{c:>14s}" for c in cells))
    return "\n".join(lines)
