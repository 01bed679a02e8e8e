"""scripts/evaluate.py and jaxdiff.evaluation: quality numbers that separate good samples from bad."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, load_config

from jaxdiff import data as data_lib
from jaxdiff import digits_classifier as dc
from jaxdiff import evaluation


@pytest.fixture(scope="module")
def reference():
    return evaluation.digits_reference(16, "train")


def test_digits_split_is_stratified_disjoint_and_fixed():
    labels = data_lib.DigitsSource(8).labels
    train = data_lib.digits_split_indices(labels, "train")
    test = data_lib.digits_split_indices(labels, "test")
    assert len(test) == 500 and len(train) == len(labels) - 500
    assert not set(train) & set(test)
    np.testing.assert_array_equal(np.bincount(labels[test]), np.full(10, 50))
    np.testing.assert_array_equal(test, data_lib.digits_split_indices(labels, "test"))  # no hidden randomness
    assert len(data_lib.DigitsSource(8, split="test")) == 500
    with pytest.raises(ValueError, match="data.split"):
        data_lib.DigitsSource(8, split="validation")


def test_held_out_digits_score_as_real_data_and_bad_samples_do_not(reference):
    heldout, labels = reference["heldout"], reference["heldout_labels"]
    real = evaluation.digits_quality(heldout, labels)
    assert real["fd_ratio"] == pytest.approx(1.0) and real["fd"] == pytest.approx(real["fd_real"])
    assert real["balanced_per_class"] >= 45  # the classifier assigns ~50 held-out digits to each class
    assert real["confidence"] > 0.95 and real["label_accuracy"] > 0.97
    assert real["near_copy_fraction"] == pytest.approx(0.01, abs=0.005)  # by construction
    assert max(real["class_fractions"]) < 0.12

    rng = np.random.default_rng(0)
    noisy = np.clip(heldout + rng.normal(0, 0.2, heldout.shape), 0, 1).astype(np.float32)
    brighter = np.clip(heldout * 1.3, 0, 1)  # what a half-random EMA did: more ink everywhere
    copies = reference["train"][rng.permutation(len(reference["train"]))[:500]]
    ones = np.repeat(heldout[labels == 1], 10, axis=0)  # mode collapse onto one class
    scores = {name: evaluation.digits_quality(x) for name, x in
              [("noisy", noisy), ("brighter", brighter), ("copies", copies), ("ones", ones)]}  # fmt: skip
    assert scores["noisy"]["fd_ratio"] > 1.5
    assert scores["brighter"]["fd_ratio"] > 1.2 and scores["brighter"]["mean_pixel"] > real["mean_pixel"] + 0.05
    assert scores["copies"]["near_copy_fraction"] == 1.0  # zero distance to the training set
    assert max(scores["ones"]["class_fractions"]) > 0.9 and scores["ones"]["fd"] > 5 * real["fd_real"]
    assert np.isnan(scores["ones"]["fd_ratio"]) and scores["ones"]["balanced_per_class"] < 5  # no balanced FD


def test_balanced_fd_ignores_class_proportions_and_plain_fd_does_not(reference):
    """Real digits in skewed proportions: the plain FD rises, the class-balanced FD stays real."""
    train, heldout = reference["train"], reference["heldout"]
    train_labels = data_lib.DigitsSource(16, split="train").labels
    # 500 real training digits, twice as many of 0-4 as of 5-9 (plus the held-out set for the balance)
    rng = np.random.default_rng(0)
    skew = np.concatenate([rng.permutation(np.flatnonzero(train_labels == c))[: 67 if c < 5 else 33]
                           for c in range(10)])  # fmt: skip
    skewed = np.concatenate([train[rng.permutation(skew)], heldout])
    scores = evaluation.digits_quality(skewed)
    balanced_real = evaluation.digits_quality(np.concatenate([train[rng.permutation(len(train))[:500]], heldout]))
    assert scores["fd"] > 1.5 * balanced_real["fd_real"]  # the class mix alone moves the plain FD
    assert scores["fd_ratio"] < 1.3 and scores["balanced_per_class"] >= 45


def test_pool_lets_the_balanced_fd_reach_the_held_out_sets_n(reference):
    """Extra samples only feed the class-balanced FD; the i.i.d. numbers stay on ``images``."""
    heldout, labels = reference["heldout"], reference["heldout_labels"]
    whole = evaluation.digits_quality(heldout, labels)
    half = evaluation.digits_quality(heldout[:250], labels[:250], pool=heldout[250:])
    assert half["num_images"] == 250 and half["balanced_pool"] == 500
    assert half["balanced_per_class"] == whole["balanced_per_class"] and half["fd_ratio"] == pytest.approx(1.0)
    alone = evaluation.digits_quality(heldout[:250], labels[:250])
    assert alone["balanced_per_class"] < half["balanced_per_class"] and alone["fd"] == half["fd"]


def _fake_sampler(pool_images):
    """A ``sample(params, key, labels=, guidance_scale=)`` that returns real digits chosen by the key."""
    calls = []

    def sample(params, key, labels=None, guidance_scale=None):
        calls.append(None if labels is None else np.asarray(labels).copy())
        pick = np.asarray(jax.random.choice(key, len(pool_images), (100,), replace=False))
        return pool_images[pick]

    return sample, calls


def test_draw_samples_continues_its_stream_and_the_pool_stops_at_fifty_of_each(reference):
    sample, calls = _fake_sampler(reference["train"])
    labels = np.arange(300) % 10
    whole = evaluation.draw_samples(sample, None, 300, 100, labels=labels, guidance_scale=2.0, seed=3)
    first = evaluation.draw_samples(sample, None, 100, 100, labels=labels, guidance_scale=2.0, seed=3)
    rest = evaluation.draw_samples(sample, None, 200, 100, labels=labels, guidance_scale=2.0, seed=3, first_batch=1)
    np.testing.assert_array_equal(whole, np.concatenate([first, rest]))
    np.testing.assert_array_equal(calls[4], calls[1])  # batch 1's labels, whichever call draws it

    sample, _ = _fake_sampler(reference["train"])
    images = evaluation.draw_samples(sample, None, 100, 100, seed=0)
    capped = evaluation.draw_balanced_pool(sample, None, images, 100, seed=0)  # at most 4 x 100 in all
    assert len(capped) == 300
    pool = evaluation.draw_balanced_pool(sample, None, images, 100, seed=0, max_images=5000)
    np.testing.assert_array_equal(pool[:300], capped)
    np.testing.assert_array_equal(pool, evaluation.draw_samples(sample, None, len(pool), 100, seed=0, first_batch=1))
    count = lambda x: np.bincount(dc.classify(x)[0], minlength=10)  # noqa: E731
    assert count(np.concatenate([images, pool])).min() >= 50  # enough of every digit ...
    assert count(np.concatenate([images, pool[:-100]])).min() < 50  # ... and not a batch more than needed
    assert len(evaluation.draw_balanced_pool(sample, None, np.concatenate([images, pool]), 100)) == 0


def test_balanced_indices():
    pred = np.array([2, 0, 1, 0, 2, 1, 1])
    np.testing.assert_array_equal(evaluation.balanced_indices(pred, 2, 3), [1, 3, 2, 5, 0, 4])
    with pytest.raises(ValueError, match="per_class=3"):
        evaluation.balanced_indices(pred, 3, 3)


def test_mean_over_seeds():
    a = {"fd": 10.0, "fd_ratio": 1.0, "class_fractions": [0.5, 0.5], "num_images": 4}
    b = {"fd": 14.0, "fd_ratio": 2.0, "class_fractions": [0.25, 0.75], "num_images": 4}
    out = evaluation.mean_over_seeds([a, b])
    assert out["fd"] == 12.0 and out["fd_std"] == pytest.approx(np.std([10, 14], ddof=1))
    assert out["class_fractions"] == [0.375, 0.625] and out["num_images"] == 4
    assert out["fd_ratio"] == 1.5 and out["fd_ratio_std"] == pytest.approx(np.std([1, 2], ddof=1))
    assert out["fd_ratio_sem"] == pytest.approx(np.std([1, 2], ddof=1) / np.sqrt(2))
    assert "fd_std" not in evaluation.mean_over_seeds([a]) and "fd_ratio_sem" not in evaluation.mean_over_seeds([a])


def test_nearest_distance_is_exact():
    a = np.array([[0.0, 0.0], [3.0, 4.0]])
    pool = np.array([[0.0, 1.0], [3.0, 0.0]])
    np.testing.assert_allclose(evaluation.nearest_distance(a, pool), [1.0, 4.0])  # (3, 4) -> (3, 0)


def test_frechet_to_data_with_any_features():
    source = data_lib.DigitsSource(8)
    flat = lambda x: np.asarray(x).reshape(len(x), -1)  # noqa: E731  (pixels as features)
    same = (source.images[:300] + 1) / 2
    out = evaluation.frechet_to_data(same, source, flat, num_real=300, seed=1)
    noise = np.random.default_rng(0).uniform(0, 1, same.shape).astype(np.float32)
    assert evaluation.frechet_to_data(noise, source, flat, num_real=300)["fd"] > 10 * out["fd"]
    with pytest.raises(ValueError, match="num_real"):
        evaluation.frechet_to_data(same, source, flat, num_real=5000)


def test_evaluate_script_on_a_trained_run(tmp_path):
    from jaxdiff import train as train_lib

    config = load_config("digits", "conditional,smoke")
    config.sample.at_end = False
    train_lib.train_and_evaluate(config, tmp_path / "run")
    out = tmp_path / "q.json"
    cmd = [sys.executable, str(REPO / "scripts" / "evaluate.py"), f"--workdir={tmp_path / 'run'}",
           "--num_images=20", "--steps=2", "--guidance_scale=2", "--seeds=2", f"--json={out}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["step"] == 6 and report["settings"]["guidance_scale"] == 2.0 and report["settings"]["num_seeds"] == 2
    for name in ("ema", "raw"):
        assert report[name]["num_images"] == 20 and 0 <= report[name]["label_accuracy"] <= 1
        assert report[name]["fd_real"] > 0 and report[name]["fd"] > report[name]["fd_real"]  # 6 steps: not digits yet
        assert report[name]["fd_std"] > 0  # two seeds, two different sets of samples
    assert "fd_ratio" in proc.stdout
    bad = subprocess.run(cmd[:2] + [f"--workdir={tmp_path / 'nope'}"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
