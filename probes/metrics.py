"""Scores of one fold, baselines of the same folds, speaker-bootstrap intervals, binary screening.

Labels are integer codes ``0..K-1`` into a fixed ``classes`` list, so that every fold, probe and
baseline is scored against the same label set even when a class is missing from a test fold.

* :func:`fold_metrics`: accuracy, balanced accuracy (mean recall over the classes present in the
  test fold, as scikit-learn), macro-F1 (over classes present in truth or prediction), one-vs-rest
  ROC-AUC (mean over classes with positives and negatives in the fold; NaN if none), per-class
  recall (NaN for a class absent from the fold).
* baselines: :func:`majority_baseline` predicts the training fold's most frequent class;
  :func:`chance_baseline` guesses at random with the training fold's class priors, averaged over
  ``n_draws`` seeded draws (its expected balanced accuracy is the mean prior of the test classes).
* speaker-bootstrap intervals live in :mod:`probes.bootstrap` (``bootstrap_ci`` and
  ``bootstrap_confusions`` here are entry points into it).
* :func:`parse_label_map` / :func:`binary_metrics`: e.g. ``Lateral:Disordered,Interdental:Disordered``
  turns the multi-class output into a screening decision (the first target named is the positive
  class; the probability of it is the sum of its source classes' probabilities).
"""
from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr")
BINARY_METRICS = ("sensitivity", "specificity", "binary_bacc", "binary_auc")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``(K, K)`` counts, rows = truth, columns = prediction."""
    idx = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def bacc_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Balanced accuracy of one ``(K, K)`` or many ``(..., K, K)`` confusion matrices."""
    conf = np.asarray(conf, dtype=np.float64)
    support = conf.sum(axis=-1)
    diag = np.diagonal(conf, axis1=-2, axis2=-1)
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, diag / np.where(present, support, 1), 0.0)
        return recall.sum(axis=-1) / present.sum(axis=-1)


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Mean recall over the classes present in ``y_true`` (equals scikit-learn's score)."""
    return float(bacc_from_confusion(confusion(y_true, y_pred, n_classes)))


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC of one binary problem (Mann-Whitney U with tied ranks; equals scikit-learn's)."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc_ovr(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean one-vs-rest ROC-AUC over classes with both positives and negatives; NaN if none."""
    y_true = np.asarray(y_true)
    scores = []
    for c in range(proba.shape[1]):
        pos = y_true == c
        if 0 < pos.sum() < len(y_true):
            scores.append(binary_auc(pos, proba[:, c]))
    return float(np.mean(scores)) if scores else float("nan")


def macro_f1(conf: np.ndarray) -> float:
    """Macro-F1 over the classes present in truth or prediction (scikit-learn's default labels)."""
    tp = np.diagonal(conf).astype(np.float64)
    denom = conf.sum(axis=1) + conf.sum(axis=0)
    present = denom > 0
    return float((2 * tp[present] / denom[present]).mean()) if present.any() else float("nan")


def fold_metrics(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None, classes) -> dict:
    """Scores of one test fold (see module docstring); keys ``recall_<class>`` per class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    k = len(classes)
    conf = confusion(y_true, y_pred, k)
    support = conf.sum(axis=1)
    out = {
        "accuracy": float(np.trace(conf) / max(1, len(y_true))),
        "balanced_accuracy": float(bacc_from_confusion(conf)),
        "macro_f1": macro_f1(conf),
        "roc_auc_ovr": roc_auc_ovr(y_true, proba) if proba is not None else float("nan"),
    }
    for c, name in enumerate(classes):
        out[f"recall_{name}"] = float(conf[c, c] / support[c]) if support[c] else float("nan")
    return out


# -- baselines --------------------------------------------------------------------------------
def _priors(y_train: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(np.asarray(y_train, dtype=np.int64), minlength=n_classes).astype(np.float64)
    return counts / counts.sum()


def majority_baseline(y_train: np.ndarray, n_test: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, proba)`` of the training fold's majority class (ties: lowest code); proba = priors."""
    priors = _priors(y_train, n_classes)
    pred = np.full(n_test, int(np.argmax(priors)), dtype=np.int64)
    return pred, np.tile(priors, (n_test, 1))


def chance_draws(y_train: np.ndarray, n_test: int, n_classes: int, n_draws: int = 10, seed: int = 0) -> np.ndarray:
    """``(n_draws, n_test)`` random guesses from the training priors (seeded)."""
    rng = np.random.default_rng(seed)
    return rng.choice(n_classes, size=(n_draws, n_test), p=_priors(y_train, n_classes))


def chance_baseline(
    y_train: np.ndarray, y_test: np.ndarray, classes, n_draws: int = 10, seed: int = 0
) -> tuple[dict, np.ndarray]:
    """Stratified-chance scores averaged over ``n_draws`` guesses, and the draws themselves."""
    k = len(classes)
    draws = chance_draws(y_train, len(y_test), k, n_draws, seed)
    proba = np.tile(_priors(y_train, k), (len(y_test), 1))
    per = [fold_metrics(y_test, d, proba, classes) for d in draws]
    return {key: nanmean([p[key] for p in per]) for key in per[0]}, draws


def nanmean(values) -> float:
    """Mean ignoring NaN; NaN (without a warning) when nothing is left."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


# -- speaker bootstrap ------------------------------------------------------------------------
def group_confusions(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, n_classes: int) -> np.ndarray:
    """``(G, K, K)`` confusion counts per group (groups in sorted order)."""
    _, g_idx = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    n_groups = int(g_idx.max()) + 1 if len(g_idx) else 0
    idx = (g_idx * n_classes + np.asarray(y_true, dtype=np.int64)) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(idx, minlength=n_groups * n_classes * n_classes).reshape(n_groups, n_classes, n_classes)


def bootstrap_confusions(conf_g: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """See :func:`probes.bootstrap.bootstrap_confusions` (the one speaker bootstrap; kept here as an
    entry point)."""
    from probes.bootstrap import bootstrap_confusions as impl

    return impl(conf_g, n_boot, alpha, seed)


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray, n_classes: int,
                 n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """See :func:`probes.bootstrap.bootstrap_ci` (kept here as an entry point)."""
    from probes.bootstrap import bootstrap_ci as impl

    return impl(y_true, y_pred, groups, n_classes, n_boot, alpha, seed)


# -- binary screening ------------------------------------------------------------------------
def parse_label_map(spec: str | dict | None) -> dict[str, str] | None:
    """``"Lateral:Disordered,Interdental:Disordered"`` -> ``{"Lateral": "Disordered", ...}``."""
    if spec is None or spec == "" or spec == {}:
        return None
    if isinstance(spec, dict):
        return {str(k): str(v) for k, v in spec.items()}
    out: dict[str, str] = {}
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        src, sep, dst = part.partition(":")
        if not sep or not src.strip() or not dst.strip():
            raise ValueError(f"bad label map entry {part!r}: use SOURCE:TARGET pairs, e.g. Lateral:Disordered,Interdental:Disordered")
        out[src.strip()] = dst.strip()
    return out or None


def binary_split(label_map: dict[str, str], classes) -> tuple[str, str, np.ndarray]:
    """``(positive, negative, is_positive[K])`` of a label map over ``classes``.

    The positive class is the first target named in the map; the mapped labels must be two.
    """
    classes = [str(c) for c in classes]
    unknown = [k for k in label_map if k not in classes]
    if unknown:
        raise ValueError(f"label map names {unknown[0]!r}, which is not a label of the items (labels: {', '.join(classes)})")
    mapped = [label_map.get(c, c) for c in classes]
    names = list(dict.fromkeys(mapped))
    if len(names) != 2:
        raise ValueError(
            f"the label map must reduce the labels to two classes for sensitivity/specificity; it gives "
            f"{len(names)}: {', '.join(names)}"
        )
    positive = next(iter(label_map.values()))
    negative = names[0] if names[1] == positive else names[1]
    return positive, negative, np.array([m == positive for m in mapped])


def binary_metrics(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None, is_positive: np.ndarray) -> dict:
    """Sensitivity, specificity, their mean and the ROC-AUC of the summed positive probability."""
    t = is_positive[np.asarray(y_true, dtype=np.int64)]
    p = is_positive[np.asarray(y_pred, dtype=np.int64)]
    sens = float((p & t).sum() / t.sum()) if t.any() else float("nan")
    spec = float((~p & ~t).sum() / (~t).sum()) if (~t).any() else float("nan")
    auc = float("nan")
    if proba is not None and 0 < t.sum() < len(t):
        auc = binary_auc(t, proba[:, is_positive].sum(axis=1))
    return {"sensitivity": sens, "specificity": spec, "binary_bacc": nanmean([sens, spec]), "binary_auc": auc}
