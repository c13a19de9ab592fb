"""Folds (speaker-grouped, reproducible) and the metrics/baselines of probes.metrics."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from probes import metrics as M
from featstore.cv import (FoldError, FoldWarning, NoGroupsWarning, cca_folds, describe_folds, fit_groups, fold_ids,
                          make_folds, nested_folds)


def _data(n_speakers=24, per=5, seed=0):
    rng = np.random.default_rng(seed)
    spk_label = np.array(["A", "B", "C"])[rng.integers(0, 3, n_speakers)]
    spk_label[:6] = ["A", "A", "B", "B", "C", "C"]
    groups = np.repeat([f"s{i}" for i in range(n_speakers)], per)
    labels = np.repeat(spk_label, per)
    return labels, groups


def test_folds_never_share_a_speaker_and_cover_every_item():
    labels, groups = _data()
    folds = make_folds(labels, groups, n_splits=3, seed=0)
    assert len(folds) == 3
    for tr, te in folds:
        assert not set(groups[tr]) & set(groups[te])
        assert len(tr) + len(te) == len(labels)
    assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(len(labels)))
    info = describe_folds(folds, labels, groups)
    assert info["speaker_overlap"].tolist() == [0, 0, 0]
    assert info["n_test"].sum() == len(labels)
    assert {"train_A", "test_C"} <= set(info.columns)
    assert (fold_ids(folds, len(labels)) >= 0).all()


def test_folds_are_reproducible_and_seed_dependent():
    labels, groups = _data()
    a = make_folds(labels, groups, 3, seed=0)
    b = make_folds(labels, groups, 3, seed=0)
    c = make_folds(labels, groups, 3, seed=1)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(np.array_equal(x[1], y[1]) for x, y in zip(a, c))


def test_no_groups_warns_and_stratifies():
    labels, _ = _data()
    with pytest.warns(NoGroupsWarning, match="no speaker groups"):
        folds = make_folds(labels, [""] * len(labels), 3)
    assert len(folds) == 3
    for _, te in folds:  # stratified: every class in every test fold
        assert set(labels[te]) == {"A", "B", "C"}
    with pytest.warns(NoGroupsWarning):
        make_folds(labels, None, 3)


def test_too_few_speakers_per_class_reduces_folds_or_fails():
    labels = np.array(["A"] * 10 + ["B"] * 6)
    groups = np.array([f"a{i}" for i in range(10)] + ["b0", "b0", "b1", "b1", "b2", "b2"])
    with pytest.warns(FoldWarning, match="class 'B' has only 3 speakers: using 3 folds instead of 5"):
        folds = make_folds(labels, groups, 5)
    assert len(folds) == 3
    with pytest.raises(FoldError, match="class 'B' has only 1 speaker"):
        make_folds(labels, np.array([f"a{i}" for i in range(10)] + ["b0"] * 6), 3)
    with pytest.raises(FoldError, match="only one class"):
        make_folds(["A"] * 6, [f"s{i}" for i in range(6)], 3)


def test_missing_groups_become_singletons():
    labels, groups = _data()
    groups = groups.astype(object)
    groups[:3] = ""
    with pytest.warns(FoldWarning, match="3 items have no speaker group"):
        folds = make_folds(labels, groups, 3)
    for tr, te in folds:
        assert not (set(groups[tr]) - {""}) & (set(groups[te]) - {""})


def test_fold_metrics_match_sklearn_and_handle_missing_classes():
    y = np.array([0, 0, 1, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 0, 2])
    proba = np.eye(3)[p] * 0.8 + 0.2 / 3
    m = M.fold_metrics(y, p, proba, ["a", "b", "c"])
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    assert m["recall_b"] == pytest.approx(2 / 3)
    # class c missing from the test fold: recall NaN, AUC from the classes present
    y2, p2 = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    m2 = M.fold_metrics(y2, p2, np.eye(3)[p2], ["a", "b", "c"])
    assert np.isnan(m2["recall_c"])
    assert m2["balanced_accuracy"] == pytest.approx(0.75)
    assert 0 < m2["roc_auc_ovr"] <= 1
    assert np.isnan(M.roc_auc_ovr(np.array([1, 1]), np.eye(3)[[1, 1]]))
    assert M.confusion(y, p, 3).tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]


def test_baselines_on_hand_made_case():
    y_train = np.array([0] * 6 + [1] * 3 + [2] * 1)
    y_test = np.array([0, 0, 1, 1, 2, 2])
    pred, proba = M.majority_baseline(y_train, len(y_test), 3)
    assert pred.tolist() == [0] * 6
    assert np.allclose(proba[0], [0.6, 0.3, 0.1])
    m = M.fold_metrics(y_test, pred, proba, ["a", "b", "c"])
    assert m["balanced_accuracy"] == pytest.approx(1 / 3)
    assert m["roc_auc_ovr"] == pytest.approx(0.5)
    # chance: expected bacc = mean prior of the test classes = (0.6 + 0.3 + 0.1) / 3
    y_test_big = np.repeat([0, 1, 2], 400)
    c, draws = M.chance_baseline(y_train, y_test_big, ["a", "b", "c"], n_draws=10, seed=0)
    assert draws.shape == (10, 1200)
    assert c["balanced_accuracy"] == pytest.approx(1 / 3, abs=0.02)
    assert c["recall_a"] == pytest.approx(0.6, abs=0.03)
    assert c["roc_auc_ovr"] == pytest.approx(0.5)


def test_bootstrap_ci_resamples_speakers():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 5).astype(str)
    y = np.repeat(rng.integers(0, 2, 40), 5)
    good = np.where(rng.random(len(y)) < 0.8, y, 1 - y)
    lo, hi = M.bootstrap_ci(y, good, groups, 2, n_boot=500, seed=0)
    point = M.balanced_accuracy(y, good, 2)
    assert lo < point < hi and hi - lo < 0.3
    assert (lo, hi) == M.bootstrap_ci(y, good, groups, 2, n_boot=500, seed=0)
    # all items of one speaker wrong together -> wider interval than items wrong independently
    per_spk_wrong = np.repeat(rng.random(40) < 0.2, 5)
    clustered = np.where(per_spk_wrong, 1 - y, y)
    lo2, hi2 = M.bootstrap_ci(y, clustered, groups, 2, n_boot=500, seed=0)
    lo3, hi3 = M.bootstrap_ci(y, clustered, np.arange(len(y)).astype(str), 2, n_boot=500, seed=0)
    assert hi2 - lo2 > hi3 - lo3


def test_label_map_sensitivity_specificity():
    classes = ["Interdental", "Lateral", "Normal"]
    lm = M.parse_label_map("Lateral:Disordered, Interdental:Disordered")
    assert lm == {"Lateral": "Disordered", "Interdental": "Disordered"}
    pos, neg, is_pos = M.binary_split(lm, classes)
    assert (pos, neg, is_pos.tolist()) == ("Disordered", "Normal", [True, True, False])
    y = np.array([0, 1, 1, 2, 2, 2])
    p = np.array([1, 1, 2, 2, 2, 0])  # Interdental->Lateral still counts as detected
    proba = np.eye(3)[p]
    b = M.binary_metrics(y, p, proba, is_pos)
    assert b["sensitivity"] == pytest.approx(2 / 3)
    assert b["specificity"] == pytest.approx(2 / 3)
    assert b["binary_bacc"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="names 'Lisp', which is not a label"):
        M.binary_split({"Lisp": "Disordered"}, classes)
    with pytest.raises(ValueError, match="two classes"):
        M.binary_split({"Lateral": "X"}, classes)
    with pytest.raises(ValueError, match="bad label map entry 'Lateral'"):
        M.parse_label_map("Lateral")


def test_no_warnings_from_grouped_folds():
    labels, groups = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_folds(labels, groups, 3)


def test_fast_metrics_equal_sklearn_on_random_data():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    for _ in range(20):
        y = rng.integers(0, 4, 50)
        p = rng.integers(0, 4, 50)
        proba = rng.dirichlet(np.ones(4), 50)
        m = M.fold_metrics(y, p, proba, list("abcd"))
        assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
        assert m["roc_auc_ovr"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", labels=[0, 1, 2, 3]))
        tied = proba[:, 0].round(1)  # ties
        assert M.binary_auc(y == 0, tied) == pytest.approx(roc_auc_score(y == 0, tied))


def test_cca_folds_grouped_and_within():
    g = np.repeat(np.arange(12), 5)
    f = cca_folds(g, 5, seed=0)
    for s in range(12):  # a speaker sits in one fold
        assert len(set(f[g == s])) == 1
    assert sorted(np.bincount(f)) == [10, 10, 10, 15, 15]
    fw = cca_folds(g, 5, seed=0, within=True)
    for s in range(12):  # each speaker's 5 items are spread over the 5 folds
        assert sorted(fw[g == s]) == [0, 1, 2, 3, 4]
    g2, units = np.repeat(np.arange(10), 6), np.repeat(np.arange(30), 2)  # frames: 2 rows per item
    fu = cca_folds(g2, 3, seed=0, within=True, units=units)
    assert (fu[::2] == fu[1::2]).all()  # an item's frames stay together
    for s in range(10):  # each speaker's 3 items go to 3 folds
        assert sorted(fu[g2 == s][::2]) == [0, 1, 2]
    with pytest.raises(ValueError, match="held-out CCA needs at least 2 groups, got 1"):
        cca_folds(np.zeros(10), 5)
