"""Step 3, fold sanity: do the speaker-grouped folds hold what a fair test needs?

Folds come from :func:`featstore.cv.make_folds`, which never puts one ``group`` in train and test
(so counting speaker overlap of these folds cannot fail and is not a check). What can go wrong:

* FAIL: identical audio (same ``sha256``) in train and test of a fold; a class missing from the
  training part of a fold; the group column is not the speaker and the items form *hidden
  speakers* (below) whose hold-out drops the score by >= 0.10;
* WARN: a class missing from the test part of a fold; the folds were adapted (fewer folds than
  asked, items without a group); a speaker-like extra column (``speaker``, ``spk``, ...) that
  differs from the group column; a group column that holds no speakers (no groups, groups of one
  item, group = item id) with or without detectable clusters.

Hidden speakers: when most groups hold one item, the nearest-neighbour distance of the items'
features is compared with the same features with each column shuffled on its own; tight clusters
(ratio < 0.7 of the shuffled one) become pseudo-speakers (average-linkage clustering), and the
screen score with those held out is compared with the score on the given groups.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np

from featstore.cv import FoldError, describe_folds, make_folds
from probes.doctor.result import FAIL, PASS, WARN, Step, pct
from probes.doctor.screen import lda_cv_predict, oof_bacc
from probes.doctor.view import View

NAME = "fold sanity"
#: speaker-like column names that should be the group column
SPEAKER_COLUMNS = ("speaker", "speaker_id", "spk", "spk_id", "subject", "participant", "talker", "child", "patient")
#: items used for the nearest-neighbour tests (a seeded subsample beyond that)
MAX_NEIGHBOUR_ITEMS = 3000
#: score drop (held-out clusters vs given groups) that means the folds leak speakers
LEAK_DROP = 0.10


def run(view: View, done: Mapping[str, Step]) -> Step:  # noqa: ARG001
    folds = view.folds
    classes = view.classes
    info = describe_folds(folds, view.labels, view.groups)
    ev: dict[str, Any] = {"folds": len(folds)}
    test_cols = [f"test_{c}" for c in classes]
    train_cols = [f"train_{c}" for c in classes]
    ev["per_fold_test_counts"] = {f"fold{int(r['fold'])}": {c: int(r[f'test_{c}']) for c in classes}
                                  for _, r in info.iterrows()}
    ev["min_test_count_per_class"] = int(info[test_cols].to_numpy().min())
    miss_test = int((info[test_cols].to_numpy() == 0).any(axis=1).sum())
    miss_train = int((info[train_cols].to_numpy() == 0).any(axis=1).sum())
    ev["folds_missing_a_class_in_test"] = miss_test
    ev["folds_missing_a_class_in_train"] = miss_train
    cross = 0
    has = view.sha != ""
    for tr, te in folds:
        cross += len(set(view.sha[tr][has[tr]]) & set(view.sha[te][has[te]]))
    ev["identical_audio_across_folds"] = cross
    fails = []
    warns = [w for w in view.fold_warnings if view.has_groups or "no speaker groups" not in w]
    advice = ""
    if cross:
        fails.append(f"{cross} identical clips (same sha256) sit in train and test of a fold")
        advice = "drop duplicated clips (or give them one group) so that identical audio never spans a fold"
    if miss_train:
        fails.append(f"{miss_train} folds have a class missing from training")
    if miss_test:
        warns.append(f"{miss_test} folds have a class missing from the test part")
    # is the group column the speaker?
    _, g = np.unique(view.groups.astype(str), return_inverse=True)
    sizes = np.bincount(g)
    singleton = float(np.mean(sizes[g] == 1)) if view.has_groups else 1.0
    same_as_id = float(np.mean(view.groups.astype(str) == view.ids)) if view.has_groups else 0.0
    ev["items_in_single_item_groups"] = singleton
    ev["group_equals_id"] = same_as_id
    for c, col in view.extra.items():
        if c.lower() not in SPEAKER_COLUMNS:
            continue
        if len(set(zip(col, view.groups))) != len(set(col)) or len(set(col)) != len(set(view.groups)):
            warns.append(f"the column {c!r} looks like the speaker but differs from the group column")
            advice = advice or f"re-extract with --group-column {c}"
    if singleton >= 0.5 or not view.has_groups:
        leak = _hidden_speakers(view, ev)
        desc = ("the store has no speaker groups" if not view.has_groups else
                "the group column equals the item id" if same_as_id >= 0.99 else
                f"{pct(singleton)} of the items are alone in their group")
        if leak is not None and leak >= LEAK_DROP:
            fails.append(
                f"{desc}, and the items form tight clusters of near-identical feature vectors (hidden speakers): "
                f"holding out whole clusters instead of the groups drops the score from "
                f"{ev['score_given_groups']:.2f} to {ev['score_cluster_groups']:.2f}, so the folds leak speakers")
            advice = advice or ("set the speaker as the group (--group-column speaker) and re-extract; "
                                "until then every score is inflated")
        elif leak is not None:
            warns.append(f"{desc}; the items form tight clusters (hidden speakers?), but holding out whole "
                         f"clusters changes the score only from {ev['score_given_groups']:.2f} to "
                         f"{ev['score_cluster_groups']:.2f}")
            advice = advice or "make the group column the speaker (--group-column) to be safe"
        else:
            warns.append(f"{desc}; if speakers recorded several clips, grouped folds cannot keep them apart")
            advice = advice or "make the group column the speaker (--group-column)"
    counts_msg = f"{len(folds)} folds, min test items per class {ev['min_test_count_per_class']}"
    if fails:
        return Step(NAME, FAIL, ev, "; ".join(fails) + f" ({counts_msg})",
                    advice or "rebuild the folds grouped by the true speaker")
    if warns:
        return Step(NAME, WARN, ev, "; ".join(warns) + f" ({counts_msg})",
                    advice or "use fewer folds or more speakers per class")
    return Step(NAME, PASS, ev, counts_msg + ", no duplicated audio across folds")


def _hidden_speakers(view: View, ev: dict) -> float | None:
    """Score drop when near-duplicate clusters are held out instead of the given groups (or None)."""
    from scipy.spatial.distance import pdist, squareform

    screen = view.screen
    n = len(view.y)
    rng = np.random.default_rng(view.seed)
    sub = np.sort(rng.choice(n, MAX_NEIGHBOUR_ITEMS, replace=False)) if n > MAX_NEIGHBOUR_ITEMS else np.arange(n)

    def nn_ratio(X: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        D = squareform(pdist(X))
        np.fill_diagonal(D, np.inf)
        d1 = D.min(axis=1)
        np.fill_diagonal(D, np.nan)
        med = np.nanmedian(D, axis=1)
        ok = med > 0
        return (float(np.median(d1[ok] / med[ok])) if ok.any() else np.inf), D, d1, med

    best_rel, best = np.inf, None
    for layer in view.layers:
        X = screen.feats[(layer, "mean")][sub]
        ratio, D, d1, med = nn_ratio(X)
        # reference: the same values with each column shuffled on its own (no clusters left)
        ref = nn_ratio(np.column_stack([rng.permutation(c) for c in X.T]))[0]
        rel = ratio / ref if np.isfinite(ratio) and ref > 0 else np.inf
        if rel < best_rel:
            best_rel, best = rel, (ratio, ref, D, d1, med)
    if best is None:
        return None
    ratio, ref, best_D, best_d1, best_med = best
    ev["nearest_neighbour_ratio"] = ratio
    ev["nearest_neighbour_ratio_unclustered"] = ref
    if best_rel >= 0.7:
        return None
    from sklearn.cluster import AgglomerativeClustering

    D = np.nan_to_num(best_D, nan=0.0)
    tau = float(np.sqrt(np.median(best_d1) * np.median(best_med)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pseudo = AgglomerativeClustering(n_clusters=None, distance_threshold=tau, metric="precomputed",
                                         linkage="average").fit_predict(D)
    ev["cluster_groups"] = int(len(np.unique(pseudo)))
    ys, labels = view.y[sub], view.labels[sub]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            f_pseudo = make_folds(labels, pseudo.astype(str), view.cv, view.seed)
            f_given = make_folds(labels, view.groups[sub], view.cv, view.seed)
        except FoldError:
            return None
    X = screen.feats[screen.best][sub]
    given = oof_bacc(ys, lda_cv_predict(X, ys[None, :], f_given, view.k)[0], view.k)
    clus = oof_bacc(ys, lda_cv_predict(X, ys[None, :], f_pseudo, view.k)[0], view.k)
    ev["score_given_groups"], ev["score_cluster_groups"] = given, clus
    return given - clus
