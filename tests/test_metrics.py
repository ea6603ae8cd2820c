"""Metrics as pure functions: checked against independent computations on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from dcgan.errors import UserError
from dcgan.feature_cache import StatsKey, cached_reference
from dcgan.metrics import (
    feature_stats,
    fid_from_features,
    frechet_distance,
    inception_score,
    kid_from_features,
    parzen_log_likelihood,
    parzen_select_sigma,
    precision_recall,
)


def _features(n: int, d: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / math.sqrt(d)  # correlated dimensions, a full covariance
    return (rng.normal(size=(n, d)) @ mix) * scale + shift


def _fid_scipy(f1: np.ndarray, f2: np.ndarray) -> float:
    """The textbook (pytorch-fid) formula with scipy.linalg.sqrtm on S1 S2."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# -- FID -----------------------------------------------------------------------------------


def test_fid_matches_scipy_sqrtm():
    f1 = _features(600, 32, seed=1)
    f2 = _features(500, 32, seed=2, scale=1.3, shift=0.2)
    ours, ref = fid_from_features(f1, f2), _fid_scipy(f1, f2)
    assert ref > 1.0
    assert ours == pytest.approx(ref, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_fid_is_symmetric():
    f1 = _features(300, 24, seed=3)
    f2 = _features(200, 24, seed=4, shift=0.5)
    assert abs(fid_from_features(f1, f1)) < 1e-6
    assert fid_from_features(f1, f2) == pytest.approx(fid_from_features(f2, f1), rel=1e-9)


def test_fid_is_real_and_finite_with_fewer_samples_than_dims():
    # 20 samples in 64 dims: both covariances are singular (rank 19).
    f1 = _features(20, 64, seed=5)
    f2 = _features(20, 64, seed=6, shift=0.3)
    value = fid_from_features(f1, f2)
    assert isinstance(value, float) and math.isfinite(value) and value > 0
    assert abs(fid_from_features(f1, f1)) < 1e-6
    # The singular case through the stats entry point with a rank-1 covariance.
    mu = np.zeros(8)
    s = np.outer(np.arange(8.0), np.arange(8.0))
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_two_known_gaussians():
    # N(0, I) vs N(m, 4I) in d dims: |m|^2 + d + 4d - 2 * 2d = |m|^2 + d.
    d = 5
    m = np.full(d, 0.5)
    value = frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d))
    assert value == pytest.approx(d * 0.25 + d, rel=1e-12)


def test_fid_bad_input():
    f = _features(10, 4, seed=0)
    with pytest.raises(UserError, match="at least 2"):
        fid_from_features(f[:1], f)
    with pytest.raises(UserError, match="different dimensions"):
        fid_from_features(f, f[:, :3])
    bad = f.copy()
    bad[3, 1] = np.nan
    with pytest.raises(UserError, match="NaN"):
        fid_from_features(f, bad)
    with pytest.raises(UserError, match="2-D"):
        fid_from_features(f[0], f)
    with pytest.raises(UserError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# -- feature statistics ---------------------------------------------------------------------


def test_feature_stats_match_numpy_when_the_mean_dwarfs_the_spread():
    # A large mean next to a small spread: where the naive sum-of-squares loses digits.
    f = _features(1000, 16, seed=7, scale=0.01, shift=1000.0).astype(np.float32)
    mu, sigma = feature_stats(f)
    ref64 = f.astype(np.float64)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, ref64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(ref64, rowvar=False), rtol=1e-9, atol=1e-15)


def test_feature_stats_bad_input():
    with pytest.raises(UserError, match="at least 2 samples"):
        feature_stats(np.zeros((1, 3)))
    with pytest.raises(UserError, match="2-D"):
        feature_stats(np.zeros((4, 2, 1)))
    with pytest.raises(UserError, match="NaN"):
        feature_stats(np.full((4, 3), np.inf))


# -- KID -----------------------------------------------------------------------------------


def _kid_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with explicit loops over pairs (tiny sets only)."""
    d, m = x.shape[1], x.shape[0]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_single_subset_matches_direct_formula():
    x = _features(12, 5, seed=8)
    y = _features(12, 5, seed=9, shift=0.4)
    # subset_size >= both sizes: every subset is a permutation of the whole set.
    mean, std = kid_from_features(x, y, subsets=3, subset_size=50)
    assert mean == pytest.approx(_kid_direct(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_near_zero_for_one_distribution_and_positive_for_two():
    # Two disjoint halves of one sample vs a shifted, wider distribution.
    same = _features(2000, 16, seed=10)
    other = _features(1000, 16, seed=10, scale=1.5, shift=0.5)
    m_same, s_same = kid_from_features(same[:1000], same[1000:], subsets=20, subset_size=500)
    m_diff, _ = kid_from_features(same[:1000], other, subsets=20, subset_size=500)
    assert abs(m_same) < 3 * s_same + 1e-3
    assert m_diff > 0.05 and m_diff > 20 * abs(m_same)


def test_kid_clips_subset_size_and_is_seeded():
    x, y = _features(30, 4, seed=14), _features(40, 4, seed=15, shift=1.0)
    assert kid_from_features(x, y, subset_size=1000, seed=3) == kid_from_features(
        x, y, subset_size=30, seed=3
    )
    assert kid_from_features(x, y, subsets=5, subset_size=10, seed=1) != kid_from_features(
        x, y, subsets=5, subset_size=10, seed=2
    )


# -- precision / recall ---------------------------------------------------------------------


def test_precision_recall_identical_and_disjoint_sets():
    real = _features(200, 8, seed=16)
    assert precision_recall(real, real.copy(), k=3, batch=37) == (1.0, 1.0)
    far = real + 1000.0
    assert precision_recall(real, far, k=3, batch=37) == (0.0, 0.0)


def test_precision_recall_mode_dropping():
    # Real: two clusters. Fake: only the first one. High precision, recall about 1/2.
    rng = np.random.default_rng(17)
    real = np.concatenate([rng.normal(size=(300, 2)), rng.normal(size=(300, 2)) + 50])
    fake = rng.normal(size=(300, 2))
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.9
    assert 0.4 < recall < 0.55


def test_precision_recall_independent_of_batch_size():
    real, fake = _features(150, 6, seed=18), _features(120, 6, seed=19, shift=0.3)
    assert precision_recall(real, fake, batch=1000) == precision_recall(real, fake, batch=7)


def test_precision_recall_counts_duplicates_as_neighbours():
    # Each real point appears 4 times: its 3rd neighbour is a duplicate at distance 0,
    # so only exact copies fall inside the balls.
    base = _features(20, 3, seed=20)
    real = np.repeat(base, 4, axis=0)
    precision, _ = precision_recall(real, base + 1e-3, k=3)
    assert precision == 0.0
    assert precision_recall(real, base, k=3)[0] == 1.0


def test_precision_recall_bad_input():
    with pytest.raises(UserError, match="more than 3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)), k=3)
    with pytest.raises(UserError, match="different dimensions"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 3)))


# -- Inception / classifier score -----------------------------------------------------------


def test_inception_score_extremes_and_logits_vs_probs():
    k = 10
    # Confident and evenly spread over classes: the score is the number of classes.
    confident = np.eye(k)[np.arange(100) % k]
    mean, std = inception_score(confident, splits=10, logits=False)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0, abs=1e-9)
    # Every image predicted uniform: the score is 1.
    assert inception_score(np.zeros((50, k)), splits=5)[0] == pytest.approx(1.0, abs=1e-12)
    # Logits and their softmax give the same score.
    z = np.random.default_rng(21).normal(size=(40, k)) * 3
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert inception_score(z, splits=4) == pytest.approx(
        inception_score(p, splits=4, logits=False), rel=1e-9
    )


def test_inception_score_direct_formula():
    z = np.random.default_rng(22).normal(size=(30, 4))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    py = p.mean(0)
    direct = math.exp(np.mean([(p[i] * np.log(p[i] / py)).sum() for i in range(30)]))
    assert inception_score(z, splits=1)[0] == pytest.approx(direct, rel=1e-10)


def test_inception_score_bad_input():
    with pytest.raises(UserError, match="splits"):
        inception_score(np.zeros((5, 3)), splits=10)
    with pytest.raises(UserError, match="sum to 1"):
        inception_score(np.full((5, 3), 0.5), splits=1, logits=False)


# -- Parzen window ---------------------------------------------------------------------------


def _parzen_direct(samples: np.ndarray, x: np.ndarray, sigma: float) -> float:
    """log (1/N sum_i N(x; s_i, sigma^2 I)), term by term."""
    d = samples.shape[1]
    dens = sum(math.exp(-((x - s) ** 2).sum() / (2 * sigma**2)) for s in samples)
    return math.log(dens / len(samples)) - d / 2 * math.log(2 * math.pi * sigma**2)


def test_parzen_matches_direct_formula():
    rng = np.random.default_rng(23)
    samples, test = rng.random((9, 4)), rng.random((7, 4))
    sigma = 0.3
    lls = np.array([_parzen_direct(samples, x, sigma) for x in test])
    mean, stderr = parzen_log_likelihood(samples, test, sigma, batch=2)
    assert mean == pytest.approx(lls.mean(), rel=1e-10)
    assert stderr == pytest.approx(lls.std() / math.sqrt(len(lls)), rel=1e-8)


def test_parzen_is_stable_far_from_every_kernel_and_batch_independent():
    # exp(-d^2 / 2 sigma^2) underflows to 0 here; log-sum-exp keeps the exact value.
    samples = np.zeros((5, 10))
    test = np.ones((3, 10))
    sigma = 0.05
    mean, _ = parzen_log_likelihood(samples, test, sigma)
    expected = -10 / (2 * sigma**2) - 5 * math.log(2 * math.pi * sigma**2)
    assert mean == pytest.approx(expected, rel=1e-12)
    rng = np.random.default_rng(24)
    s, t = rng.random((50, 6)), rng.random((30, 6))
    assert parzen_log_likelihood(s, t, 0.2, batch=1000)[0] == pytest.approx(
        parzen_log_likelihood(s, t, 0.2, batch=3)[0], rel=1e-12
    )


def test_parzen_select_sigma_picks_the_validation_best():
    rng = np.random.default_rng(25)
    samples = rng.normal(0.5, 0.1, size=(400, 2))
    validation = rng.normal(0.5, 0.1, size=(200, 2))
    sigmas = [0.001, 0.03, 3.0]
    best = parzen_select_sigma(samples, validation, sigmas)
    assert best == 0.03
    scores = [parzen_log_likelihood(samples, validation, s)[0] for s in sigmas]
    assert best == sigmas[int(np.argmax(scores))]


def test_parzen_bad_input():
    with pytest.raises(UserError, match="dimensions"):
        parzen_log_likelihood(np.zeros((3, 2)), np.zeros((3, 4)), 0.1)
    with pytest.raises(UserError, match="positive"):
        parzen_log_likelihood(np.zeros((3, 2)), np.zeros((3, 2)), 0.0)
    with pytest.raises(UserError, match="positive"):
        parzen_select_sigma(np.zeros((3, 2)), np.zeros((3, 2)), [])


# -- reference cache -------------------------------------------------------------------------


def test_cached_reference_key_covers_every_part(tmp_path):
    calls = []

    def compute_for(key):
        def compute():
            calls.append(key)
            return _features(50, 4, seed=len(calls)), None

        return compute

    base = StatsKey("fashion-mnist", "train", 32, 1, 50, "domain-x")
    first = cached_reference(base, compute_for(base), tmp_path)
    again = cached_reference(base, compute_for(base), tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.features, again.features)
    np.testing.assert_allclose(again.mu, first.features.astype(np.float64).mean(0), rtol=1e-12)
    variants = [
        StatsKey("mnist", "train", 32, 1, 50, "domain-x"),
        StatsKey("fashion-mnist", "test", 32, 1, 50, "domain-x"),
        StatsKey("fashion-mnist", "train", 64, 1, 50, "domain-x"),
        StatsKey("fashion-mnist", "train", 32, 3, 50, "domain-x"),
        StatsKey("fashion-mnist", "train", 32, 1, 60, "domain-x"),
        StatsKey("fashion-mnist", "train", 32, 1, 50, "inception-y"),
    ]
    for i, key in enumerate(variants):
        cached_reference(key, compute_for(key), tmp_path)
        assert len(calls) == i + 2, f"changing {key} did not recompute"
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 7
    assert not list((tmp_path / "stats").glob(".*tmp"))  # no temporary files left behind


def test_cached_reference_stores_logits_and_recovers_from_damage(tmp_path):
    key = StatsKey("emoji", "train", 64, 3, 20, "domain-z")
    logits = np.arange(40, dtype=np.float32).reshape(20, 2)
    ref = cached_reference(key, lambda: (_features(20, 3, seed=1), logits), tmp_path)
    np.testing.assert_array_equal(ref.logits, logits)
    path = next((tmp_path / "stats").glob("*.npz"))
    with np.load(path, allow_pickle=False) as z:  # no object arrays: loads without pickle
        assert set(z.files) == {"key", "features", "mu", "sigma", "logits"}
    path.write_bytes(b"not a zip file")
    calls = []
    again = cached_reference(
        key, lambda: calls.append(1) or (_features(20, 3, seed=1), None), tmp_path
    )
    assert calls == [1] and again.features.shape == (20, 3)
