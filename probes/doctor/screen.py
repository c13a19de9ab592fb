"""The screen probe, label shuffles and the layer x pooling screen every later step reads.

To stay fast, the layer screen (every layer x {mean, stats}), the permutation nulls, the confound
tests and the speaker test use a closed-form *screen probe*: shrinkage LDA (equal class priors) on
the first :data:`SCREEN_COMPONENTS` principal components of the standardised pooled vectors (the
PCA sees no labels). Its predictions are linear in the one-hot labels, so all permutations cost one
matrix product. Confirmatory numbers (best configuration, pooling ablation, class weighting,
baseline comparison) come from the sweep's logistic-regression probe (``C=1``) on the full pooled
vectors (:func:`logreg_oof`). Every score is the balanced accuracy of the out-of-fold predictions
of all items on the speaker-grouped folds of :func:`featstore.cv.make_folds`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from probes.metrics import bacc_from_confusion, confusion

if TYPE_CHECKING:  # pragma: no cover
    from probes.doctor.view import View

#: principal components kept for the screen probe
SCREEN_COMPONENTS = 64
#: shrinkage of the screen probe's covariance towards its mean variance
SHRINKAGE = 0.2
#: significance level of the permutation tests
ALPHA = 0.05
#: a probe that predicts one class for more than this share of items has collapsed
COLLAPSE_SHARE = 0.9
#: row shifts of the labels tried by the alignment check (label of row i+s given to row i)
SHIFTS = (-1, 1)
#: the poolings of the screen
SCREEN_POOLINGS = ("mean", "stats")

Config = tuple[int, str]


def screen_features(X: np.ndarray, n_components: int = SCREEN_COMPONENTS, seed: int = 0) -> np.ndarray:
    """Standardise (zero-variance columns stay 0) and keep the first principal components."""
    X = np.asarray(X, dtype=np.float64)
    mu, sd = X.mean(axis=0), X.std(axis=0)
    Z = (X - mu) / np.where(sd > 1e-12, sd, 1.0)
    Z[:, sd <= 1e-12] = 0.0
    k = min(n_components, Z.shape[0] - 1, Z.shape[1])
    if Z.shape[1] <= n_components or k < 1:
        return Z
    from sklearn.utils.extmath import randomized_svd

    U, S, _ = randomized_svd(Z, k, n_iter=3, random_state=seed)
    return U * S


def lda_cv_predict(X: np.ndarray, Y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]],
                   n_classes: int) -> np.ndarray:
    """Out-of-fold predictions of the screen probe for several label vectors at once.

    ``Y`` is ``(P, n)`` integer labels (row 0 usually the real ones). Per fold: shrinkage LDA with
    equal priors, ``score_k(x) = x S^-1 m_k - m_k S^-1 m_k / 2`` on train-centred features; the class
    means are linear in the one-hot labels, so all P label vectors share one solve. A class absent from
    a training fold is never predicted. Returns ``(P, n)`` predictions (-1 for items in no test fold).
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.atleast_2d(np.asarray(Y, dtype=np.int64))
    P, n = Y.shape
    pred = np.full((P, n), -1, dtype=np.int64)
    for tr, te in folds:
        mu = X[tr].mean(axis=0)
        Xc, Xt = X[tr] - mu, X[te] - mu
        d = X.shape[1]
        S = Xc.T @ Xc / max(1, len(tr))
        S = (1 - SHRINKAGE) * S + (SHRINKAGE * np.trace(S) / max(1, d) + 1e-9) * np.eye(d)
        onehot = np.zeros((len(tr), P, n_classes))
        onehot[np.arange(len(tr))[:, None], np.arange(P)[None, :], Y[:, tr].T] = 1.0
        counts = onehot.sum(axis=0)
        onehot /= np.maximum(counts, 1.0)
        means = Xc.T @ onehot.reshape(len(tr), P * n_classes)
        Z = np.linalg.solve(S, means)
        scores = (Xt @ Z - 0.5 * (means * Z).sum(axis=0)).reshape(len(te), P, n_classes)
        scores[:, counts == 0] = -np.inf
        pred[:, te] = scores.argmax(axis=2).T
    return pred


def baccs(Y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Balanced accuracy of each row of ``(P, n)`` predictions against ``(P, n)`` labels."""
    P = Y.shape[0]
    idx = (np.arange(P)[:, None] * k + Y) * k + pred
    conf = np.bincount(idx.ravel(), minlength=P * k * k).reshape(P, k, k)
    return bacc_from_confusion(conf)


def oof_bacc(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    return float(bacc_from_confusion(confusion(y, pred, k)))


def recalls(y: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    conf = confusion(y, pred, len(classes))
    sup = conf.sum(axis=1)
    return {c: float(conf[i, i] / sup[i]) if sup[i] else float("nan") for i, c in enumerate(classes)}


def collapse(y: np.ndarray, pred: np.ndarray, k: int) -> tuple[float, int, bool]:
    """(largest predicted share, that class, collapsed?) - collapsed when > COLLAPSE_SHARE of items
    get one class that is clearly rarer in truth."""
    share = np.bincount(pred, minlength=k) / max(1, len(pred))
    c = int(share.argmax())
    true_share = float(np.mean(y == c)) if len(y) else 0.0
    return float(share[c]), c, bool(share[c] > COLLAPSE_SHARE and share[c] > true_share + 0.05)


def shuffles(y: np.ndarray, groups: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, str]:
    """``(n, len(y))`` shuffled labels and the kind of shuffle used.

    ``speaker-level`` when every speaker has one label and speakers hold several items (labels
    permuted across speakers); ``item-level`` otherwise.
    """
    rng = np.random.default_rng(seed)
    names, g = np.unique(groups.astype(str), return_inverse=True)
    per_group = np.array([len(np.unique(y[g == j])) for j in range(len(names))])
    if len(names) < len(y) and (per_group == 1).all() and (groups != "").all():
        lab = np.zeros(len(names), dtype=np.int64)
        lab[g] = y
        out = np.stack([rng.permutation(lab)[g] for _ in range(n)]) if n else np.zeros((0, len(y)), np.int64)
        return out, "speaker-level"
    out = np.stack([rng.permutation(y) for _ in range(n)]) if n else np.zeros((0, len(y)), np.int64)
    return out, "item-level"


def perm_test(X: np.ndarray, y: np.ndarray, shuffled: np.ndarray, folds,
              k: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(observed score, null scores, observed predictions) of the screen probe."""
    Y = np.vstack([y[None, :], shuffled])
    pred = lda_cv_predict(X, Y, folds, k)
    scores = baccs(Y, pred, k)
    return float(scores[0]), scores[1:], pred[0]


def p_value(observed: float, null: np.ndarray) -> float:
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null))) if len(null) else float("nan")


def logreg_oof(X: np.ndarray, y: np.ndarray, folds, k: int, class_weight: str | None = None,
               seed: int = 0, confound: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold predictions of the sweep's logistic-regression probe (C=1, standardised).

    ``confound`` ``(n, c)``: regressed out of the features inside each fold (least squares fitted on
    the training part, applied to both parts), so that the test part never shapes the correction.
    """
    from probes.estimators import make_probe

    pred = np.full(len(y), -1, dtype=np.int64)
    for tr, te in folds:
        classes = np.unique(y[tr])
        if len(classes) < 2:
            pred[te] = classes[0]
            continue
        Xtr, Xte = X[tr], X[te]
        if confound is not None:
            coef, *_ = np.linalg.lstsq(confound[tr], np.asarray(Xtr, dtype=np.float64), rcond=None)
            Xtr, Xte = Xtr - confound[tr] @ coef, Xte - confound[te] @ coef
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = make_probe("logreg", class_weight=class_weight, random_state=seed).fit(Xtr, y[tr])
        pred[te] = model.predict(Xte)
    return pred


def best_config(scores: Mapping[Config, float]) -> Config:
    """Highest score; ties -> earlier layer, mean before stats."""
    return max(scores, key=lambda c: (round(scores[c], 6), -c[0], c[1] == "mean"))


@dataclass(frozen=True)
class Screen:
    """The screen of every (layer, pooling): held-out scores, shuffled nulls, row-shifted labels.

    ``shuffled``: the ``(P, n)`` shuffled label vectors (``shuffle_kind`` speaker-level or
    item-level); ``feats``: screen features per config; ``scores``/``null``: real and shuffled
    scores; ``shifted[s]``: scores of the labels shifted by ``s`` rows (row i gets row i+s's label);
    ``best``: the best config; ``best_pred``/``best_score``: its logistic-regression predictions and
    balanced accuracy.
    """

    shuffled: np.ndarray
    shuffle_kind: str
    feats: Mapping[Config, np.ndarray]
    scores: Mapping[Config, float]
    null: Mapping[Config, np.ndarray]
    shifted: Mapping[int, Mapping[Config, float]]
    best: Config
    best_pred: np.ndarray
    best_score: float

    @property
    def null_max(self) -> np.ndarray:
        """Per shuffle, the best score over all configs (the selection-aware null)."""
        return np.max(np.stack(list(self.null.values())), axis=0)


def run_screen(view: "View") -> Screen:
    """Screen every (layer, pooling) of ``view`` (which has folds and pooled vectors)."""
    y, k, folds = view.y, view.k, view.folds
    shuffled, kind = shuffles(y, view.groups, view.n_perm, view.seed)
    shifted_y = np.stack([np.roll(y, -s) for s in SHIFTS])  # row i gets the label of row i + s
    feats, scores, null = {}, {}, {}
    shifted: dict[int, dict[Config, float]] = {s: {} for s in SHIFTS}
    for layer in view.layers:
        for pooling in SCREEN_POOLINGS:
            X = screen_features(view.X(layer, pooling), seed=view.seed)
            Y = np.vstack([y[None, :], shifted_y, shuffled])
            sc = baccs(Y, lda_cv_predict(X, Y, folds, k), k)
            key = (layer, pooling)
            feats[key] = _frozen(X)
            scores[key] = float(sc[0])
            for j, s in enumerate(SHIFTS):
                shifted[s][key] = float(sc[1 + j])
            null[key] = _frozen(sc[1 + len(SHIFTS):])
    best = best_config(scores)
    best_pred = logreg_oof(view.X(*best), y, folds, k, None, view.seed)
    return Screen(_frozen(shuffled), kind, MappingProxyType(feats), MappingProxyType(scores),
                  MappingProxyType(null), MappingProxyType({s: MappingProxyType(v) for s, v in shifted.items()}),
                  best, _frozen(best_pred), oof_bacc(y, best_pred, k))


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    a.flags.writeable = False
    return a
