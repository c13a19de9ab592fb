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
from probes.selection import other_folds_selection
from probes.sweep import SweepError, parse_layers, run_sweep

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
    assert good_sweep.best["headline_method"] == "nested" and good_sweep.best["nested_bacc"] > 0.8
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
    # 12 configurations x 3 outer folds + 12 x 3 x 3 inner folds of the nested headline
    assert again.n_fitted == 0 and again.n_cached == good_sweep.n_cells == 36 + 108
    pd.testing.assert_frame_equal(again.folds, good_sweep.folds)
    pd.testing.assert_frame_equal(again.summary, good_sweep.summary)
    assert again.best == good_sweep.best
    # a subset reuses the finished cells; a different setting (z-scoring) is a different cell
    shutil.copytree(good_sweep.out_dir / "cells", tmp_path / "cells")
    sub = run_sweep([stores["good"]], layers=[1], poolings=["max"], probes=["logreg"], class_weights=["none"],
                    out_dir=tmp_path, **FAST)
    assert sub.n_fitted == 0 and sub.n_cells == 3 + 9
    z = run_sweep([stores["good"]], layers=[1], poolings=["max"], probes=["logreg"], class_weights=["none"],
                  out_dir=tmp_path, speaker_zscore=True, **FAST)
    assert z.n_fitted == 3 + 9
    assert not np.allclose(z.folds["balanced_accuracy"], sub.folds["balanced_accuracy"])


def test_parallel_run_equals_sequential(stores, good_sweep, tmp_path):
    par = run_sweep([stores["good"]], layers=[1], poolings=["max"], probes=["logreg"], class_weights=["none", "balanced"],
                    out_dir=tmp_path, label_map="Lateral:Disordered,Interdental:Disordered", **{**FAST, "n_jobs": 2})
    assert par.n_fitted == 6 + 18
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
    from featstore.cv import make_folds
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
    assert res.n_cells == 9 + 27


def test_other_folds_selection_on_a_hand_made_table():
    rows = []
    scores = {"A": [0.9, 0.5, 0.5], "B": [0.6, 0.6, 0.6], "C": [0.4, 0.8, 0.4]}
    for conf, vals in scores.items():
        rows += [{"config": conf, "fold": f, "balanced_accuracy": v} for f, v in enumerate(vals)]
    res = other_folds_selection(pd.DataFrame(rows))
    # fold 0: others' means A .5, B .6, C .6 -> B (tie broken by name) scores .6
    # fold 1: A .7, B .6, C .4 -> A scores .5; fold 2: A .7, B .6, C .6 -> A scores .5
    assert [p["config"] for p in res["folds"]] == ["B", "A", "A"]
    assert res["bacc"] == pytest.approx((0.6 + 0.5 + 0.5) / 3) and res["method"] == "other-folds"
    naive = max(np.mean(v) for v in scores.values())
    assert res["bacc"] < naive


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
    assert len(best["headline"]["folds"]) == 3 and best["headline"]["inner_cv"] == 3
    assert len(list((out / "cells").glob("*.json"))) == 36 + 108
    inner = pd.read_csv(out / "inner_folds.csv")
    assert len(inner) == 108 and set(inner["fold"]) == {0, 1, 2} and set(inner["inner_fold"]) == {0, 1, 2}
    disk = pd.read_csv(out / "summary.csv", dtype={"layer": str})
    assert np.allclose(disk["balanced_accuracy_mean"], good_sweep.summary["balanced_accuracy_mean"])


# -- the headline: true nested CV never sees the scored fold ----------------------------------------
def _corrupt_fold(src, dst, ids, scale=50.0, seed=0):
    """Copy ``src`` to ``dst`` with the frames of items ``ids`` replaced by loud noise (every layer)."""
    shutil.copy(src, dst)
    rng = np.random.default_rng(seed)
    with h5py.File(dst, "r+") as h5:
        all_ids = np.array([v.decode() for v in h5["items/id"][:]], dtype=object)
        off, n = h5["items/offset"][:], h5["items/num_frames"][:]
        for name in h5["layers"]:
            data = h5["layers"][name][:]
            for i in np.flatnonzero(np.isin(all_ids, list(ids))):
                data[off[i]:off[i] + n[i]] = scale * rng.normal(size=(n[i], data.shape[1]))
            h5["layers"][name][...] = data


def test_nested_selection_is_blind_to_the_scored_fold_and_other_folds_is_not(stores, tmp_path):
    """Corrupting only outer fold 0's items leaves fold 0's nested choice and inner scores exactly
    as they were (they come from fold 0's training speakers), while the not-nested selection's
    scores for fold 0 move (they come from models trained with fold 0's items)."""
    kw = dict(poolings=["mean", "max"], probes=["logreg"], class_weights=["none"], nested="all", **FAST)
    clean = run_sweep([stores["good"]], out_dir=tmp_path / "clean", **kw)
    test0 = set(clean.predictions.loc[clean.predictions["fold"] == 0, "id"])
    bad = tmp_path / "fake.h5"  # same stem: same configuration keys
    _corrupt_fold(stores["good"], bad, test0)
    dirty = run_sweep([bad], out_dir=tmp_path / "dirty", **kw)
    assert set(dirty.predictions.loc[dirty.predictions["fold"] == 0, "id"]) == test0  # same folds
    n0, n1 = clean.best["headline"]["folds"][0], dirty.best["headline"]["folds"][0]
    assert clean.best["headline_method"] == dirty.best["headline_method"] == "nested"
    assert (n0["config"], n0["selection_score"]) == (n1["config"], n1["selection_score"])
    cols = ["config", "fold", "inner_fold", "n_train", "n_test", "balanced_accuracy"]
    a = clean.inner.loc[clean.inner["fold"] == 0, cols].reset_index(drop=True)
    b = dirty.inner.loc[dirty.inner["fold"] == 0, cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert n1["score"] < n0["score"] - 0.2  # fold 0 itself is ruined: its score drops
    o0, o1 = clean.best["other_folds"]["folds"][0], dirty.best["other_folds"]["folds"][0]
    assert abs(o0["selection_score"] - o1["selection_score"]) > 0.05  # the other folds saw fold 0 ...
    assert o0["config"] == n0["config"] and o1["config"] != n1["config"]  # ... and it changes the choice


def test_nested_inner_fits_use_only_the_outer_training_part(stores, tmp_path, monkeypatch):
    """Every fit behind fold f's nested choice trains and tests on f's training items only; the
    not-nested selection's fits for fold f all trained on f's test items."""
    import probes.sweep as sw

    calls = []
    real = sw.fit_cell

    def spy(x, y, train, test, *args, **kwargs):
        calls.append((np.asarray(train).copy(), np.asarray(test).copy()))
        return real(x, y, train, test, *args, **kwargs)

    monkeypatch.setattr(sw, "fit_cell", spy)
    res = run_sweep([stores["good"]], layers=[0, 1], poolings=["mean"], probes=["logreg"], class_weights=["none"],
                    out_dir=tmp_path, nested="all", **FAST)
    from featstore.cv import make_folds, nested_folds

    with h5py.File(stores["good"], "r") as h5:
        y = np.array([v.decode() for v in h5["items/label"][:]], dtype=object)
        g = np.array([v.decode() for v in h5["items/group"][:]], dtype=object)
    outer = make_folds(y, g, 3, 0)
    inner = nested_folds(outer, y, g, 3, 0)
    seen = {(tuple(tr), tuple(te)) for tr, te in calls}
    assert len(calls) == 2 * 3 + 2 * 3 * 3
    for f, (tr_f, te_f) in enumerate(outer):
        for itr, ite in inner[f]:
            assert (tuple(itr), tuple(ite)) in seen  # these fits chose fold f's configuration
            assert set(itr) | set(ite) <= set(tr_f) and not (set(itr) | set(ite)) & set(te_f)
        for g_, (tr_g, _) in enumerate(outer):
            if g_ != f:
                assert set(te_f) <= set(tr_g)  # what the not-nested selection for fold f relies on
    assert res.best["headline"]["inner_cv"] == 3 and len(res.inner) == 2 * 3 * 3


def test_auto_nested_covers_logreg_only_on_large_grids(stores, tmp_path, monkeypatch):
    import probes.sweep as sw

    monkeypatch.setattr(sw, "NESTED_BUDGET", 10)
    res = run_sweep([stores["good"]], layers=[1], poolings=["max"], probes=["logreg", "xgb"],
                    class_weights=["none"], out_dir=tmp_path, probe_params={"xgb": {"n_estimators": 5}}, **FAST)
    h = res.best["headline"]
    assert h["method"] == "nested" and h["probes"] == ["logreg"] and h["n_configs"] == 1
    assert "the logreg ones of 2" in h["description"] and set(res.inner["probe"]) == {"logreg"}
    off = run_sweep([stores["good"]], layers=[1], poolings=["max"], probes=["logreg"], class_weights=["none"],
                    out_dir=tmp_path / "off", nested="off", **FAST)
    assert off.best["headline_method"] == "other-folds" and "nested_bacc" not in off.best
    assert "not nested" in off.best["headline"]["description"] and off.inner.empty


def test_stores_with_different_folds_get_no_shared_headline(stores, tmp_path):
    fewer = tmp_path / "fewer.h5"
    shutil.copy(stores["good"], fewer)
    with h5py.File(fewer, "r") as h5:
        status = np.array([v.decode() for v in h5["items/status"][:]], dtype=object)
    status[:12] = "decode_error"  # two speakers fewer: other folds
    _set_column(fewer, "status", status)
    res = run_sweep([stores["good"], fewer], layers=[1], poolings=["max"], probes=["logreg"], class_weights=["none"],
                    out_dir=tmp_path / "out", **FAST)
    assert "headline" not in res.best and "nested_bacc" not in res.best
    assert "different folds" in res.best["headline_note"]
    for name in ("fake", "fewer"):
        h = res.best["per_store"][name]["headline"]
        assert h["method"] == "nested" and {f["config"].split("|")[0] for f in h["folds"]} == {name}
    same = run_sweep([stores["good"], stores["shuffled"]], layers=[1], poolings=["max"], probes=["logreg"],
                     class_weights=["none"], out_dir=tmp_path / "same", **FAST)
    # shuffled labels: other labels -> other folds, so again no headline across the stores
    assert "headline" not in same.best
    twin = tmp_path / "twin.h5"
    shutil.copy(stores["good"], twin)
    both = run_sweep([stores["good"], twin], layers=[0, 1], poolings=["max"], probes=["logreg"],
                     class_weights=["none"], out_dir=tmp_path / "both", **FAST)
    assert both.best["headline"]["stores"] == ["fake", "twin"] and both.best["headline"]["n_configs"] == 4


# -- versioned cells -------------------------------------------------------------------------------
def test_cells_refit_when_versions_or_estimator_defaults_change(stores, tmp_path, monkeypatch):
    import probes.cache as pc
    import probes.estimators as est
    kw = dict(layers=[1], poolings=["max"], probes=["logreg"], class_weights=["none"], nested="off",
              out_dir=tmp_path, **FAST)
    first = run_sweep([stores["good"]], **kw)
    assert first.n_fitted == 3 and run_sweep([stores["good"]], **kw).n_fitted == 0
    real = pc.library_versions()
    for lib in ("featstore", "scikit-learn", "xgboost", "torch", "numpy"):
        monkeypatch.setattr(pc, "library_versions", lambda lib=lib: {**real, lib: "99.0"})
        assert run_sweep([stores["good"]], **kw).n_fitted == 3, lib
    monkeypatch.setattr(pc, "library_versions", lambda: real)
    assert run_sweep([stores["good"]], **kw).n_fitted == 0
    defaults = est.LogRegProbe.__init__.__defaults__
    monkeypatch.setattr(est.LogRegProbe.__init__, "__defaults__", (1.0, None, 500, 0))  # max_iter 2000 -> 500
    assert run_sweep([stores["good"]], **kw).n_fitted == 3
    monkeypatch.setattr(est.LogRegProbe.__init__, "__defaults__", defaults)
    assert run_sweep([stores["good"]], **kw).n_fitted == 0


def test_sweep_never_writes_the_store(stores, tmp_path, monkeypatch):
    """The store's bytes stay the same; pooled vectors go beside it, or to the user cache folder when
    its folder is unwritable (failure injected, so this holds for root too); a reader may hold it."""
    import hashlib
    from pathlib import Path

    from probes.cache import sidecar_dir

    path = tmp_path / "fake.h5"
    shutil.copy(stores["good"], path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    reader = h5py.File(path, "r")  # another reader holds the file open during the sweep
    try:
        kw = dict(layers=[1], poolings=["mean", "max"], probes=["logreg"], class_weights=["none"], nested="off", **FAST)
        res = run_sweep([path], out_dir=tmp_path / "a", **kw)
        assert reader["items/id"].shape == (144,)
    finally:
        reader.close()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert len(list(sidecar_dir(path).glob("*/*.npy"))) == 2
    shutil.rmtree(sidecar_dir(path))
    monkeypatch.setenv("FEATSTORE_CACHE_DIR", str(tmp_path / "user"))
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == sidecar_dir(path) or sidecar_dir(path) in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    again = run_sweep([path], out_dir=tmp_path / "b", **kw)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest and not sidecar_dir(path).exists()
    assert len(list((tmp_path / "user").glob("pooled/*/*.npy"))) == 2
    cols = [c for c in res.summary.columns if not c.startswith("fit_")]
    pd.testing.assert_frame_equal(again.summary[cols], res.summary[cols])


def test_too_few_speakers_for_grouped_inner_folds_is_said(tmp_path):
    """Two speakers per class: an outer training part holds one speaker per class, so its inner
    folds cannot be speaker-grouped; the sweep says so (the headline is still nested)."""
    path = write_fake_store(tmp_path / "few.h5", n_speakers=6, items_per_speaker=6, num_layers=2, dim=4,
                            informative_layers=(1,), class_probs=(1, 1, 1), seed=2)
    with h5py.File(path, "r") as h5:
        g = [v.decode() for v in h5["items/group"][:]]
        y = [v.decode() for v in h5["items/label"][:]]
    assert all(len({s for s, l in zip(g, y) if l == c}) == 2 for c in set(y))
    res = run_sweep([path], poolings=["mean"], probes=["logreg"], class_weights=["none"], out_dir=tmp_path / "o",
                    **{**FAST, "cv": 2})
    assert any("not grouped by speaker" in n for n in res.notes)
    assert res.best["headline_method"] == "nested"


def test_controls_are_compared_but_never_the_cross_store_headline(tmp_path):
    """A random-init control (or a padded-recipe store) of the same items sits beside the trained
    store in every table, but the headline across stores is chosen among trained, exact stores
    only: a control that happens to score higher must not become the reported finding."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from labelled_stores import CONTROL, write_store

    trained = write_store(tmp_path / "trained.h5", [0, 1], cue={0: 0.0, 1: 0.05}, seed=1)
    control = write_store(tmp_path / "control.h5", [0, 1], attrs=CONTROL, cue={0: 2.0, 1: 2.0}, seed=1)
    res = run_sweep([trained, control], layers=[0, 1], poolings=["mean"], probes=["logreg"], class_weights=["none"],
                    out_dir=tmp_path / "out", **FAST)
    per = res.best["per_store"]
    assert per["control"]["naive_best_bacc"] > per["trained"]["naive_best_bacc"] + 0.2  # the control does win
    assert res.best["headline"]["stores"] == ["trained"]
    assert {f["config"].split("|")[0] for f in res.best["headline"]["folds"]} == {"trained"}
    assert res.best["headline_excludes"] == ["control"]


def test_stores_that_differ_only_in_frames_never_share_cached_results(tmp_path):
    """Two stores with identical attributes and items table but different frames (two fake stores
    made at the same instant, or a control labelled only by an attribute) must get different
    identities: the pooled cache and the sweep cells are keyed by it. Before the fix the identity
    read a fixed list of attributes, the items table and the layer shapes only, and the second
    store was scored with the first one's cached cells."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from labelled_stores import write_store

    import featstore

    weak = write_store(tmp_path / "a" / "weak.h5", [0], cue={0: 0.0}, seed=1)
    strong = write_store(tmp_path / "b" / "strong.h5", [0], cue={0: 2.0}, seed=1)
    with featstore.open(weak) as a, featstore.open(strong) as b:
        assert a.attrs == b.attrs and a.items.equals(b.items)
        assert a.identity() != b.identity()
    kw = dict(layers=[0], poolings=["mean"], probes=["logreg"], class_weights=["none"], nested="off", **FAST)
    res = run_sweep([weak, strong], out_dir=tmp_path / "out", **kw)
    per = res.best["per_store"]
    assert per["strong"]["naive_best_bacc"] > per["weak"]["naive_best_bacc"] + 0.3


def test_a_store_that_is_still_a_partial_run_is_named_as_such(tmp_path):
    from probes.sweep import SweepConfig, SweepError

    out = tmp_path / "run.h5"
    (tmp_path / "run.h5.partial").mkdir()
    with pytest.raises(SweepError, match=r"run\.h5 is not finished: .*run\.h5\.partial holds an interrupted run"):
        SweepConfig(stores=[out])
    with pytest.raises(SweepError, match=r"no store at .*nothing\.h5"):
        SweepConfig(stores=[tmp_path / "nothing.h5"])
