"""The sweep engine on tiny fake stores: learnability, controls, caching, tables, nested headline."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from featstore.fakestore import write_fake_store
from probes import metrics as M
from probes.sweep import SweepError, nested_selection, parse_layers, run_sweep

FAST = dict(cv=3, n_jobs=1, progress=False, quiet=True, n_boot=200)
TINY = dict(n_speakers=24, items_per_speaker=6, num_layers=3, dim=8, informative_layers=(1,), cue_strength=2.5)


def _set_column(path, name, values):
    with h5py.File(path, "r+") as h5:
        h5["items"][name][...] = np.asarray(values, dtype=object)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("stores")
    good = write_fake_store(d / "fake.h5", seed=0, **TINY)
    # label-shuffled control: permute the speakers' labels (one label per speaker is kept)
    shuffled = d / "shuffled.h5"
    shutil.copy(good, shuffled)
    with h5py.File(shuffled, "r") as h5:
        labels = np.array([v.decode() for v in h5["items/label"][:]], dtype=object)
        groups = np.array([v.decode() for v in h5["items/group"][:]], dtype=object)
    spk = list(dict.fromkeys(groups))
    spk_label = {s: labels[groups == s][0] for s in spk}
    perm = np.random.default_rng(1).permutation(len(spk))
    new = {s: spk_label[spk[j]] for s, j in zip(spk, perm)}
    _set_column(shuffled, "label", [new[g] for g in groups])
    return {"good": good, "shuffled": shuffled, "dir": d}


@pytest.fixture(scope="module")
def good_sweep(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    res = run_sweep([stores["good"]], poolings=["mean", "max"], probes=["logreg"],
                    class_weights=["none", "balanced"], out_dir=out, label_map="Lateral:Disordered,Interdental:Disordered",
                    **FAST)
    return res


def test_learnable_store_beats_chance_and_finds_the_informative_layer(good_sweep):
    s = good_sweep.summary
    probes = s[~s["probe"].isin(["majority", "chance"])]
    best = probes.sort_values("balanced_accuracy_mean", ascending=False).iloc[0]
    assert best["layer"] == "1"
    assert best["balanced_accuracy_mean"] > 0.85
    assert best["chance_bacc"] < 0.45 and best["majority_bacc"] == pytest.approx(1 / 3)
    # an uninformative layer stays near chance
    l0 = probes[probes["layer"] == "0"]["balanced_accuracy_mean"]
    assert l0.max() < 0.6
    assert good_sweep.best["nested_bacc"] > 0.8
    assert good_sweep.best["nested_bacc"] <= good_sweep.best["naive_best"]["balanced_accuracy_mean"] + 1e-12


def test_label_shuffled_store_is_at_chance(stores, tmp_path):
    res = run_sweep([stores["shuffled"]], poolings=["mean", "max"], probes=["logreg"], class_weights=["balanced"],
                    out_dir=tmp_path, **FAST)
    assert abs(res.best["nested_bacc"] - 1 / 3) < 0.15
    assert res.best["nested_bacc"] < 0.5


def test_tables_have_the_documented_columns_and_baselines(good_sweep):
    f, s, p = good_sweep.folds, good_sweep.summary, good_sweep.predictions
    for col in ("store", "encoder", "layer", "scope", "pooling", "probe", "class_weight", "fold", "accuracy",
                "balanced_accuracy", "macro_f1", "roc_auc_ovr", "recall_Lateral", "recall_Normal",
                "recall_Interdental", "fit_seconds", "n_train", "n_test", "majority_bacc", "chance_bacc",
                "sensitivity", "specificity"):
        assert col in f.columns, col
    for col in ("balanced_accuracy_mean", "balanced_accuracy_std", "bacc_ci_low", "bacc_ci_high", "majority_bacc",
                "chance_bacc", "macro_f1_mean", "roc_auc_ovr_mean", "sensitivity_mean"):
        assert col in s.columns, col
    # 3 layers x 2 poolings x 1 probe x 2 weightings = 12 configs, x 3 folds; + 2 baselines x 3 folds
    assert len(s) == 12 + 2 and len(f) == 12 * 3 + 2 * 3
    assert set(s["probe"]) == {"logreg", "majority", "chance"}
    maj = s.loc[s["probe"] == "majority", "balanced_accuracy_mean"].item()
    assert (s["majority_bacc"] == maj).all()
    assert maj == pytest.approx(1 / 3)
    assert (s["bacc_ci_low"] <= s["bacc_oof"]).all() and (s["bacc_oof"] <= s["bacc_ci_high"]).all()
    # the OOF predictions reproduce the per-fold scores
    conf = s.loc[s["probe"] == "logreg"].iloc[0]["config"]
    sub = p[p["config"] == conf]
    classes = sorted(sub["label"].unique())
    for fold, g in sub.groupby("fold"):
        y = np.searchsorted(classes, g["label"])
        yp = np.searchsorted(classes, g["pred"])
        row = f[(f["config"] == conf) & (f["fold"] == fold)].iloc[0]
        assert M.balanced_accuracy(y, yp, 3) == pytest.approx(row["balanced_accuracy"])
    assert {"proba_Lateral", "proba_Normal", "proba_Interdental", "id", "group", "label", "pred"} <= set(p.columns)
    assert np.allclose(sub[["proba_Interdental", "proba_Lateral", "proba_Normal"]].sum(axis=1), 1, atol=1e-5)


def test_same_folds_for_every_configuration_and_no_shared_speaker(good_sweep):
    p = good_sweep.predictions
    per_id = p.groupby("id")["fold"].nunique()
    assert (per_id == 1).all()
    fold_of_speaker = p.groupby("group")["fold"].nunique()
    assert (fold_of_speaker == 1).all()  # a speaker's items are all in one test fold
    info = pd.read_csv(good_sweep.out_dir / "fold_info.csv")
    assert (info["speaker_overlap"] == 0).all()


def test_cached_rerun_is_identical_and_fits_nothing(stores, good_sweep, tmp_path):
    again = run_sweep([stores["good"]], poolings=["mean", "max"], probes=["logreg"], class_weights=["none", "balanced"],
                      out_dir=good_sweep.out_dir, label_map="Lateral:Disordered,Interdental:Disordered", **FAST)
    assert again.n_fitted == 0 and again.n_cached == good_sweep.n_cells == 36
    pd.testing.assert_frame_equal(again.folds, good_sweep.folds)
    pd.testing.assert_frame_equal(again.summary, good_sweep.summary)
    assert again.best == good_sweep.best
    # a subset reuses the finished cells; a different setting (z-scoring) is a different cell
    shutil.copytree(good_sweep.out_dir / "cells", tmp_path / "cells")
    sub = run_sweep([stores["good"]], layers=[1], poolings=["max"], probes=["logreg"], class_weights=["none"],
                    out_dir=tmp_path, **FAST)
    assert sub.n_fitted == 0 and sub.n_cells == 3
    z = run_sweep([stores["good"]], layers=[1], poolings=["max"], probes=["logreg"], class_weights=["none"],
                  out_dir=tmp_path, speaker_zscore=True, **FAST)
    assert z.n_fitted == 3
    assert not np.allclose(z.folds["balanced_accuracy"], sub.folds["balanced_accuracy"])


def test_parallel_run_equals_sequential(stores, good_sweep, tmp_path):
    par = run_sweep([stores["good"]], layers=[1], poolings=["max"], probes=["logreg"], class_weights=["none", "balanced"],
                    out_dir=tmp_path, label_map="Lateral:Disordered,Interdental:Disordered", **{**FAST, "n_jobs": 2})
    assert par.n_fitted == 6
    seq = good_sweep.folds
    cols = ["config", "fold", "balanced_accuracy", "macro_f1", "roc_auc_ovr"]
    a = par.folds[par.folds["probe"] == "logreg"][cols].reset_index(drop=True)
    b = seq[seq["config"].isin(a["config"])][cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_logreg_cells_equal_plain_sklearn_on_the_same_folds(stores, good_sweep):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import cross_validate
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import featstore
    from probes.cv import make_folds
    from probes.pooling import pooled_matrix

    with featstore.open(stores["good"]) as st:
        x = pooled_matrix(st, 1, "max", "clip", cache=False)
        y = st.column("label").astype(str)
        g = st.column("group")
    folds = make_folds(y, g, 3, seed=0)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    cvres = cross_validate(pipe, x, y, cv=folds, scoring="balanced_accuracy")
    f = good_sweep.folds
    ours = f[f["config"] == "fake|L1|clip|max|logreg|none"].sort_values("fold")["balanced_accuracy"].to_numpy()
    assert np.allclose(ours, cvres["test_score"], atol=1e-9)
    assert balanced_accuracy_score is not None


def test_unlabelled_and_failed_items_are_skipped_with_a_note(stores, tmp_path):
    path = tmp_path / "holes.h5"
    shutil.copy(stores["good"], path)
    with h5py.File(path, "r") as h5:
        labels = [v.decode() for v in h5["items/label"][:]]
        status = [v.decode() for v in h5["items/status"][:]]
    labels[:5] = [""] * 5
    status[10:13] = ["decode_error"] * 3
    _set_column(path, "label", labels)
    _set_column(path, "status", status)
    res = run_sweep([path], layers=[1], poolings=["max"], probes=["logreg"], class_weights=["none"],
                    out_dir=tmp_path / "out", **FAST)
    assert "holes: using 136 of 144 items (skipped 5 unlabelled, 3 with status != ok)" in res.notes
    ids = set(res.predictions["id"])
    assert len(ids) == 136 and "spk000_000" not in ids and "spk001_004" not in ids
    assert (res.summary["n_items"] == 136).all()


def test_two_stores_in_one_table(stores, tmp_path):
    other = write_fake_store(tmp_path / "other.h5", seed=0, **{**TINY, "dim": 12, "informative_layers": (2,)})
    res = run_sweep([stores["good"], other], poolings=["max"], probes=["logreg"], class_weights=["none"],
                    out_dir=tmp_path / "out", **FAST)
    s = res.summary
    assert set(s["store"]) == {"fake", "other"}
    assert set(s.loc[s["probe"] == "majority", "store"]) == {"fake", "other"}
    best = s[s["probe"] == "logreg"].sort_values("balanced_accuracy_mean").groupby("store").tail(1)
    assert dict(zip(best["store"], best["layer"])) == {"fake": "1", "other": "2"}
    # same items, labels and speakers -> the same folds in both stores
    p = res.predictions
    fa = p[p["store"] == "fake"].groupby("id")["fold"].first()
    fo = p[p["store"] == "other"].groupby("id")["fold"].first()
    assert fa.equals(fo.loc[fa.index])
    assert set(res.best["per_store"]) == {"fake", "other"}
    assert res.out_dir == tmp_path / "out"


def test_self_pooling_probes_get_their_own_rows(stores, tmp_path):
    params = {"attn-mlp": {"epochs": 3, "hidden": 8}, "weighted-layers": {"epochs": 3, "hidden": 0}}
    res = run_sweep([stores["good"]], layers=[1, 2], poolings=["mean", "max"], probes=["attn-mlp", "weighted-layers"],
                    class_weights=["none"], out_dir=tmp_path, probe_params=params, **FAST)
    s = res.summary[~res.summary["probe"].isin(["majority", "chance"])]
    got = sorted(zip(s["probe"], s["layer"], s["pooling"]))
    assert got == [("attn-mlp", "1", "attention"), ("attn-mlp", "2", "attention"), ("weighted-layers", "all", "mean")]
    assert res.n_cells == 9


def test_nested_selection_on_a_hand_made_table():
    rows = []
    scores = {"A": [0.9, 0.5, 0.5], "B": [0.6, 0.6, 0.6], "C": [0.4, 0.8, 0.4]}
    for conf, vals in scores.items():
        rows += [{"config": conf, "fold": f, "balanced_accuracy": v} for f, v in enumerate(vals)]
    res = nested_selection(pd.DataFrame(rows))
    # fold 0: others' means A .5, B .6, C .6 -> B (tie broken by name) scores .6
    # fold 1: A .7, B .6, C .4 -> A scores .5; fold 2: A .7, B .6, C .6 -> A scores .5
    assert [p["config"] for p in res["folds"]] == ["B", "A", "A"]
    assert res["nested_bacc"] == pytest.approx((0.6 + 0.5 + 0.5) / 3)
    naive = max(np.mean(v) for v in scores.values())
    assert res["nested_bacc"] < naive


def test_bad_inputs_raise_clear_errors(stores, tmp_path):
    with pytest.raises(SweepError, match="unknown pooling 'median'"):
        run_sweep([stores["good"]], poolings=["median"], out_dir=tmp_path, **FAST)
    with pytest.raises(SweepError, match="no store at"):
        run_sweep([tmp_path / "missing.h5"], out_dir=tmp_path, **FAST)
    with pytest.raises(SweepError, match="has none of the layers 7,8"):
        run_sweep([stores["good"]], layers=[7, 8], out_dir=tmp_path, **FAST)
    with pytest.raises(SweepError, match="label map names 'Lisp'"):
        run_sweep([stores["good"]], layers=[1], probes=["logreg"], label_map="Lisp:X", out_dir=tmp_path, **FAST)
    assert parse_layers("0-3,6") == [0, 1, 2, 3, 6]
    assert parse_layers("0-2,all") is None
    with pytest.raises(SweepError, match="bad layer spec 'a'"):
        parse_layers("0,a")
    with pytest.raises(SweepError, match="bad layer range '5-2'"):
        parse_layers("5-2")


def test_outputs_on_disk(good_sweep):
    out = good_sweep.out_dir
    for name in ("folds.csv", "summary.csv", "predictions.csv", "best.json", "fold_info.csv", "sweep.json"):
        assert (out / name).exists(), name
    best = json.loads((out / "best.json").read_text())
    assert best["nested_bacc"] == pytest.approx(good_sweep.best["nested_bacc"])
    assert len(best["nested_folds"]) == 3
    assert len(list((out / "cells").glob("*.json"))) == 36
    disk = pd.read_csv(out / "summary.csv", dtype={"layer": str})
    assert np.allclose(disk["balanced_accuracy_mean"], good_sweep.summary["balanced_accuracy_mean"])
