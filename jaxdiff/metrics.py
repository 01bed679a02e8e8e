"""Sample-quality metrics: the Frechet distance between feature distributions (FID's formula).

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", arXiv:1706.08500) fits a Gaussian to the features of real and of generated images
and reports the Frechet (2-Wasserstein) distance between the two Gaussians::

    d^2 = ||mu_1 - mu_2||^2 + Tr(C_1 + C_2 - 2 (C_1 C_2)^{1/2})

The number depends on the feature extractor, the image resizing and dtype conventions, and the
number of samples (it is biased upwards for few samples), so compare only numbers computed the
same way. This module is extractor-agnostic: any ``features(images [N, H, W, C] in [0, 1]) ->
[N, D]`` works. :mod:`jaxdiff.digits_classifier` ships a pinned extractor for the digits data
set (Inception weights are not available offline).

Host-side numpy, float64 throughout: the matrix square root is ill-conditioned and float32
round-off visibly moves FID.

Example::

    stats_real = FeatureStats.from_features(features(real_images))
    stats_fake = FeatureStats(dim=64)
    for batch in batches:                    # any split gives the same statistics
        stats_fake.update(features(batch))
    fd = frechet_distance(*stats_real.mean_cov(), *stats_fake.mean_cov())
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import numpy.typing as npt
import scipy.linalg


def frechet_distance(
    mu1: npt.ArrayLike,
    cov1: npt.ArrayLike,
    mu2: npt.ArrayLike,
    cov2: npt.ArrayLike,
    *,
    eps: float = 1e-6,
) -> float:
    """Frechet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)`` (FID's formula), float64.

    ``d^2 = ||mu1 - mu2||^2 + Tr(cov1) + Tr(cov2) - 2 Tr((cov1 cov2)^{1/2})``.

    As the reference implementations (TTUR's ``fid.py``, ``pytorch-fid``) do: the square root is
    ``scipy.linalg.sqrtm`` of the product; if it is not finite or scipy reports the product
    singular (e.g. fewer samples than feature dimensions), ``eps * I`` is added to both covariances and the root
    recomputed; a complex result whose diagonal has imaginary parts above 1e-3 is an error,
    smaller imaginary parts (round-off) are dropped.

    Args:
      mu1, mu2: means ``[D]``.
      cov1, cov2: covariances ``[D, D]`` (symmetric positive semi-definite).
      eps: the diagonal offset used when the product is singular.

    Returns:
      The squared distance ``d^2`` as a Python float (what is reported as "FID").

    Example:
      >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2))  # 2 + 2 (1 + 4 - 2 * 2)
      4.0
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must both be [D], got {mu1.shape} and {mu2.shape}.")
    d = mu1.shape[0]
    if cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"covariances must both be [{d}, {d}], got {cov1.shape} and {cov2.shape}.")

    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    singular = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    if singular or not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if max_imag > 1e-3:
            raise ValueError(f"sqrtm(cov1 @ cov2) has an imaginary component {max_imag:.3g} (> 1e-3).")
        covmean = covmean.real
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


@dataclasses.dataclass
class FeatureStats:
    """Running mean and covariance of features, accumulated batch by batch in float64.

    Keeps ``n``, ``s = sum_i f_i`` and ``S = sum_i f_i f_i^T``; then ``mean = s / n`` and the
    unbiased covariance ``cov = (S - n mean mean^T) / (n - 1)`` (``np.cov`` of the rows). The
    result does not depend on how the features were split into batches, and two accumulators
    :meth:`merge` into the statistics of the union (e.g. one per host).

    Example:
      >>> rows = np.arange(12.0).reshape(4, 3) ** 2
      >>> stats = FeatureStats(dim=3).update(rows[:1]).update(rows[1:])
      >>> bool(np.allclose(stats.cov, np.cov(rows, rowvar=False)))
      True
    """

    dim: int
    count: int = 0
    sum: np.ndarray | None = None  # [D] float64
    sum_outer: np.ndarray | None = None  # [D, D] float64

    def __post_init__(self):
        if self.sum is None:
            self.sum = np.zeros((self.dim,), np.float64)
        if self.sum_outer is None:
            self.sum_outer = np.zeros((self.dim, self.dim), np.float64)

    @classmethod
    def from_features(cls, features: npt.ArrayLike) -> FeatureStats:
        """Statistics of one ``[N, D]`` array."""
        features = np.asarray(features)
        return cls(dim=features.shape[-1]).update(features)

    def update(self, features: npt.ArrayLike) -> FeatureStats:
        """Adds a batch ``[N, D]`` (any N, including 0); returns ``self`` for chaining."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must be [N, {self.dim}], got shape {f.shape}.")
        if not np.isfinite(f).all():
            raise ValueError("features contain NaN or infinity.")
        self.count += f.shape[0]
        self.sum += f.sum(axis=0)
        self.sum_outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """The statistics of both accumulators' features together (a new object)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}.")
        return FeatureStats(
            dim=self.dim,
            count=self.count + other.count,
            sum=self.sum + other.sum,
            sum_outer=self.sum_outer + other.sum_outer,
        )

    @property
    def mean(self) -> np.ndarray:
        """``s / n``, ``[D]`` float64."""
        if self.count < 1:
            raise ValueError("no features accumulated yet.")
        return self.sum / self.count

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance ``(S - n mean mean^T) / (n - 1)``, ``[D, D]`` float64."""
        if self.count < 2:
            raise ValueError(f"the covariance needs at least 2 feature vectors, have {self.count}.")
        mean = self.mean
        cov = (self.sum_outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return (cov + cov.T) / 2.0  # exactly symmetric despite round-off

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, cov)``, ready for :func:`frechet_distance`."""
        return self.mean, self.cov
