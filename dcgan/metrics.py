"""Sample-quality metrics as small pure functions over feature arrays.

Every function takes numpy arrays of shape (N, D) (one row per image) and works
in float64 whatever the input dtype, so results do not depend on the batch size
the features were computed with. Feature extraction lives in `dcgan.features`;
the command behind `dcgan eval` in `dcgan.evaluate`, and what it calls each metric
(its inputs, JSON fields and table rows) in `dcgan.metric_registry`.

- FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to two
  feature sets. The matrix square root is taken on a symmetric matrix through
  an eigendecomposition, so it is real and finite even when N < D.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel,
  averaged over random subsets.
- Precision / recall (Kynkaanniemi et al. 2019): k-NN balls around each sample.
- Inception Score (Salimans et al. 2016) over class logits or probabilities;
  with the domain classifier it is called the classifier score.
- Parzen-window log-likelihood (Goodfellow et al. 2014) on pixels in [0, 1].
- `feature_stats`: float64 mean and covariance of a feature set.

No I/O here: the cache of reference features is `dcgan.feature_cache`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dcgan.errors import UserError

# ----------------------------------------------------------------------------------------------
# Input checks


def as_features(x: np.ndarray, what: str = "features", min_samples: int = 2) -> np.ndarray:
    """Check a (N, D) feature array and return it as float64.

    Raises UserError for a wrong rank, fewer than `min_samples` rows or any
    non-finite value, since each would otherwise give a silently wrong number.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise UserError(f"{what} must be a 2-D array (samples, dims), got shape {x.shape}")
    if x.shape[0] < min_samples:
        raise UserError(f"{what}: need at least {min_samples} samples, got {x.shape[0]}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise UserError(f"{what}: {bad} of {x.shape[0]} samples contain NaN or inf")
    return x


def _same_dim(a: np.ndarray, b: np.ndarray, what: str = "features") -> None:
    if a.shape[1] != b.shape[1]:
        raise UserError(f"{what} have different dimensions: {a.shape[1]} vs {b.shape[1]}")


# ----------------------------------------------------------------------------------------------
# Streaming mean / covariance


def feature_stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,), unbiased covariance (D, D), both float64.

    The rows are centred before the product (in float64), which avoids the
    cancellation of the naive sum(x x^T) - n mu mu^T when the mean is large
    relative to the spread.
    """
    x = as_features(f)
    mu = x.mean(axis=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


# ----------------------------------------------------------------------------------------------
# FID


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix via eigh.

    Rounding can leave tiny negative eigenvalues (always, when N < D); they are
    clipped to 0 so the root stays real.
    """
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).
    tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the
    eigenvalues of the symmetric PSD matrix L^T S2 L (S1 = L L^T), which has
    the same eigenvalues as S1 S2. Unlike scipy.linalg.sqrtm on the non-symmetric
    S1 S2 this never yields complex values, so the result is a finite float >= 0.
    """
    mu1 = np.asarray(mu1, dtype=np.float64).reshape(-1)
    mu2 = np.asarray(mu2, dtype=np.float64).reshape(-1)
    sigma1 = np.asarray(sigma1, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    d = mu1.shape[0]
    if mu2.shape[0] != d or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise UserError(
            f"statistics have mismatched shapes: mu {mu1.shape} / {mu2.shape}, "
            f"sigma {sigma1.shape} / {sigma2.shape}"
        )
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise UserError(f"{name} contains NaN or inf")
    # Any factor S1 = L L^T works: L^T S2 L is symmetric PSD with the eigenvalues
    # of S1 S2. Cholesky is several times cheaper than an eigendecomposition at
    # D = 2048; a singular S1 (always when N <= D) falls back to the PSD root.
    try:
        factor = np.linalg.cholesky(sigma1)
    except np.linalg.LinAlgError:
        factor = _sqrt_psd(sigma1)
    m = factor.T @ sigma2 @ factor  # (D, D), symmetric PSD up to rounding
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    fid = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    # Equal inputs give -1e-12-sized rounding noise; a distance is never negative.
    return max(fid, 0.0)


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two (N, D) feature sets (N may differ between them)."""
    f1, f2 = as_features(f1, "first features"), as_features(f2, "second features")
    _same_dim(f1, f2)
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


# ----------------------------------------------------------------------------------------------
# KID


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / D + 1)^3 for all row pairs: (m, D), (m, D) -> (m, m)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between two (m, D) samples of the same size m >= 2."""
    m = x.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    # Within-set terms leave out the diagonal k(x_i, x_i) (that is what makes
    # the estimate unbiased); the cross term averages all m^2 pairs.
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


def kid_from_features(
    f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and standard deviation of MMD^2 over `subsets` random subsets.

    Each subset draws `subset_size` rows without replacement from each set,
    clipped to the smaller set. The estimate is unbiased, so it can be slightly
    negative for two samples of one distribution.
    """
    f1, f2 = as_features(f1, "first features"), as_features(f2, "second features")
    _same_dim(f1, f2)
    if subsets < 1:
        raise UserError(f"KID needs at least one subset, got {subsets}")
    m = min(subset_size, f1.shape[0], f2.shape[0])
    if m < 2:
        raise UserError(f"KID subset size must be at least 2, got {m}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets, dtype=np.float64)
    for i in range(subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        values[i] = mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std())


# ----------------------------------------------------------------------------------------------
# Precision / recall


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (A, D), (B, D) -> (A, B), float64, clipped at 0."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d, 0.0)


def knn_radii(x: np.ndarray, k: int = 3, batch: int = 1000) -> np.ndarray:
    """Squared distance from each row of x to its k-th nearest other row, (N,)."""
    n = x.shape[0]
    if n <= k:
        raise UserError(f"k-NN with k={k} needs more than {k} samples, got {n}")
    radii = np.empty(n, dtype=np.float64)
    for s in range(0, n, batch):
        d = _sq_dists(x[s : s + batch], x)  # (b, N)
        # The point itself sits at distance 0 in its own row: force it first so
        # that a duplicate elsewhere counts as a genuine neighbour.
        rows = np.arange(d.shape[0])
        d[rows, s + rows] = -1.0
        radii[s : s + batch] = np.partition(d, k, axis=1)[:, k]
    return radii


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch: int) -> float:
    """Fraction of `points` inside at least one ball (centre_j, radius_j)."""
    inside = 0
    for s in range(0, points.shape[0], batch):
        d = _sq_dists(points[s : s + batch], centres)  # (b, M)
        inside += int((d <= radii[None, :]).any(axis=1).sum())
    return inside / points.shape[0]


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 1000
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    The real manifold is the union of balls around each real feature reaching
    its k-th nearest real neighbour; precision is the fraction of fake features
    inside it. Recall swaps the roles. Distances are computed `batch` rows at a
    time, so memory is O(batch * N).
    """
    real, fake = as_features(real, "real features"), as_features(fake, "fake features")
    _same_dim(real, fake)
    if k < 1:
        raise UserError(f"k must be at least 1, got {k}")
    precision = _coverage(fake, real, knn_radii(real, k, batch), batch)
    recall = _coverage(real, fake, knn_radii(fake, k, batch), batch)
    return precision, recall


# ----------------------------------------------------------------------------------------------
# Inception Score / classifier score


def inception_score(
    scores: np.ndarray, splits: int = 10, logits: bool = True
) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))): mean and std over `splits` consecutive splits.

    scores: (N, classes) logits (`logits=True`) or probabilities. The same
    formula over the domain classifier's softmax is reported as the
    "classifier score"; its maximum is the number of classes.
    """
    scores = as_features(scores, "class scores")
    if scores.shape[1] < 2:
        raise UserError("the Inception Score needs at least 2 classes")
    if not 1 <= splits <= scores.shape[0]:
        raise UserError(f"splits must be between 1 and the {scores.shape[0]} samples, got {splits}")
    if logits:
        z = scores - scores.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # log softmax, (N, K)
    else:
        if (scores < 0).any() or not np.allclose(scores.sum(axis=1), 1.0, atol=1e-4):
            raise UserError("probabilities must be non-negative and sum to 1 per row")
        logp = np.log(np.clip(scores, 1e-300, None))
    p = np.exp(logp)
    values = []
    for idx in np.array_split(np.arange(scores.shape[0]), splits):
        py = p[idx].mean(axis=0)  # marginal p(y) over the split, (K,)
        kl = (p[idx] * (logp[idx] - np.log(np.clip(py, 1e-300, None)))).sum(axis=1)
        values.append(math.exp(kl.mean()))
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------------------------
# Parzen window log-likelihood


def _parzen_log_densities(
    samples: np.ndarray, test: np.ndarray, sigmas: Sequence[float], batch: int
) -> np.ndarray:
    """log p_sigma(x) for each test row and each sigma: (len(sigmas), T).

    p_sigma(x) = 1/N sum_i N(x; s_i, sigma^2 I). Test rows and samples are both
    taken `batch` at a time; the sum over samples is a running log-sum-exp so
    no (T, N) matrix is ever held.
    """
    n, d = samples.shape
    sig = np.asarray(sigmas, dtype=np.float64)  # (S,)
    out = np.empty((sig.shape[0], test.shape[0]), dtype=np.float64)
    inv2s2 = 1.0 / (2.0 * sig**2)  # (S,)
    norm = -math.log(n) - 0.5 * d * np.log(2 * math.pi * sig**2)  # (S,)
    for t0 in range(0, test.shape[0], batch):
        x = np.asarray(test[t0 : t0 + batch], dtype=np.float64)  # (b, D)
        run_max = np.full((sig.shape[0], x.shape[0]), -np.inf)
        run_sum = np.zeros((sig.shape[0], x.shape[0]))
        for s0 in range(0, n, batch):
            s = np.asarray(samples[s0 : s0 + batch], dtype=np.float64)  # (c, D)
            e = -_sq_dists(x, s)[None] * inv2s2[:, None, None]  # (S, b, c) exponents
            m = np.maximum(run_max, e.max(axis=2))
            run_sum = run_sum * np.exp(run_max - m) + np.exp(e - m[:, :, None]).sum(axis=2)
            run_max = m
        out[:, t0 : t0 + x.shape[0]] = run_max + np.log(run_sum) + norm[:, None]
    return out


def _check_parzen(samples: np.ndarray, other: np.ndarray, what: str) -> None:
    for name, a in (("samples", samples), (what, other)):
        if a.ndim != 2 or a.shape[0] < 1:
            raise UserError(f"Parzen {name} must be a non-empty (N, D) array, got {a.shape}")
    if samples.shape[1] != other.shape[1]:
        raise UserError(
            f"Parzen samples and {what} have different dimensions: "
            f"{samples.shape[1]} vs {other.shape[1]}"
        )


def parzen_log_likelihood(
    samples: np.ndarray, test: np.ndarray, sigma: float, batch: int = 500
) -> tuple[float, float]:
    """Mean log-likelihood of `test` under a Gaussian Parzen window on `samples`.

    samples: (N, D) generated images, test: (T, D) held-out images, both
    flattened pixels scaled to [0, 1] as in Goodfellow et al. (2014). Returns
    (mean, standard error) in nats, the standard error being std / sqrt(T)
    with the population std, as in their parzen_ll.py.
    """
    samples, test = np.asarray(samples), np.asarray(test)
    _check_parzen(samples, test, "test")
    if not sigma > 0:
        raise UserError(f"Parzen sigma must be positive, got {sigma}")
    ll = _parzen_log_densities(samples, test, [sigma], batch)[0]
    return float(ll.mean()), float(ll.std() / math.sqrt(ll.shape[0]))


PARZEN_SIGMAS = tuple(float(s) for s in np.logspace(-1.0, 0.0, 10))  # Goodfellow's grid


def parzen_select_sigma(
    samples: np.ndarray,
    validation: np.ndarray,
    sigmas: Sequence[float] = PARZEN_SIGMAS,
    batch: int = 500,
) -> float:
    """The sigma in `sigmas` that maximises the mean validation log-likelihood."""
    samples, validation = np.asarray(samples), np.asarray(validation)
    _check_parzen(samples, validation, "validation")
    if len(sigmas) == 0 or min(sigmas) <= 0:
        raise UserError("Parzen sigmas must be a non-empty list of positive numbers")
    ll = _parzen_log_densities(samples, validation, sigmas, batch).mean(axis=1)
    return float(sigmas[int(np.argmax(ll))])
