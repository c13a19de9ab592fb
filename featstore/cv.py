"""Every split of the project, in one place: outer folds, inner folds, validation splits, the
fine-tuning hold-out, held-out CCA folds, and how items without a speaker are grouped.

It lives in ``featstore`` (not ``probes``) because fine-tuning (``featstore.finetune``) needs the
same speaker-grouped splits as the probes, and ``featstore`` never imports ``probes``. It depends
only on numpy, pandas and scikit-learn.

* :func:`fill_groups` -- an item without a speaker becomes its own group (``__item_<i>``);
* :func:`make_folds` -- the outer folds every configuration of a sweep shares;
* :func:`inner_folds` -- folds inside one outer training part (``C="auto"``, early stopping);
* :func:`nested_folds` -- the inner folds of every outer fold, in item indices (nested selection);
* :func:`fit_groups` -- the groups a probe's own inner splits get (``None`` without speakers);
* :func:`validation_split` -- an early-stopping split inside a training part;
* :func:`holdout_split` -- fold K of N as the fine-tuning validation part;
* :func:`cca_folds` -- test-fold index per row for held-out CCA (by group, or within groups);
* :func:`fold_ids`, :func:`describe_folds` -- views of a list of folds.

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
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, StratifiedShuffleSplit

Fold = tuple[np.ndarray, np.ndarray]

#: a validation part must hold at least this many speakers of every class to be speaker-grouped
MIN_VAL_GROUPS = 2


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


def fill_groups(groups: Sequence | np.ndarray | None, n: int | None = None) -> np.ndarray:
    """Groups as strings, an empty/missing group replaced by the item's own group ``__item_<i>``.

    The one rule for items without a speaker, used by folds, bootstraps and analyses alike.
    ``groups=None`` (with ``n``) makes every item its own group.
    """
    if groups is None:
        if n is None:
            raise ValueError("fill_groups(None) needs n")
        return np.array([f"__item_{i}" for i in range(n)], dtype=object)
    g = _as_str_array(groups, len(groups)).copy()
    empty = np.flatnonzero(g == "")
    g[empty] = [f"__item_{i}" for i in empty]
    return g


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
        warnings.warn(
            f"{int((g == '').sum())} items have no speaker group; each is treated as its own speaker",
            FoldWarning, stacklevel=2,
        )
        g = fill_groups(g)
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


# ---------------------------------------------------------------------------------------------
# Splits inside a training part
# ---------------------------------------------------------------------------------------------
def inner_folds(y: np.ndarray, groups: np.ndarray | None, n_splits: int, seed: int = 0) -> list[Fold]:
    """Stratified (and, with ``groups``, speaker-grouped) folds inside one training part.

    ``y`` are integer class codes ``0..K-1``. Speaker-grouped when every class has at least two
    speakers and every inner training part keeps every class; otherwise stratified by item. ``[]``
    when even that is impossible (a class with fewer than two items).
    """
    y = np.asarray(y)
    counts = np.bincount(y)
    if groups is not None:
        groups = np.asarray(groups)
        per_class = [len(np.unique(groups[y == c])) for c in range(len(counts))]
        k = min(n_splits, min(per_class))
        if k >= 2:
            cv = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*least populated class.*", category=UserWarning)
                folds = list(cv.split(np.zeros(len(y)), y, groups))
            if all(len(np.unique(y[tr])) == len(counts) for tr, _ in folds):
                return folds
    k = min(n_splits, int(counts.min()))
    if k < 2:
        return []
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def fit_groups(groups: Sequence | np.ndarray | None) -> np.ndarray | None:
    """Groups for the splits inside a training part, by the rule of :func:`make_folds`: ``None``
    when no item has a speaker (the splits are then stratified by item), otherwise
    :func:`fill_groups` (an item without a speaker is its own group)."""
    if groups is None:
        return None
    g = _as_str_array(groups, len(groups))
    if (g == "").all():
        return None
    return fill_groups(g)


def nested_folds(outer: Sequence[Fold], y: Sequence | np.ndarray, groups: Sequence | np.ndarray | None,
                 n_inner: int = 3, seed: int = 0) -> list[list[Fold]]:
    """For each outer fold, :func:`inner_folds` of its *training* items only, as item indices.

    The inner folds of outer fold ``f`` are built from ``outer[f][0]`` (never from its test items),
    grouped by speaker as :func:`inner_folds` allows. An outer fold whose training part cannot be
    split gets ``[]``.
    """
    y = _as_str_array(y, len(y))
    g = fit_groups(groups)
    out = []
    for tr, _ in outer:
        tr = np.asarray(tr, dtype=np.int64)
        _, codes = np.unique(y[tr], return_inverse=True)
        inner = inner_folds(codes.reshape(-1), None if g is None else g[tr], n_inner, seed)
        out.append([(np.sort(tr[a]), np.sort(tr[b])) for a, b in inner])
    return out


def validation_split(y: np.ndarray, groups: np.ndarray | None, fraction: float,
                     seed: int = 0) -> Fold:
    """``(train, validation)`` indices for early stopping; an empty validation part when none can be made.

    With ``groups`` the split is speaker-grouped when its validation part holds at least
    :data:`MIN_VAL_GROUPS` speakers of every class; with fewer, a loss on a handful of speakers is
    too noisy to stop on, and the split is stratified by item instead.
    """
    y = np.asarray(y)
    n = len(y)
    everything = (np.arange(n), np.zeros(0, dtype=np.int64))
    if not 0 <= fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {fraction}")
    if not fraction:
        return everything
    n_classes = int(y.max()) + 1
    if groups is not None:
        groups = np.asarray(groups)
        folds = inner_folds(y, groups, max(2, int(round(1 / fraction))), seed)
        if folds:
            tr, va = folds[0]
            if min(len(np.unique(groups[va][y[va] == c])) for c in range(n_classes)) >= MIN_VAL_GROUPS:
                return tr, va
    n_val = int(round(n * fraction))
    if np.bincount(y).min() < 2 or n_val < n_classes or n - n_val < n_classes:
        return everything
    split = StratifiedShuffleSplit(1, test_size=n_val, random_state=seed)
    return next(split.split(np.zeros(n), y))


def holdout_split(labels: Sequence, groups: Sequence, fold: tuple[int, int] | None = None,
                  seed: int = 0) -> Fold:
    """Speaker-grouped ``(train, validation)``: fold K of a ``StratifiedGroupKFold(N)``, or by
    default fold 1 of 5 (about 20 % validation; 1 of G when only G < 5 groups exist). No group lies
    on both sides. Raises :class:`FoldError` when the groups cannot make the folds."""
    groups = np.asarray(groups)
    n_groups = len(set(groups.tolist()))
    if n_groups < 2:
        raise FoldError(f"{n_groups} speaker group(s): a grouped validation split needs at least 2")
    k, n = fold or (1, min(5, n_groups))
    if n_groups < n:
        raise FoldError(f"{n_groups} speaker group(s) cannot make {n} folds: use fewer folds (--fold 1/{max(2, n_groups)}) "
                        f"or a manifest with more speakers")
    cv = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*least populated class.*")
        splits = list(cv.split(np.zeros(len(groups)), np.asarray(labels), groups))
    train, val = splits[k - 1]
    return np.sort(train), np.sort(val)


# ---------------------------------------------------------------------------------------------
# Held-out CCA folds
# ---------------------------------------------------------------------------------------------
def cca_folds(groups: np.ndarray | None, n_splits: int = 5, seed: int = 0, within: bool = False,
              units: np.ndarray | None = None) -> np.ndarray:
    """Test-fold index per row, for held-out CCA/CKA.

    ``within=False``: rows sharing a group (speaker) stay in one fold; groups are shuffled and cut
    into ``n_splits`` runs of about equal row counts. ``within=True``: each group's units (default:
    each row; pass item ids when rows are frames) are dealt round-robin over the folds, so every
    group is seen in training -- needed when the target *is* the speaker. ``n_splits`` is lowered
    to the number of groups (units) available; fewer than 2 is an error.
    """
    if groups is None:
        raise ValueError("groups is required (use np.arange(n) for ungrouped rows)")
    groups = np.asarray(groups)
    n = len(groups)
    rng = np.random.default_rng(seed)
    _, g = np.unique(groups, return_inverse=True)
    if not within:
        n_groups = int(g.max()) + 1 if n else 0
        k = min(n_splits, n_groups)
        if k < 2:
            raise ValueError(f"held-out CCA needs at least 2 groups, got {n_groups}")
        # groups in random order, cut into k runs of about n / k rows each
        order = rng.permutation(n_groups)
        sizes = np.bincount(g, minlength=n_groups)[order]
        before = np.cumsum(sizes) - sizes
        fold_of = np.empty(n_groups, dtype=np.int64)
        fold_of[order] = np.minimum((before + sizes / 2) * k // n, k - 1).astype(np.int64)
        return fold_of[g]
    _, u = np.unique(np.arange(n) if units is None else np.asarray(units), return_inverse=True)
    n_units = int(u.max()) + 1 if n else 0
    k = min(n_splits, n_units)
    if k < 2:
        raise ValueError(f"held-out CCA needs at least 2 items, got {n_units}")
    unit_group = np.zeros(n_units, dtype=np.int64)
    unit_group[u] = g
    # each group's units in random order, dealt round-robin from a random fold
    order = np.lexsort((rng.random(n_units), unit_group))
    first = np.searchsorted(unit_group[order], unit_group[order])
    rank = np.arange(n_units) - first
    start = rng.integers(0, k, size=int(g.max()) + 1)
    fold_of = np.empty(n_units, dtype=np.int64)
    fold_of[order] = (start[unit_group[order]] + rank) % k
    return fold_of[u]
