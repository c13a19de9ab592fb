"""Representation similarity: linear CKA, SVCCA, PWCCA and held-out CCA (numpy only).

Every function takes two matrices with the same items in rows, ``X (n, p)`` and ``Y (n, q)``
(a layer's vectors, another layer's, or a one-hot encoding of a label, see :func:`one_hot`).

* :func:`linear_cka` -- centred kernel alignment with linear kernels (Kornblith et al. 2019):
  ``||Yc' Xc||_F^2 / (||Xc' Xc||_F ||Yc' Yc||_F)``; ``debiased=True`` uses the unbiased HSIC
  estimator (Song et al. 2012), whose value for independent spaces is ~0 even when ``p >~ n``.
* :func:`svcca` -- SVD-reduce each side to the components that keep ``keep`` of the variance (and
  at most ``max_dims``, default :func:`default_max_dims`), then CCA; the mean canonical correlation
  (Raghu et al. 2017).
* :func:`pwcca` -- the canonical correlations weighted by how much of ``X``'s neurons each
  canonical variate accounts for (Morcos et al. 2018).
* :func:`heldout_cca` / :class:`HeldOutCCA` -- CCA directions fitted on training folds, the
  correlations measured on held-out items. In-sample CCA with a reduced dimension close to ``n``
  reports ~1 even for shuffled labels; the held-out score of unrelated spaces is ~0.

CCA (:func:`fit_cca`) works on centred data: an orthonormal basis of each side by QR (SVD where a
side is rank-deficient, e.g. a full one-hot encoding), then the SVD of ``Qx' Qy``, whose singular
values are the canonical correlations. Against a one-hot target, :func:`fit_cca_onehot` gives the
same result from X's Gram matrix (Cholesky) and per-class sums, without forming the encoding.
All fits accept row weights (= repeated rows), which is how bootstrap draws are refitted.

The analysis (``probes.analysis``) reuses the costly parts: one SVD per layer serves every target,
permutation and bootstrap draw (CCA then runs on ``n x k`` matrices, ``k <= 50``; a bootstrap draw
is a refit with row weights, :meth:`HeldOutCCA.scores`), and :class:`OneHotCKA` evaluates CKA
against one-hot targets for many speaker-bootstrap draws from a speaker-by-speaker summary of the
Gram matrix.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from featstore.cv import cca_folds

#: relative tolerance under which a singular value counts as zero
RANK_TOL = 1e-9


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _as2d(X: np.ndarray, name: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (items, features) array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError(f"{name} holds non-finite values")
    return X


def _pair(X: np.ndarray, Y: np.ndarray, min_items: int = 2) -> tuple[np.ndarray, np.ndarray]:
    X, Y = _as2d(X, "X"), _as2d(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must hold the same items: {X.shape[0]} rows vs {Y.shape[0]}")
    if X.shape[0] < min_items:
        raise ValueError(f"need at least {min_items} items, got {X.shape[0]}")
    return X, Y


def center(X: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """``X`` minus its column means (weighted means when ``weights`` is given)."""
    X = np.asarray(X, dtype=np.float64)
    if weights is None:
        return X - X.mean(axis=0)
    w = np.asarray(weights, dtype=np.float64)
    return X - (w @ X) / w.sum()


def one_hot(values: Sequence | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-hot encoding ``(n, n_classes)`` (all columns, classes sorted) and the class names.

    All columns are kept: CKA uses the full encoding (the kernel "same class or not"); CCA sees
    that the centred encoding has rank ``n_classes - 1`` and handles it.
    """
    classes, codes = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    Y = np.zeros((len(codes), len(classes)))
    Y[np.arange(len(codes)), codes] = 1.0
    return Y, classes


def default_max_dims(n: int) -> int:
    """Cap on the SVD-reduced dimension: ``min(50, n // 10)`` (at least 1), far below ``n``."""
    return max(1, min(50, n // 10))


# ---------------------------------------------------------------------------------------------
# Linear CKA
# ---------------------------------------------------------------------------------------------
def _hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Unbiased HSIC estimator (Song et al. 2012) of two Gram matrices (diagonals ignored)."""
    n = K.shape[0]
    K = K.copy()
    L = L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    ks, ls = K.sum(axis=0), L.sum(axis=0)
    value = (K * L).sum() + ks.sum() * ls.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (ks @ ls)
    return float(value / (n * (n - 3)))


def linear_cka(X: np.ndarray, Y: np.ndarray, debiased: bool = False) -> float:
    """Linear CKA in [0, 1]; 1 for spaces equal up to rotation, isotropic scaling and shifts.

    NaN when a side has no variance. ``debiased=True`` needs at least 4 items and can be
    slightly negative for unrelated spaces.
    """
    X, Y = _pair(X, Y, 4 if debiased else 2)
    X, Y = center(X), center(Y)
    n, p, q = X.shape[0], X.shape[1], Y.shape[1]
    if debiased:
        K, L = X @ X.T, Y @ Y.T
        hxy, hxx, hyy = _hsic_unbiased(K, L), _hsic_unbiased(K, K), _hsic_unbiased(L, L)
        den = np.sqrt(hxx * hyy) if hxx > 0 and hyy > 0 else 0.0
        return float(hxy / den) if den > 0 else float("nan")
    if n * n * (p + q) < n * (p * p + q * q + p * q):  # Gram form is cheaper (n < p, q)
        K, L = X @ X.T, Y @ Y.T
        num, dx, dy = (K * L).sum(), np.linalg.norm(K), np.linalg.norm(L)
    else:
        num = np.linalg.norm(Y.T @ X) ** 2
        dx, dy = np.linalg.norm(X.T @ X), np.linalg.norm(Y.T @ Y)
    return float(num / (dx * dy)) if dx > 0 and dy > 0 else float("nan")


class OneHotCKA:
    """Linear CKA of one representation against one-hot targets under group-bootstrap weights.

    A speaker bootstrap draws speakers with replacement: item ``i`` of speaker ``s`` then counts
    ``m[s]`` times. CKA on the resampled rows equals CKA with item weights ``w_i = m[s(i)]``,
    weighted centring included. With ``G[s, t] = sum_{i in s, j in t} (x_i . x_j)^2`` computed once
    (one pass over the Gram matrix, in blocks), each draw costs ``O(n p)`` instead of ``O(n^2 p)``::

        ||Xc' D Xc||^2 = m' G m - 2 W sum_i w_i a_i^2 + W^2 b^2,  a = X X' w / W,  b = w'a / W
        ||Xc' D Yc||^2 = sum_c ||X' D y_c - q_c X' w / W||^2,      q_c = sum_{i in c} w_i
        ||Yc' D Yc||^2 = sum q^2 - 2 sum q^3 / W + (sum q^2)^2 / W^2

    with ``D = diag(w)`` and ``W = sum w``.
    """

    def __init__(self, X: np.ndarray, groups: np.ndarray, block: int = 2048):
        X = center(_as2d(X))
        groups = np.asarray(groups)
        if groups.shape != (X.shape[0],) or groups.dtype.kind not in "iu":
            raise ValueError("groups must be one integer code (0..S-1) per row of X")
        self.X = X
        self.groups = groups.astype(np.int64)
        self.n_groups = int(groups.max()) + 1 if len(groups) else 0
        P = np.zeros((X.shape[0], self.n_groups))
        P[np.arange(X.shape[0]), self.groups] = 1.0
        G = np.zeros((self.n_groups, self.n_groups))
        for lo in range(0, X.shape[0], block):
            K2 = (X[lo : lo + block] @ X.T) ** 2
            G += P[lo : lo + block].T @ (K2 @ P)
        self.G = G
        self._xx_cache: dict = {}

    def _weights(self, M: np.ndarray | None) -> np.ndarray:
        if M is None:
            return np.ones((1, self.n_groups))
        M = np.asarray(M, dtype=np.float64)
        return M[None, :] if M.ndim == 1 else M

    def x_self(self, M: np.ndarray | None = None) -> np.ndarray:
        """``||Xc' D Xc||_F^2`` for each row of group multiplicities ``M`` (``(B, S)``)."""
        M = self._weights(M)
        key = (M.shape, M.tobytes())
        if key in self._xx_cache:
            return self._xx_cache[key]
        w = M[:, self.groups]
        W = w.sum(axis=1)
        t1 = np.einsum("bs,st,bt->b", M, self.G, M)
        a = (w @ self.X) @ self.X.T / W[:, None]
        b = (w * a).sum(axis=1) / W
        value = t1 - 2.0 * W * (w * a * a).sum(axis=1) + W**2 * b**2
        if len(self._xx_cache) > 8:
            self._xx_cache.clear()
        self._xx_cache[key] = value
        return value

    def scores(self, codes: np.ndarray, M: np.ndarray | None = None) -> np.ndarray:
        """CKA against the one-hot encoding of integer ``codes`` for each row of ``M`` (default: no
        resampling); returns ``(B,)``, NaN where a draw leaves one class only."""
        M = self._weights(M)
        codes = np.asarray(codes, dtype=np.int64)
        w = M[:, self.groups]
        W = w.sum(axis=1)
        z = w @ self.X
        # items summed per (group, class) cell, so a draw costs O(cells * p), not O(n * p) per class
        n_classes = int(codes.max()) + 1
        cell, cell_idx = np.unique(self.groups * n_classes + codes, return_inverse=True)
        order = np.argsort(cell_idx, kind="stable")
        counts = np.bincount(cell_idx, minlength=len(cell)).astype(np.float64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        sums = np.add.reduceat(self.X[order], starts, axis=0)
        cell_group, cell_class = cell // n_classes, cell % n_classes
        Mc = M[:, cell_group]
        cross = np.zeros(M.shape[0])
        q = np.zeros((M.shape[0], n_classes))
        for c in range(n_classes):
            sel = cell_class == c
            if not sel.any():
                continue
            qc = Mc[:, sel] @ counts[sel]
            R = Mc[:, sel] @ sums[sel] - qc[:, None] * z / W[:, None]
            cross += (R * R).sum(axis=1)
            q[:, c] = qc
        q2 = (q * q).sum(axis=1)
        yy = q2 - 2.0 * (q**3).sum(axis=1) / W + q2**2 / W**2
        xx = self.x_self(M)
        ok = (yy > 1e-9 * q2) & (xx > 1e-12 * np.einsum("bs,st,bt->b", M, self.G, M))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(ok, cross / np.sqrt(np.where(ok, xx * yy, 1.0)), np.nan)


# ---------------------------------------------------------------------------------------------
# SVD reduction and CCA
# ---------------------------------------------------------------------------------------------
@dataclass
class Reduction:
    """An SVD (PCA) reduction fitted on some rows: ``scores = (X - mean) @ components``."""

    mean: np.ndarray  # (p,)
    components: np.ndarray  # (p, k), orthonormal columns
    singular_values: np.ndarray  # (r,), all of them, descending
    scores: np.ndarray  # (n, k) of the fitted rows

    @property
    def dims(self) -> int:
        return self.components.shape[1]

    @property
    def explained(self) -> float:
        """Fraction of the variance the kept components hold."""
        var = self.singular_values**2
        return float(var[: self.dims].sum() / var.sum()) if var.sum() > 0 else 0.0

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (_as2d(X) - self.mean) @ self.components


def svd_reduce(X: np.ndarray, keep: float = 0.99, max_dims: int | None = None) -> Reduction:
    """Keep the fewest leading components holding ``keep`` of the variance, at most ``max_dims``
    (default :func:`default_max_dims`) and never a null direction."""
    X = _as2d(X)
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    mean = X.mean(axis=0)
    U, s, Vt = np.linalg.svd(X - mean, full_matrices=False)
    var = s**2
    rank = int((s > s[0] * RANK_TOL).sum()) if len(s) and s[0] > 0 else 0
    if rank == 0:
        raise ValueError("X has no variance (all rows equal)")
    k = int(np.searchsorted(np.cumsum(var) / var.sum(), keep - 1e-12)) + 1
    cap = default_max_dims(X.shape[0]) if max_dims is None else int(max_dims)
    if cap < 1:
        raise ValueError(f"max_dims must be at least 1, got {max_dims}")
    k = min(k, cap, rank)
    return Reduction(mean, Vt[:k].T, s, U[:, :k] * s[:k])


def _orth(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis ``Q`` of the columns of ``A`` and ``W`` with ``Q = A @ W``.

    QR when ``A`` has full column rank; otherwise (e.g. a full one-hot encoding, a class missing
    from a training fold) the SVD, dropping null directions.
    """
    if A.shape[1] == 0:
        return A[:, :0], np.zeros((0, 0))
    if A.shape[0] > A.shape[1]:
        Q, R = np.linalg.qr(A)
        d = np.abs(np.diag(R))
        if d.min() > d.max() * RANK_TOL * 1e3:
            return Q, np.linalg.inv(R)
    U, s, Vt = np.linalg.svd(A, full_matrices=False)
    r = int((s > s[0] * RANK_TOL * 1e3).sum()) if len(s) and s[0] > 0 else 0
    return U[:, :r], Vt[:r].T / s[:r]


@dataclass
class CCA:
    """Canonical directions fitted on some rows; canonical variates ``(X - x_mean) @ x_weights``."""

    x_mean: np.ndarray
    y_mean: np.ndarray
    x_weights: np.ndarray  # (p, k)
    y_weights: np.ndarray  # (q, k)
    correlations: np.ndarray  # (k,), in-sample, descending

    def transform(self, X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Canonical variates ``(n, k)`` of both sides for (new) rows."""
        return (_as2d(X) - self.x_mean) @ self.x_weights, (_as2d(Y) - self.y_mean) @ self.y_weights

    def score(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Correlation of each canonical pair on the given rows (NaN where a variate is constant)."""
        U, V = self.transform(X, Y)
        return _column_corr(U, V)


def _column_corr(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    U, V = U - U.mean(axis=0), V - V.mean(axis=0)
    den = np.sqrt((U * U).sum(axis=0) * (V * V).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (U * V).sum(axis=0) / den, np.nan)


def _fit_cca(X: np.ndarray, Y: np.ndarray, w: np.ndarray | None = None) -> CCA:
    if w is None:
        xm, ym = X.mean(axis=0), Y.mean(axis=0)
        A, B = X - xm, Y - ym
    else:
        xm, ym = (w @ X) / w.sum(), (w @ Y) / w.sum()
        r = np.sqrt(w)[:, None]
        A, B = r * (X - xm), r * (Y - ym)
    Qx, Wx = _orth(A)
    Qy, Wy = _orth(B)
    if Qx.shape[1] == 0 or Qy.shape[1] == 0:
        return CCA(xm, ym, np.zeros((X.shape[1], 0)), np.zeros((Y.shape[1], 0)), np.zeros(0))
    U, s, Vt = np.linalg.svd(Qx.T @ Qy, full_matrices=False)
    k = len(s)
    return CCA(xm, ym, Wx @ U[:, :k], Wy @ Vt[:k].T, np.clip(s, 0.0, 1.0))


def _whitener(G: np.ndarray) -> np.ndarray:
    """``W`` with ``W' G W = I`` on the range of the Gram matrix ``G`` (Cholesky; an eigen-
    decomposition, dropping null directions, when ``G`` is singular or badly conditioned)."""
    if G.shape[0] and np.diag(G).min() > 0:
        try:
            L = np.linalg.cholesky(G)
            d = np.diag(L)
            if d.min() > d.max() * RANK_TOL * 1e3:
                return np.linalg.inv(L).T
        except np.linalg.LinAlgError:
            pass
    lam, V = np.linalg.eigh(G)
    keep = lam > (lam.max() if len(lam) else 0) * (RANK_TOL * 1e3) ** 2
    if not len(lam) or lam.max() <= 0:
        keep[:] = False
    return V[:, keep] / np.sqrt(lam[keep])


def _fit_cca_onehot(X: np.ndarray, codes: np.ndarray, w: np.ndarray | None, n_classes: int) -> CCA:
    if w is None:
        w = np.ones(X.shape[0])
    xm = (w @ X) / w.sum()
    A = X - xm
    wA = w[:, None] * A
    Wx = _whitener(wA.T @ A)  # (X - xm) @ Wx is orthonormal under the weights
    q = np.bincount(codes, weights=w, minlength=n_classes)
    present = q > 0
    k = min(Wx.shape[1], int(present.sum()) - 1)
    if k <= 0:
        return CCA(xm, np.zeros(n_classes), np.zeros((X.shape[1], 0)), np.zeros((n_classes, 0)), np.zeros(0))
    # Qx' Qy Qy' Qx = sum_c S_c S_c' / q_c, with S_c the weighted class sums of the whitened rows
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    T = np.zeros((n_classes, X.shape[1]))
    T[sorted_codes[starts]] = np.add.reduceat(wA[order], starts, axis=0)
    S = T @ Wx
    Sp = S[present] / np.sqrt(q[present])[:, None]
    lam, U = np.linalg.eigh(Sp.T @ Sp)
    order = np.argsort(lam)[::-1][:k]
    lam, U = lam[order], U[:, order]
    rho = np.sqrt(np.clip(lam, 0.0, 1.0))
    # target side: each class scores the weighted class mean of the X variate (0 for absent classes)
    class_values = np.zeros((n_classes, k))
    class_values[present] = (S[present] @ U) / q[present][:, None]
    return CCA(xm, np.zeros(n_classes), Wx @ U, class_values, rho)


def fit_cca_onehot(X: np.ndarray, codes: np.ndarray, weights: np.ndarray | None = None,
                   n_classes: int | None = None) -> CCA:
    """CCA of ``X`` with the one-hot encoding of integer ``codes`` without forming it.

    With ``Q`` an orthonormal basis of centred ``X``, the squared canonical correlations are the
    eigenvalues of ``sum_c S_c S_c' / n_c`` (``S_c`` the sum of ``Q``'s rows in class ``c``); the
    target-side variate of a class is the class mean of the X-side variate. Same correlations as
    :func:`fit_cca` on the one-hot matrix; ``y_weights`` (``(n_classes, k)``) maps a one-hot row
    to its variate (absent classes score 0, the mean).
    """
    X = _as2d(X)
    codes = np.asarray(codes)
    if codes.shape != (X.shape[0],) or codes.dtype.kind not in "iu" or (codes < 0).any():
        raise ValueError("codes must be one non-negative integer per row of X")
    n_classes = int(codes.max()) + 1 if n_classes is None else int(n_classes)
    w = None if weights is None else _row_weights(weights, X.shape[0])
    return _fit_cca_onehot(X, codes.astype(np.int64), w, n_classes)


def fit_cca(X: np.ndarray, Y: np.ndarray, weights: np.ndarray | None = None) -> CCA:
    """CCA by QR + SVD on centred data; ``min(rank X, rank Y)`` canonical pairs.

    ``weights`` (>= 0, one per row) gives the fit of the data with row ``i`` repeated ``w_i`` times.
    """
    X, Y = _pair(X, Y)
    w = None if weights is None else _row_weights(weights, X.shape[0])
    return _fit_cca(X, Y, w)


def _row_weights(weights: np.ndarray, n: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be {n} finite non-negative numbers with a positive sum")
    return w


def canonical_correlations(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """In-sample canonical correlations of the raw spaces (no reduction)."""
    return fit_cca(X, Y).correlations


def pwcca_weights(cca: CCA, X: np.ndarray, neurons: np.ndarray | None = None,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """Projection weights of Morcos et al. (2018) on the rows ``cca`` was fitted on.

    ``alpha_j ~ sum_i |<h_j, x_i>|`` with ``h_j`` the unit-norm X-side canonical variates and ``x_i``
    the centred neurons (columns) of ``neurons`` (default ``X``; pass the unreduced layer when ``X``
    is its SVD reduction). Always weighted on the X side (the representation under study); Morcos
    et al. pick the side with fewer neurons. ``weights`` as in :func:`fit_cca`.
    """
    X = _as2d(X)
    N = _as2d(X if neurons is None else neurons, "neurons")
    w = None if weights is None else _row_weights(weights, X.shape[0])
    return _pw_weights(cca, X, N, w)


def _pw_weights(cca: CCA, X: np.ndarray, N: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    return _pw_from_variates((X - cca.x_mean) @ cca.x_weights, N, w)


def svcca(X: np.ndarray, Y: np.ndarray, keep: float = 0.99, max_dims: int | None = None,
          reduce_y: bool = True) -> float:
    """In-sample SVCCA: mean canonical correlation after SVD-reducing each side.

    In-sample CCA is biased upwards when the reduced dimensions approach ``n``; compare against
    :func:`heldout_cca` or a shuffled control.
    """
    X, Y = _pair(X, Y)
    zx = svd_reduce(X, keep, max_dims).scores
    zy = svd_reduce(Y, keep, max_dims).scores if reduce_y else Y
    return float(fit_cca(zx, zy).correlations.mean())


def pwcca(X: np.ndarray, Y: np.ndarray, keep: float = 0.99, max_dims: int | None = None,
          reduce_y: bool = True) -> float:
    """In-sample PWCCA: canonical correlations of the SVD-reduced sides, projection-weighted on X's
    neurons (:func:`pwcca_weights`)."""
    X, Y = _pair(X, Y)
    zx = svd_reduce(X, keep, max_dims).scores
    zy = svd_reduce(Y, keep, max_dims).scores if reduce_y else Y
    cca = fit_cca(zx, zy)
    return float(pwcca_weights(cca, zx, X) @ cca.correlations)


# ---------------------------------------------------------------------------------------------
# Held-out CCA
# ---------------------------------------------------------------------------------------------
class _NeuronMoments:
    """``sum_i w_i z_i n_i'`` (``(k, d)``) and ``sum_i w_i n_i`` over chosen rows, for PWCCA.

    With ``groups`` given, per-group sums are precomputed once, so that weights constant within
    groups (a speaker bootstrap) over whole groups cost ``O(groups k d)`` instead of ``O(n k d)``.
    """

    def __init__(self, Z: np.ndarray, N: np.ndarray, groups: np.ndarray | None):
        self.Z = np.asarray(Z, dtype=np.float32)
        self.N = np.asarray(N, dtype=np.float32)
        self.groups = None if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
        self._per_group: tuple[np.ndarray, np.ndarray] | None = None
        self._all: tuple[np.ndarray, np.ndarray] | None = None

    def _group_sums(self) -> tuple[np.ndarray, np.ndarray]:
        if self._per_group is None:
            G = int(self.groups.max()) + 1
            order = np.argsort(self.groups, kind="stable")
            starts = np.searchsorted(self.groups[order], np.arange(G))
            P = np.empty((G, self.Z.shape[1], self.N.shape[1]), dtype=np.float32)
            for g, (a, b) in enumerate(zip(starts, list(starts[1:]) + [len(order)])):
                rows = order[a:b]
                P[g] = self.Z[rows].T @ self.N[rows]
            E = np.zeros((G, len(self.groups)), dtype=np.float32)
            E[self.groups, np.arange(len(self.groups))] = 1.0
            self._per_group = (P, E @ self.N)
        return self._per_group

    def sums(self, w: np.ndarray | None, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Moments over ``rows`` (boolean mask, default all) with row weights ``w`` (default 1)."""
        if w is None and rows is None:
            if self._all is None:
                self._all = (self.Z.T @ self.N, self.N.sum(axis=0))
            return self._all
        if self.groups is not None:
            m = self._group_weights(w, rows)
            if m is not None:
                P, nsum = self._group_sums()
                idx = np.flatnonzero(m)
                return np.tensordot(m[idx], P[idx], axes=1), m[idx] @ nsum[idx]
        sel = np.ones(len(self.N), dtype=bool) if rows is None else rows
        ws = np.ones(int(sel.sum()), dtype=np.float32) if w is None else w[sel].astype(np.float32)
        N = self.N[sel]
        return (ws[:, None] * self.Z[sel]).T @ N, ws @ N

    def _group_weights(self, w: np.ndarray | None, rows: np.ndarray | None) -> np.ndarray | None:
        """Per-group weights when ``w`` (masked by ``rows``) is constant within every group."""
        G = int(self.groups.max()) + 1
        full = np.ones(len(self.groups)) if w is None else np.asarray(w, dtype=np.float64)
        if rows is not None:
            full = np.where(rows, full, 0.0)
        m = np.zeros(G)
        m[self.groups] = full
        if not np.array_equal(m[self.groups], full):
            return None
        return m.astype(np.float32)


class HeldOutCCA:
    """Held-out SVCCA / PWCCA of ``X`` (usually SVD-reduced) against ``Y``.

    ``Y`` is a matrix, or 1-D integer class codes for a one-hot target (then CCA is solved from
    class sums, :func:`fit_cca_onehot`, which costs nothing on the target side). For given folds,
    CCA is fitted on all folds but one and the correlation of each canonical pair is measured on
    the held-out fold; per fold the correlations are averaged (``svcca``) or projection-weighted on
    the training rows' ``neurons`` (``pwcca``, :func:`pwcca_weights`); folds are averaged weighted
    by their held-out (row weight) totals. Item weights (bootstrap multiplicities) refit every
    fold on the weighted rows, i.e. on the resampled data. ``groups`` (speakers) only speeds up
    PWCCA under weights constant within groups; :meth:`with_target` shares that work between
    targets (e.g. permuted labels) of the same ``X``.
    """

    def __init__(self, X: np.ndarray, Y: np.ndarray, neurons: np.ndarray | None = None, pw: bool = True,
                 groups: np.ndarray | None = None):
        X = _as2d(X)
        self.X, self.pw = X, pw
        self._set_target(Y)
        N = None if not pw else (X if neurons is None else _as2d(neurons, "neurons"))
        if N is not None and N.shape[0] != X.shape[0]:
            raise ValueError("neurons must hold the same rows as X")
        if groups is not None and np.shape(groups) != (X.shape[0],):
            raise ValueError("groups must give one group per row of X")
        self._moments = None if N is None else _NeuronMoments(X, N, groups)

    def _set_target(self, Y: np.ndarray) -> None:
        Y = np.asarray(Y)
        self.codes: np.ndarray | None = None
        self.Y = None
        if Y.ndim == 1 and Y.dtype.kind in "iu":
            if Y.shape != (self.X.shape[0],) or (Y < 0).any():
                raise ValueError("class codes must be one non-negative integer per row of X")
            self.codes = Y.astype(np.int64)
            self.n_classes = int(Y.max()) + 1 if len(Y) else 0
        else:
            _, self.Y = _pair(self.X, Y)

    def with_target(self, Y: np.ndarray) -> "HeldOutCCA":
        """The same ``X`` (and PWCCA precomputations) against another target."""
        other = copy.copy(self)
        other._set_target(Y)
        return other

    @property
    def methods(self) -> tuple[str, ...]:
        return ("svcca", "pwcca") if self.pw else ("svcca",)

    def _folds(self, folds: np.ndarray) -> np.ndarray:
        folds = np.asarray(folds)
        if folds.ndim == 1:
            folds = folds[None, :]
        if folds.ndim != 2 or folds.shape[1] != self.X.shape[0]:
            raise ValueError(f"folds must give one fold index per row ({self.X.shape[0]}), or be (repeats, rows)")
        return folds

    def _fits(self, folds: np.ndarray, w: np.ndarray | None):
        """Per fold: held-out rows, their canonical variates and the PWCCA weights of the fit."""
        live = None if w is None else w > 0
        total = self._moments.sums(w, live) if self.pw else None
        for f in np.unique(folds):
            te = folds == f
            tr = ~te if live is None else ~te & live
            if live is not None:
                te = te & live
            if tr.sum() < 2 or te.sum() < 2:
                continue
            wtr = None if w is None else w[tr]
            Xtr = self.X[tr]
            if self.codes is not None:
                cca = _fit_cca_onehot(Xtr, self.codes[tr], wtr, self.n_classes)
            else:
                cca = _fit_cca(Xtr, self.Y[tr], wtr)
            if cca.correlations.size == 0:
                continue
            U = (self.X[te] - cca.x_mean) @ cca.x_weights
            if self.codes is not None:
                V = cca.y_weights[self.codes[te]]
            else:
                V = (self.Y[te] - cca.y_mean) @ cca.y_weights
            a = None
            if self.pw:
                # sum_i w_i (z_i - mean) n_i' over the training rows = all rows minus the held-out ones
                P_te, n_te = self._moments.sums(w, te)
                P_tr, n_tr = total[0] - P_te, total[1] - n_te
                cross = cca.x_weights.T.astype(np.float32) @ (P_tr - np.outer(cca.x_mean, n_tr).astype(np.float32))
                H = (Xtr - cca.x_mean) @ cca.x_weights
                norm = np.sqrt(((H * H) if wtr is None else (wtr[:, None] * H * H)).sum(axis=0))
                a = np.abs(cross).sum(axis=1) / np.maximum(norm, 1e-300)
            yield np.flatnonzero(te), U, V, a

    def _combine(self, fits, W: np.ndarray) -> dict[str, np.ndarray]:
        """Fold-weighted held-out scores for each row of test-row weights ``W`` ``(B, n)``."""
        num = {m: np.zeros(W.shape[0]) for m in self.methods}
        den = {m: np.zeros(W.shape[0]) for m in self.methods}
        for te, U, V, a in fits:
            r = _weighted_corr_rows(U, V, W[:, te])  # (B, k)
            valid = np.isfinite(r)
            sw = W[:, te].sum(axis=1)
            ok = valid.any(axis=1) & (sw > 0)
            rv = np.where(valid, r, 0.0)
            num["svcca"] += np.where(ok, sw * rv.sum(axis=1) / np.maximum(valid.sum(axis=1), 1), 0.0)
            den["svcca"] += np.where(ok, sw, 0.0)
            if self.pw:
                av = np.where(valid, a[None, :], 0.0)
                tot = av.sum(axis=1)
                okp = ok & (tot > 0)
                num["pwcca"] += np.where(okp, sw * (rv * av).sum(axis=1) / np.maximum(tot, 1e-300), 0.0)
                den["pwcca"] += np.where(okp, sw, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {m: np.where(den[m] > 0, num[m] / den[m], np.nan) for m in self.methods}

    def run(self, folds: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
        """Scores for one fold assignment, fitted (and scored) on the rows weighted by ``weights``."""
        w = None if weights is None else np.asarray(weights, dtype=np.float64)
        W = np.ones((1, self.X.shape[0])) if w is None else w[None, :]
        return {m: float(v[0]) for m, v in self._combine(self._fits(folds, w), W).items()}

    def score(self, folds: np.ndarray, method: str = "svcca") -> float:
        """Held-out score; ``folds`` ``(n,)`` or ``(repeats, n)`` (then the mean over repeats)."""
        if method not in self.methods:
            raise ValueError(f"method must be one of {', '.join(self.methods)}, got {method!r}")
        values = [self.run(f)[method] for f in self._folds(folds)]
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")

    def scores(self, folds: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Scores refitted under each row of item ``weights`` ``(B, n)``: ``{method: (B,)}``.

        ``folds`` is one assignment ``(n,)`` for all draws or one per draw ``(B, n)``.
        """
        W = self._weights(weights)
        F = self._folds(folds)
        if F.shape[0] not in (1, W.shape[0]):
            raise ValueError("give one fold assignment, or one per draw")
        runs = [self.run(F[b % F.shape[0]], w) for b, w in enumerate(W)]
        return {m: np.array([r[m] for r in runs]) for m in self.methods}

    def _weights(self, weights: np.ndarray) -> np.ndarray:
        W = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        if W.shape[1] != self.X.shape[0] or (W < 0).any():
            raise ValueError(f"weights must be (draws, {self.X.shape[0]}) and non-negative")
        return W


def _weighted_corr_rows(U: np.ndarray, V: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Correlation of each column pair of ``U``, ``V`` under each row of weights ``W`` ``(B, n)``:
    ``(B, k)``, NaN where a variate is constant."""
    with np.errstate(invalid="ignore", divide="ignore"):
        sw = W.sum(axis=1, keepdims=True)
        mu, mv = W @ U / sw, W @ V / sw
        cuv = W @ (U * V) / sw - mu * mv
        cuu = W @ (U * U) / sw - mu * mu
        cvv = W @ (V * V) / sw - mv * mv
        scale = np.maximum((W @ (U * U)) * (W @ (V * V)) / sw**2, 1e-300)
        ok = cuu * cvv > 1e-12 * scale
        return np.where(ok, cuv / np.sqrt(np.where(ok, cuu * cvv, 1.0)), np.nan)


def _pw_from_variates(H: np.ndarray, N: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    """PWCCA weights from X-side variates ``H`` that are (weighted-)centred on the fitting rows and
    zero elsewhere: ``sum_d |<h_j, n_d>_w| / ||h_j||_w`` (centring ``N`` is then unnecessary)."""
    if w is None:
        Hw, norm = H, np.sqrt((H * H).sum(axis=0))
    else:
        Hw = w[:, None] * H
        norm = np.sqrt((Hw * H).sum(axis=0))
    alpha = np.abs(Hw.T @ N).sum(axis=1) / np.maximum(norm, 1e-300)
    total = alpha.sum()
    return alpha / total if total > 0 else np.full(len(alpha), 1.0 / max(1, len(alpha)))


def heldout_cca(
    X: np.ndarray,
    Y: np.ndarray,
    groups: np.ndarray | None = None,
    method: str = "svcca",
    n_splits: int = 5,
    keep: float = 0.99,
    max_dims: int | None = None,
    reduce_y: bool = True,
    within: bool = False,
    n_repeats: int = 1,
    seed: int = 0,
) -> float:
    """Held-out SVCCA / PWCCA: reduce each side by SVD (unsupervised, on all rows), fit CCA on the
    training folds and average the canonical correlations measured on the held-out fold.

    ``Y`` may be 1-D class labels (any type): a one-hot target, never reduced. ``groups`` (e.g.
    speakers; default: every row its own group) keeps a group's rows in one fold, or, with
    ``within=True``, spreads each group's rows over the folds (:func:`featstore.cv.cca_folds`); the score is
    averaged over ``n_repeats`` random fold assignments.
    """
    X = _as2d(X)
    Y = np.asarray(Y)
    if Y.ndim == 1:
        _, codes = np.unique(Y.astype(str), return_inverse=True)
        if len(codes) != X.shape[0]:
            raise ValueError(f"X and Y must hold the same items: {X.shape[0]} rows vs {len(codes)}")
        zy = codes.astype(np.int64)
    else:
        X, Y = _pair(X, Y, 4)
        zy = svd_reduce(Y, keep, max_dims).scores if reduce_y else Y
    groups = np.arange(X.shape[0]) if groups is None else np.asarray(groups)
    zx = svd_reduce(X, keep, max_dims).scores
    folds = np.stack([cca_folds(groups, n_splits, seed + r, within=within) for r in range(n_repeats)])
    return HeldOutCCA(zx, zy, neurons=X, pw=method == "pwcca").score(folds, method)
