"""The similarity math: CKA, SVCCA, PWCCA, held-out CCA, and their fast paths."""
from __future__ import annotations

import numpy as np
import pytest

from featstore.cv import cca_folds
from probes.similarity import (HeldOutCCA, OneHotCKA, canonical_correlations, fit_cca, fit_cca_onehot,
                               heldout_cca, linear_cka, one_hot, pwcca, pwcca_weights, svcca,
                               svd_reduce)


def _rotation(p: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(p, p)))
    return q


@pytest.fixture()
def related():
    """X (300 x 20) and Y (300 x 8) sharing 5 latent directions plus noise."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 20)) * np.linspace(3, 0.5, 20)
    Y = X[:, :5] @ rng.normal(size=(5, 8)) + 0.5 * rng.normal(size=(300, 8))
    return X, Y, rng


def test_identical_spaces_score_one(related):
    X, _, rng = related
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, X, debiased=True) == pytest.approx(1.0, abs=1e-12)
    assert svcca(X, X) == pytest.approx(1.0, abs=1e-9)
    assert pwcca(X, X) == pytest.approx(1.0, abs=1e-9)
    assert heldout_cca(X, X, method="svcca") == pytest.approx(1.0, abs=1e-9)
    assert heldout_cca(X, X, method="pwcca") == pytest.approx(1.0, abs=1e-9)


def test_invariance_to_rotation_isotropic_scaling_and_shift(related):
    X, Y, rng = related
    Xr = 3.7 * X @ _rotation(X.shape[1], rng) + 5.0
    assert linear_cka(Xr, Y) == pytest.approx(linear_cka(X, Y), abs=1e-10)
    assert linear_cka(Xr, Y, debiased=True) == pytest.approx(linear_cka(X, Y, debiased=True), abs=1e-10)
    assert svcca(Xr, Y) == pytest.approx(svcca(X, Y), abs=1e-9)
    assert heldout_cca(Xr, Y) == pytest.approx(heldout_cca(X, Y), abs=1e-9)
    # CKA is not invariant to anisotropic scaling; SVCCA with all components kept is
    D = np.diag(np.linspace(0.2, 5, X.shape[1]))
    assert abs(linear_cka(X @ D, Y) - linear_cka(X, Y)) > 0.05
    assert svcca(X @ D, Y, keep=1.0, max_dims=20) == pytest.approx(svcca(X, Y, keep=1.0, max_dims=20), abs=1e-9)
    assert 0.4 < linear_cka(X, Y) < 1 and 0.4 < svcca(X, Y) < 1


def test_independent_spaces_heldout_near_zero():
    rng = np.random.default_rng(1)
    X, Z = rng.normal(size=(600, 30)), rng.normal(size=(600, 30))
    assert abs(heldout_cca(X, Z, method="svcca")) < 0.05
    assert abs(heldout_cca(X, Z, method="pwcca")) < 0.05
    # wide data: biased CKA is far from 0, the debiased estimate is not
    W1, W2 = rng.normal(size=(50, 500)), rng.normal(size=(50, 500))
    assert linear_cka(W1, W2) > 0.8
    assert abs(linear_cka(W1, W2, debiased=True)) < 0.1


def test_insample_cca_overfits_shuffled_labels_heldout_does_not():
    insample, heldout, default = [], [], []
    for seed in range(4):
        rng = np.random.default_rng(seed)
        X = rng.normal(size=(100, 90))
        labels = rng.permutation(np.repeat(["a", "b", "c", "d"], 25))  # unrelated to X
        Y, _ = one_hot(labels)
        insample.append(svcca(X, Y, keep=1.0, max_dims=90, reduce_y=False))
        assert canonical_correlations(X, Y).min() > 0.85
        heldout.append(heldout_cca(X, labels, keep=1.0, max_dims=90, seed=seed))
        default.append(heldout_cca(X, labels, seed=seed))  # default reduction: min(50, n // 10) dims
    assert min(insample) > 0.9
    assert abs(np.mean(heldout)) < 0.1 and max(np.abs(heldout)) < 0.25
    assert abs(np.mean(default)) < 0.1 and max(np.abs(default)) < 0.25


def test_svd_reduce_keeps_variance_and_caps_dims():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 10)) @ np.diag([10, 5, 3, 2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    red = svd_reduce(X, keep=0.99)
    assert red.dims == 4 and red.explained >= 0.99
    assert svd_reduce(X, keep=0.99, max_dims=2).dims == 2
    assert svd_reduce(np.c_[X, X[:, 0]], keep=1.0, max_dims=50).dims == 10  # never a null direction
    assert np.allclose(red.transform(X), red.scores)
    assert svd_reduce(X[:30], keep=1.0).dims == 3  # default cap n // 10
    with pytest.raises(ValueError, match="X has no variance"):
        svd_reduce(np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        svd_reduce(X, keep=1.5)


def test_cca_handles_rank_deficient_one_hot_and_matches_class_sum_solution(related):
    X, _, rng = related
    codes = rng.integers(0, 4, len(X))
    X = X[:, :6] + np.eye(6)[codes % 6] * 2
    Y, classes = one_hot(codes)
    assert Y.shape == (300, 4) and list(classes) == ["0", "1", "2", "3"]
    full, fast = fit_cca(X, Y), fit_cca_onehot(X, codes)
    assert len(full.correlations) == 3  # centred one-hot has rank 3
    np.testing.assert_allclose(fast.correlations, full.correlations, atol=1e-10)
    Xt, ct = X[:50] + rng.normal(size=(50, 6)), codes[:50]
    np.testing.assert_allclose(fast.score(Xt, one_hot(ct)[0]), full.score(Xt, one_hot(ct)[0]), atol=1e-8)
    # a class missing from the fitting rows: one pair fewer, no error
    keep = codes != 3
    assert len(fit_cca(X[keep], Y[keep]).correlations) == 2
    assert len(fit_cca_onehot(X[keep], codes[keep], n_classes=4).correlations) == 2


def test_weights_equal_repeated_rows(related):
    X, Y, rng = related
    w = rng.integers(0, 3, len(X)).astype(float)
    rows = np.repeat(np.arange(len(X)), w.astype(int))
    a, b = fit_cca(X, Y, weights=w), fit_cca(X[rows], Y[rows])
    np.testing.assert_allclose(a.correlations, b.correlations, atol=1e-10)
    np.testing.assert_allclose(pwcca_weights(a, X, weights=w), pwcca_weights(b, X[rows]), atol=1e-10)
    with pytest.raises(ValueError, match="weights must be 300 finite non-negative numbers"):
        fit_cca(X, Y, weights=-w)


def test_heldout_bootstrap_weights_match_resampled_rows():
    rng = np.random.default_rng(4)
    g = np.repeat(np.arange(20), 6)
    codes = (g % 3).astype(np.int64)
    X = rng.normal(size=(120, 5)) + np.eye(5)[codes] * 1.5
    folds = cca_folds(g, 4, seed=0)
    m = np.bincount(rng.integers(0, 20, 20), minlength=20).astype(float)
    got = HeldOutCCA(X, codes).scores(folds, m[g][None, :])
    rows = np.repeat(np.arange(120), m[g].astype(int))
    expect = HeldOutCCA(X[rows], codes[rows]).run(folds[rows])
    assert got["svcca"][0] == pytest.approx(expect["svcca"], abs=1e-10)
    assert got["pwcca"][0] == pytest.approx(expect["pwcca"], abs=1e-6)  # float32 projection weights
    assert 0.3 < expect["svcca"] < 1
    # the per-speaker shortcut for PWCCA gives the same numbers, also for items split within speakers
    fast = HeldOutCCA(X, codes, groups=g)
    for f in (folds, cca_folds(g, 3, seed=1, within=True)):
        a, b = fast.scores(f, m[g][None, :]), HeldOutCCA(X, codes).scores(f, m[g][None, :])
        assert a["pwcca"][0] == pytest.approx(b["pwcca"][0], abs=1e-6)
    other = fast.with_target(g % 2)
    assert other.run(folds)["svcca"] == pytest.approx(HeldOutCCA(X, g % 2).run(folds)["svcca"], abs=1e-12)


def test_onehot_cka_matches_explicit_cka_with_and_without_resampling():
    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(15), 4)
    X = rng.normal(size=(60, 7)) + rng.normal(size=(15, 7))[g]
    labels = rng.integers(0, 3, 15)[g]
    ok = OneHotCKA(X, g)
    for codes in (labels, g):
        Y, _ = one_hot(codes)
        assert ok.scores(codes)[0] == pytest.approx(linear_cka(X, Y), abs=1e-12)
        M = np.stack([np.bincount(rng.integers(0, 15, 15), minlength=15) for _ in range(3)])
        got = ok.scores(codes, M)
        for b in range(3):
            rows = np.concatenate([np.flatnonzero(g == s) for s in range(15) for _ in range(M[b, s])])
            assert got[b] == pytest.approx(linear_cka(X[rows], Y[rows]), abs=1e-10)
    assert np.isnan(ok.scores(np.zeros(60, dtype=np.int64))[0])  # one class: undefined


def test_bad_input_messages():
    with pytest.raises(ValueError, match="X and Y must hold the same items: 5 rows vs 4"):
        linear_cka(np.ones((5, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="X holds non-finite values"):
        svcca(np.full((5, 2), np.nan), np.ones((5, 2)))
    with pytest.raises(ValueError, match="debiased CKA|need at least 4 items"):
        linear_cka(np.ones((3, 2)), np.ones((3, 2)), debiased=True)
    assert np.isnan(linear_cka(np.ones((5, 2)), np.arange(10.0).reshape(5, 2)))
