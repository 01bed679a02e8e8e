"""Frechet distance, feature statistics and the shipped digits classifier (jaxdiff.metrics)."""

import itertools

import jax
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from jaxdiff import digits_classifier as dc
from jaxdiff.data import DigitsSource
from jaxdiff.metrics import FeatureStats, frechet_distance


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def scipy_frechet(mu1, cov1, mu2, cov2) -> float:
    """FD written independently: Tr sqrt(C1 C2) = Tr sqrt(C1^1/2 C2 C1^1/2) (symmetric root)."""
    r1 = scipy.linalg.sqrtm(cov1).real
    middle = scipy.linalg.sqrtm(r1 @ cov2 @ r1).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(middle))


@pytest.mark.parametrize("d", [1, 3, 16, 64])
def test_frechet_distance_matches_scipy_on_random_spd(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    cov1, cov2 = random_spd(rng, d), random_spd(rng, d)
    got = frechet_distance(mu1, cov1, mu2, cov2)
    np.testing.assert_allclose(got, scipy_frechet(mu1, cov1, mu2, cov2), rtol=1e-8, atol=1e-8)
    assert got > 0
    # Symmetric in its two Gaussians, and 0 between a Gaussian and itself.
    np.testing.assert_allclose(frechet_distance(mu2, cov2, mu1, cov1), got, rtol=1e-8)
    assert abs(frechet_distance(mu1, cov1, mu1, cov1)) < 1e-8


@given(
    st.lists(st.floats(0.01, 10.0), min_size=1, max_size=6),
    st.lists(st.floats(0.01, 10.0), min_size=6, max_size=6),
    st.floats(-3.0, 3.0),
)
def test_frechet_distance_closed_form_for_diagonal_covariances(var1, var2, shift):
    # Diagonal covariances commute: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    a = np.array(var1)
    b = np.array(var2[: len(a)])
    mu1 = np.zeros(len(a))
    mu2 = np.full(len(a), shift)
    expected = len(a) * shift**2 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-9)


def test_frechet_distance_singular_covariances_use_the_offset():
    # Rank-1 covariances (fewer samples than dimensions): finite, real, close to the exact answer.
    rng = np.random.default_rng(0)
    u = rng.standard_normal((5, 1))
    cov = u @ u.T  # singular
    got = frechet_distance(np.zeros(5), cov, np.ones(5), cov)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, 5.0, atol=1e-3)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="means"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


@given(
    st.integers(2, 40),
    st.integers(1, 5),
    st.lists(st.integers(0, 40), min_size=0, max_size=6),
    st.integers(0, 2**16),
)
def test_feature_stats_equal_numpy_whatever_the_batch_split(n, d, cuts, seed):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n, d)).astype(np.float32) * 3 + 5
    edges = sorted({0, n, *(min(c, n) for c in cuts)})
    stats = FeatureStats(dim=d)
    for lo, hi in itertools.pairwise(edges):
        stats.update(features[lo:hi])
    stats.update(features[:0])  # empty batches are fine
    f64 = features.astype(np.float64)
    assert stats.count == n
    np.testing.assert_allclose(stats.mean, np.mean(f64, axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.atleast_2d(np.cov(f64, rowvar=False)), rtol=1e-9, atol=1e-9)
    # Merging two halves gives the statistics of the whole.
    half = n // 2
    merged = FeatureStats.from_features(features[:half]).merge(FeatureStats.from_features(features[half:]))
    np.testing.assert_allclose(merged.cov, stats.cov, rtol=1e-9, atol=1e-9)
    assert merged.cov.dtype == np.float64


def test_feature_stats_errors():
    stats = FeatureStats(dim=3)
    with pytest.raises(ValueError, match="no features"):
        _ = stats.mean
    stats.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        _ = stats.cov
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        stats.update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(np.full((2, 3), np.nan))


# ---------------------------------------------------------------------------------------------
# The shipped digits classifier. It was trained on 80% of these very images, so accuracy on the
# whole set mostly measures fit, not generalisation (the held-out 20% is stored as metadata).
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    source = DigitsSource(16)
    return (source.images + 1.0) / 2.0, source.labels


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).uniform(size=(256, 16, 16, 1)).astype(np.float32)


def test_shipped_classifier_is_accurate_and_small(digits):
    images, labels = digits
    predicted, confidence = dc.classify(images)
    assert predicted.shape == labels.shape and confidence.shape == labels.shape
    assert np.mean(predicted == labels) > 0.95
    assert np.mean(confidence) > 0.95
    params, meta = dc.load_params()
    assert meta["heldout_accuracy"] > 0.97
    assert sum(p.size for p in jax.tree.leaves(params)) < 100_000
    logits_fn, features_fn = dc.load()
    assert logits_fn(images[:3]).shape == (3, 10)
    assert features_fn(images[:3]).shape == (3, dc.FEATURE_DIM)


def test_classifier_is_not_confident_on_noise(digits, noise):
    _, real_conf = dc.classify(digits[0][:256])
    _, noise_conf = dc.classify(noise)
    assert np.mean(noise_conf) < 0.5
    assert np.mean(real_conf) > 0.95


def test_digits_fd_separates_real_digits_from_noise(digits, noise):
    images = digits[0]
    real = dc.digits_fd(images[:256])
    assert 0 < real < 0.1 * dc.digits_fd(noise)
    assert abs(dc.digits_fd(images)) < 1e-6  # the reference statistics are of these images
    own = FeatureStats.from_features(dc.features(images[:256]))
    assert abs(dc.digits_fd(images[:256], reference_stats=own)) < 1e-6
    # The same statistics for RGB input: it is averaged to grey.
    rgb = np.repeat(images[:256], 3, axis=-1)
    np.testing.assert_allclose(dc.digits_fd(rgb), real, rtol=1e-5)


def test_digits_eval_reports_quality(digits, noise):
    eval_fn = dc.make_digits_eval(num_images=256)
    good = eval_fn(digits[0][:300])
    bad = eval_fn(noise)
    assert set(good) == {"digits_fd", "classifier_confidence", "confident_fraction", "classes_present", "num_images"}
    assert good["num_images"] == 256
    assert good["classes_present"] == 10 and bad["classes_present"] < 3
    assert good["classifier_confidence"] > 0.95
    assert bad["classifier_confidence"] < 0.5
    assert good["digits_fd"] < 0.1 * bad["digits_fd"]
    with pytest.raises(ValueError, match="256 images"):
        eval_fn(noise[:10])


def test_weights_round_trip(tmp_path):
    params, _ = dc.load_params()
    dc.save_params(tmp_path / "w.npz", params, heldout_accuracy=0.5)
    again, meta = dc.load_params(tmp_path / "w.npz")
    assert meta == {"heldout_accuracy": 0.5}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
