"""Cross-validation folds grouped by speaker.

:func:`make_folds` builds the folds every configuration of a sweep shares: stratified by label and
grouped by speaker (``StratifiedGroupKFold``) whenever the store has groups, so that no speaker is
ever in the training and the test part of one fold. Folds depend only on ``(labels, groups,
n_splits, seed)``, so they are identical for every layer, pooling and probe.

Rules for small data (documented behaviour, not silent):

* no groups at all (every group empty) -> ``StratifiedKFold`` and a :class:`NoGroupsWarning`
  (items of one speaker may then sit on both sides of a fold, which inflates scores);
* some groups empty -> each item without a group is its own group, with a :class:`FoldWarning`;
* a class with fewer speakers than ``n_splits`` -> ``n_splits`` is reduced to that number with a
  :class:`FoldWarning` (every test fold can then hold each class); a class with fewer than two
  speakers, or fewer than two groups in total, is a :class:`FoldError`.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

Fold = tuple[np.ndarray, np.ndarray]


class FoldError(ValueError):
    """The labels/groups cannot be split into the requested folds."""


class FoldWarning(UserWarning):
    """The folds were adapted to the data (fewer splits, singleton groups)."""


class NoGroupsWarning(FoldWarning):
    """The store has no speaker groups: folds are stratified but not grouped."""


def _as_str_array(values: Sequence | np.ndarray | None, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, "", dtype=object)
    arr = np.asarray(values, dtype=object)
    return np.array(["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in arr], dtype=object)


def make_folds(
    labels: Sequence | np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    n_splits: int = 5,
    seed: int = 0,
) -> list[Fold]:
    """Speaker-grouped, stratified folds: a list of ``(train_idx, test_idx)`` (sorted int arrays).

    ``groups`` empty or ``None`` -> plain ``StratifiedKFold`` plus a :class:`NoGroupsWarning`.
    See the module docstring for how too few speakers per class are handled.
    """
    y = _as_str_array(labels, len(labels))
    n = len(y)
    if n == 0:
        raise FoldError("no labelled items to split into folds")
    if n_splits < 2:
        raise FoldError(f"cv must be at least 2, got {n_splits}")
    if (y == "").any():
        raise FoldError(f"{int((y == '').sum())} items have an empty label; drop them before making folds")
    g = _as_str_array(groups, n)
    classes, y_idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise FoldError(f"only one class ({classes[0]!r}) among the labelled items; a probe needs two or more")

    if (g == "").all():
        counts = np.bincount(y_idx)
        k = _reduce_splits(n_splits, counts, classes, "items")
        warnings.warn(
            "the store has no speaker groups: folds are stratified but not grouped by speaker, so one "
            "speaker's items can be in train and test (scores may be inflated); extract with "
            "--group-column to fix this",
            NoGroupsWarning, stacklevel=2,
        )
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        return [(np.sort(tr), np.sort(te)) for tr, te in splitter.split(np.zeros(n), y_idx)]

    if (g == "").any():
        missing = np.flatnonzero(g == "")
        warnings.warn(
            f"{len(missing)} items have no speaker group; each is treated as its own speaker",
            FoldWarning, stacklevel=2,
        )
        g = g.copy()
        for i in missing:
            g[i] = f"__item_{i}"
    if len(np.unique(g)) < 2:
        raise FoldError("all items belong to one speaker group; grouped cross-validation needs two or more")
    groups_per_class = np.array([len(np.unique(g[y_idx == c])) for c in range(len(classes))])
    k = _reduce_splits(n_splits, groups_per_class, classes, "speakers")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for tr, te in splitter.split(np.zeros(n), y_idx, groups=g):
            shared = set(g[tr]) & set(g[te])
            assert not shared, f"speaker(s) {sorted(shared)[:3]} in train and test of one fold"
            folds.append((np.sort(tr), np.sort(te)))
    return folds


def _reduce_splits(n_splits: int, per_class: np.ndarray, classes: np.ndarray, what: str) -> int:
    smallest = int(per_class.min())
    name = classes[int(per_class.argmin())]
    if smallest < 2:
        raise FoldError(
            f"class {name!r} has only {smallest} {what[:-1] if smallest == 1 else what}; cross-validation "
            f"needs at least 2 {what} per class (drop or merge the class, e.g. with --label-map)"
        )
    if smallest < n_splits:
        warnings.warn(
            f"class {name!r} has only {smallest} {what}: using {smallest} folds instead of {n_splits}",
            FoldWarning, stacklevel=3,
        )
        return smallest
    return n_splits


def fold_ids(folds: Sequence[Fold], n: int) -> np.ndarray:
    """Fold number of each item's test fold (``-1`` where an item is in no test fold)."""
    out = np.full(n, -1, dtype=np.int64)
    for f, (_, te) in enumerate(folds):
        out[te] = f
    return out


def describe_folds(
    folds: Sequence[Fold],
    labels: Sequence | np.ndarray,
    groups: Sequence | np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per fold: sizes, speakers, per-class counts in train/test and speaker overlap."""
    y = _as_str_array(labels, len(labels))
    g = _as_str_array(groups, len(y))
    classes = np.unique(y)
    rows = []
    for f, (tr, te) in enumerate(folds):
        row: dict = {
            "fold": f, "n_train": len(tr), "n_test": len(te),
            "train_speakers": len(set(g[tr]) - {""}), "test_speakers": len(set(g[te]) - {""}),
            "speaker_overlap": len((set(g[tr]) & set(g[te])) - {""}),
        }
        for c in classes:
            row[f"train_{c}"] = int((y[tr] == c).sum())
            row[f"test_{c}"] = int((y[te] == c).sum())
        rows.append(row)
    return pd.DataFrame(rows)
