"""Quality end to end: a briefly trained conditional digits model draws the digits it is asked for.

The check uses an independent classifier (a scikit-learn RBF support-vector machine fitted on
the 16x16 training images), so it judges the samples with nothing jaxdiff trained.
"""

from __future__ import annotations

import jax
import numpy as np
from conftest import load_config

from jaxdiff import train as train_lib
from jaxdiff.sampling import load_params, make_sampler


def digit_classifier():
    """An SVM on the training images (in [0, 1], flattened); ~99% accurate on real digits."""
    from sklearn.svm import SVC

    from jaxdiff.data import DigitsSource

    source = DigitsSource(16)
    return SVC(gamma="scale").fit(
        flatten((source.images + 1) / 2), source.labels
    )


def flatten(images: np.ndarray) -> np.ndarray:
    """[N, 16, 16, 1] in [0, 1] -> [N, 256]."""
    return images.reshape(len(images), -1)


def test_conditional_digits_follow_their_labels(tmp_path):
    config = load_config("digits", "conditional")
    config.train.num_steps = 800
    config.train.checkpoint_every = 800
    config.train.log_every = 100
    config.train.sample_every = 0
    config.train.ema_decay = 0.99  # a short run: average over its last ~100 steps
    config.sample.at_end = False
    train_lib.train_and_evaluate(config, tmp_path)

    params, _ = load_params(tmp_path)
    labels = np.tile(np.arange(10), 10)  # 100 images, 10 of each digit
    sample = make_sampler(config, num_images=len(labels), num_steps=25, labels=labels, guidance_scale=3.0)
    images = np.asarray(sample(params, jax.random.key(0)))
    predicted = digit_classifier().predict(flatten(images))
    accuracy = float(np.mean(predicted == labels))
    # Chance is 0.1; a model that ignored its labels would sit there (P(>= 30/100) < 1e-8).
    print(f"conditional accuracy: {accuracy:.0%}")
    assert accuracy >= 0.3, f"only {accuracy:.0%} of the conditional samples show the requested digit"
